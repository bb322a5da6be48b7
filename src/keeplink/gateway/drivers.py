"""The drivers the gateway runs, declared once: what each takes and how its links are made.

Each :class:`DriverSpec` says which ``options`` its driver takes (a pydantic model: the
options' names, types and defaults), which device keys it requires or refuses, which pip
extra it needs, whether its devices share one hub link (devices on one host and port) and
which settings those devices must then agree on, and how to build its link and presence
sources. The config parser (:mod:`keeplink.gateway.config`) validates from these
declarations, the runtime plans its links from them, and ``tests/test_docs.py`` checks that
``docs/gateway.md`` describes every option they declare.

A driver may also take device keys of its own at the top level of ``[[devices]]`` (an
ESPHome device's ``noise_psk``, ``mac``, ``ota_port``: its ``keys`` model, validated like
``options``) and deliver some ops with executors of its own (ESPHome firmware over espota2,
jsonline firmware as ``ota.*`` requests: its ``executors``).

Adding a driver is one entry in :data:`REGISTRY` (its options model and its ``build``) and
its protocol module under ``keeplink.drivers``.
"""

from __future__ import annotations

import binascii
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Final, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator

from keeplink._link import Link
from keeplink._slots import SlotPool
from keeplink.drivers.jsonline import JsonLineDriver
from keeplink.outbox import Executor, FirmwareTransfer
from keeplink.outbox.esphome_ota import EsphomeOta
from keeplink.presence import PresenceTracker

if TYPE_CHECKING:
    from keeplink.gateway.config import DeviceConfig

