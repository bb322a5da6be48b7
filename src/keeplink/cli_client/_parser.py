"""The client commands' arguments: their types, ``k=v`` pairs, and the subcommands."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

from keeplink.cli_client._common import COMMAND_STATES, DEFAULT_TIMEOUT_S, DEFAULT_WAIT_TIMEOUT_S
from keeplink.gateway_client import DEFAULT_URL


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _wait_timeout(text: str) -> float:
    if text.strip() == "0":
        return 0.0
    return _positive_float(text)


def _attempts(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..1000, got {text!r}")
    return int(text)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..10000, got {text!r}")
    return int(text)


def _states(text: str) -> str:
    states = [s.strip() for s in text.split(",")]
    for state in states:
        if state not in COMMAND_STATES:
            raise argparse.ArgumentTypeError(
                f"unknown state {state!r}; one or more (comma-separated) of "
                f"{', '.join(COMMAND_STATES)}"
            )
    return ",".join(states)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_kv(text: str) -> tuple[str, Any]:
    """``k=v`` → ``(k, v)``: ``v`` as JSON when it parses as JSON, else the string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"arguments are key=value pairs (value as JSON or plain text), got {text!r}"
        )
    try:
        value: Any = json.loads(raw, parse_constant=_no_constants)
    except ValueError:
        value = raw
    return key, value


class _IntermixedParser(argparse.ArgumentParser):
    """Options may come between the ``k=v`` arguments: ``send hall set --wait a=1``."""

    _parsing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._parsing:  # parse_known_intermixed_args calls back in (Python < 3.13)
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("gateway")
    group.add_argument(
        "--url",
        default=None,
        help=f"the gateway (default: $KEEPLINK_URL, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--token", default=None, help="bearer token for writes (default: $KEEPLINK_TOKEN)"
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="machine output: the API's JSON, one document on stdout",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"per HTTP request (default {DEFAULT_TIMEOUT_S:g})",
    )
    return common


def add_client_commands(subparsers: Any) -> None:
    """Register ``devices``, ``send``, ``commands``, ``cancel``, ``reconnect`` and ``resume``
    on an argparse ``add_subparsers()`` object. Run the parsed result with
    :func:`run_client_command` when ``args.command in CLIENT_COMMANDS``."""
    common = _common_options()
    epilog = (
        "exit codes: 0 ok, 1 command not succeeded or gateway error, 2 bad usage, "
        "3 gateway unreachable, 4 auth failed, 5 not found, 6 --wait timed out"
    )
    subparsers.add_parser(
        "devices",
        parents=[common],
        help="list devices: presence, link state, queued commands, last error",
        epilog=epilog,
    )

    send = subparsers.add_parser(
        "send",
        parents=[common],
        help="submit a durable command to a device",
        description=(
            "Submit a command. It is stored first and delivered when the device is present; "
            "arguments are key=value, the value as JSON when it parses (21.5, true, "
            '"x", {"a":1}), else plain text.'
        ),
        epilog=epilog,
    )
    send.__class__ = _IntermixedParser
    send.add_argument("device", metavar="DEVICE")
    send.add_argument("op", metavar="OP")
    send.add_argument("args", metavar="k=v", nargs="*", type=parse_kv, help="arguments")
    send.add_argument("--key", default=None, help="supersede key: replaces a queued one")
    send.add_argument(
        "--ttl", type=_positive_float, default=None, metavar="SECONDS", help="expire after"
    )
    send.add_argument("--max-attempts", type=_attempts, default=None, metavar="N", help="default 3")
    send.add_argument("--priority", type=_integer, default=None, help="higher first")
    send.add_argument("--idempotency-key", default=None, metavar="KEY")
    send.add_argument("--wait", action="store_true", help="follow the command until it is final")
    send.add_argument(
        "--wait-timeout",
        type=_wait_timeout,
        default=DEFAULT_WAIT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up waiting after this (default {DEFAULT_WAIT_TIMEOUT_S:g}; 0: never)",
    )

    commands = subparsers.add_parser(
        "commands", parents=[common], help="list commands (newest last)", epilog=epilog
    )
    commands.add_argument("--device", default=None, help="only this device's")
    commands.add_argument(
        "--state", type=_states, default=None, help="only these states (comma-separated)"
    )
    commands.add_argument("--limit", type=_limit, default=None, help="at most N (default 100)")

    cancel = subparsers.add_parser(
        "cancel", parents=[common], help="cancel a queued or in-flight command", epilog=epilog
    )
    cancel.add_argument(
        "id", metavar="ID", help="the command's id, or a unique prefix of it (6 hex digits or more)"
    )

    reconnect = subparsers.add_parser(
        "reconnect",
        parents=[common],
        help="make a failed or backing-off link try again now",
        description=(
            "After fixing a device's token or identity (auth_failed, device_mismatch): make "
            "its failed link try again now, or a link waiting out a backoff skip the wait."
        ),
        epilog=epilog,
    )
    reconnect.add_argument("device", metavar="DEVICE")

    resume = subparsers.add_parser(
        "resume",
        parents=[common],
        help="deliver to a parked device now",
        description=(
            "After repeated failed delivery cycles the gateway parks a device's deliveries "
            "for a while (its view shows why and until when): deliver to it now instead."
        ),
        epilog=epilog,
    )
    resume.add_argument("device", metavar="DEVICE")
