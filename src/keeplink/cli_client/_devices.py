"""``keeplink devices``, ``reconnect`` and ``resume``: the devices and their links."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from keeplink.cli_client._common import EXIT_OK
from keeplink.cli_client._output import error_cell, print_json, seconds, table
from keeplink.gateway_client import GatewayClient


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
                error_cell(link.get("last_error")),
                seconds(link.get("retry_in_s")),
            ]
        )
        parked = device.get("parked")
        if isinstance(parked, dict) and parked.get("reason"):
            notes.append(f"{device.get('id')}: delivery parked: {parked['reason']}")
    table(["ID", "PRESENCE", "LINK", "QUEUED", "LAST ERROR", "RETRY IN"], rows, sys.stdout)
    for note in notes:
        print(note, flush=True)


async def devices(client: GatewayClient, args: argparse.Namespace) -> int:
    document = await client.devices()
    if args.json:
        print_json(document)
    else:
        _devices_table(document)
    return EXIT_OK


async def reconnect(client: GatewayClient, args: argparse.Namespace) -> int:
    answer = await client.reconnect(args.device)
    if args.json:
        print_json(answer)
    else:
        print(f"{args.device}: {answer.get('reconnect')}: {answer.get('note')}", flush=True)
    return EXIT_OK


async def resume(client: GatewayClient, args: argparse.Namespace) -> int:
    answer = await client.resume(args.device)
    if args.json:
        print_json(answer)
    else:
        print(f"{args.device}: {answer.get('note')}", flush=True)
    return EXIT_OK
