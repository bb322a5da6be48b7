"""An ESPHome device in a process of its own (``keeplink sim --esphome``), killed with
SIGKILL and started again: the link alone gets back to it."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from helpers import IO_BOUND_S, connected, until_state
from keeplink import Acknowledged, Backoff, ErrorCode, Link, LinkState
from keeplink.drivers.esphome import EsphomeDriver
from keeplink.testing import free_port

PSK = base64.b64encode(bytes(range(32))).decode()


@asynccontextmanager
async def device_process(port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeplink", "sim", "--esphome", "--port", str(port),
        "--name", "kitchen", "--noise-psk", PSK,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert re.search(rf"'kitchen' listening on 127\.0\.0\.1:{port}", line), line
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


async def test_a_killed_device_process_is_reconnected_by_the_link_alone() -> None:
    port = free_port()
    driver = EsphomeDriver(host="127.0.0.1", port=port, expected_name="kitchen", noise_psk=PSK)
    link = Link(
        driver, name="kitchen", heartbeat_s=None, backoff=Backoff(initial_s=0.05, cap_s=0.3)
    )
    async with link:
        async with device_process(port) as first:
            await connected(link)
            first.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(first.wait(), IO_BOUND_S) == -signal.SIGKILL
            await until_state(link, LinkState.BACKOFF)
        assert link.last_error is not None
        assert link.last_error.code is ErrorCode.CONNECTION_FAILED
        async with device_process(port):
            await connected(link)
            outcome = await link.request("switch", {"entity": "relay", "state": True}, timeout=5)
            stats = link.statistics()
    assert isinstance(outcome, Acknowledged)
    assert outcome.result == {"entity": "relay", "state": True}
    assert stats.connects == 2
    assert stats.failed_attempts >= 1  # it kept trying while nothing listened
