"""The PostgreSQL store beside pgqueuer, and a fleet takeover, on one real server.

    python -m bench.fleet_pg [--commands 2000] [--rounds 3] [--devices 20]

A throwaway PostgreSQL cluster is started on a free loopback port (the Debian server
binaries; as root the server runs as ``postgres``), then, side by side in one run:

- durable submits/s with 1 and 32 producers: keeplink's ``Outbox.submit()`` on
  ``PostgresStore`` against pgqueuer's ``Queries.enqueue()`` (asyncpg pool driver), each
  call committed before it returns;
- submit-to-ack latency for an online device (the jsonline simulator, its own process)
  against pgqueuer's enqueue-to-handler latency (a ``QueueManager`` with one entrypoint,
  woken by LISTEN/NOTIFY), one at a time;
- takeover after SIGKILL: two ``keeplink serve`` nodes share ``--devices`` simulated
  devices with ``lease_s = 2``; the owner of the most is killed; the time until the other
  owns and is connected to every device.

Each round measures every mode once, interleaved; the figures are the medians of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import percentile, start_sim
from bench.outbox import submit_rate
from keeplink import Link
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import CommandState, CommandStateChanged, Outbox, OutboxEvent
from keeplink.outbox.postgres import PostgresStore
from keeplink.presence import Presence, PresenceTracker
from keeplink.testing import DeviceSimulator
from keeplink.testing.postgres import PostgresServer

Figures = dict[str, Any]
PRODUCERS = 32
LATENCY_SAMPLES = 300
TAKEOVER_LEASE_S = 2.0


def _outbox(dsn: str) -> tuple[Outbox, PresenceTracker]:
    presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=1.0)
    store = PostgresStore(dsn, schema=f"b{uuid.uuid4().hex[:12]}")
    return Outbox(store, presence=presence), presence


async def keeplink_submits(dsn: str, commands: int, producers: int) -> float:
    outbox, presence = _outbox(dsn)
    try:
        return await submit_rate(outbox, commands, producers)
    finally:
        presence.close()


async def pgqueuer_enqueues(dsn: str, commands: int, producers: int) -> float:
    import asyncpg
    from pgqueuer import AsyncpgPoolDriver, Queries

    schema = f"q{uuid.uuid4().hex[:12]}"
    async with asyncpg.create_pool(
        dsn, min_size=1, max_size=10, server_settings={"search_path": f"{schema},public"}
    ) as pool:
        await pool.execute(f"CREATE SCHEMA {schema}")
        queries = Queries(AsyncpgPoolDriver(pool))
        await queries.install(create_schema=False)
        per = commands // producers

        async def produce(p: int) -> None:
            for n in range(per):
                await queries.enqueue("set", f'{{"n":{n},"p":{p}}}'.encode())

        begin = time.perf_counter()
        await asyncio.gather(*(produce(p) for p in range(producers)))
        elapsed = time.perf_counter() - begin
        await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    return per * producers / elapsed


async def keeplink_latency(dsn: str, samples: int) -> list[float]:
    """Submit-to-ack, one command at a time, for a device that is online."""
    sim = await start_sim("--device-id", "lat")
    outbox, presence = _outbox(dsn)
    acked: dict[str, float] = {}
    done = asyncio.Event()

    def on_event(event: OutboxEvent) -> None:
        if isinstance(event, CommandStateChanged) and event.command.state is CommandState.SUCCEEDED:
            acked[event.command.id] = time.perf_counter()
            done.set()

    outbox.subscribe(on_event)
    await outbox.start()
    link: Link[Any] = Link(
        JsonLineDriver(host="127.0.0.1", port=sim.port), name="lat", heartbeat_s=None
    )
    latencies: list[float] = []
    try:
        await outbox.attach("lat", link)
        link.start()
        await link.wait_connected()
        await presence.wait_for("lat", Presence.ONLINE)
        for n in range(samples):
            done.clear()
            begin = time.perf_counter()
            command = await outbox.submit("lat", "set", {"n": n})
            async with asyncio.timeout(10):
                while command.id not in acked:
                    await done.wait()
                    done.clear()
            latencies.append(acked[command.id] - begin)
    finally:
        await link.stop()
        await outbox.close()
        presence.close()
        await sim.stop()
    return latencies


async def pgqueuer_latency(dsn: str, samples: int) -> list[float]:
    """Enqueue-to-handler, one job at a time, with a worker listening."""
    import asyncpg
    from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, Job, Queries, QueueManager

    schema = f"q{uuid.uuid4().hex[:12]}"
    settings = {"search_path": f"{schema},public"}
    handled: dict[str, float] = {}
    seen = asyncio.Event()
    latencies: list[float] = []
    async with asyncpg.create_pool(dsn, min_size=1, max_size=4, server_settings=settings) as pool:
        await pool.execute(f"CREATE SCHEMA {schema}")
        queries = Queries(AsyncpgPoolDriver(pool))
        await queries.install(create_schema=False)
        worker_conn = await asyncpg.connect(dsn, server_settings=settings)
        qm = QueueManager(Queries(AsyncpgDriver(worker_conn)))

        @qm.entrypoint("set")
        async def handle(job: Job) -> None:
            handled[(job.payload or b"").decode()] = time.perf_counter()
            seen.set()

        worker = asyncio.create_task(qm.run(batch_size=1))
        try:
            await asyncio.sleep(0.5)  # the worker is listening
            for n in range(samples):
                key = f"job-{n}"
                seen.clear()
                begin = time.perf_counter()
                await queries.enqueue("set", key.encode())
                async with asyncio.timeout(10):
                    while key not in handled:
                        await seen.wait()
                        seen.clear()
                latencies.append(handled[key] - begin)
        finally:
            qm.shutdown.set()
            with contextlib.suppress(Exception):  # the worker's own shutdown path
                await asyncio.wait_for(worker, 10)
            await worker_conn.close()
            await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    return latencies


# ---------------------------------------------------------------------------- takeover


def fleet_config(
    path: Path,
    *,
    node: str,
    dsn: str,
    ports: dict[str, int],
    lease_s: float,
    token: str,
    heartbeat_s: float = 1.0,
    backoff_cap_s: float = 0.5,
) -> Path:
    """A ``keeplink serve`` config for one node of a fleet on loopback: the shared store,
    this node's name, and one jsonline device a port (every node gets the same devices)."""
    lines = [
        "[gateway]",
        'listen = "127.0.0.1:0"',
        f'store = "{dsn}"',
        f'token = "{token}"',
        f'node = "{node}"',
        f"lease_s = {lease_s}",
    ]
    for device, port in ports.items():
        lines += [
            "",
            "[[devices]]",
            f'id = "{device}"',
            'driver = "jsonline"',
            f"port = {port}",
            f"heartbeat_s = {heartbeat_s}",
            f"backoff = {{ initial_s = 0.05, cap_s = {backoff_cap_s} }}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _devices(url: str) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/api/devices") as r:
        return {d["id"]: d for d in (await r.json())["devices"]}


