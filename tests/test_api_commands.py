"""A command's resource in the HTTP API, against a real gateway on loopback: the submit
answer is the command itself (with its ``Location``), a command is found by a unique prefix
of its id, and a command no driver can ever deliver is refused at submit."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import eventually
from keeplink._core.commands import new_command
from keeplink._core.errors import InvalidRequestError
from keeplink._core.jsonline import MAX_LINE, encoded_request
from keeplink.gateway import models, schema
from keeplink.gateway.config import parse_config
from keeplink.gateway.server import Server
from keeplink.gateway_client import GatewayClient
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
    assert document == schema.openapi()
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
    refused = document["paths"]["/api/devices/{device}/commands"]["post"]["responses"]["422"]
    assert "could never be delivered" in refused["description"]


# ---------------------------------------------------------------------------- id prefixes


async def _stored(rig: Rig, command_id: str) -> None:
    """A queued command for ``away`` with this id (straight into the store: ids are random)."""
    command = new_command(device="away", op="set", args={}, now=time.time())
    await rig.server.gateway.store.insert(dataclasses.replace(command, id=command_id))


async def test_get_and_cancel_take_a_unique_prefix_of_the_id(rig: Rig) -> None:
    _, answer, _ = await rig.submit("away", {"op": "set"})
    command_id = answer["id"]
    status, whole = await rig.call("GET", f"/api/commands/{command_id}")
    assert status == 200, whole
    for prefix in (command_id[:8], command_id[:6], command_id[:6].upper(), command_id[:31]):
        status, command = await rig.call("GET", f"/api/commands/{prefix}")
        assert (status, command) == (200, whole), prefix
    status, cancelled = await rig.call("DELETE", f"/api/commands/{command_id[:8]}")
    assert status == 200, cancelled
    assert (cancelled["id"], cancelled["state"]) == (command_id, "cancelled")
    status, error = await rig.call("DELETE", f"/api/commands/{command_id[:8]}")
    assert (status, error["code"]) == (409, "conflict")  # found, and already final


async def test_a_prefix_that_starts_several_ids_is_a_422_listing_them(rig: Rig) -> None:
    ids = ["997e657c" + "0" * 24, "997e657d" + "0" * 24]
    for command_id in ids:
        await _stored(rig, command_id)
    for method in ("GET", "DELETE"):
        status, error = await rig.call(method, "/api/commands/997e65")
        assert (status, error["code"]) == (422, "invalid_request"), error
        assert set(error) == {"code", "message"}
        assert error["message"] == (
            f"'997e65' is ambiguous: it starts the ids of 2 commands: {ids[0]}, {ids[1]}; give"
            " more of the id"
        )
    for command_id in ids:  # nothing was cancelled
        status, command = await rig.call("GET", f"/api/commands/{command_id[:8]}")
        assert (status, command["id"], command["state"]) == (200, command_id, "queued")


async def test_a_prefix_of_many_ids_lists_ten(rig: Rig) -> None:
    ids = [f"abcdef{n:02x}" + "0" * 24 for n in range(12)]
    for command_id in ids:
        await _stored(rig, command_id)
    status, error = await rig.call("GET", "/api/commands/abcdef")
    assert status == 422, error
    assert "it starts the ids of more than 10 commands, among them " in error["message"]
    assert [i for i in ids if i in error["message"]] == ids[:10]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("0123456789", "no command '0123456789', nor one whose id starts with it"),
        ("01234", "no command '01234' (an id prefix needs at least 6 hex digits)"),
        ("nope-not-hex", "no command 'nope-not-hex'"),
    ],
)
async def test_no_command_by_that_id_or_prefix_is_a_404(rig: Rig, name: str, message: str) -> None:
    await rig.submit("away", {"op": "set"})
    for method in ("GET", "DELETE"):
        status, error = await rig.call(method, f"/api/commands/{name}")
        assert (status, error) == (404, {"code": "command_not_found", "message": message})


async def test_the_openapi_document_says_a_prefix_names_a_command(rig: Rig) -> None:
    async with rig.http.get(f"{rig.url}/api/openapi.json") as response:
        document = await response.json()
    one = document["paths"]["/api/commands/{command}"]
    (parameter,) = one["parameters"]
    assert "prefix of it of at least 6 hex digits" in parameter["description"]
    for method in ("get", "delete"):
        responses = one[method]["responses"]
        assert "more than one command" in responses["422"]["description"]
        assert "prefix" in responses["404"]["description"]


async def test_the_client_waits_for_a_command_named_by_a_prefix(rig: Rig) -> None:
    """``wait`` follows the event stream for the whole id, whatever named the command."""
    _, answer, _ = await rig.submit("away", {"op": "set"})
    listeners = rig.server.gateway.events.listeners
    before = len(listeners)  # the gateway's own (the history) listen already

    async def script() -> tuple[dict[str, Any], dict[str, Any]]:
        async with GatewayClient(rig.url, token=TOKEN) as client:
            waiting = asyncio.ensure_future(client.wait(answer["id"][:8], timeout=10))
            try:
                await eventually(
                    lambda: len(listeners) > before, what="the wait follows the stream"
                )
                await asyncio.sleep(0.5)  # past its re-read: the change must come as an event
                cancelled = await client.cancel(answer["id"][:8])
                return cancelled, await asyncio.wait_for(waiting, 10)
            finally:
                waiting.cancel()

    # A script's own loop: aiohttp 3.14 re-arms a closed WebSocket's heartbeat timer when
    # data arrives during its close, which the leak check of this loop would report.
    cancelled, final = await asyncio.to_thread(asyncio.run, script())
    assert cancelled["state"] == "cancelled"
    assert (final["id"], final["state"]) == (answer["id"], "cancelled")


# ---------------------------------------------------------------------------- never deliverable


async def _stored_for(rig: Rig, device: str) -> list[dict[str, Any]]:
    status, listed = await rig.call("GET", f"/api/commands?device={device}")
    assert status == 200, listed
    commands: list[dict[str, Any]] = listed["commands"]
    return commands


async def _final(rig: Rig, command_id: str) -> dict[str, Any]:
    async with asyncio.timeout(15):
        while True:
            status, command = await rig.call("GET", f"/api/commands/{command_id}")
            assert status == 200, command
            if command["state"] not in ("queued", "sending"):
                return command
            await asyncio.sleep(0.02)  # polling the live API, not a timing rule


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "fw.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    return path


def _firmware_cases(image: Path) -> list[tuple[dict[str, Any], str]]:
    good = hashlib.sha256(image.read_bytes()).hexdigest()
    missing = image.parent / "missing.bin"
    return [
        ({}, "args.path is required: the image file to send"),
        ({"path": 5, "sha256": good}, "args.path must be a non-empty string, got 5"),
        ({"path": "", "sha256": good}, "args.path must be a non-empty string, got ''"),
        (
            {"path": str(image)},
            "args.sha256 is required: the image's SHA-256, 64 lowercase hex digits",
        ),
        (
            {"path": str(image), "sha256": "abc"},
            "args.sha256 must be 64 lowercase hex digits, got 'abc'",
        ),
        (
            {"path": str(image), "sha256": good.upper()},
            f"args.sha256 must be 64 lowercase hex digits, got {good.upper()!r}",
        ),
        (
            {"path": str(image), "sha256": good, "size": "10240"},
            "args.size must be the image's size in bytes, an integer >= 0, got '10240'",
        ),
        (
            {"path": str(image), "sha256": good, "size": True},
            "args.size must be the image's size in bytes, an integer >= 0, got True",
        ),
        (
            {"path": str(image), "sha256": good, "size": 10_000},
            f"the image {image} has 10240 bytes, not args.size = 10000",
        ),
        (
            {"path": str(missing), "sha256": good},
            f"cannot read the image {missing}: No such file or directory",
        ),
        (
            {"path": str(image.parent), "sha256": good},
            f"the image {image.parent} is not a regular file",
        ),
    ]


async def test_a_firmware_command_that_could_never_be_delivered_is_refused_at_submit(
    rig: Rig, image: Path
) -> None:
    for args, problem in _firmware_cases(image):
        status, error, _ = await rig.submit("hall", {"op": "firmware", "args": args})
        assert (status, error) == (
            422,
            {"code": "invalid_request", "message": f"firmware: {problem}"},
        ), args
    assert await _stored_for(rig, "hall") == []  # nothing was stored


async def test_a_firmware_command_that_can_be_delivered_is_accepted(rig: Rig, image: Path) -> None:
    good = hashlib.sha256(bytes(range(256)) * 40).hexdigest()  # the image's bytes
    for args in (
        {"path": str(image), "sha256": good, "size": 10_240},
        {"path": str(image), "sha256": good},
    ):
        status, answer, _ = await rig.submit("hall", {"op": "firmware", "args": args})
        assert status == 202, answer
        done = await _final(rig, answer["id"])
        assert done["state"] == "succeeded", done
        assert done["result"]["installed"] is True


def _longest_blob() -> int:
    """The longest ``blob`` whose request fits the jsonline line with sequence number 0 and
    no key: with the key it goes out with (the command's id) it is too long."""
    low, high = 0, MAX_LINE
    while low < high:
        mid = (low + high + 1) // 2
        try:
            encoded_request(0, "set", {"blob": "x" * mid}, None)
        except InvalidRequestError:
            high = mid - 1
        else:
            low = mid
    return low


async def test_a_command_too_long_once_it_carries_its_key_is_refused_at_submit(
    rig: Rig,
) -> None:
    blob = "x" * _longest_blob()
    status, error, _ = await rig.submit("hall", {"op": "set", "args": {"blob": blob}})
    assert (status, error.get("code")) == (422, "invalid_request"), error
    assert "over the 65536-byte line limit" in error["message"]
    assert await _stored_for(rig, "hall") == []
    # With room for its key and any sequence number it goes out and succeeds.
    status, answer, _ = await rig.submit("hall", {"op": "set", "args": {"blob": blob[:-100]}})
    assert status == 202, answer
    assert (await _final(rig, answer["id"]))["state"] == "succeeded"
