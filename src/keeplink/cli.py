"""The ``keeplink`` command line.

- ``keeplink serve --config FILE``: the gateway daemon.
- ``keeplink demo``: simulated devices with real devices' habits and the gateway in front of
  them, on the embedded SQLite store; every link state change is printed as it happens.
- ``keeplink sim``: one simulated jsonline device on loopback (``--esphome``: an ESPHome
  device on the native API).

Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import signal
import sys
from collections.abc import Sequence

from keeplink import __version__
from keeplink._core.errors import KeeplinkError
from keeplink._events import LinkEvent, LinkStateChanged
from keeplink.testing.faultproxy import FaultProxy
from keeplink.testing.sim import DeviceSimulator
from keeplink.testing.sim import main as sim_main

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEMO_TOKEN = "keeplink-demo-token"
GATEWAY_EXTRA = "pip install 'keeplink[gateway]'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keeplink", description="Reliable links to unreliable devices."
    )
    parser.add_argument("--version", action="version", version=f"keeplink {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway daemon")
    serve.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    demo = sub.add_parser(
        "demo",
        help="run simulated devices behind supervised links and print what happens",
    )
    demo.add_argument("--port", type=int, default=8470, help="gateway port (0: any free port)")
    demo.add_argument(
        "--store",
        default="sqlite:///keeplink-demo.db",
        help="command store URL (default: keeplink-demo.db in the current directory)",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: run until Ctrl-C)",
    )
    try:
        from keeplink.cli_client import add_client_commands
    except ImportError:  # the core install: no aiohttp, so no gateway and no client
        for name in ("devices", "send", "commands", "cancel", "reconnect", "resume"):
            sub.add_parser(name, help=f"(needs {GATEWAY_EXTRA})")
    else:
        add_client_commands(sub)
    # `keeplink sim ...` is dispatched before parsing; listed here for --help.
    sub.add_parser(
        "sim",
        help="run one simulated jsonline device, or with --esphome an ESPHome one "
        "(see keeplink sim [--esphome] --help)",
    )
    return parser


def _print_event(event: LinkEvent) -> None:
    if not isinstance(event, LinkStateChanged):
        return
    line = f"{event.link:<10} {event.old.value:>11} -> {event.new.value:<11}"
    if event.error is not None:
        line += f" [{event.error.code}] {event.error.message}"
    if event.retry_at is not None:
        line += f" (retry in {event.retry_at - event.at:.1f}s)"
    print(line, flush=True)


async def _flaky_faults(proxy: FaultProxy) -> None:
    """Every few seconds the network in front of the flaky device misbehaves."""
    while True:
        await asyncio.sleep(4)
        proxy.reset_all()
        await asyncio.sleep(3)
        proxy.set_down(True)
        await asyncio.sleep(2)
        proxy.set_down(False)


async def run_demo(duration: float | None, *, port: int, store: str) -> int:
    """Simulated devices with real devices' habits, and the gateway in front of them."""
    from keeplink.gateway.config import parse_config
    from keeplink.gateway.server import Server

    healthy = DeviceSimulator(device_id="healthy", token=DEMO_TOKEN, push_interval_s=5)
    sleepy = DeviceSimulator(device_id="sleepy", token=DEMO_TOKEN, sleepy=(4.0, 12.0))
    flaky = DeviceSimulator(device_id="flaky", token=DEMO_TOKEN)
    locked = DeviceSimulator(device_id="locked", token="the-real-token")
    sims = [healthy, sleepy, flaky, locked]
    for sim in sims:
        await sim.start()
    proxy = FaultProxy(flaky.host, flaky.port, name="flaky")
    await proxy.start()
    fast = {"initial_s": 0.5, "cap_s": 5}
    targets = {"healthy": healthy.port, "sleepy": sleepy.port, "flaky": proxy.port,
               "locked": locked.port}  # fmt: skip
    config = parse_config(
        {
            "gateway": {"listen": f"127.0.0.1:{port}", "store": store, "token": DEMO_TOKEN},
            "devices": [
                {
                    "id": name,
                    "driver": "jsonline",
                    "port": p,
                    "token": DEMO_TOKEN,
                    "heartbeat_s": 2,
                    "backoff": fast,
                }
                for name, p in targets.items()
            ],
        },
        source="keeplink demo",
    )
    server = Server(config, token=DEMO_TOKEN)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    faults = loop.create_task(_flaky_faults(proxy), name="demo.faults")
    try:
        await server.start()
        for link in server.gateway.links.values():
            link.subscribe(_print_event)
        command = await server.gateway.outbox.submit("sleepy", "set", {"target": 20.5})
        print(
            f"keeplink demo: dashboard {server.url}/  (write token: {DEMO_TOKEN})\n"
            "  healthy: always there   sleepy: awake 4 s of 12   flaky: behind a fault proxy\n"
            f"  locked: wrong token     command {command.id[:8]} queued for sleepy until it wakes\n"
            "Ctrl-C stops.",
            flush=True,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
    finally:
        faults.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await faults
        links = list(server.gateway.links.values())
        await server.stop()
        await proxy.stop()
        for sim in sims:
            await sim.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print("\nsummary:", flush=True)
    for link in links:
        stats = link.statistics()
        last = f"[{stats.last_error.code}]" if stats.last_error else ""
        print(
            f"  {link.name:<10} connects={stats.connects} disconnects={stats.disconnects} "
            f"failed_attempts={stats.failed_attempts} last_error={last}",
            flush=True,
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while args_list[:1] and args_list[0] in ("-v", "--verbose") and "sim" in args_list:
        verbose = True  # `keeplink -v sim ...`: the global flag before the simulator's own
        args_list.pop(0)
    if args_list[:1] == ["sim"]:
        if verbose:
            logging.basicConfig(
                level=logging.DEBUG, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
            )
        if "--esphome" in args_list[1:]:
            # An ESPHome device on the native API; needs the esphome extra, so imported here.
            from keeplink.testing.esphome import main as esphome_sim_main

            return esphome_sim_main(args_list[1:])
        return sim_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    if args.command != "sim" and importlib.util.find_spec("aiohttp") is None:
        print(f"keeplink: {args.command} needs the gateway extra: {GATEWAY_EXTRA}", file=sys.stderr)
        return EXIT_USAGE
    from keeplink.cli_client import CLIENT_COMMANDS, run_client

    if args.command in CLIENT_COMMANDS:
        return run_client(args)
    try:
        if args.command == "demo":
            return asyncio.run(run_demo(args.duration, port=args.port, store=args.store))
        if args.command == "serve":
            from keeplink.gateway.server import read_config, serve

            config, base_dir = read_config(args.config)  # a bad file: nothing starts
            return asyncio.run(serve(config, base_dir=base_dir))
    except KeeplinkError as exc:
        print(f"keeplink: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.code == "config_error" else EXIT_FAILURE
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE  # pragma: no cover - parser.error exits