async def takeover(dsn: str, devices: int, directory: Path) -> float:
    """Seconds from a SIGKILL of the busiest node to every device owned and connected by
    the other."""
    names = [f"dev{n:03d}" for n in range(devices)]
    async with contextlib.AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(DeviceSimulator(device_id=d)) for d in names]
        ports = {d: sim.port for d, sim in zip(names, sims, strict=True)}
        procs: dict[str, asyncio.subprocess.Process] = {}
        urls: dict[str, str] = {}
        schema_dsn = f"{dsn}?schema=t{uuid.uuid4().hex[:12]}"
        for node in ("gw-a", "gw-b"):
            config = fleet_config(
                directory / f"{node}.toml",
                node=node,
                dsn=schema_dsn,
                ports=ports,
                lease_s=TAKEOVER_LEASE_S,
                token="bench-token-0123456789",
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "keeplink", "serve", "--config", str(config),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            stack.callback(lambda p=proc: p.returncode is None and p.kill())
            assert proc.stdout is not None
            while True:
                line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
                found = re.search(r"(http://127\.0\.0\.1:\d+)", line)
                if found:
                    break
            procs[node], urls[node] = proc, found.group(1)
        async with asyncio.timeout(60):
            while True:
                view = await _devices(urls["gw-a"])
                owners = [v["node"] for v in view.values()]
                if set(owners) == {"gw-a", "gw-b"} and all(
                    v["link"]["state"] == "connected" for v in view.values()
                ):
                    break
                await asyncio.sleep(0.05)
        victim = max(("gw-a", "gw-b"), key=owners.count)
        survivor = "gw-b" if victim == "gw-a" else "gw-a"
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        async with asyncio.timeout(60):
            while True:
                view = await _devices(urls[survivor])
                if all(
                    v["node"] == survivor and v["link"]["state"] == "connected"
                    for v in view.values()
                ):
                    break
                await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - killed
        procs[survivor].send_signal(signal.SIGTERM)
        await asyncio.wait_for(procs[survivor].wait(), 30)
        await procs[victim].wait()
    return elapsed


async def measure(commands: int = 2000, rounds: int = 3, devices: int = 20) -> Figures:
    directory = Path(tempfile.mkdtemp(prefix="keeplink-pgbench-"))
    # The server's own directory, not one inside a root-only one: as root the server
    # runs as the postgres user, who must be able to reach it.
    pg_directory = Path(tempfile.mkdtemp(prefix="keeplink-pg-"))
    server = PostgresServer(pg_directory)
    server.start()
    samples: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    try:
        dsn = server.dsn()
        for _ in range(rounds):
            add("pgq_1", await pgqueuer_enqueues(dsn, commands, 1))
            add("kl_1", await keeplink_submits(dsn, commands, 1))
            add("pgq_32", await pgqueuer_enqueues(dsn, commands * 2, PRODUCERS))
            add("kl_32", await keeplink_submits(dsn, commands * 2, PRODUCERS))
        pgq_lat = await pgqueuer_latency(dsn, LATENCY_SAMPLES)
        kl_lat = await keeplink_latency(dsn, LATENCY_SAMPLES)
        takeover_s = await takeover(dsn, devices, directory)
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(pg_directory, ignore_errors=True)
    figures: Figures = {name: statistics.median(values) for name, values in samples.items()}
    figures.update(
        pgq_p50_ms=1000 * percentile(pgq_lat, 50),
        pgq_p99_ms=1000 * percentile(pgq_lat, 99),
        kl_p50_ms=1000 * percentile(kl_lat, 50),
        kl_p99_ms=1000 * percentile(kl_lat, 99),
        takeover_s=takeover_s,
        devices=devices,
        lease_s=TAKEOVER_LEASE_S,
    )
    print(
        f"PostgreSQL durable submits ({rounds} rounds, medians): keeplink 1 producer "
        f"{figures['kl_1']:,.0f}/s vs pgqueuer {figures['pgq_1']:,.0f}/s "
        f"({figures['kl_1'] / figures['pgq_1']:.2f}x); {PRODUCERS} producers "
        f"{figures['kl_32']:,.0f}/s vs {figures['pgq_32']:,.0f}/s "
        f"({figures['kl_32'] / figures['pgq_32']:.2f}x)"
    )
    print(
        f"latency: keeplink submit-to-ack p50 {figures['kl_p50_ms']:.1f} ms, p99 "
        f"{figures['kl_p99_ms']:.1f} ms; pgqueuer enqueue-to-handler p50 "
        f"{figures['pgq_p50_ms']:.1f} ms, p99 {figures['pgq_p99_ms']:.1f} ms "
        f"({figures['kl_p99_ms'] / figures['pgq_p99_ms']:.2f}x at p99)"
    )
    print(
        f"takeover after SIGKILL: {takeover_s:.2f} s for {devices} devices "
        f"(lease {TAKEOVER_LEASE_S:g} s)"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(measure(args.commands, args.rounds, args.devices))


if __name__ == "__main__":
    main()
