"""The command line, run as a user would: a real subprocess."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from keeplink import Link
from keeplink.drivers import JsonLineDriver


async def run(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeplink", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_demo_shows_each_device_in_its_expected_state_within_30_s(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeplink", "demo", "--port", "0", "--duration", "40",
        "--store", f"sqlite:///{tmp_path}/demo.db",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        url = None
        async with asyncio.timeout(15):
            while url is None:
                line = (await proc.stdout.readline()).decode()
                assert line, "the demo exited early"
                found = re.search(r"dashboard (http://127\.0\.0\.1:\d+)/", line)
                url = found.group(1) if found else None
        seen: dict[str, set[str]] = {}
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                async with http.get(f"{url}/api/devices") as response:
                    devices = {d["id"]: d for d in (await response.json())["devices"]}
                for name, device in devices.items():
                    seen.setdefault(name, set()).add(device["link"]["state"])
                async with http.get(f"{url}/api/commands?device=sleepy") as response:
                    commands = (await response.json())["commands"]
                locked = devices["locked"]["link"]
                if (
                    devices["healthy"]["link"]["state"] == "connected"
                    and locked["state"] == "failed"
                    and (locked["last_error"] or {}).get("code") == "auth_failed"
                    and devices["flaky"]["link"]["connects"] >= 1
                    and {"connected", "backoff"} <= seen["sleepy"]
                    and commands
                    and commands[0]["state"] == "succeeded"  # queued until sleepy woke
                ):
                    break
                await asyncio.sleep(0.25)  # polling a live daemon, not a timing rule
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert "summary:" in out.decode()


@pytest.mark.parametrize("flags", [[], ["-v"]], ids=["plain", "verbose"])
async def test_sim_subcommand_serves_a_device_a_link_can_reach(flags: list[str]) -> None:
    """``keeplink sim``, and ``keeplink -v sim`` (the global flag first) logs at DEBUG."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeplink", *flags, "sim", "--device-id", "cli-sim", "--token", "t",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        link = Link(JsonLineDriver(host="127.0.0.1", port=int(match.group(1)), token="t"), name="c")
        async with link:
            info = await asyncio.wait_for(link.wait_connected(), 10)
        assert info.device_id == "cli-sim"
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert proc.returncode == 0
    assert ("DEBUG" in err.decode()) == bool(flags), err


async def test_bad_usage_exits_2() -> None:
    code, _, err = await run("frobnicate")
    assert code == 2
    assert "invalid choice" in err
