"""The gateway from a shell: ``keeplink devices | send | commands | cancel | reconnect |
resume``.

These commands mirror the HTTP API of a running ``keeplink serve``. Options every one of
them takes (after the command name):

``--url URL``
    the gateway (default: ``$KEEPLINK_URL``, else ``http://127.0.0.1:8470``);
``--token TOKEN``
    the bearer token for writes (default: ``$KEEPLINK_TOKEN``);
``--json``
    machine output: the API's JSON, exactly one document on stdout (``send``: the submit
    answer, the command with ``device_presence`` and ``note`` beside its fields; ``send
    --wait``: the command as it ended, or as last seen when the wait timed out);
``--timeout SECONDS``
    how long one HTTP request may take (default 10).

Commands::

    keeplink devices
    keeplink send DEVICE OP [k=v ...] [--key K] [--ttl S] [--max-attempts N]
                  [--priority P] [--idempotency-key I] [--wait] [--wait-timeout S]
    keeplink commands [--device D] [--state S[,S...]] [--limit N]
    keeplink cancel ID      (ID: the id, or a unique prefix of it of at least 6 hex digits)
    keeplink reconnect DEVICE
    keeplink resume DEVICE

``send`` arguments are ``k=v`` pairs; ``v`` is JSON if it parses as JSON (``21.5``,
``true``, ``"x"``, ``{"a":1}``), else the plain string. ``send`` prints the command id and
its state (and says so when the device is away and the command waits for it); with
``--wait`` it follows the gateway's event stream until the command is final (a progress bar
for a firmware transfer on a terminal, plain lines otherwise). ``send DEVICE firmware
path=IMAGE`` fills in ``sha256`` and ``size`` from the file when they are not given (the
gateway reads the image from the same path). A command that could never be delivered (an
op or args the device's driver cannot carry, a firmware image the gateway cannot read) is
refused at once and nothing is stored: exit 1 with the gateway's reason. ``reconnect``
makes a failed link (a refused token, a device that named another id) try again now, or a
link waiting out a backoff skip the rest of the wait, once the device or its config is
fixed. ``resume`` delivers to a device whose deliveries the breaker parked (after repeated
failed delivery cycles) now, instead of at the end of the park.

Exit codes, for scripts:

==  ==========================================================================================
0   ok (``send``: the command is stored; ``send --wait``: it succeeded; ``cancel``: it is
    cancelled; ``reconnect``: the link tries again now, or is already up; ``resume``:
    delivery resumes, or was not parked)
1   the command ended other than succeeded (failed, rejected, expired, cancelled,
    superseded; for ``cancel``: it finished before it could be cancelled), or the gateway
    answered another error
2   bad usage or configuration (options, ``k=v`` arguments, ``--url``; ``cancel``: an id
    prefix that starts more than one command's id, which are listed)
3   the gateway is unreachable (nothing listening, connection reset, no answer in time)
4   authentication failed (401: missing or wrong ``--token``)
5   not found (404: unknown device or command)
6   ``--wait`` timed out (the command is still stored and may yet complete)
130 interrupted (Ctrl-C); a command already sent stays stored
==  ==========================================================================================

Errors go to stderr as ``keeplink: [code] message`` with the API's ``{code, message}``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Final, TextIO

from keeplink._core.commands import CommandState
from keeplink.client import (
    DEFAULT_URL,
    FINAL_STATES,
    ApiError,
    GatewayClient,
    GatewayUnreachableError,
    WaitTimeoutError,
    check_url,
)

__all__ = [
    "CLIENT_COMMANDS",
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "EXIT_WAIT_TIMEOUT",
    "add_client_commands",
    "main",
    "parse_kv",
    "run_client",
    "run_client_command",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_AUTH: Final = 4
EXIT_NOT_FOUND: Final = 5
EXIT_WAIT_TIMEOUT: Final = 6
EXIT_INTERRUPTED: Final = 130

CLIENT_COMMANDS: Final = frozenset({"devices", "send", "commands", "cancel", "reconnect", "resume"})
COMMAND_STATES: Final[tuple[str, ...]] = tuple(state.value for state in CommandState)
DEFAULT_TIMEOUT_S: Final = 10.0
DEFAULT_WAIT_TIMEOUT_S: Final = 300.0
ERROR_WIDTH: Final = 48


class UsageError(Exception):
    """Bad usage found after argparse (exit 2)."""


# ---------------------------------------------------------------------------- parsing


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


# ---------------------------------------------------------------------------- output


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=False), flush=True)


def _error(code: str, message: str) -> None:
    print(f"keeplink: [{code}] {message}", file=sys.stderr, flush=True)


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    for row in (headers, *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        print("  ".join(cells).rstrip(), file=out)
    out.flush()


def _error_cell(error: Any) -> str:
    if not isinstance(error, dict):
        return "-"
    return _truncate(f"{error.get('code')}: {error.get('message', '')}", ERROR_WIDTH)


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.1f}s"


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


def _devices_table(document: dict[str, Any]) -> None:
    devices = document.get("devices", [])
    if not devices:
        print("no devices configured", flush=True)
        return
    rows = []
    notes = []
    for device in devices:
        link = device.get("link") or {}
        rows.append(
            [
                str(device.get("id")),
                str(device.get("presence")),
                str(link.get("state")),
                str(device.get("queued")),
                _error_cell(link.get("last_error")),
                _seconds(link.get("retry_in_s")),
            ]
        )
        parked = device.get("parked")
        if isinstance(parked, dict) and parked.get("reason"):
            notes.append(f"{device.get('id')}: delivery parked: {parked['reason']}")
    _table(["ID", "PRESENCE", "LINK", "QUEUED", "LAST ERROR", "RETRY IN"], rows, sys.stdout)
    for note in notes:
        print(note, flush=True)


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
            _error_cell(c.get("last_error")),
        ]
        for c in commands
    ]
    _table(
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
        return f"{reason} {_seconds(max(0.0, until - now))}"
    return reason


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


class _Follower:
    """Prints what happens to one command while ``send --wait`` follows it."""

    def __init__(self, command: dict[str, Any], *, quiet: bool, tty: bool) -> None:
        self.id = str(command.get("id"))
        self.device = str(command.get("device"))
        self.state = str(command.get("state"))
        self.quiet = quiet
        self.tty = tty
        self.bar_open = False
        self.next_step = 0.0

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar_open:
            sys.stdout.write("\n")
            self.bar_open = False
        print(text, flush=True)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "command":
            self._command(event["command"])
        elif kind == "firmware_progress":
            self._progress(event)
        elif kind == "presence":
            self._line(f"{self.device} is {event.get('new')}")
        elif kind == "link" and event.get("new") in ("connected", "failed"):
            error = event.get("error")
            why = f" [{error.get('code')}] {error.get('message')}" if error else ""
            self._line(f"{self.device}: link {event.get('new')}{why}")
        elif kind == "parked":
            reason = event.get("reason")
            if reason:
                self._line(f"{self.device}: delivery parked: {reason}")
            else:
                self._line(f"{self.device}: delivery resumed")

    def _command(self, command: dict[str, Any]) -> None:
        state = str(command.get("state"))
        if state == self.state or state in FINAL_STATES:
            self.state = state
            return  # the final state is reported by the caller
        self.state = state
        attempts, most = command.get("attempts"), command.get("max_attempts")
        if state == "sending":
            self._line(f"sending (attempt {attempts} of {most})")
        elif state == "queued":
            error = command.get("last_error")
            why = f" [{error.get('code')}] {error.get('message')}" if error else ""
            self._line(f"queued again after attempt {attempts} of {most}:{why}")
        else:
            self._line(state)

    def _progress(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        percent = float(event.get("percent") or 0.0)
        offset, size = event.get("offset") or 0, event.get("size") or 0
        rate = float(event.get("rate_bps") or 0.0)
        resumes = event.get("resumes") or 0
        resumed = f", resumed {resumes}x" if resumes else ""
        detail = (
            f"{percent:5.1f}%  {_human_bytes(offset)} of {_human_bytes(size)}  "
            f"{_human_bytes(rate)}/s{resumed}"
        )
        if self.tty:
            width = 30
            done = min(width, int(width * percent / 100))
            bar = "#" * done + "-" * (width - done)
            sys.stdout.write(f"\rfirmware [{bar}] {detail}\x1b[K")
            sys.stdout.flush()
            self.bar_open = True
            return
        if percent >= self.next_step or percent >= 100:
            self.next_step = (int(percent // 10) + 1) * 10
            print(f"firmware {detail}", flush=True)

    def close(self) -> None:
        if self.bar_open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.bar_open = False


# ---------------------------------------------------------------------------- commands


def _firmware_args(args: dict[str, Any]) -> dict[str, Any]:
    """``path=IMAGE`` alone: add ``sha256`` and ``size`` from the file, path made absolute."""
    path = args.get("path")
    if not isinstance(path, str) or ("sha256" in args and "size" in args):
        return args
    path = os.path.abspath(path)
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    except OSError as exc:
        raise UsageError(f"cannot read the firmware image {path}: {exc.strerror or exc}") from exc
    return {**args, "path": path, "sha256": args.get("sha256", digest.hexdigest()), "size": size}


async def _devices(client: GatewayClient, args: argparse.Namespace) -> int:
    document = await client.devices()
    if args.json:
        _print_json(document)
    else:
        _devices_table(document)
    return EXIT_OK


async def _commands(client: GatewayClient, args: argparse.Namespace) -> int:
    document = await client.commands(device=args.device, state=args.state, limit=args.limit)
    if args.json:
        _print_json(document)
    else:
        _commands_table(document)
    return EXIT_OK


async def _cancel(client: GatewayClient, args: argparse.Namespace) -> int:
    try:
        command = await client.cancel(args.id)
    except ApiError as exc:
        if exc.status != 422:
            raise
        _error(exc.wire_code, exc.message)  # a prefix of several ids: they are listed
        return EXIT_USAGE
    state = command.get("state")
    if args.json:
        _print_json(command)
    elif state == "cancelled":
        print(f"{command.get('id')} cancelled", flush=True)
    else:
        print(f"{command.get('id')} {state} (it finished before it could be cancelled)")
    return EXIT_OK if state == "cancelled" else EXIT_FAILED


async def _reconnect(client: GatewayClient, args: argparse.Namespace) -> int:
    answer = await client.reconnect(args.device)
    if args.json:
        _print_json(answer)
    else:
        print(f"{args.device}: {answer.get('reconnect')}: {answer.get('note')}", flush=True)
    return EXIT_OK


async def _resume(client: GatewayClient, args: argparse.Namespace) -> int:
    answer = await client.resume(args.device)
    if args.json:
        _print_json(answer)
    else:
        print(f"{args.device}: {answer.get('note')}", flush=True)
    return EXIT_OK


def _report_final(command: dict[str, Any], *, as_json: bool) -> int:
    state = command.get("state")
    if as_json:
        _print_json(command)
    else:
        line = f"{command.get('id')} {state}"
        result = command.get("result")
        if state == "succeeded" and result:
            line += " " + json.dumps(result, separators=(",", ":"))
        print(line, flush=True)
    if state == "succeeded":
        return EXIT_OK
    error = command.get("last_error")
    if isinstance(error, dict) and error.get("code"):
        _error(str(error["code"]), str(error.get("message", "")))
    else:
        _error(str(state), f"command {command.get('id')} ended {state}")
    return EXIT_FAILED


async def _send(client: GatewayClient, args: argparse.Namespace) -> int:
    pairs: dict[str, Any] = {}
    for key, value in args.args:
        if key in pairs:
            raise UsageError(f"argument {key!r} given twice")
        pairs[key] = value
    if args.op == "firmware":
        pairs = _firmware_args(pairs)
    answer = await client.submit(
        args.device,
        args.op,
        pairs,
        key=args.key,
        ttl_s=args.ttl,
        max_attempts=args.max_attempts,
        idempotency_key=args.idempotency_key,
        priority=args.priority,
    )
    # The stored command's own fields, with device_presence and note beside them.
    command_id = str(answer.get("id"))
    state = answer.get("state")
    presence = answer.get("device_presence")
    if not args.json:
        print(f"{command_id} {state}", flush=True)
        note = answer.get("note")
        if state == "queued" and isinstance(note, str) and note.startswith("queued: the link "):
            print(note, flush=True)  # the link was refused: the gateway says why and what to do
        elif state == "queued" and presence != "online":
            print(
                f"queued: {args.device} is away; it will be delivered when it is back",
                flush=True,
            )
        elif state == "queued":
            print(f"{args.device} is online: delivering now", flush=True)
    if not args.wait:
        if args.json:
            _print_json(answer)
        return EXIT_OK
    follower = _Follower(answer, quiet=args.json, tty=sys.stdout.isatty())
    timeout = args.wait_timeout or None
    try:
        final = await client.wait(command_id, timeout=timeout, on_event=follower)
    except WaitTimeoutError as exc:
        follower.close()
        if args.json:
            _print_json(exc.command)
        last = exc.command.get("state")
        hint = ""
        if last == "queued":
            hint = f"; it stays queued and will be delivered when {args.device} is back"
        elif last not in FINAL_STATES:
            hint = "; it is still stored and may yet complete"
        _error(exc.wire_code, exc.message + hint)
        return EXIT_WAIT_TIMEOUT
    follower.close()
    return _report_final(final, as_json=args.json)


_HANDLERS: Final = {
    "devices": _devices,
    "send": _send,
    "commands": _commands,
    "cancel": _cancel,
    "reconnect": _reconnect,
    "resume": _resume,
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
        _error(
            exc.wire_code,
            f"{exc.message} (is `keeplink serve` running there? set --url or KEEPLINK_URL)",
        )
        return EXIT_UNREACHABLE
    except ApiError as exc:
        message = exc.message
        if exc.status == 401 and not token:
            message += " (no token given: use --token or KEEPLINK_TOKEN)"
        _error(exc.wire_code, message)
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


if __name__ == "__main__":
    raise SystemExit(main())