__all__ = [
    "REGISTRY",
    "Built",
    "DeviceKeys",
    "DriverSpec",
    "EsphomeKeys",
    "EsphomeOptions",
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


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("must be an integer in 1..65535")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise ValueError("must be an integer in 1..100")
    return value


def _delay(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError("must be a number of seconds >= 0")
    return float(value)


def _noise_key(value: object) -> str:
    text = _text(value)
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 (the device's api: encryption: key)") from None
    if len(raw) != 32:
        raise ValueError(f"must be the base64 of 32 bytes, this is {len(raw)} bytes")
    return text


def _mac(value: object) -> str:
    text = _text(value)
    plain = text.replace(":", "").replace("-", "").replace(".", "").lower()
    if len(plain) != 12 or any(c not in "0123456789abcdef" for c in plain):
        raise ValueError("must be a MAC address like 'AA:BB:CC:DD:EE:FF'")
    return text


Text = Annotated[str, BeforeValidator(_text)]
"""A non-empty string without NUL characters."""
Port = Annotated[int, BeforeValidator(_port)]
"""A TCP port, 1 … 65535."""
Count = Annotated[int, BeforeValidator(_count)]
"""An integer 1 … 100."""
Delay = Annotated[float, BeforeValidator(_delay)]
"""A finite number of seconds >= 0."""
NoiseKey = Annotated[str, BeforeValidator(_noise_key)]
"""An ESPHome API encryption key: the base64 of 32 bytes."""
Mac = Annotated[str, BeforeValidator(_mac)]
"""A MAC address: 12 hex digits, any case, with or without separators."""


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


class EsphomeOptions(DriverOptions):
    ota_attempts: Count = 3
    """Whole uploads of one image within one delivery (espota2 cannot resume)."""
    ota_retry_delay_s: Delay = 5.0
    """The wait before the image is sent again after a failed upload."""
    ota_settle_s: Delay = 60.0
    """After a connection lost past the data phase: how long to wait for the device to
    reconnect reporting a new build before the image is sent again."""
    ota_min_online_s: Delay = 0.0
    """A firmware command waits until the device has been online this long (the outbox's
    ``min_online`` precondition); 0: no wait."""


class DeviceKeys(BaseModel):
    """Device keys a driver takes at the top level of ``[[devices]]``: unknown keys are the
    config parser's to refuse, every value is checked by its type."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EsphomeKeys(DeviceKeys):
    noise_psk: NoiseKey | None = None
    """The device's ``api: encryption: key``; None: plaintext."""
    password: Text | None = None
    """The legacy plaintext API password (not with ``noise_psk``)."""
    expected_name: Text | None = None
    """The node name the device must report; None: the device's ``id``."""
    mac: Mac | None = None
    """The MAC address the device must report; None: not checked."""
    ota_port: Port = 3232
    ota_password: Text | None = None

    @field_validator("password")
    @classmethod
    def _not_with_a_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("noise_psk") is not None:
            raise ValueError("does not go with noise_psk (a Noise device has no API password)")
        return value


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


Executors = Callable[["DeviceConfig"], Mapping[str, Executor]]
"""``executors(device)``: the executor of each op the device gets otherwise than as one
request on its link (firmware)."""


def _firmware_transfer(device: DeviceConfig) -> Mapping[str, Executor]:
    return {"firmware": FirmwareTransfer()}


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
    keys: type[DeviceKeys] = DeviceKeys
    """Device keys of its own, at the top level of ``[[devices]]`` (names, types and
    defaults); a device of another driver that gives one is refused."""
    executors: Executors = _firmware_transfer
    preconditions: Callable[[DeviceConfig], Mapping[str, tuple[str, Mapping[str, Any]]]] = (
        lambda _device: {}
    )
    """``op -> (precondition, its args)`` each such command of the device is submitted with
    (checked at delivery by the outbox)."""
    """How its devices' ``firmware`` (and any other executor op) is delivered: by default
    as ``ota.*`` requests on the device's link (:class:`~keeplink.outbox.FirmwareTransfer`)."""


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


def _esphome(
    devices: Sequence[DeviceConfig], presence: PresenceTracker, slots: SlotPool | None
) -> Built:
    """One device, its own native API link; presence from that link (or mDNS too)."""
    from keeplink.drivers.esphome import EsphomeDriver

    (device,) = devices
    keys = EsphomeKeys.model_validate(device.settings)
    driver = EsphomeDriver(
        host=device.host,
        port=device.port,
        device_id=device.id,
        expected_name=keys.expected_name or device.id,
        noise_psk=keys.noise_psk,
        password=keys.password,
        mac=keys.mac,
    )
    link: Link[Any] = Link(
        driver,
        name=device.id,
        heartbeat_s=device.heartbeat_s,
        backoff=device.backoff,
        slots=slots,
    )
    return Built(link=link)


def _esphome_ota(device: DeviceConfig) -> Mapping[str, Executor]:
    """Firmware to the device's ``ota_port`` over espota2 (see docs/esphome.md)."""
    options = EsphomeOptions.model_validate(device.options)
    keys = EsphomeKeys.model_validate(device.settings)
    ota = EsphomeOta(
        address=lambda _: (device.host, keys.ota_port),
        password=keys.ota_password,
        max_attempts=options.ota_attempts,
        retry_delay_s=options.ota_retry_delay_s,
        settle_s=options.ota_settle_s,
    )
    return {"firmware": ota}


def _esphome_preconditions(device: DeviceConfig) -> Mapping[str, tuple[str, Mapping[str, Any]]]:
    seconds = EsphomeOptions.model_validate(device.options).ota_min_online_s
    return {"firmware": ("min_online", {"seconds": seconds})} if seconds > 0 else {}


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
    "esphome": DriverSpec(
        name="esphome",
        options=EsphomeOptions,
        build=_esphome,
        extra="esphome",
        needs="aioesphomeapi",
        keys=EsphomeKeys,
        # The native API has no token, sequence numbers or window of keeplink's.
        refused=frozenset({"token", "seq_bits", "max_in_flight"}),
        executors=_esphome_ota,
        preconditions=_esphome_preconditions,
    ),
}
"""Every driver the gateway runs, by the name a device's ``driver`` key gives."""
