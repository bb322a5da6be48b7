"""The ESPHome driver under a Link, against the native-API simulator (real loopback sockets).

aioesphomeapi runs its own timers on the event loop's clock, so these tests run in real
time with short timeouts; every wait is bounded by IO_BOUND_S.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aioesphomeapi.client import APIClient
from aioesphomeapi.model import SwitchState

from helpers import IO_BOUND_S, Recorder, connected, eventually, until_state
from keeplink import (
    Acknowledged,
    Backoff,
    ErrorCode,
    FrameReceived,
    InvalidRequestError,
    Link,
    LinkState,
    StatePush,
    TimedOut,
)
from keeplink.drivers.esphome import EsphomeDriver
from keeplink.testing.esphome import EsphomeSimulator

PSK = base64.b64encode(bytes(range(32))).decode()
OTHER_PSK = base64.b64encode(bytes(range(1, 33))).decode()
FAST = Backoff(initial_s=0.05, factor=2.0, cap_s=0.2)


def esphome_link(sim: EsphomeSimulator, **kwargs: Any) -> Link[Any]:
    link_kwargs = {
        key: kwargs.pop(key) for key in ("heartbeat_s", "liveness_s", "backoff") if key in kwargs
    }
    link_kwargs.setdefault("heartbeat_s", None)
    link_kwargs.setdefault("backoff", FAST)
    kwargs.setdefault("expected_name", sim.name)
    if sim.noise_psk is not None:
        kwargs.setdefault("noise_psk", sim.noise_psk)
    driver = EsphomeDriver(host=sim.host, port=sim.port, **kwargs)
    return Link(driver, name=sim.name, rng=lambda: 1.0, **link_kwargs)


@pytest.fixture(params=["plaintext", "noise"])
async def device(request: pytest.FixtureRequest) -> AsyncIterator[EsphomeSimulator]:
    psk = PSK if request.param == "noise" else None
    async with EsphomeSimulator(name="kitchen", noise_psk=psk) as sim:
        yield sim


def pushes(rec: Recorder) -> list[dict[str, Any]]:
    return [
        dict(e.frame.values)  # type: ignore[attr-defined]
        for e in rec.of(FrameReceived)
        if isinstance(e.frame, StatePush)  # type: ignore[attr-defined]
    ]


# ---------------------------------------------------------------------------- the simulator


async def test_the_simulator_speaks_to_aioesphomeapis_own_client(
    device: EsphomeSimulator,
) -> None:
    client = APIClient(
        device.host, device.port, None, noise_psk=device.noise_psk, provide_time=False
    )
    async with asyncio.timeout(IO_BOUND_S):
        await client.connect(login=True)
        try:
            info = await client.device_info()
            entities, _ = await client.list_entities_services()
            states: list[Any] = []
            client.subscribe_states(states.append)
            relay = next(e for e in entities if e.object_id == "relay")
            await eventually(lambda: len(states) == 4, what="the initial states")
            client.switch_command(relay.key, True)
            await eventually(lambda: len(states) == 5, what="the switch's new state")
        finally:
            await client.disconnect()
    assert (info.name, info.mac_address, info.esphome_version) == (
        "kitchen",
        "AA:BB:CC:DD:EE:01",
        "2026.11.0",
    )
    kinds = {e.object_id: type(e).__name__ for e in entities}
    assert kinds == {
        "relay": "SwitchInfo",
        "setpoint": "NumberInfo",
        "lamp": "LightInfo",
        "reboot": "ButtonInfo",
        "temperature": "SensorInfo",
    }
    assert states[-1] == SwitchState(key=relay.key, state=True)
    assert device.entities["relay"].state is True
    assert device.commands == [("relay", {"state": True})]


# ---------------------------------------------------------------------------- sessions


async def test_connect_reports_the_device_info_in_the_session(device: EsphomeSimulator) -> None:
    link = esphome_link(device)
    async with link:
        info = await connected(link)
    assert info.device_id == "kitchen"
    assert info.firmware == "1.0.0"
    assert info.extra["mac"] == "AA:BB:CC:DD:EE:01"
    assert info.extra["esphome_version"] == "2026.11.0"
    assert info.extra["compilation_time"] == device.compilation_time
    assert info.extra["project_name"] == "keeplink.sim"
    assert info.extra["encrypted"] is (device.noise_psk is not None)


async def test_a_new_build_shows_in_the_next_session(device: EsphomeSimulator) -> None:
    link = esphome_link(device)
    async with link:
        await connected(link)
        await device.reboot_into(project_version="1.1.0", compilation_time="Dec  2 2026, 08:00:00")
        await eventually(
            lambda: link.session is not None and link.session.firmware == "1.1.0",
            what="the session after the reboot",
        )
        assert link.session is not None
        assert link.session.extra["compilation_time"] == "Dec  2 2026, 08:00:00"


async def test_state_updates_arrive_as_state_pushes(device: EsphomeSimulator) -> None:
    link = esphome_link(device)
    rec = Recorder(link)
    async with link:
        await connected(link)
        await eventually(lambda: len(pushes(rec)) == 4, what="the initial states")
        device.set_sensor(22.5)
        await eventually(lambda: len(pushes(rec)) == 5, what="the sensor update")
    assert pushes(rec) == [
        {"relay": False},
        {"setpoint": 20.0},
        {"lamp": {"state": False, "brightness": 1.0}},
        {"temperature": 21.0},
        {"temperature": 22.5},
    ]


# ---------------------------------------------------------------------------- commands


async def test_commands_are_acknowledged_by_the_state_they_asked_for(
    device: EsphomeSimulator,
) -> None:
    link = esphome_link(device)
    async with link:
        await connected(link)
        switch = await link.request("switch", {"entity": "relay", "state": True}, timeout=2)
        number = await link.request("number", {"entity": "setpoint", "value": 21.3}, timeout=2)
        light = await link.request(
            "light", {"entity": "lamp", "state": True, "brightness": 0.5}, timeout=2
        )
        button = await link.request("button", {"entity": "reboot"}, timeout=2)
    assert isinstance(switch, Acknowledged)
    assert switch.result == {"entity": "relay", "state": True}
    assert isinstance(number, Acknowledged)
    assert number.result["state"] == pytest.approx(21.3, abs=1e-4)
    assert isinstance(light, Acknowledged)
    assert light.result["state"]["state"] is True
    assert light.result["state"]["brightness"] == pytest.approx(0.5, abs=1e-3)
    assert isinstance(button, Acknowledged)
    assert button.result == {"entity": "reboot"}
    assert device.entities["reboot"].presses == 1
    assert [c[0] for c in device.commands] == ["relay", "setpoint", "lamp", "reboot"]


async def test_a_command_the_device_never_applies_times_out(device: EsphomeSimulator) -> None:
    link = esphome_link(device)
    async with link:
        await connected(link)
        device.drop_commands = True
        outcome = await link.request("switch", {"entity": "relay", "state": True}, timeout=0.3)
        assert isinstance(outcome, TimedOut)
        assert link.state is LinkState.CONNECTED  # one request's timeout ends nothing else
        device.drop_commands = False
        again = await link.request("switch", {"entity": "relay", "state": True}, timeout=2)
    assert isinstance(again, Acknowledged)
    assert device.commands == [("relay", {"state": True})] * 2


async def test_an_unrelated_state_does_not_acknowledge_a_command(
    device: EsphomeSimulator,
) -> None:
    link = esphome_link(device)
    async with link:
        await connected(link)
        device.drop_commands = True
        pending = asyncio.ensure_future(
            link.request("number", {"entity": "setpoint", "value": 42.0}, timeout=0.5)
        )
        await eventually(lambda: len(device.commands) == 1, what="the command at the device")
        device.set_sensor(30.0)  # another entity's update
        outcome = await pending
    assert isinstance(outcome, TimedOut)


@pytest.mark.parametrize(
    ("op", "args", "match"),
    [
        ("switch", {"entity": "nope", "state": True}, "no entity 'nope'"),
        ("switch", {"entity": "setpoint", "state": True}, "is a number, not a switch"),
        ("number", {"entity": "setpoint", "value": 500}, "outside"),
        ("switch", {"entity": "relay"}, "state"),
        ("switch", {"entity": "relay", "state": "on"}, "true or false"),
        ("light", {"entity": "lamp", "brightness": 2}, "0..1"),
        ("dance", {"entity": "relay"}, "unknown op"),
        ("button", {"entity": "reboot", "hard": True}, "unexpected args"),
    ],
)
async def test_an_invalid_command_fails_before_anything_is_sent(
    op: str, args: dict[str, Any], match: str
) -> None:
    async with EsphomeSimulator(name="kitchen") as device:
        link = esphome_link(device)
        async with link:
            await connected(link)
            with pytest.raises(InvalidRequestError, match=match) as caught:
                await link.request(op, args, timeout=2)
            assert link.state is LinkState.CONNECTED
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert device.commands == []


async def test_an_entity_is_checked_at_send_time_when_the_list_was_not_known() -> None:
    """Before the first session the driver cannot know the entities: a command for an
    unknown one is built, and refused when it would be sent."""
    async with EsphomeSimulator(name="kitchen") as device:
        link = esphome_link(device)
        frame = link.driver.build_request(1, "switch", {"entity": "nope", "state": True}, None)
        assert frame.entity == "nope"
        async with link:
            await connected(link)
            with pytest.raises(InvalidRequestError, match="no entity 'nope'"):
                await link.request("switch", {"entity": "nope", "state": True}, timeout=2)
    assert device.commands == []


# ---------------------------------------------------------------------------- identity


async def expect_refusal(link: Link[Any], code: ErrorCode) -> None:
    async with link:
        state = await until_state(link, LinkState.FAILED)
    assert state is LinkState.FAILED
    assert link.last_error is not None
    assert link.last_error.code is code, link.last_error


@pytest.mark.parametrize("psk", [None, PSK], ids=["plaintext", "noise"])
async def test_another_name_is_a_device_mismatch(psk: str | None) -> None:
    async with EsphomeSimulator(name="garage", noise_psk=psk) as device:
        await expect_refusal(
            esphome_link(device, expected_name="kitchen"), ErrorCode.DEVICE_MISMATCH
        )
        assert device.commands == []


@pytest.mark.parametrize("psk", [None, PSK], ids=["plaintext", "noise"])
async def test_another_mac_is_a_device_mismatch(psk: str | None) -> None:
    async with EsphomeSimulator(name="kitchen", noise_psk=psk, mac="AA:BB:CC:DD:EE:02") as device:
        await expect_refusal(
            esphome_link(device, mac="aa:bb:cc:dd:ee:01"), ErrorCode.DEVICE_MISMATCH
        )
        # On plaintext only keeplink's own DeviceInfo check can have refused it.
        assert device.device_info_requests == (1 if psk is None else 0)


async def test_the_right_mac_in_any_spelling_connects() -> None:
    async with EsphomeSimulator(name="kitchen", mac="AA:BB:CC:DD:EE:02") as device:
        link = esphome_link(device, mac="aabbccddee02")
        async with link:
            info = await connected(link)
    assert info.extra["mac"] == "AA:BB:CC:DD:EE:02"


async def test_the_expected_name_defaults_to_the_device_id() -> None:
    async with EsphomeSimulator(name="garage") as device:
        driver = EsphomeDriver(host=device.host, port=device.port, device_id="kitchen")
        assert driver.expected_name == "kitchen"
        link = Link(driver, name="kitchen", heartbeat_s=None, backoff=FAST)
        await expect_refusal(link, ErrorCode.DEVICE_MISMATCH)


@pytest.mark.parametrize(
    ("device_psk", "device_password", "link_kwargs"),
    [
        (PSK, None, {"noise_psk": OTHER_PSK}),
        (PSK, None, {"noise_psk": None}),
        (None, None, {"noise_psk": PSK}),
        (None, "hunter2", {"password": "wrong"}),
    ],
    ids=["wrong-key", "no-key", "key-for-plaintext", "wrong-password"],
)
async def test_refused_credentials_are_auth_failed(
    device_psk: str | None, device_password: str | None, link_kwargs: dict[str, Any]
) -> None:
    async with EsphomeSimulator(
        name="kitchen", noise_psk=device_psk, password=device_password
    ) as device:
        link = esphome_link(device, **link_kwargs)
        await expect_refusal(link, ErrorCode.AUTH_FAILED)
        assert device.commands == []


async def test_the_right_password_connects_and_commands() -> None:
    async with EsphomeSimulator(name="kitchen", password="hunter2") as device:
        link = esphome_link(device, password="hunter2")
        async with link:
            await connected(link)
            outcome = await link.request("switch", {"entity": "relay", "state": True}, timeout=2)
    assert isinstance(outcome, Acknowledged)


async def test_a_refused_connection_is_connection_failed() -> None:
    async with EsphomeSimulator(name="kitchen") as device:
        port = device.port
    driver = EsphomeDriver(host="127.0.0.1", port=port, expected_name="kitchen")
    link = Link(driver, name="kitchen", heartbeat_s=None, backoff=FAST)
    async with link:
        await until_state(link, LinkState.BACKOFF)
        assert link.last_error is not None
        assert link.last_error.code is ErrorCode.CONNECTION_FAILED


# ---------------------------------------------------------------------------- faults


async def test_a_restarted_device_is_reconnected_by_the_link(device: EsphomeSimulator) -> None:
    link = esphome_link(device)
    async with link:
        await connected(link)
        await device.kill()
        await until_state(link, LinkState.BACKOFF)
        await device.start()
        await connected(link)
        outcome = await link.request("switch", {"entity": "relay", "state": True}, timeout=2)
        stats = link.statistics()
    assert isinstance(outcome, Acknowledged)
    assert stats.connects == 2
    assert device.connections_total >= 2


async def test_a_silent_device_is_found_by_liveness(device: EsphomeSimulator) -> None:
    """Half-open: the socket stays up, nothing comes back. aioesphomeapi's own keepalive
    would take 90 s; the link's heartbeat (a DeviceInfoRequest) finds it in 3 × 0.2 s."""
    link = esphome_link(device, heartbeat_s=0.2)
    async with link:
        await connected(link)
        await eventually(lambda: device.device_info_requests >= 3, what="answered heartbeats")
        device.go_silent()
        loop = asyncio.get_running_loop()
        silent_at = loop.time()
        await until_state(link, LinkState.LOST, LinkState.BACKOFF)
        found_after = loop.time() - silent_at
        assert link.last_error is not None
        assert link.last_error.code is ErrorCode.TIMEOUT
        assert "liveness" in link.last_error.message
        device.speak()
        await connected(link)
    assert 0.3 <= found_after < 3.0  # 3 × 0.2 s after the last answer; never 90 s


