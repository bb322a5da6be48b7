"""The durable path: submits, one device's drain and keyed submits, beside plain queues.

    python -m bench.outbox [--commands 4000] [--rounds 3]

Every figure is measured side by side in one run, on one disk (a temporary directory),
SQLite with ``synchronous=FULL`` throughout:

- durable submits: keeplink's ``Outbox.submit()`` with 1 producer and with 32 concurrent
  producers, against persist-queue's ``SQLiteAckQueue`` (``auto_commit=True``: one commit a
  put) and a bare loop of autocommit ``INSERT``s on a WAL database, the floor;
- one device's drain: commands queued while the device is away, then delivered to the
  simulator (its own process) when it comes back, deliveries/s;
- a keyed submit with 0 and with 20,000 commands queued for the device: the supersede is one
  indexed statement, so the cost must not grow with the queue.

Each round measures every mode once, interleaved; the figures are the medians of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import start_sim
from keeplink import Link
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import CommandStateChanged, Outbox, OutboxEvent, SqliteStore
from keeplink.presence import PresenceTracker

Figures = dict[str, Any]
PRODUCERS = 32
QUEUED_BEHIND = 20_000


def _outbox(path: Path) -> tuple[Outbox, PresenceTracker]:
    presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=1.0)
    return Outbox(SqliteStore(path, synchronous="FULL"), presence=presence), presence


async def submit_rate(outbox: Outbox, commands: int, producers: int) -> float:
    """Durable submits/s through ``outbox.submit()`` from ``producers`` concurrent callers,
    for 8 devices that are away (nothing delivers); the outbox is started and closed."""
    await outbox.start()
    try:
        per = commands // producers

        async def produce(p: int) -> None:
            for n in range(per):
                await outbox.submit(f"dev{p % 8}", "set", {"n": n, "p": p})

        begin = time.perf_counter()
        await asyncio.gather(*(produce(p) for p in range(producers)))
        elapsed = time.perf_counter() - begin
    finally:
        await outbox.close()
    return per * producers / elapsed


async def keeplink_submits(directory: Path, commands: int, producers: int) -> float:
    """Durable submits/s on SQLite."""
    outbox, presence = _outbox(directory / f"submits-{producers}.db")
    try:
        return await submit_rate(outbox, commands, producers)
    finally:
        presence.close()


def persist_queue_puts(directory: Path, commands: int) -> float:
    """persist-queue's SQLiteAckQueue, auto-commit: one durable put per call."""
    import persistqueue

    queue = persistqueue.SQLiteAckQueue(
        str(directory / "persist-queue"), auto_commit=True, multithreading=True
    )
    begin = time.perf_counter()
    for n in range(commands):
        queue.put({"device": f"dev{n % 8}", "op": "set", "args": {"n": n}})
    elapsed = time.perf_counter() - begin
    return commands / elapsed


def bare_inserts(directory: Path, commands: int) -> float:
    """The floor: autocommit INSERTs of a JSON text on a WAL database, synchronous=FULL."""
    conn = sqlite3.connect(directory / "bare.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, data TEXT)")
        begin = time.perf_counter()
        for n in range(commands):
            conn.execute("INSERT INTO q (data) VALUES (?)", (f'{{"op":"set","args":{{"n":{n}}}}}',))
        elapsed = time.perf_counter() - begin
    finally:
        conn.close()
    return commands / elapsed


async def drain(directory: Path, commands: int) -> float:
    """One device: ``commands`` queued while it is away, deliveries/s once it is back."""
    sim = await start_sim("--device-id", "drain")
    outbox, presence = _outbox(directory / "drain.db")
    done = 0

    def count(event: OutboxEvent) -> None:
        nonlocal done
        if isinstance(event, CommandStateChanged) and event.command.final:
            done += 1

    outbox.subscribe(count)
    await outbox.start()
    link: Link[Any] = Link(
        JsonLineDriver(host="127.0.0.1", port=sim.port), name="drain", heartbeat_s=None
    )
    try:
        await asyncio.gather(*(outbox.submit("drain", "set", {"n": n}) for n in range(commands)))
        await outbox.attach("drain", link)
        begin = time.perf_counter()
        link.start()
        async with asyncio.timeout(300):
            while done < commands:
                await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - begin
    finally:
        await link.stop()
        await outbox.close()
        presence.close()
        await sim.stop()
    return commands / elapsed


async def keyed_submits(directory: Path, submits: int, queued: int) -> float:
    """Seconds per keyed submit (supersede by key) with ``queued`` other commands queued."""
    outbox, presence = _outbox(directory / f"keyed-{queued}.db")
    await outbox.start()
    try:
        for start in range(0, queued, 1000):  # filled in concurrent batches: quick
            await asyncio.gather(
                *(
                    outbox.submit("hall", "set", {"n": n}, key=f"other-{n}")
                    for n in range(start, min(start + 1000, queued))
                )
            )
        begin = time.perf_counter()
        for n in range(submits):
            await outbox.submit("hall", "set", {"target": n}, key="target")
        elapsed = time.perf_counter() - begin
    finally:
        await outbox.close()
        presence.close()
    return elapsed / submits


async def measure(commands: int = 4000, rounds: int = 3) -> Figures:
    samples: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="keeplink-bench-") as tmp:
            directory = Path(tmp)
            add("bare", bare_inserts(directory, commands))
            add("persist_queue", persist_queue_puts(directory, commands))
            add("keeplink_1", await keeplink_submits(directory, commands, 1))
            add("keeplink_32", await keeplink_submits(directory, commands * 4, PRODUCERS))
            add("drain", await drain(directory, commands))
            add("keyed_0", await keyed_submits(directory, 200, 0))
            add("keyed_20k", await keyed_submits(directory, 200, QUEUED_BEHIND))
    figures: Figures = {name: statistics.median(values) for name, values in samples.items()}
    figures["rounds"] = rounds
    pq = figures["persist_queue"]
    print(
        f"durable submits (SQLite FULL, {rounds} rounds, medians): "
        f"bare autocommit INSERT {figures['bare']:,.0f}/s, persist-queue {pq:,.0f}/s, "
        f"keeplink 1 producer {figures['keeplink_1']:,.0f}/s "
        f"({figures['keeplink_1'] / pq:.2f}x persist-queue), "
        f"{PRODUCERS} producers {figures['keeplink_32']:,.0f}/s "
        f"({figures['keeplink_32'] / pq:.2f}x persist-queue sequential)"
    )
    print(f"one device's drain: {figures['drain']:,.0f} deliveries/s")
    print(
        f"keyed submit: {1e6 * figures['keyed_0']:,.0f} µs with 0 queued, "
        f"{1e6 * figures['keyed_20k']:,.0f} µs with {QUEUED_BEHIND:,} queued "
        f"({figures['keyed_20k'] / figures['keyed_0']:.2f}x)"
    )
    return figures


Runner = Callable[[], Awaitable[Figures]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(measure(args.commands, args.rounds))


if __name__ == "__main__":
    main()
