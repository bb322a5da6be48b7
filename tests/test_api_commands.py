"""A command's resource in the HTTP API, against a real gateway on loopback: the submit
answer is the command itself (with its ``Location``), a command is found by a unique prefix
of its id, and a command no driver can ever deliver is refused at submit."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from keeplink.gateway import models
from keeplink.gateway.config import parse_config
from keeplink.gateway.server import Server
from keeplink.testing import DeviceSimulator

TOKEN = "commands-test-write-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COMMAND_FIELDS = set(models.Command.model_fields)


@dataclass
class Rig:
    server: Server
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.server.url

    async def submit(self, device: str, body: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.http.post(
            f"{self.url}/api/devices/{device}/commands", json=body, headers=AUTH
        ) as response:
            return response.status, await response.json(), response

    async def call(self, method: str, path: str) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, headers=AUTH) as response:
            return response.status, await response.json()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """``hall`` is online (a simulator); ``away`` is never reachable (bound, not listening)."""
    hall = DeviceSimulator(device_id="hall")
    await hall.start()
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    config = {
        "gateway": {"listen": "127.0.0.1:0", "store": "memory:", "token": TOKEN},
        "devices": [
            {"id": "hall", "driver": "jsonline", "port": hall.port, "heartbeat_s": False},
            {"id": "away", "driver": "jsonline", "port": dead.getsockname()[1]},
        ],
    }
    server = Server(parse_config(config, source="test_api_commands"), token=TOKEN)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            yield Rig(server=server, http=http)
    finally:
        await server.stop()
        await hall.stop()
        dead.close()


# ---------------------------------------------------------------------------- one shape


async def test_submit_answers_the_command_itself_with_its_location(rig: Rig) -> None:
    status, answer, response = await rig.submit("away", {"op": "set", "args": {"t": 21.5}})
    assert status == 202, answer
    # The command's own fields at the top level, what happens next beside them.
    assert set(answer) == COMMAND_FIELDS | {"device_presence", "note"}, answer
    assert answer["state"] == "queued"
    assert answer["device_presence"] in ("unknown", "offline")
    assert "away" in answer["note"]
    location = response.headers["Location"]
    assert location == f"/api/commands/{answer['id']}"
    # What the Location answers is the same command, field for field.
    status, command = await rig.call("GET", location)
    assert status == 200, command
    assert command == {k: v for k, v in answer.items() if k in COMMAND_FIELDS}


async def test_a_repeated_idempotency_key_is_stored_again_with_its_own_location(
    rig: Rig,
) -> None:
    """No replay: the same idempotency key is a new command (the device drops repeats of
    the key), answered 202 with its own Location like any submit."""
    body = {"op": "set", "args": {"v": 1}, "idempotency_key": "once"}
    first_status, first, first_response = await rig.submit("away", body)
    again_status, again, again_response = await rig.submit("away", body)
    assert (first_status, again_status) == (202, 202)
    assert first["id"] != again["id"]
    assert first["idempotency_key"] == again["idempotency_key"] == "once"
    assert first_response.headers["Location"] == f"/api/commands/{first['id']}"
    assert again_response.headers["Location"] == f"/api/commands/{again['id']}"


async def test_the_openapi_document_shows_the_submit_answer_and_its_location(rig: Rig) -> None:
    async with rig.http.get(f"{rig.url}/api/openapi.json") as response:
        document = await response.json()
    assert document == models.openapi()
    schemas = document["components"]["schemas"]
    accepted = schemas["SubmitAccepted"]
    assert set(accepted["properties"]) == set(schemas["Command"]["properties"]) | {
        "device_presence",
        "note",
    }
    answer = document["paths"]["/api/devices/{device}/commands"]["post"]["responses"]["202"]
    assert answer["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SubmitAccepted"
    }
    assert answer["headers"]["Location"]["schema"] == {"type": "string"}
    assert "/api/commands/{id}" in answer["headers"]["Location"]["description"]