async def test_a_sleeping_device_is_reached_again_when_it_wakes() -> None:
    async with EsphomeSimulator(name="kitchen", awake_s=0.4, asleep_s=0.3) as device:
        link = esphome_link(device)
        async with link:
            await connected(link)
            await until_state(link, LinkState.BACKOFF)
            assert link.last_error is not None
            assert "closed the session" in link.last_error.message
            await eventually(lambda: link.statistics().connects >= 2, what="the next wake")
    assert device.connections_total >= 2


async def test_a_command_applied_just_before_a_drop_is_acknowledged_after_the_reconnect(
    device: EsphomeSimulator,
) -> None:
    """The device applies the switch but its state update is lost with the connection; the
    request stays pending, and the states the device sends on the next session confirm it."""
    link = esphome_link(device)

    def lose_the_update(object_id: str, fields: dict[str, Any]) -> None:
        device.go_silent()  # applied, but nothing more reaches this client

    async with link:
        await connected(link)
        device.on_command = lose_the_update
        pending = asyncio.ensure_future(
            link.request("switch", {"entity": "relay", "state": True}, timeout=5)
        )
        await eventually(lambda: device.entities["relay"].state is True, what="applied")
        device.on_command = None
        await device.restart()
        outcome = await pending
        stats = link.statistics()
    assert isinstance(outcome, Acknowledged)
    assert outcome.result == {"entity": "relay", "state": True}
    assert stats.connects == 2
    assert device.commands == [("relay", {"state": True})]  # sent once, never again


async def test_unanswered_pings_end_the_session_through_the_one_disconnect_path(
    device: EsphomeSimulator,
) -> None:
    """aioesphomeapi's own keepalive is a backstop: when it gives up on a device that leaves
    its pings unanswered, the link sees the end like any other and reconnects."""
    link = esphome_link(device, client_keepalive_s=0.1)
    async with link:
        await connected(link)
        device.hold_pings = True
        await until_state(link, LinkState.LOST, LinkState.BACKOFF)
        assert link.last_error is not None
        assert link.last_error.code is ErrorCode.TIMEOUT
        assert "Ping" in link.last_error.message
        device.hold_pings = False
        await connected(link)
    assert device.pings >= 2
