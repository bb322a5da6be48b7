"""The OTA benchmark runs and prints its rows (no timing asserts: figures go to the docs)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def test_the_ota_benchmark_prints_every_row() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.esphome_ota", "--mib", "0.2", "--rounds", "1", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 50)
    assert proc.returncode == 0, err.decode()[-2000:]
    text = out.decode()
    assert "ESPHome OTA, 209,715 bytes over loopback" in text
    rows = ["raw asyncio sender", "raw asyncio espota2, window 1"]
    rows += [f"keeplink EsphomeOta, window {w}" for w in (1, 2, 8)]
    for row in rows:
        found = re.search(rf"{row} +[\d.]+ MB/s +[\d.]+x of raw +[\d.]+x of espota2 by hand", text)
        assert found, f"{row!r} in:\n{text}"
    wake = re.search(
        r"wake to flash, 64 KiB: first block p50 ([\d.]+) ms \(max [\d.]+\), "
        r"done p50 ([\d.]+) ms \(max [\d.]+\), 1 rounds",
        text,
    )
    assert wake, text
    assert float(wake.group(1)) <= float(wake.group(2))
