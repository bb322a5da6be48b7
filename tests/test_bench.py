"""The short benchmark run CI does: every row is measured and printed (no timing asserts:
speed goals are reported in docs/performance.md, never gated on a noisy machine)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    r"requests, window 1 .* req/s vs raw asyncio .* req/s .*x",
    r"requests, window 32 .* req/s vs raw asyncio .* req/s .*x",
    r"modbus, window 1 .* req/s vs pymodbus client .* req/s .*x",
    r"wake-to-delivery, \d+ devices x 10 .*p50 \d+ ms, p99 \d+ ms .* in [\d.]+ s",
    r"ESPHome wake to flash, 64 KiB image .*first OTA block p50 [\d.]+ ms, done p50 [\d.]+ ms",
    r"durable submits, SQLite FULL, 1 producer .*/s vs persist-queue .*/s .*x",
    r"durable submits, SQLite FULL, 32 producers .*/s vs persist-queue sequential .*x",
    r"one device's drain, SQLite FULL .* deliveries/s",
    r"keyed submit, 0 vs 20,000 queued .* µs vs .* µs .*x",
    r"PostgreSQL durable submits, 1 producer .*/s vs pgqueuer .*/s .*x",
    r"PostgreSQL durable submits, 32 producers .*/s vs pgqueuer .*/s .*x",
    r"PostgreSQL submit-to-ack vs enqueue-to-handler .*p99 .* ms .*x at p99",
    r"fleet takeover after SIGKILL, \d+ devices .* s until owned and connected again",
    r"idle links, \d+, heartbeat .* KiB resident per link .*% of one core idle",
    r"reconnect storm, \d+ links .*peak \d+ connects/s .*all up after [\d.]+ s",
]


@pytest.mark.slow
@pytest.mark.timeout(330)  # about 50 s alone; a loaded machine takes longer (bounded at 300)
async def test_the_quick_benchmark_prints_every_row() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench", "--quick", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    table = text[text.index("keeplink benchmarks") :]
    for row in ROWS:
        assert re.search(row, table), f"missing row {row!r} in:\n{table}"
