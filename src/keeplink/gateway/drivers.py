"""The drivers the gateway runs, declared once: what each takes and how its links are made.

Each :class:`DriverSpec` says which ``options`` its driver takes (a pydantic model: the
options' names, types and defaults), which device keys it requires or refuses, which pip
extra it needs, whether its devices share one hub link (devices on one host and port) and
which settings those devices must then agree on, and how to build its link and presence
sources. The config parser (:mod:`keeplink.gateway.config`) validates from these
declarations, the runtime plans its links from them, and ``tests/test_docs.py`` checks that
``docs/gateway.md`` describes every option they declare.

Adding a driver is one entry in :data:`REGISTRY` (its options model and its ``build``) and
its protocol module under ``keeplink.drivers``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Final, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict

from keeplink._link import Link
from keeplink._slots import SlotPool
from keeplink.drivers.jsonline import JsonLineDriver
from keeplink.presence import PresenceTracker

if TYPE_CHECKING:
    from keeplink.gateway.config import DeviceConfig

__all__ = [
    "REGISTRY",
    "Built",
    "DriverSpec",
    "JsonLineOptions",
    "ModbusOptions",
    "MqttOptions",
    "PresenceSource",
]


# ---------------------------------------------------------------------------- option types


def _positive_seconds(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not value > 0
    ):
        raise ValueError("must be a positive number of seconds")
    return float(value)


def _whole_seconds(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("must be an integer in 1..65535")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


Seconds = Annotated[float, BeforeValidator(_positive_seconds)]
"""A positive, finite number of seconds (an integer is taken as a float)."""
WholeSeconds = Annotated[int, BeforeValidator(_whole_seconds)]
"""An integer number of seconds, 1 … 65535 (what an MQTT keepalive holds)."""
Text = Annotated[str, BeforeValidator(_text)]
"""A non-empty string without NUL characters."""


class DriverOptions(BaseModel):
    """A driver's ``options`` table: unknown keys refused, every value checked by its type."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonLineOptions(DriverOptions):
    """The jsonline driver takes no options: its settings are device keys."""


class ModbusOptions(DriverOptions):
    probe_interval_s: Seconds = 10.0
    """How often each unit is probed with a one-register read."""


class MqttOptions(DriverOptions):
    client_id: Text | None = None
    """None: ``keeplink-`` and 8 random hex digits."""
    username: Text | None = None
    password: Text | None = None
    keepalive_s: WholeSeconds = 30
    command_topic: Text = "{device}/cmd"
    response_topic: Text | None = None
    availability_topic: Text = "{device}/availability"
    payload_online: Text = "online"
    payload_offline: Text = "offline"


# ---------------------------------------------------------------------------- the registry


class PresenceSource(Protocol):
    """A presence source a driver's build makes besides its link (a unit probe, say): the
    gateway starts it after the links and closes it before them."""

    def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Built:
    """What a driver's ``build`` made for one link: the link (not started) and the presence
    sources that report on its devices."""

    link: Link[Any]
    sources: tuple[PresenceSource, ...] = ()


Build = Callable[["Sequence[DeviceConfig]", PresenceTracker, "SlotPool | None"], Built]
"""``build(devices, presence, slots)``: the link for ``devices`` (one device, or every
device of one hub), not started; ``slots`` is the slot pool of the ``hub`` the first
device names (None: the driver's own default), ``presence`` where its reports go.
Raises ConfigError for what only the driver can check (the device key it names is the
spec's ``checked_key``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DriverSpec:
    """One driver as the gateway knows it."""

    name: str
    options: type[DriverOptions]
    """The ``options`` it takes: names, types and defaults."""
    build: Build
    extra: str | None = None
    """The pip extra it needs (``pip install 'keeplink[EXTRA]'``); None: none."""
    needs: str | None = None
    """The module whose absence means that extra is not installed."""
    hub: bool = False
    """Devices with the same host and port share one link, built from the first one's
    settings; their presence comes from the driver (MQTT availability) or its sources (a
    unit probe), not from the shared link being up."""
    hub_settings: tuple[str, ...] = ()
    """Device keys of that shared link: the devices of one hub must agree on them (and on
    ``options``); a difference is a config error naming the key."""
    seq_bits: int = 32
    """The default of the device key ``seq_bits``."""
    required: Mapping[str, str] = field(default_factory=dict)
    """Device keys it requires, and what they are (said when one is missing)."""
    own: Mapping[str, str] = field(default_factory=dict)
    """Device keys only drivers that declare them take, and why (said to the others)."""
    refused: frozenset[str] = frozenset()
    """Device keys it has no use for: given, they are a config error, not ignored."""
    checked_key: str = "driver"
    """The device key a ConfigError from ``build`` is told under."""
    command_defaults: Callable[[DeviceConfig], Mapping[str, Any]] = lambda _device: {}
    """Args filled into each of a device's commands when the submitter left them out."""


