"""``keeplink send``: submit a command, and with ``--wait`` follow it until it is final."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any

from keeplink.cli_client._common import EXIT_FAILED, EXIT_OK, EXIT_WAIT_TIMEOUT, UsageError
from keeplink.cli_client._follow import Follower
from keeplink.cli_client._output import print_error, print_json
from keeplink.gateway_client import FINAL_STATES, GatewayClient, WaitTimeoutError


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


def _report_final(command: dict[str, Any], *, as_json: bool) -> int:
    state = command.get("state")
    if as_json:
        print_json(command)
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
        print_error(str(error["code"]), str(error.get("message", "")))
    else:
        print_error(str(state), f"command {command.get('id')} ended {state}")
    return EXIT_FAILED


async def send(client: GatewayClient, args: argparse.Namespace) -> int:
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
            print_json(answer)
        return EXIT_OK
    follower = Follower(answer, quiet=args.json, tty=sys.stdout.isatty())
    timeout = args.wait_timeout or None
    try:
        final = await client.wait(command_id, timeout=timeout, on_event=follower)
    except WaitTimeoutError as exc:
        follower.close()
        if args.json:
            print_json(exc.command)
        last = exc.command.get("state")
        hint = ""
        if last == "queued":
            hint = f"; it stays queued and will be delivered when {args.device} is back"
        elif last not in FINAL_STATES:
            hint = "; it is still stored and may yet complete"
        print_error(exc.wire_code, exc.message + hint)
        return EXIT_WAIT_TIMEOUT
    follower.close()
    return _report_final(final, as_json=args.json)
