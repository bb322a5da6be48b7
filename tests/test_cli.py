"""The command line, run as a user would: a real subprocess."""

from __future__ import annotations

import asyncio
import re
import sys

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
async def test_demo_shows_each_device_in_its_expected_state() -> None:
    code, out, _ = await run("demo", "--duration", "10")
    assert code == 0, out
    summary = {
        m.group(1): m.group(0) for m in re.finditer(r"^  (\w+)\s+connects=.*$", out, re.MULTILINE)
    }
    assert set(summary) == {"healthy", "sleepy", "flaky", "locked"}
    assert "connects=1 disconnects=0" in summary["healthy"]
    assert "connects=0" in summary["locked"]
    assert "[auth_failed]" in summary["locked"]
    assert re.search(r"locked\s+handshaking -> failed\s+\[auth_failed\]", out)
    flaky = re.search(r"flaky\s+connects=(\d+) disconnects=(\d+)", out)
    assert flaky is not None
    assert int(flaky.group(1)) >= 2  # it lost its link to the faults, and came back
    assert int(flaky.group(2)) >= 1
    assert re.search(r"sleepy\s+connected -> lost", out)  # it fell asleep at 4 s


async def test_sim_subcommand_serves_a_device_a_link_can_reach() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeplink", "sim", "--device-id", "cli-sim", "--token", "t",
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
        await proc.communicate()
    assert proc.returncode == 0


async def test_bad_usage_exits_2() -> None:
    code, _, err = await run("frobnicate")
    assert code == 2
    assert "invalid choice" in err
