"""The ESPHome driver's own decisions, without a socket: configuration, requests, and which
state update confirms which command."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from aioesphomeapi.model import (
    ButtonInfo,
    DeviceInfo,
    LightInfo,
    LightState,
    NumberInfo,
    NumberState,
    SensorState,
    SwitchInfo,
    SwitchState,
)

from keeplink import ConfigError, InvalidRequestError, StatePush
from keeplink.drivers.esphome import (
    MAX_AWAITING,
    Confirmed,
    EntityCommand,
    EsphomeDriver,
    Introduced,
    normalize_mac,
)

PSK = base64.b64encode(bytes(32)).decode()


def driver_with_entities(**kwargs: Any) -> EsphomeDriver:
    """A driver that has seen one handshake's entity list (fed through its handshake)."""
    driver = EsphomeDriver(host="127.0.0.1", expected_name="kitchen", **kwargs)
    entities = (
        SwitchInfo(object_id="relay", key=1, name="Relay"),
        NumberInfo(object_id="setpoint", key=2, name="Setpoint", min_value=0, max_value=100),
        LightInfo(object_id="lamp", key=3, name="Lamp"),
        ButtonInfo(object_id="reboot", key=4, name="Reboot"),
    )

    class Handshake:
        async def send(self, frame: Any) -> None:
            pass

        async def receive(self) -> Any:
            return Introduced(info=DeviceInfo(name="kitchen"), entities=entities)

    asyncio.run(driver.handshake(Handshake()))
    return driver


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"host": ""}, "host"),
        ({"host": "h", "port": 0, "expected_name": "k"}, "port"),
        ({"host": "h"}, "expected_name"),
        ({"host": "h", "expected_name": "k", "noise_psk": "not base64!"}, "base64"),
        ({"host": "h", "expected_name": "k", "noise_psk": "AAAA"}, "32 bytes"),
        ({"host": "h", "expected_name": "k", "noise_psk": PSK, "password": "p"}, "together"),
        ({"host": "h", "expected_name": "k", "mac": "aa:bb"}, "MAC"),
    ],
)
def test_a_bad_configuration_is_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EsphomeDriver(**kwargs)


def test_macs_are_compared_in_one_spelling() -> None:
    assert normalize_mac("AA:BB:CC:DD:EE:01") == "aabbccddee01"
    assert normalize_mac("aa-bb-cc-dd-ee-01") == "aabbccddee01"
    assert normalize_mac("aabb.ccdd.ee01") == "aabbccddee01"
    with pytest.raises(ValueError, match="not a MAC"):
        normalize_mac("aabbccddee0g")


def test_before_any_handshake_only_the_shape_of_a_command_is_checked() -> None:
    driver = EsphomeDriver(host="h", expected_name="kitchen")
    frame = driver.build_request(7, "switch", {"entity": "anything", "state": False}, "k")
    assert frame == EntityCommand(seq=7, op="switch", entity="anything", state=False)
    with pytest.raises(InvalidRequestError, match="finite number"):
        driver.build_request(7, "number", {"entity": "x", "value": float("nan")}, None)
    with pytest.raises(InvalidRequestError, match="finite number"):
        driver.build_request(7, "number", {"entity": "x", "value": True}, None)


def test_after_a_handshake_the_entities_are_checked() -> None:
    driver = driver_with_entities()
    with pytest.raises(InvalidRequestError, match="no entity 'nope'"):
        driver.build_request(1, "switch", {"entity": "nope", "state": True}, None)
    with pytest.raises(InvalidRequestError, match="is a button, not a light"):
        driver.build_request(1, "light", {"entity": "reboot", "state": True}, None)
    with pytest.raises(InvalidRequestError, match="outside"):
        driver.build_request(1, "number", {"entity": "setpoint", "value": -1}, None)
    assert driver.build_request(1, "button", {"entity": "reboot"}, None) == EntityCommand(
        seq=1, op="button", entity="reboot"
    )


def test_only_the_state_that_was_asked_for_confirms_a_command() -> None:
    driver = driver_with_entities()
    on = driver.build_request(1, "switch", {"entity": "relay", "state": True}, None)
    assert isinstance(on, EntityCommand)
    driver.expect(on)
    assert driver.on_state(SwitchState(key=1, state=False)) == [StatePush(values={"relay": False})]
    assert driver.on_state(SwitchState(key=1, state=True)) == [
        Confirmed(seq=1, entity="relay", state=True),
        StatePush(values={"relay": True}),
    ]
    # Confirmed once: the next update is a state push only.
    assert driver.on_state(SwitchState(key=1, state=True)) == [StatePush(values={"relay": True})]


def test_numbers_and_lights_are_compared_as_the_device_rounds_them() -> None:
    driver = driver_with_entities()
    number = driver.build_request(2, "number", {"entity": "setpoint", "value": 21.3}, None)
    light = driver.build_request(
        3, "light", {"entity": "lamp", "state": True, "brightness": 0.3}, None
    )
    assert isinstance(number, EntityCommand)
    assert isinstance(light, EntityCommand)
    driver.expect(number)
    driver.expect(light)
    near = 21.3 + 5e-5  # what arrives is a 32-bit float, never exactly what was sent
    confirmed = driver.on_state(NumberState(key=2, state=near))[0]
    assert isinstance(confirmed, Confirmed)
    assert confirmed.seq == 2
    assert driver.on_state(NumberState(key=2, state=near)) == [
        StatePush(values={"setpoint": pytest.approx(near)})
    ]
    dim = driver.on_state(LightState(key=3, state=True, brightness=0.5))
    assert not any(isinstance(f, Confirmed) for f in dim)
    bright = driver.on_state(LightState(key=3, state=True, brightness=0.3000001))
    assert isinstance(bright[0], Confirmed)
    assert bright[0].seq == 3


def test_a_device_that_never_confirms_grows_no_waiting_list() -> None:
    driver = driver_with_entities()
    for seq in range(MAX_AWAITING + 10):
        frame = driver.build_request(seq, "switch", {"entity": "relay", "state": True}, None)
        assert isinstance(frame, EntityCommand)
        driver.expect(frame)
    confirmed = [
        f for f in driver.on_state(SwitchState(key=1, state=True)) if isinstance(f, Confirmed)
    ]
    assert [f.seq for f in confirmed] == list(range(10, MAX_AWAITING + 10))


def test_a_state_of_an_entity_it_was_not_told_about_is_dropped() -> None:
    driver = driver_with_entities()
    assert driver.on_state(SensorState(key=99, state=1.0)) == []
    assert driver.on_state(SensorState(key=2, state=1.0, missing_state=True)) == [
        StatePush(values={"setpoint": None})
    ]
