"""ESPHome devices through the gateway: the config contract, the device view's DeviceInfo,
entity commands, and firmware over espota2 end to end against the simulator's OTA port
(queued while asleep, flashed once, never again after flaps; a drop retries the whole
image; a wrong password; a cancel; a gateway restart; a lost answer settled by the build
the device comes back with)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import IO_BOUND_S, eventually
from keeplink import LinkState
from keeplink._core.errors import ConfigError
from keeplink.gateway.config import parse_config
from keeplink.gateway.server import Server
from keeplink.testing import free_port
from keeplink.testing.esphome import EsphomeSimulator

TOKEN = "esphome-gateway-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PSK = base64.b64encode(bytes(range(32))).decode()
IMAGE = os.urandom(48 * 1024 + 123)
FAST = {"initial_s": 0.05, "cap_s": 0.2}
"""The link retries fast: a device coming up is found within a fraction of a second."""


def device_keys(sim: EsphomeSimulator, **extra: Any) -> dict[str, Any]:
    assert sim.ota is not None
    keys = {
        "id": "porch-light",
        "driver": "esphome",
        "host": "127.0.0.1",
        "port": sim.port,
        "noise_psk": PSK,
        "mac": sim.mac,
        "ota_port": sim.ota.port,
        "backoff": FAST,
        "debounce_online_s": 0,
        "debounce_offline_s": 0,
        "heartbeat_s": 5,
        "options": {"ota_retry_delay_s": 0.05, "ota_settle_s": 3},
    }
    keys.update(extra)
    return {key: value for key, value in keys.items() if value is not None}  # None: left out


def image_args(tmp_path: Path, image: bytes = IMAGE) -> dict[str, Any]:
    path = tmp_path / "porch-light.bin"
    path.write_bytes(image)
    return {"path": str(path), "sha256": hashlib.sha256(image).hexdigest(), "size": len(image)}


@dataclass
class Rig:
    server: Server
    http: aiohttp.ClientSession
    sim: EsphomeSimulator

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(
            method, self.server.url + path, json=body, headers=AUTH
        ) as response:
            return response.status, await response.json()

    async def submit(self, body: Any) -> tuple[int, Any]:
        return await self.call("POST", "/api/devices/porch-light/commands", body)

    async def final(self, command_id: str) -> dict[str, Any]:
        gateway = self.server.gateway
        async with asyncio.timeout(IO_BOUND_S):
            await gateway.outbox.wait(command_id)
        status, command = await self.call("GET", f"/api/commands/{command_id}")
        assert status == 200, command
        return dict(command)


def simulator(**kw: Any) -> EsphomeSimulator:
    """``porch-light`` with Noise and an OTA port, not started (asleep)."""
    kw.setdefault("ota_port", free_port())
    kw.setdefault("noise_psk", PSK)
    return EsphomeSimulator(name="porch-light", port=free_port(), **kw)


@contextlib.asynccontextmanager
async def rig(sim: EsphomeSimulator, *, store: str = "memory:", **extra: Any) -> AsyncIterator[Rig]:
    config = {
        "gateway": {"listen": "127.0.0.1:0", "store": store, "token": TOKEN},
        "devices": [device_keys(sim, **extra)],
    }
    server = Server(parse_config(config, source="test_gateway_esphome"), token=TOKEN)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            yield Rig(server=server, http=http, sim=sim)
    finally:
        await server.stop()


async def connected(rig: Rig) -> None:
    async with asyncio.timeout(IO_BOUND_S):
        await rig.server.gateway.links["porch-light"].wait_for_state(LinkState.CONNECTED)


# ---------------------------------------------------------------------------- the config


def _parse(**keys: Any) -> Any:
    device = {"id": "porch-light", "driver": "esphome", "host": "192.0.2.20", "port": 6053}
    return parse_config({"devices": [{**device, **keys}]}, source="gw.toml").devices[0]


def test_the_contract_keys_are_taken_at_the_top_level_with_their_defaults() -> None:
    device = _parse(
        noise_psk=PSK, mac="AA:BB:CC:DD:EE:FF", ota_port=8266, ota_password="ota-pw",
        presence="mdns",
    )  # fmt: skip
    assert device.settings == {
        "noise_psk": PSK, "password": None, "expected_name": None,
        "mac": "AA:BB:CC:DD:EE:FF", "ota_port": 8266, "ota_password": "ota-pw",
    }  # fmt: skip
    # mDNS: the device's own instance on _esphomelib._tcp, named by its node name.
    assert device.mdns_service == "porch-light._esphomelib._tcp.local."
    assert _parse(expected_name="porch", presence="mdns").mdns_service == (
        "porch._esphomelib._tcp.local."
    )
    bare = _parse()
    assert bare.settings["ota_port"] == 3232 and bare.settings["noise_psk"] is None
    assert bare.mdns_service is None


@pytest.mark.parametrize(
    ("keys", "key", "problem"),
    [
        ({"noise_psk": "not base64!"}, "noise_psk", "must be base64"),
        ({"noise_psk": base64.b64encode(b"short").decode()}, "noise_psk", "32 bytes"),
        ({"noise_psk": PSK, "password": "pw"}, "password", "does not go with noise_psk"),
        ({"mac": "AA:BB:CC"}, "mac", "must be a MAC address"),
        ({"ota_port": 0}, "ota_port", "must be an integer in 1..65535"),
        ({"expected_name": ""}, "expected_name", "must be a non-empty string"),
        ({"token": "x" * 16}, "token", "a esphome device does not use it"),
        ({"options": {"ota_attempts": 0}}, "options.ota_attempts", "1..100"),
    ],
)
def test_a_mistake_is_one_line_naming_the_key(keys: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _parse(**keys)
    message = refused.value.message
    assert "\n" not in message
    assert message.startswith(f"gw.toml: devices[0].{key}: "), message
    assert problem in message, message


def test_a_secret_is_never_repeated_and_other_drivers_refuse_the_keys() -> None:
    with pytest.raises(ConfigError) as refused:
        _parse(noise_psk="c2VjcmV0LXZhbHVl")  # base64, but 12 bytes
    assert "c2VjcmV0LXZhbHVl" not in refused.value.message
    assert "a value of 16 characters" in refused.value.message
    for key, value in (("noise_psk", PSK), ("ota_port", 3232), ("mac", "AA:BB:CC:DD:EE:FF")):
        with pytest.raises(ConfigError, match=rf"devices\[0\]\.{key}: only esphome devices"):
            parse_config({"devices": [{"id": "d", "driver": "jsonline", "port": 1, key: value}]})


# ---------------------------------------------------------------------------- the device


async def test_the_device_view_shows_device_info_and_entity_commands_work() -> None:
    sim = simulator()
    async with sim, rig(sim) as r:
        await connected(r)
        status, view = await r.call("GET", "/api/devices/porch-light")
        assert status == 200, view
        info = view["link"]["device_info"]
        assert info["name"] == "porch-light"
        assert info["mac"] == sim.mac
        assert (info["esphome_version"], info["project_version"]) == ("2026.11.0", "1.0.0")
        assert info["compilation_time"] == sim.compilation_time
        assert info["encrypted"] is True
        assert view["link"]["firmware"] == "1.0.0"
        switch = {"op": "switch", "args": {"entity": "relay", "state": True}}
        status, accepted = await r.submit(switch)
        assert status == 202, accepted
        done = await r.final(accepted["id"])
        assert done["state"] == "succeeded", done
        assert done["result"] == {"entity": "relay", "state": True}
        assert sim.entities["relay"].state is True
        status, refused = await r.submit(
            {"op": "switch", "args": {"entity": "nope", "state": True}}
        )
        assert (status, refused["code"]) == (422, "invalid_request"), refused


@pytest.mark.parametrize(
    ("device", "keys", "code"),
    [
        ({"password": "api-pw"}, {"noise_psk": None, "password": "api-pw"}, None),
        ({"password": "api-pw"}, {"noise_psk": None, "password": "wrong"}, "auth_failed"),
        ({}, {"noise_psk": base64.b64encode(bytes(32)).decode()}, "auth_failed"),
        ({}, {"expected_name": "someone-else"}, "device_mismatch"),
        ({}, {"mac": "AA:BB:CC:DD:EE:99"}, "device_mismatch"),
    ],
    ids=["password", "wrong-password", "wrong-key", "wrong-name", "wrong-mac"],
)
async def test_the_config_keys_decide_who_may_connect(
    device: dict[str, Any], keys: dict[str, Any], code: str | None
) -> None:
    sim = simulator(noise_psk=None, **device) if device else simulator()
    async with sim, rig(sim, **keys) as r:
        link = r.server.gateway.links["porch-light"]
        if code is None:
            await connected(r)
            return
        async with asyncio.timeout(IO_BOUND_S):
            await link.wait_for_state(LinkState.FAILED)  # terminal: no auth_retry_s
        assert link.last_error is not None
        assert link.last_error.code.value == code
        assert sim.commands == []


async def test_a_killed_device_is_found_again_and_a_silent_one_is_declared_dead() -> None:
    sim = simulator()
    async with sim, rig(sim, heartbeat_s=0.2) as r:
        await connected(r)
        link = r.server.gateway.links["porch-light"]
        await sim.kill()  # power loss: no goodbye
        async with asyncio.timeout(IO_BOUND_S):
            await link.wait_for_state(LinkState.BACKOFF)
        await sim.start()
        await connected(r)
        assert link.statistics().connects == 2
        sim.go_silent()  # half-open: the socket stays, nothing answers
        async with asyncio.timeout(IO_BOUND_S):
            await link.wait_for_state(LinkState.LOST, LinkState.BACKOFF)
        error = link.statistics().last_error
        assert error is not None
        assert (error.code, "liveness" in error.message) == ("timeout", True)
        _, view = await r.call("GET", "/api/devices/porch-light")
        assert view["link"]["last_error"]["code"] == "timeout", view
        sim.speak()
        await connected(r)


# ---------------------------------------------------------------------------- firmware


async def test_a_firmware_refused_at_submit_stores_nothing(tmp_path: Path) -> None:
    sim = simulator()
    async with rig(sim) as r:
        args = image_args(tmp_path)
        for bad in ({**args, "size": 1}, {**args, "path": str(tmp_path / "gone.bin")}, {}):
            status, refused = await r.submit({"op": "firmware", "args": bad})
            assert (status, refused["code"]) == (422, "invalid_request"), refused
            assert "esphome_ota" in refused["message"], refused
        status, listed = await r.call("GET", "/api/commands")
        assert listed["commands"] == []


async def test_queued_while_asleep_it_is_flashed_once_and_never_again_after_flaps(
    tmp_path: Path,
) -> None:
    sim = simulator()
    async with rig(sim) as r:
        status, accepted = await r.submit({"op": "firmware", "args": image_args(tmp_path)})
        assert status == 202, accepted
        assert accepted["state"] == "queued"
        before = sim.compilation_time
        await sim.start()  # it wakes
        try:
            done = await r.final(accepted["id"])
            assert done["state"] == "succeeded", done
            assert done["result"]["installed"] is True
            assert sim.ota is not None
            assert [f.sha256 for f in sim.ota.flashes] == [hashlib.sha256(IMAGE).hexdigest()]
            await eventually(lambda: len(sim.builds) == 1, what="the reboot into the new build")
            await connected(r)
            await eventually(
                lambda: _view_build(r) != before, what="the new build in the device view"
            )
            for _ in range(10):
                await sim.restart()
                await connected(r)
            assert len(sim.ota.flashes) == 1 and sim.ota.sessions == 1
            command = await r.server.gateway.outbox.get(accepted["id"])
            assert command.attempts == 1
        finally:
            await sim.stop()


def _view_build(r: Rig) -> str | None:
    session = r.server.gateway.links["porch-light"].session
    return None if session is None else str(session.extra["compilation_time"])


async def test_a_drop_mid_transfer_sends_the_whole_image_again(tmp_path: Path) -> None:
    sim = simulator()
    assert sim.ota is not None
    sim.ota.drop_after(len(IMAGE) // 2)
    async with sim, rig(sim) as r:
        _, accepted = await r.submit({"op": "firmware", "args": image_args(tmp_path)})
        done = await r.final(accepted["id"])
        assert done["state"] == "succeeded", done
        assert done["result"]["resumes"] == 1
        assert done["result"]["bytes_sent"] > len(IMAGE)  # half, then all of it
        assert sim.ota.drops == 1 and sim.ota.sessions == 2
        assert [f.image for f in sim.ota.flashes] == [IMAGE]


async def test_a_wrong_ota_password_ends_auth_failed_and_flashes_nothing(tmp_path: Path) -> None:
    sim = simulator(ota_password="the-right-one")
    async with sim, rig(sim, ota_password="a-wrong-one") as r:
        _, accepted = await r.submit({"op": "firmware", "args": image_args(tmp_path)})
        done = await r.final(accepted["id"])
        assert done["state"] == "rejected", done
        assert done["last_error"]["code"] == "auth_failed"
        assert sim.ota is not None and sim.ota.flashes == []


async def test_cancelled_while_queued_nothing_is_flashed(tmp_path: Path) -> None:
    sim = simulator()
    async with rig(sim) as r:
        _, accepted = await r.submit({"op": "firmware", "args": image_args(tmp_path)})
        status, cancelled = await r.call("DELETE", f"/api/commands/{accepted['id']}")
        assert status == 200, cancelled
        assert cancelled["state"] == "cancelled"
        async with sim:
            await connected(r)
            status, switched = await r.submit(
                {"op": "switch", "args": {"entity": "relay", "state": True}}
            )
            assert (await r.final(switched["id"]))["state"] == "succeeded"  # delivery ran
        assert sim.ota is not None and sim.ota.sessions == 0 and sim.ota.flashes == []


async def test_a_gateway_restarted_while_it_is_queued_still_delivers_it(tmp_path: Path) -> None:
    sim = simulator()
    store = f"sqlite:///{tmp_path / 'gw.db'}"
    async with rig(sim, store=store) as r:
        status, accepted = await r.submit({"op": "firmware", "args": image_args(tmp_path)})
        assert status == 202, accepted
    async with sim, rig(sim, store=store) as r:
        done = await r.final(accepted["id"])
        assert done["state"] == "succeeded", done
        assert sim.ota is not None and len(sim.ota.flashes) == 1


async def test_a_lost_answer_is_settled_by_the_new_build_the_device_comes_back_with(
    tmp_path: Path,
) -> None:
    """The device installs the image and reboots, but its answer is lost: the build it
    runs was noted before the upload, the device comes back reporting another one, so the
    command succeeds as installed and nothing is sent again."""
    sim = simulator()
    assert sim.ota is not None
    sim.ota.drop_after_flash()
    async with sim, rig(sim) as r:
        await connected(r)
        before = sim.compilation_time
        _, accepted = await r.submit({"op": "firmware", "args": image_args(tmp_path)})
        done = await r.final(accepted["id"])
        assert done["state"] == "succeeded", done
        assert done["result"]["skipped"] is True
        assert "rebooted into a new build" in done["result"]["reason"]
        assert before in done["result"]["reason"]
        assert len(sim.ota.flashes) == 1 and sim.ota.sessions == 1


async def test_the_noted_build_survives_a_failed_attempt(tmp_path: Path) -> None:
    """With one upload a delivery and no time to settle, the lost answer fails the attempt
    (retried by the outbox); the build noted before
    the upload stays in the command's progress, and the next attempt (the device back
    with its new build) acknowledges it without sending again."""
    sim = simulator()
    assert sim.ota is not None
    sim.ota.drop_after_flash()
    async with sim, rig(sim, options={"ota_settle_s": 0, "ota_attempts": 1}) as r:
        await connected(r)
        before = sim.compilation_time
        _, accepted = await r.submit(
            {"op": "firmware", "args": image_args(tmp_path), "max_attempts": 3}
        )
        done = await r.final(accepted["id"])
        assert done["state"] == "succeeded", done
        assert done["result"]["skipped"] is True, done
        command = await r.server.gateway.outbox.get(accepted["id"])
        assert command.attempts == 2
        assert len(sim.ota.flashes) == 1 and sim.ota.sessions == 1
        assert sim.builds[0]["compilation_time"] != before


async def test_a_device_already_reporting_the_target_build_is_not_flashed(tmp_path: Path) -> None:
    sim = simulator()
    async with sim, rig(sim) as r:
        await connected(r)
        args = {**image_args(tmp_path), "build": {"compilation_time": sim.compilation_time}}
        _, accepted = await r.submit({"op": "firmware", "args": args})
        done = await r.final(accepted["id"])
        assert done["state"] == "succeeded", done
        assert done["result"]["reason"] == "the device already runs the target build"
        assert sim.ota is not None and sim.ota.sessions == 0


# ---------------------------------------------------------------------------- a process


@contextlib.asynccontextmanager
async def device_process(port: int, ota_port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """``keeplink sim --esphome`` with an OTA port, in a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeplink", "sim", "--esphome", "--port", str(port),
        "--name", "porch-light", "--noise-psk", PSK, "--ota-port", str(ota_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert f"listening on 127.0.0.1:{port}, OTA on port {ota_port}" in line, line
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


async def test_a_device_process_killed_after_its_flash_is_found_again_and_not_reflashed(
    tmp_path: Path,
) -> None:
    port, ota_port = free_port(), free_port()
    config = {
        "gateway": {"listen": "127.0.0.1:0", "store": "memory:", "token": TOKEN},
        "devices": [
            {
                "id": "porch-light", "driver": "esphome", "port": port, "noise_psk": PSK,
                "ota_port": ota_port, "backoff": FAST, "debounce_online_s": 0,
                "debounce_offline_s": 0,
            }
        ],
    }  # fmt: skip
    server = Server(parse_config(config, source="test_gateway_esphome"), token=TOKEN)
    await server.start()
    try:
        link = server.gateway.links["porch-light"]
        async with device_process(port, ota_port) as first:
            command = await server.gateway.outbox.submit(
                "porch-light", "firmware", image_args(tmp_path)
            )
            async with asyncio.timeout(IO_BOUND_S):
                done = await server.gateway.outbox.wait(command.id)
            assert done.state.value == "succeeded", done.last_error
            assert done.result is not None and done.result["installed"] is True
            first.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(first.wait(), IO_BOUND_S) == -signal.SIGKILL
            async with asyncio.timeout(IO_BOUND_S):
                await link.wait_for_state(LinkState.BACKOFF)
        connects = link.statistics().connects
        async with device_process(port, ota_port):
            async with asyncio.timeout(IO_BOUND_S):
                await link.wait_for_state(LinkState.CONNECTED)
            assert link.statistics().connects > connects
            again = await server.gateway.outbox.get(command.id)
            assert (again.state.value, again.attempts) == ("succeeded", 1)
    finally:
        await server.stop()


async def test_a_firmware_waits_until_the_device_has_been_online_long_enough(
    tmp_path: Path,
) -> None:
    sim = simulator()
    options = {"ota_min_online_s": 0.5, "ota_retry_delay_s": 0.05}
    async with sim, rig(sim, options=options) as r:
        await connected(r)
        online_since = r.server.gateway.presence.online_since("porch-light")
        assert online_since is not None
        status, accepted = await r.submit({"op": "firmware", "args": image_args(tmp_path)})
        assert status == 202, accepted
        stored = await r.server.gateway.outbox.get(accepted["id"])
        assert (stored.precondition, stored.precondition_args) == ("min_online", {"seconds": 0.5})
        done = await r.final(accepted["id"])
        assert done["state"] == "succeeded", done
        assert done["updated_at"] >= online_since + 0.5  # not flashed in its first 0.5 s
        assert sim.ota is not None and len(sim.ota.flashes) == 1
