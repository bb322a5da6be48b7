"""Shared by the benchmarks: a simulator in its own process, and process measurements."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class SimProcess:
    proc: asyncio.subprocess.Process
    port: int

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def start_sim(*args: str, port: int = 0) -> SimProcess:
    """`keeplink sim` in a child process, so the client side is what gets measured."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeplink", "sim", "--port", str(port), *args,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    found = re.search(r":(\d+)$", line.strip())
    if found is None:
        raise RuntimeError(f"simulator did not start: {line!r}")
    return SimProcess(proc, int(found.group(1)))


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def machine() -> str:
    return f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
