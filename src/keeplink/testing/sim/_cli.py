"""``keeplink sim`` / ``python -m keeplink.testing.sim``: one simulated device from a shell."""

from __future__ import annotations

import argparse
import asyncio
import signal

from keeplink.testing.sim._device import DeviceSimulator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keeplink sim", description="Run a simulated jsonline device on loopback."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--device-id", default="sim-1")
    parser.add_argument("--token", default=None)
    parser.add_argument("--seq-bits", type=int, choices=(8, 16, 32), default=32)
    parser.add_argument("--no-pong", action="store_true", help="never answer pings")
    parser.add_argument("--ack-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--drop-acks", action="store_true")
    parser.add_argument("--push-interval", type=float, default=None, metavar="SECONDS")
    parser.add_argument(
        "--sleepy", nargs=2, type=float, default=None, metavar=("AWAKE_S", "PERIOD_S")
    )
    return parser


async def _run(args: argparse.Namespace) -> None:
    sim = DeviceSimulator(
        device_id=args.device_id,
        token=args.token,
        host=args.host,
        port=args.port,
        seq_bits=args.seq_bits,
        answer_pings=not args.no_pong,
        ack_delay_s=args.ack_delay,
        drop_acks=args.drop_acks,
        push_interval_s=args.push_interval,
        sleepy=tuple(args.sleepy) if args.sleepy else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        print(f"keeplink sim {sim.device_id} listening on {sim.host}:{sim.port}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    asyncio.run(_run(args))
    return 0
