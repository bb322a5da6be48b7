"""``keeplink commands`` and ``cancel``: the stored commands."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from keeplink.cli_client._common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from keeplink.cli_client._output import error_cell, print_error, print_json, seconds, table
from keeplink.gateway_client import ApiError, GatewayClient


def _age(at: Any, now: float) -> str:
    if not isinstance(at, int | float):
        return "-"
    age = max(0.0, now - at)
    if age < 60:
        return f"{age:.0f}s"
    if age < 3600:
        return f"{age / 60:.0f}m"
    if age < 86400:
        return f"{age / 3600:.1f}h"
    return f"{age / 86400:.1f}d"


def _commands_table(document: dict[str, Any]) -> None:
    commands = document.get("commands", [])
    if not commands:
        print("no commands", flush=True)
        return
    now = time.time()
    rows = [
        [
            str(c.get("id")),
            str(c.get("device")),
            str(c.get("op")),
            str(c.get("state")),
            f"{c.get('attempts')}/{c.get('max_attempts')}",
            _age(c.get("created_at"), now),
            _waiting_cell(c.get("waiting"), now),
            error_cell(c.get("last_error")),
        ]
        for c in commands
    ]
    table(
        ["ID", "DEVICE", "OP", "STATE", "ATTEMPTS", "AGE", "WAITING", "LAST ERROR"],
        rows,
        sys.stdout,
    )


def _waiting_cell(waiting: object, now: float) -> str:
    """Why a queued command waits, short: ``retry in 4.2s``, ``behind 7e603ceb``…"""
    if not isinstance(waiting, dict):
        return "-"
    reason = str(waiting.get("reason"))
    until, other = waiting.get("until"), waiting.get("command")
    if reason == "behind" and isinstance(other, str):
        return f"behind {other[:8]}"
    if isinstance(until, int | float):
        return f"{reason} {seconds(max(0.0, until - now))}"
    return reason


async def commands(client: GatewayClient, args: argparse.Namespace) -> int:
    document = await client.commands(device=args.device, state=args.state, limit=args.limit)
    if args.json:
        print_json(document)
    else:
        _commands_table(document)
    return EXIT_OK


async def cancel(client: GatewayClient, args: argparse.Namespace) -> int:
    try:
        command = await client.cancel(args.id)
    except ApiError as exc:
        if exc.status != 422:
            raise
        print_error(exc.wire_code, exc.message)  # a prefix of several ids: they are listed
        return EXIT_USAGE
    state = command.get("state")
    if args.json:
        print_json(command)
    elif state == "cancelled":
        print(f"{command.get('id')} cancelled", flush=True)
    else:
        print(f"{command.get('id')} {state} (it finished before it could be cancelled)")
    return EXIT_OK if state == "cancelled" else EXIT_FAILED
