"""All benchmarks, one table: ``python -m bench [--links 10000] [--quick]``.

Every row is measured side by side in the same run; ratios compare against a baseline
measured in that same run. ``--quick`` is the short version CI runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import time

from bench import fleet
from bench.common import machine


async def run(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    from bench import requests as req

    figures = await req.measure(count=args.count, rounds=args.rounds)
    for window in (1, 32):
        raw = figures[f"raw asyncio, window {window}"]
        ours = figures[f"keeplink, window {window}"]
        goal = {1: 0.8, 32: 0.7}[window]
        rows.append(
            (
                f"requests, window {window}",
                f"{ours:,.0f} req/s vs raw asyncio {raw:,.0f} req/s",
                f"{ours / raw:.2f}x (goal {goal}x)",
            )
        )
    if importlib.util.find_spec("pymodbus") is not None:
        from bench import modbus

        rates, _, _ = await modbus.measure(count=args.count // 2, rounds=args.rounds)
        for label in ("window 1", f"{modbus.CALLERS} callers"):
            ours, theirs = rates[f"keeplink, {label}"], rates[f"pymodbus, {label}"]
            goal = " (goal 1.3x)" if label == "window 1" else ""
            rows.append(
                (
                    f"modbus, {label}",
                    f"{ours:,.0f} req/s vs pymodbus client {theirs:,.0f} req/s",
                    f"{ours / theirs:.2f}x{goal}",
                )
            )
    else:
        rows.append(("modbus", "skipped: pymodbus not installed", "-"))
    wake = await fleet.wake(devices=args.devices, commands=10)
    rows.append(
        (
            f"wake-to-delivery, {wake['devices']} devices x 10",
            f"p50 {wake['p50_ms']:.0f} ms, p99 {wake['p99_ms']:.0f} ms (presence-online to ack)",
            f"all {wake['commands']} in {wake['drain_s']:.2f} s (goal p99 <= 100 ms)",
        )
    )
    if importlib.util.find_spec("aioesphomeapi") is not None:
        from bench import esphome_ota

        flash = await esphome_ota.wake_to_flash(rounds=args.rounds)
        rows.append(
            (
                f"ESPHome wake to flash, {esphome_ota.WAKE_IMAGE // 1024} KiB image",
                f"first OTA block p50 {flash['first_p50_ms']:.1f} ms, "
                f"done p50 {flash['done_p50_ms']:.1f} ms (wake-up to ack)",
                f"max {flash['done_max_ms']:.1f} ms (goal <= 1 s)",
            )
        )
    else:
        rows.append(("ESPHome wake to flash", "skipped: aioesphomeapi not installed", "-"))
    from bench import outbox

    durable = await outbox.measure(commands=args.commands, rounds=args.outbox_rounds)
    pq = durable["persist_queue"]
    rows.append(
        (
            "durable submits, SQLite FULL, 1 producer",
            f"{durable['keeplink_1']:,.0f}/s vs persist-queue {pq:,.0f}/s "
            f"(bare INSERT {durable['bare']:,.0f}/s)",
            f"{durable['keeplink_1'] / pq:.2f}x (goal 1.0x)",
        )
    )
    rows.append(
        (
            f"durable submits, SQLite FULL, {outbox.PRODUCERS} producers",
            f"{durable['keeplink_32']:,.0f}/s vs persist-queue sequential {pq:,.0f}/s",
            f"{durable['keeplink_32'] / pq:.2f}x (goal 5x)",
        )
    )
    rows.append(
        (
            "one device's drain, SQLite FULL",
            f"{durable['drain']:,.0f} deliveries/s",
            "goal >= 1,500/s",
        )
    )
    rows.append(
        (
            f"keyed submit, 0 vs {outbox.QUEUED_BEHIND:,} queued",
            f"{1e6 * durable['keyed_0']:,.0f} µs vs {1e6 * durable['keyed_20k']:,.0f} µs",
            f"{durable['keyed_20k'] / durable['keyed_0']:.2f}x (goal ~1.0x)",
        )
    )
    from keeplink.testing.postgres import postgres_bindir

    if postgres_bindir() is not None and importlib.util.find_spec("pgqueuer") is not None:
        from bench import fleet_pg

        pg = await fleet_pg.measure(
            commands=args.pg_commands, rounds=args.outbox_rounds, devices=args.pg_devices
        )
        rows.append(
            (
                "PostgreSQL durable submits, 1 producer",
                f"{pg['kl_1']:,.0f}/s vs pgqueuer {pg['pgq_1']:,.0f}/s",
                f"{pg['kl_1'] / pg['pgq_1']:.2f}x (goal 1.0x)",
            )
        )
        rows.append(
            (
                f"PostgreSQL durable submits, {fleet_pg.PRODUCERS} producers",
                f"{pg['kl_32']:,.0f}/s vs pgqueuer {pg['pgq_32']:,.0f}/s",
                f"{pg['kl_32'] / pg['pgq_32']:.2f}x (goal 3x)",
            )
        )
        rows.append(
            (
                "PostgreSQL submit-to-ack vs enqueue-to-handler",
                f"p50 {pg['kl_p50_ms']:.1f} ms, p99 {pg['kl_p99_ms']:.1f} ms vs pgqueuer "
                f"p50 {pg['pgq_p50_ms']:.1f} ms, p99 {pg['pgq_p99_ms']:.1f} ms",
                f"{pg['kl_p99_ms'] / pg['pgq_p99_ms']:.2f}x at p99 (goal <= 2x)",
            )
        )
        rows.append(
            (
                f"fleet takeover after SIGKILL, {pg['devices']} devices",
                f"{pg['takeover_s']:.2f} s until owned and connected again",
                f"lease {pg['lease_s']:g} s (goal <= 2 lease periods)",
            )
        )
    else:
        rows.append(("PostgreSQL", "skipped: no PostgreSQL server binaries or pgqueuer", "-"))
    idle = await fleet.idle(links=args.links, idle_s=args.idle_s, heartbeat_s=args.heartbeat_s)
    rows.append(
        (
            f"idle links, {idle['links']}, heartbeat {idle['heartbeat_s']:g} s",
            f"{idle['rss_per_link_kib']:.1f} KiB resident per link (goal <= 30)",
            f"{idle['idle_cpu_pct']:.2f}% of one core idle (goal <= 5%)",
        )
    )
    storm = await fleet.storm(links=args.storm_links)
    rows.append(
        (
            f"reconnect storm, {storm['links']} links",
            f"peak {storm['peak_connects_per_s']} connects/s",
            f"all up after {storm['all_up_s']:.2f} s",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="keeplink benchmarks, one table")
    parser.add_argument("--quick", action="store_true", help="the short version CI runs")
    parser.add_argument("--links", type=int, default=None, help="idle links (default 1000)")
    args = parser.parse_args()
    args.count = 1000 if args.quick else 4000
    args.rounds = 2 if args.quick else 5
    args.devices = 20 if args.quick else 100
    args.commands = 500 if args.quick else 4000
    args.outbox_rounds = 1 if args.quick else 3
    args.pg_commands = 200 if args.quick else 2000
    args.pg_devices = 4 if args.quick else 20
    args.links = args.links or (200 if args.quick else 1000)
    args.idle_s = 5.0 if args.quick else 30.0
    args.heartbeat_s = 2.0 if args.quick else 30.0
    args.storm_links = 200 if args.quick else 1000
    logging.basicConfig(level=logging.ERROR)  # thousands of expected reconnect warnings
    begin = time.perf_counter()
    rows = asyncio.run(run(args))
    print(f"\nkeeplink benchmarks ({machine()}), {time.perf_counter() - begin:.0f} s")
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)))


if __name__ == "__main__":
    main()
