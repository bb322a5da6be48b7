"""The gateway drives Modbus units and MQTT devices too: config in, HTTP out, real peers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import eventually

pytest.importorskip("pymodbus", minversion="3.16")
pytest.importorskip("mqtt5")

from keeplink.gateway.config import ConfigError, parse_config
from keeplink.gateway.server import Server
from keeplink.testing.modbus import ModbusGateway
from keeplink.testing.mqtt import FakeMqttDevice
from mosquitto import Mosquitto

TOKEN = "protocols-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def modbus_server() -> AsyncIterator[ModbusGateway]:
    """A pymodbus gateway on a free port, stopped after the test."""
    gw = ModbusGateway()
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
async def gateway_server(
    modbus_server: ModbusGateway, broker: Mosquitto, tmp_path: Path
) -> AsyncIterator[Server]:
    fast = {"initial_s": 0.05, "cap_s": 0.2}
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0", "store": "memory:", "token": TOKEN},
            "devices": [
                {"id": "boiler", "driver": "modbus", "port": modbus_server.port, "unit": 1,
                 "backoff": fast, "options": {"probe_interval_s": 0.1}},
                {"id": "pump", "driver": "modbus", "port": modbus_server.port, "unit": 2,
                 "backoff": fast, "options": {"probe_interval_s": 0.1}},
                {"id": "plug", "driver": "mqtt", "port": broker.port, "backoff": fast},
            ],
        }
    )  # fmt: skip
    server = Server(config, token=TOKEN)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def submit(http: aiohttp.ClientSession, url: str, device: str, body: Any) -> Any:
    async with http.post(f"{url}/api/devices/{device}/commands", json=body, headers=AUTH) as r:
        return r.status, await r.json()


async def final_state(http: aiohttp.ClientSession, url: str, command_id: str) -> Any:
    async with asyncio.timeout(15):
        while True:
            async with http.get(f"{url}/api/commands/{command_id}") as response:
                command = await response.json()
            if command["state"] not in ("queued", "sending"):
                return command
            await asyncio.sleep(0.05)  # polling the live API, not a timing rule


async def test_modbus_units_and_an_mqtt_device_through_the_gateway(
    gateway_server: Server, modbus_server: ModbusGateway, broker: Mosquitto
) -> None:
    url = gateway_server.url
    gateway = gateway_server.gateway
    assert gateway.links["boiler"] is gateway.links["pump"]  # one link to the Modbus gateway
    modbus_server.offline.add(2)  # the pump is away: its gateway answers exception 11
    device = FakeMqttDevice("plug", broker.host, broker.port)
    async with aiohttp.ClientSession() as http:
        # Modbus: the unit id comes from the config; presence from the unit probe.
        await eventually(lambda: gateway.presence_of("boiler").value == "online")
        status, body = await submit(
            http, url, "boiler", {"op": "write_registers", "args": {"address": 0, "values": [7, 8]}}
        )
        assert status == 202
        assert body["args"]["unit"] == 1
        done = await final_state(http, url, body["id"])
        assert done["state"] == "succeeded", done
        assert await modbus_server.registers(1, 0, 2) == [7, 8]

        # The pump is offline behind a connected gateway: its write waits, then lands.
        await eventually(lambda: gateway.presence_of("pump").value == "offline")
        status, body = await submit(
            http, url, "pump", {"op": "write_register", "args": {"address": 3, "value": 42}}
        )
        assert body["device_presence"] == "offline"
        probe = gateway.probes[0]
        target = probe.rounds + 3
        await eventually(lambda: probe.rounds >= target)  # three probe rounds go by
        async with http.get(f"{url}/api/commands/{body['id']}") as response:
            assert (await response.json())["state"] == "queued"
        modbus_server.offline.discard(2)
        done = await final_state(http, url, body["id"])
        assert done["state"] == "succeeded", done
        assert await modbus_server.registers(2, 3, 1) == [42]

        # Invalid Modbus arguments are refused by the driver at submit time.
        status, body = await submit(
            http, url, "boiler", {"op": "write_register", "args": {"address": -1, "value": 1}}
        )
        assert (status, body["code"]) == (422, "invalid_request")

        # MQTT: availability drives presence; the command is published when it is online.
        status, body = await submit(http, url, "plug", {"op": "set", "args": {"on": True}})
        assert body["device_presence"] != "online"
        device.start()
        try:
            done = await final_state(http, url, body["id"])
            assert done["state"] == "succeeded", done
            assert device.commands[0]["args"] == {"on": True, "device": "plug"}
            assert device.applied == [done["idempotency_key"]]
        finally:
            await device.stop()


async def _refused(server: Server, cases: list[tuple[str, dict[str, Any], str]]) -> None:
    """Each ``(device, body, start of the message)`` is a 422; nothing is stored."""
    async with aiohttp.ClientSession() as http:
        for device, body, message in cases:
            status, error = await submit(http, server.url, device, body)
            assert (status, error.get("code")) == (422, "invalid_request"), (device, body, error)
            assert error["message"].startswith(message), (device, body, error)
        async with http.get(f"{server.url}/api/commands") as response:
            assert (await response.json())["commands"] == []  # nothing stored


async def test_firmware_for_a_modbus_unit_or_an_mqtt_device_is_refused_at_submit(
    gateway_server: Server, tmp_path: Path
) -> None:
    """A firmware transfer goes as ota.* requests, which neither driver can carry (MQTT's
    took the firmware command itself, which never goes on the wire)."""
    image = tmp_path / "fw.bin"
    image.write_bytes(b"firmware")
    firmware = {"op": "firmware", "args": {"path": str(image), "sha256": "0" * 64}}
    await _refused(
        gateway_server,
        [
            (
                "plug",
                firmware,
                "firmware: the mqtt driver cannot carry the transfer's ota.begin requests "
                "(mqtt: args must name the device (args['device']), one of ['plug'])",
            ),
            (
                "boiler",
                firmware,
                "firmware: the modbus driver cannot carry the transfer's ota.begin requests "
                "(modbus: unknown op 'ota.begin'; known: [",
            ),
        ],
    )


async def test_ops_and_args_a_driver_refuses_are_refused_at_submit(
    gateway_server: Server,
) -> None:
    """The driver's own checks, at submit: 422 with its message, nothing stored."""
    await _refused(
        gateway_server,
        [
            ("boiler", {"op": "set"}, "modbus: unknown op 'set'; known: ["),
            (
                "boiler",
                {"op": "write_register", "args": {"address": 3}},
                "modbus write_register: missing ['value']",
            ),
            (
                "boiler",
                {"op": "read_holding_registers", "args": {"address": 0, "count": 1, "colour": 1}},
                "modbus read_holding_registers: unknown args ['colour']",
            ),
            (
                "plug",
                {"op": "set", "args": {"device": "lamp"}},
                "mqtt: unknown device 'lamp'; this link serves ['plug']",
            ),
        ],
    )


def test_a_modbus_device_without_a_unit_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match=r"devices\[0\]\.unit: is required"):
        parse_config({"devices": [{"id": "x", "driver": "modbus", "port": 502}]})
