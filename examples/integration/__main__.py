"""Set the integration up against a thermostat, print its diagnostics, unload it.

    keeplink sim --port 7001 --device-id hall-thermostat --token s3cret
    python -m examples.integration --port 7001 --token s3cret

Exit status 0: set up and unloaded (the diagnostics, token redacted, are printed as JSON);
1: the thermostat refused the token (a re-auth, with keeplink's code); 2: not reachable
within ``--setup-timeout`` (Home Assistant would retry the set-up later).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

from . import (
    ConfigEntryNotReady,
    ReauthRequired,
    async_setup_entry,
    async_unload_entry,
    diagnostics,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.integration")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default=None)
    parser.add_argument("--device-id", default="hall-thermostat")
    parser.add_argument("--store", default="keeplink_thermostat.db")
    parser.add_argument("--setup-timeout", type=float, default=10.0, metavar="SECONDS")
    return parser


async def run(args: argparse.Namespace) -> int:
    config = {
        "host": args.host,
        "port": args.port,
        "token": args.token,
        "device_id": args.device_id,
        "store": args.store,
        "setup_timeout_s": args.setup_timeout,
    }
    try:
        runtime = await async_setup_entry(config)
    except ReauthRequired as exc:
        print(f"re-auth required: {exc.code}: {exc.message}", flush=True)
        return 1
    except ConfigEntryNotReady as exc:
        print(f"not ready: {exc}", flush=True)
        return 2
    try:
        # Connected is not yet available: presence is debounced (a second, by default).
        with contextlib.suppress(TimeoutError):
            await runtime.thermostat.wait_available(timeout=args.setup_timeout)
        print(json.dumps(diagnostics(runtime), indent=2), flush=True)
    finally:
        await async_unload_entry(runtime)
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