# ---------------------------------------------------------------------------- the builds


def _jsonline(
    devices: Sequence[DeviceConfig], presence: PresenceTracker, slots: SlotPool | None
) -> Built:
    """One device, its own link; presence from that link."""
    (device,) = devices
    driver = JsonLineDriver(
        host=device.host,
        port=device.port,
        token=device.token,
        seq_bits=device.seq_bits,
        max_in_flight=device.max_in_flight or 64,
        device_id=device.device_id or device.id,
    )
    link: Link[Any] = Link(
        driver,
        name=device.id,
        heartbeat_s=device.heartbeat_s,
        backoff=device.backoff,
        slots=slots,
    )
    return Built(link=link)


def _modbus(
    devices: Sequence[DeviceConfig], presence: PresenceTracker, slots: SlotPool | None
) -> Built:
    """The units behind one Modbus TCP gateway: one link, and a probe for their presence."""
    from keeplink.drivers.modbus import modbus_link
    from keeplink.presence.modbus import ProbeTarget, UnitProbe

    first = devices[0]
    link = modbus_link(
        first.host,
        first.port,
        max_in_flight=first.max_in_flight or 1,
        backoff=first.backoff,
        slots=slots,
    )
    options = ModbusOptions.model_validate(first.options)
    probe = UnitProbe(
        link=link,
        presence=presence,
        units=[ProbeTarget(device=d.id, unit=d.unit or 0) for d in devices],
        interval_s=options.probe_interval_s,
    )
    return Built(link=link, sources=(probe,))


def _mqtt(
    devices: Sequence[DeviceConfig], presence: PresenceTracker, slots: SlotPool | None
) -> Built:
    """The devices on one MQTT broker: one link; presence from their availability topics."""
    from keeplink.drivers.mqtt import MqttDriver
    from keeplink.presence.mqtt import MqttAvailability

    first = devices[0]
    host, port = first.host, first.port
    options = dict(first.options)
    mqtt = MqttDriver(
        host,
        port,
        client_id=str(options.pop("client_id", f"keeplink-{uuid.uuid4().hex[:8]}")),
        devices=[d.id for d in devices],
        **options,
    )
    MqttAvailability(mqtt, presence)  # held by the driver, as its listener
    link: Link[Any] = Link(
        mqtt,
        name=f"mqtt:{host}:{port}",
        heartbeat_s=None,
        backoff=first.backoff,
    )
    return Built(link=link)


REGISTRY: Final[Mapping[str, DriverSpec]] = {
    "jsonline": DriverSpec(
        name="jsonline",
        options=JsonLineOptions,
        build=_jsonline,
        own={"device_id": "only jsonline devices name themselves in a handshake"},
    ),
    "modbus": DriverSpec(
        name="modbus",
        options=ModbusOptions,
        build=_modbus,
        hub=True,
        hub_settings=("backoff", "max_in_flight", "hub", "hub_slots"),
        seq_bits=16,
        required={"unit": "the unit id behind the gateway"},
        own={"unit": "only modbus devices have a unit"},
        refused=frozenset({"token", "seq_bits", "heartbeat_s"}),
        command_defaults=lambda device: {"unit": device.unit},
    ),
    "mqtt": DriverSpec(
        name="mqtt",
        options=MqttOptions,
        build=_mqtt,
        extra="mqtt",
        needs="mqtt5",
        hub=True,
        hub_settings=("backoff",),
        seq_bits=16,
        # The broker link takes its credentials and reply width in options.
        refused=frozenset(
            {"token", "seq_bits", "max_in_flight", "heartbeat_s", "hub", "hub_slots"}
        ),
        checked_key="options",
        command_defaults=lambda device: {"device": device.id},
    ),
}
"""Every driver the gateway runs, by the name a device's ``driver`` key gives."""
