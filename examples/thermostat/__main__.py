"""Run the thermostat client against a thermostat, or against keeplink's simulator.

In one terminal, a simulated thermostat (it pushes its state every 5 seconds)::

    keeplink sim --port 7001 --device-id hall-thermostat --token s3cret --push-interval 5

In another, from the repository root::

    python -m examples.thermostat --port 7001 --token s3cret --target 21.5

It sets the target, then prints every change of the thermostat's state and availability
until Ctrl-C. Meanwhile, stop the simulator (Ctrl-C) and start it again: the client says
the thermostat is away, reconnects by itself and says it is back. Run it with ``--target``
while the simulator is stopped: the command waits in ``thermostat.db`` (across restarts of
this program too) and is delivered when the thermostat is back. ``--once`` sets the target
and exits; a wrong ``--token`` exits with status 1 and keeplink's code, ``auth_failed``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from keeplink import AuthError

from .client import Thermostat, ThermostatError

CONNECT_TIMEOUT_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.thermostat", description="A thermostat client on keeplink."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default=None)
    parser.add_argument("--device-id", default="hall-thermostat")
    parser.add_argument("--db", default="thermostat.db", help="where queued commands wait")
    parser.add_argument("--target", type=float, default=None, metavar="CELSIUS")
    parser.add_argument("--once", action="store_true", help="set the target, then exit")
    return parser


async def run(args: argparse.Namespace) -> int:
    thermostat = Thermostat(
        host=args.host, port=args.port, token=args.token, device_id=args.device_id, store=args.db
    )

    def show() -> None:
        state = thermostat.state
        print(
            f"{thermostat.device_id}: {'available' if thermostat.available else 'away'},"
            f" temperature {state.temperature}, target {state.target}, mode {state.mode}",
            flush=True,
        )

    async with thermostat:
        thermostat.add_listener(show)
        try:
            session = await thermostat.wait_connected(timeout=CONNECT_TIMEOUT_S)
            print(f"connected to {session.device_id} (firmware {session.firmware})", flush=True)
        except AuthError as exc:
            # Terminal: the link stays failed, retrying would not help.
            print(f"the thermostat refused us: [{exc.wire_code}] {exc.message}", flush=True)
            return 1
        except TimeoutError:
            print("the thermostat is not reachable yet; the link keeps trying", flush=True)

        if args.target is not None:
            try:
                result = await thermostat.set_target(args.target)
            except (ValueError, ThermostatError) as exc:
                print(f"target not set: {exc}", flush=True)
                return 1
            if result.applied:
                print(f"target {result.target:g} applied (rssi {result.rssi})", flush=True)
            else:
                print(f"target {result.target:g} {result.state}: sent when it is back")
        if args.once:
            return 0

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
