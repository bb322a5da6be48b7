"""Fleet benchmarks: wake-to-delivery latency, idle scale, reconnect storm.

    python -m bench.fleet wake    [--devices 100 --commands 10]
    python -m bench.fleet idle    [--links 1000 --idle-s 20]
    python -m bench.fleet storm   [--links 1000]

Each prints its figures and returns them as a dict (``python -m bench`` collects them into
one table). Peers run in their own process so the keeplink side is what gets measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    cpu_seconds,
    percentile,
    raise_fd_limit,
    rss_bytes,
    start_sim,
)
from keeplink import Backoff, Link, LinkState, LinkStateChanged
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import CommandState, CommandStateChanged, Outbox, SqliteStore
from keeplink.presence import PresenceChanged, PresenceTracker

Figures = dict[str, Any]


def _link(port: int, name: str, **kwargs: Any) -> Link[Any]:
    kwargs.setdefault("heartbeat_s", None)
    return Link(JsonLineDriver(host="127.0.0.1", port=port), name=name, **kwargs)


async def _all(links: list[Link[Any]], state: LinkState, limit_s: float) -> None:
    async with asyncio.timeout(limit_s):
        while any(link.state is not state for link in links):
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------- wake


async def wake(devices: int = 100, commands: int = 10) -> Figures:
    """N devices with M queued commands each come online at once (an mDNS-like wake of
    every link); latency from presence-online to acknowledged, and the time to drain."""
    sim = await start_sim("--device-id", "fleet")
    port = sim.port
    await sim.stop()  # the fleet is away: commands queue up
    tmp = tempfile.TemporaryDirectory()
    presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=1.0)
    outbox = Outbox(
        SqliteStore(Path(tmp.name) / "wake.db"), presence=presence, request_timeout_s=30
    )
    online_at: dict[str, float] = {}
    acked: list[tuple[str, float]] = []
    presence.subscribe(
        lambda c: (
            online_at.setdefault(c.device, time.perf_counter())
            if isinstance(c, PresenceChanged) and c.new.value == "online"
            else None
        )
    )
    outbox.subscribe(
        lambda e: (
            acked.append((e.command.device, time.perf_counter()))
            if isinstance(e, CommandStateChanged) and e.command.state is CommandState.SUCCEEDED
            else None
        )
    )
    await outbox.start()
    names = [f"dev{i:04d}" for i in range(devices)]
    links = [_link(port, n, backoff=Backoff(initial_s=300, cap_s=300)) for n in names]
    try:
        for name, link in zip(names, links, strict=True):
            await outbox.attach(name, link)
            for n in range(commands):
                await outbox.submit(name, "set", {"n": n})
            link.start()
        await _all(links, LinkState.BACKOFF, 30)
        sim = await start_sim("--device-id", "fleet", port=port)
        begin = time.perf_counter()
        for link in links:
            link.wake("bench")  # they all come back at once
        total = devices * commands
        async with asyncio.timeout(120):
            while len(acked) < total:
                await asyncio.sleep(0.01)
        drained = time.perf_counter() - begin
        latencies = [at - online_at[device] for device, at in acked]
    finally:
        await asyncio.gather(*(link.stop() for link in links))
        await outbox.close()
        presence.close()
        await sim.stop()
        tmp.cleanup()
    figures = {
        "devices": devices,
        "commands": devices * commands,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "drain_s": drained,
        "deliveries_per_s": devices * commands / drained,
    }
    print(
        f"wake-to-delivery: {devices} devices x {commands} commands (SQLite): "
        f"p50 {figures['p50_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms from presence-online "
        f"to ack; all {devices * commands} drained in {drained:.2f} s"
    )
    return figures


# ---------------------------------------------------------------------------- idle


async def idle(links: int = 1000, idle_s: float = 20.0, heartbeat_s: float = 5.0) -> Figures:
    """N idle links with heartbeats: resident memory per link, CPU of this process idle."""
    raise_fd_limit(2 * links + 256)
    sim = await start_sim("--device-id", "idle")
    gc.collect()
    base = rss_bytes()
    fleet = [_link(sim.port, f"l{i}", heartbeat_s=heartbeat_s) for i in range(links)]
    try:
        for i, link in enumerate(fleet):
            link.start()
            if i % 200 == 199:
                await asyncio.sleep(0.05)  # pace the connects: a bench, not a storm
        await _all(fleet, LinkState.CONNECTED, 120)
        gc.collect()
        loaded = rss_bytes()
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        await asyncio.sleep(idle_s)
        cpu = cpu_seconds() - cpu0
        wall = time.perf_counter() - wall0
        heartbeats = sum(link.statistics().heartbeats_sent for link in fleet)
        alive = sum(1 for link in fleet if link.state is LinkState.CONNECTED)
    finally:
        await asyncio.gather(*(link.stop() for link in fleet))
        await sim.stop()
    figures = {
        "links": links,
        "rss_per_link_kib": (loaded - base) / links / 1024,
        "idle_cpu_pct": 100 * cpu / wall,
        "heartbeat_s": heartbeat_s,
        "heartbeats_sent": heartbeats,
        "connected_at_end": alive,
    }
    print(
        f"idle scale: {links} links, heartbeat every {heartbeat_s:g} s: "
        f"{figures['rss_per_link_kib']:.1f} KiB resident per link, "
        f"{figures['idle_cpu_pct']:.2f}% of one core over {wall:.0f} s idle "
        f"({heartbeats} heartbeats, {alive}/{links} connected at the end)"
    )
    return figures


# ---------------------------------------------------------------------------- storm


async def storm(links: int = 1000) -> Figures:
    """N links to a server that restarts: peak connects/s and time until all are up."""
    raise_fd_limit(2 * links + 256)
    sim = await start_sim("--device-id", "storm")
    port = sim.port
    fleet = [_link(port, f"s{i}", backoff=Backoff(initial_s=1, cap_s=10)) for i in range(links)]
    connected_at: list[float] = []
    for link in fleet:
        link.subscribe(
            lambda e: (
                connected_at.append(time.perf_counter())
                if isinstance(e, LinkStateChanged) and e.new is LinkState.CONNECTED
                else None
            )
        )
    try:
        for i, link in enumerate(fleet):
            link.start()
            if i % 200 == 199:
                await asyncio.sleep(0.05)
        await _all(fleet, LinkState.CONNECTED, 120)
        await sim.stop()
        await _all(fleet, LinkState.BACKOFF, 60)
        connected_at.clear()
        sim = await start_sim("--device-id", "storm", port=port)
        begin = time.perf_counter()
        await _all(fleet, LinkState.CONNECTED, 120)
        all_up = time.perf_counter() - begin
    finally:
        await asyncio.gather(*(link.stop() for link in fleet))
        await sim.stop()
    buckets = Counter(int((t - begin) * 10) for t in connected_at)  # 100 ms buckets
    figures = {
        "links": links,
        "peak_connects_per_s": 10 * max(buckets.values()),
        "all_up_s": all_up,
    }
    print(
        f"reconnect storm: {links} links, server restarted: peak {figures['peak_connects_per_s']} "
        f"connects/s (100 ms buckets), all up again after {all_up:.2f} s"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["wake", "idle", "storm"])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--commands", type=int, default=None)
    parser.add_argument("--links", type=int, default=1000)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--heartbeat-s", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # expected reconnect warnings, by the thousand
    if args.which == "wake":
        result = asyncio.run(wake(args.devices, args.commands or 10))
    elif args.which == "idle":
        result = asyncio.run(idle(args.links, args.idle_s, args.heartbeat_s))
    else:
        result = asyncio.run(storm(args.links))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
