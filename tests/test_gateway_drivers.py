"""The driver registry: each driver's declarations are what the config parser enforces.

Every mistake in a driver's settings is one ConfigError line naming the file, the key and
the problem; devices of one hub that disagree on a setting of their shared link are refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from helpers import IO_BOUND_S, connected
from keeplink import Link, SlotPool
from keeplink._core.errors import ConfigError
from keeplink.drivers import JsonLineDriver
from keeplink.gateway.config import DeviceConfig, GatewayConfig, parse_config
from keeplink.gateway.drivers import REGISTRY, Built, DriverOptions, DriverSpec, Text
from keeplink.gateway.runtime import Gateway
from keeplink.presence import Presence, PresenceTracker, Source
from keeplink.testing import DeviceSimulator

BASE: dict[str, dict[str, Any]] = {
    "jsonline": {"driver": "jsonline", "port": 7001},
    "modbus": {"driver": "modbus", "port": 502, "unit": 1},
    "mqtt": {"driver": "mqtt", "port": 1883},
    "esphome": {"driver": "esphome", "host": "192.0.2.20", "port": 6053},
}

# driver -> case -> (extra device keys, the key named, the problem)
MISTAKES: dict[str, dict[str, tuple[dict[str, Any], str, str]]] = {
    "jsonline": {
        "option key": ({"options": {"tls": True}}, "options.tls", "takes no options"),
        "wrong type": ({"seq_bits": "8"}, "seq_bits", "must be an integer in 8..32, got '8'"),
        "bad value": ({"seq_bits": 12}, "seq_bits", "must be 8, 16 or 32, got 12"),
    },
    "modbus": {
        "option key": (
            {"options": {"probe_s": 5}},
            "options.probe_s",
            "unknown option; the modbus driver takes one of probe_interval_s",
        ),
        "wrong type": (
            {"options": {"probe_interval_s": "5"}},
            "options.probe_interval_s",
            "must be a positive number of seconds, got '5'",
        ),
        "bad value": (
            {"options": {"probe_interval_s": 0}},
            "options.probe_interval_s",
            "must be a positive number of seconds, got 0",
        ),
    },
    "mqtt": {
        "option key": ({"options": {"qos": 1}}, "options.qos", "unknown option; the mqtt"),
        "wrong type": (
            {"options": {"keepalive_s": 1.5}},
            "options.keepalive_s",
            "must be an integer in 1..65535, got 1.5",
        ),
        "bad value": (
            {"options": {"payload_online": ""}},
            "options.payload_online",
            "must be a non-empty string, got ''",
        ),
    },
    "esphome": {
        "option key": ({"options": {"ota": 1}}, "options.ota", "unknown option; the esphome"),
        "wrong type": ({"ota_port": "3232"}, "ota_port", "must be an integer in 1..65535"),
        "bad value": ({"mac": "AA:BB"}, "mac", "must be a MAC address like"),
    },
}


def _parse(*devices: dict[str, Any]) -> GatewayConfig:
    return parse_config(
        {"devices": [{"id": f"d{i}", **d} for i, d in enumerate(devices)]},
        source="gw.toml",
    )


def test_every_driver_has_its_mistakes_checked() -> None:
    assert set(MISTAKES) == set(REGISTRY) == set(BASE)


@pytest.mark.parametrize(
    ("driver", "extra", "key", "problem"),
    [(d, *case) for d, cases in MISTAKES.items() for case in cases.values()],
    ids=[f"{d}-{c}" for d, cases in MISTAKES.items() for c in cases],
)
def test_a_mistake_is_one_line_naming_file_key_and_problem(
    driver: str, extra: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        _parse({**BASE[driver], **extra})
    message = refused.value.message
    assert "\n" not in message
    assert message.startswith(f"gw.toml: devices[0].{key}: "), message
    assert problem in message, message


@pytest.mark.parametrize("driver", REGISTRY)
def test_the_declared_options_and_defaults_are_taken(driver: str) -> None:
    """Options as given are kept (defaults not filled in); each declared default passes."""
    spec = REGISTRY[driver]
    defaults = {k: f.default for k, f in spec.options.model_fields.items() if f.default}
    (device,) = _parse({**BASE[driver], "options": defaults}).devices
    assert device.options == defaults
    (bare,) = _parse(BASE[driver]).devices
    assert bare.options == {}
    assert bare.seq_bits == spec.seq_bits


def test_a_required_key_and_a_key_of_another_driver_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"devices\[0\]\.unit: is required for a modbus"):
        _parse({"driver": "modbus", "port": 502})
    with pytest.raises(ConfigError, match=r"devices\[0\]\.unit: only modbus devices have a"):
        _parse({**BASE["mqtt"], "unit": 1})
    with pytest.raises(ConfigError, match=r"devices\[0\]\.device_id: only jsonline devices"):
        _parse({**BASE["modbus"], "device_id": "x"})
    for driver, spec in REGISTRY.items():
        for key in sorted(spec.refused):
            with pytest.raises(ConfigError, match=rf"devices\[0\]\.{key}: a {driver} device"):
                _parse({**BASE[driver], key: 8})


# A value of each hub setting that differs from the default.
OTHER: dict[str, Any] = {
    "backoff": {"initial_s": 2},
    "max_in_flight": 2,
    "hub": "ble",
    "hub_slots": 2,
}


@pytest.mark.parametrize(
    ("driver", "key"),
    [(d, k) for d, spec in REGISTRY.items() for k in spec.hub_settings],
)
def test_devices_of_one_hub_that_disagree_on_a_hub_setting_are_refused(
    driver: str, key: str
) -> None:
    first = {**BASE[driver], "unit": 1} if driver == "modbus" else BASE[driver]
    second = {**first, "unit": 2} if driver == "modbus" else first
    changed = {key: OTHER[key]}
    if key == "hub_slots":
        first, second = {**first, "hub": "ble"}, {**second, "hub": "ble"}
    _parse(first, second)  # agreeing devices share the link
    with pytest.raises(ConfigError) as refused:
        _parse(first, {**second, **changed})
    message = refused.value.message
    assert message.startswith(f"gw.toml: devices[1].{key}: "), message
    assert "devices[0]" in message


@pytest.mark.parametrize("driver", [d for d, spec in REGISTRY.items() if spec.hub])
def test_devices_of_one_hub_with_different_options_are_refused(driver: str) -> None:
    key = next(iter(REGISTRY[driver].options.model_fields))
    one = {"probe_interval_s": 2} if key == "probe_interval_s" else {key: "a"}
    two = {"probe_interval_s": 3} if key == "probe_interval_s" else {key: "b"}
    first = {**BASE[driver], "options": one}
    second = {**BASE[driver], "options": two}
    if driver == "modbus":
        second["unit"] = 2
    with pytest.raises(ConfigError, match=r"devices\[1\]\.options: this .* shares one link"):
        _parse(first, second)
    second["options"] = one
    _parse(first, second)  # the same options on both: one link


def test_a_driver_without_a_hub_gives_every_device_its_own_settings() -> None:
    one = {**BASE["jsonline"], "max_in_flight": 1}
    two = {**BASE["jsonline"], "max_in_flight": 2}
    assert [d.max_in_flight for d in _parse(one, two).devices] == [1, 2]


# ---------------------------------------------------------------------------- a new driver


class RelayOptions(DriverOptions):
    greeting: Text = "hi"


@dataclass
class Announcer:
    """A presence source of the new driver: says its devices are online when started."""

    presence: PresenceTracker
    devices: list[str]
    started: bool = False
    closed: bool = False

    def start(self) -> None:
        self.started = True
        for device in self.devices:
            self.presence.report(device, Source.PROBE, True)

    async def close(self) -> None:
        self.closed = True


def _relay(
    devices: Sequence[DeviceConfig], presence: PresenceTracker, slots: SlotPool | None
) -> Built:
    first = devices[0]
    driver = JsonLineDriver(host=first.host, port=first.port, device_id="relay-hub")
    link: Link[Any] = Link(driver, name=f"relay:{first.port}", heartbeat_s=None, slots=slots)
    return Built(link=link, sources=(Announcer(presence, [d.id for d in devices]),))


RELAY = DriverSpec(
    name="relay",
    options=RelayOptions,
    build=_relay,
    hub=True,
    hub_settings=("backoff",),
    refused=frozenset({"token"}),
    command_defaults=lambda device: {"target": device.id},
)


async def test_a_driver_added_to_the_registry_is_validated_planned_and_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One registry entry is all a new driver needs: the config checks its options and
    keys, the gateway builds one link for its hub, starts and closes its presence source,
    and fills its command defaults."""
    monkeypatch.setitem(REGISTRY, "relay", RELAY)  # type: ignore[index]
    async with DeviceSimulator(device_id="relay-hub") as sim:
        relay = {"driver": "relay", "port": sim.port}
        with pytest.raises(ConfigError, match=r"devices\[0\]\.options\.greeting: must be a non"):
            _parse({**relay, "options": {"greeting": ""}})
        with pytest.raises(ConfigError, match=r"devices\[1\]\.token: a relay device does not"):
            _parse(relay, {**relay, "token": "x" * 16})
        config = parse_config(
            {
                "gateway": {"store": "memory:"},
                "devices": [
                    {"id": "lamp", **relay, "options": {"greeting": "hello"}},
                    {"id": "fan", **relay, "debounce_online_s": 0},
                ],
            }
        )
        assert config.devices[0].options == {"greeting": "hello"}
        gateway = Gateway(config)
        await gateway.start()
        try:
            assert gateway.links["lamp"] is gateway.links["fan"]
            (source,) = gateway.probes
            assert isinstance(source, Announcer) and source.started
            assert source.devices == ["lamp", "fan"]
            async with asyncio.timeout(IO_BOUND_S):
                await gateway.presence.wait_for("fan", Presence.ONLINE)
            await connected(gateway.links["fan"])  # the one link reaches the hub
            assert gateway.command_args("fan", {"x": 1}) == {"x": 1, "target": "fan"}
            assert gateway.command_args("fan", {"target": "b"}) == {"target": "b"}
        finally:
            await gateway.stop()
        assert source.closed
