"""The gateway against devices that are not what they claim, that babble, or that refuse us:
an in-process gateway (links on loopback, the memory store) and HTTP against it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from helpers import eventually
from keeplink import LinkState
from keeplink.gateway.config import parse_config
from keeplink.gateway.server import Server
from keeplink.testing import DeviceSimulator

TOKEN = "gw-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {"initial_s": 0.05, "cap_s": 0.2}


@contextlib.asynccontextmanager
async def gateway(*devices: dict[str, Any]) -> AsyncIterator[tuple[Server, aiohttp.ClientSession]]:
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0", "store": "memory:", "token": TOKEN},
            "devices": [
                {"driver": "jsonline", "heartbeat_s": 30, "backoff": FAST, **d} for d in devices
            ],
        }
    )
    server = Server(config, token=TOKEN)
    await server.start()
    try:
        async with aiohttp.ClientSession(base_url=server.url) as http:
            yield server, http
    finally:
        await server.stop()


async def submit(http: aiohttp.ClientSession, device: str, op: str = "set") -> Any:
    async with http.post(
        f"/api/devices/{device}/commands", json={"op": op, "args": {"n": 1}}, headers=AUTH
    ) as response:
        assert response.status == 202, await response.text()
        return await response.json()


async def get(http: aiohttp.ClientSession, path: str) -> Any:
    async with http.get(path) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not noisy, [r.getMessage() for r in noisy]


# ---------------------------------------------------------------------------- identity


async def test_a_device_that_names_another_id_is_refused_and_gets_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="keeplink")
    async with DeviceSimulator(device_id="intruder") as sim:
        async with gateway({"id": "dev1", "port": sim.port}) as (server, http):
            link = server.gateway.links["dev1"]
            answer = await submit(http, "dev1")
            # Either the link gives up on the impostor, or (the bug) the command reaches it.
            await eventually(lambda: link.state is LinkState.FAILED or bool(sim.applied))
            assert sim.applied == []
            assert sim.statistics().requests == 0
            view = await get(http, "/api/devices/dev1")
            command = await get(http, f"/api/commands/{answer['command']['id']}")
    assert view["link"]["state"] == "failed"
    assert view["link"]["last_error"]["code"] == "device_mismatch"
    assert "'intruder'" in view["link"]["last_error"]["message"]
    assert "'dev1'" in view["link"]["last_error"]["message"]
    assert command["state"] == "queued"  # kept for the real dev1, not lost
    assert any(
        "device_mismatch" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )
    no_tracebacks(caplog)


async def test_device_id_names_the_id_a_device_reports_in_another_form() -> None:
    async with DeviceSimulator(device_id="AA:BB:CC:01") as sim:
        async with gateway({"id": "dev1", "port": sim.port, "device_id": "AA:BB:CC:01"}) as (
            server,
            http,
        ):
            await submit(http, "dev1")
            await eventually(lambda: bool(sim.applied))
            assert server.gateway.links["dev1"].state is LinkState.CONNECTED
    assert [c.args for c in sim.applied] == [{"n": 1}]
