"""Running a parsed client command: the gateway client, errors to exit codes, Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Final

from keeplink.cli_client._commands import cancel, commands
from keeplink.cli_client._common import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
)
from keeplink.cli_client._devices import devices, reconnect, resume
from keeplink.cli_client._output import print_error
from keeplink.cli_client._parser import add_client_commands
from keeplink.cli_client._send import send
from keeplink.gateway_client import (
    DEFAULT_URL,
    ApiError,
    GatewayClient,
    GatewayUnreachableError,
    check_url,
)

_HANDLERS: Final = {
    "devices": devices,
    "send": send,
    "commands": commands,
    "cancel": cancel,
    "reconnect": reconnect,
    "resume": resume,
}


async def run_client_command(args: argparse.Namespace) -> int:
    """Run a parsed client command; returns its exit code (see the module docstring)."""
    token = args.token if args.token is not None else os.environ.get("KEEPLINK_TOKEN")
    try:
        try:
            url = check_url(args.url or os.environ.get("KEEPLINK_URL") or DEFAULT_URL)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        handler = _HANDLERS[args.command]
        async with GatewayClient(url, token=token or None, timeout=args.timeout) as client:
            return await handler(client, args)
    except UsageError as exc:
        print(f"keeplink {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except GatewayUnreachableError as exc:
        print_error(
            exc.wire_code,
            f"{exc.message} (is `keeplink serve` running there? set --url or KEEPLINK_URL)",
        )
        return EXIT_UNREACHABLE
    except ApiError as exc:
        message = exc.message
        if exc.status == 401 and not token:
            message += " (no token given: use --token or KEEPLINK_TOKEN)"
        print_error(exc.wire_code, message)
        if exc.status == 401:
            return EXIT_AUTH
        if exc.status == 404:
            return EXIT_NOT_FOUND
        return EXIT_FAILED


INTERRUPT_GRACE_S: Final = 3.0
"""After Ctrl-C, how long the client may take to close its connections before it exits
anyway (a command already sent is stored by the gateway: nothing here needs saving)."""


def run_client(args: argparse.Namespace) -> int:
    """:func:`run_client_command` in a fresh event loop; Ctrl-C exits 130, within
    INTERRUPT_GRACE_S whatever the connections being closed are doing."""

    def interrupted(_signum: int, _frame: object) -> None:
        def give_up() -> None:
            print("\nkeeplink: interrupted", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)

        watchdog = threading.Timer(INTERRUPT_GRACE_S, give_up)
        watchdog.daemon = True
        watchdog.start()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupted) if main else None
    try:
        return asyncio.run(run_client_command(args))
    except KeyboardInterrupt:
        print("\nkeeplink: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m keeplink.cli_client devices ...``."""
    parser = argparse.ArgumentParser(
        prog="keeplink", description="The keeplink gateway from a shell."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_client_commands(sub)
    args = parser.parse_args(argv)
    return run_client(args)
