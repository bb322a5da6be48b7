"""Gateway configuration: TOML, validated at start. A bad file names the key and the problem.

    [gateway]
    listen = "127.0.0.1:8470"          # loopback unless told otherwise
    store = "sqlite:///keeplink.db"
    token = "a-long-random-write-token"  # bearer token for writes (16 characters or more)
    read_token = "another-long-token"  # bearer token for reads; required off loopback
    ttl_s = 3600                       # commands submitted without a ttl expire after this
    max_clients = 200                  # HTTP + WebSocket connections at once
    header_timeout_s = 10              # a client has this long to send its request headers
    idle_timeout_s = 20                # an idle keep-alive connection is closed after this

    [[devices]]
    id = "hall-thermostat"
    driver = "jsonline"
    host = "192.0.2.10"
    port = 7001
    token = "device-secret"
    seq_bits = 8
    heartbeat_s = 30
    backoff = { initial_s = 5, cap_s = 300 }
    device_id = "hall-thermostat"      # the id its welcome must name (default: id)
    auth_retry_s = 600                 # after auth_failed/device_mismatch (default: stay failed)
    max_queued = 10000                 # commands waiting for this device at most
    debounce_online_s = 1              # presence must hold this long to be announced online
    debounce_offline_s = 3             # ... and this long to be announced offline
    presence = "mdns"                  # "link" (default) or "mdns": see below
    mdns_service = "_keeplink._tcp"    # with presence = "mdns" (this is the default)

A jsonline device must name itself ``device_id`` in its handshake, or the session is refused
with ``device_mismatch`` and nothing is sent; set ``device_id`` for a device that reports
its id in another form (a MAC address, a serial number). ``auth_retry_s`` turns a refusal
(``auth_failed``, ``device_mismatch``, a config error the peer reports) from terminal
(state ``failed``, until ``POST /api/devices/{id}/reconnect`` or a restart) into a slow
retry every that many seconds. Every key is described in ``docs/gateway.md``.

Presence (what the API shows and what gates delivery) is debounced per device:
``debounce_online_s`` (default 1) and ``debounce_offline_s`` (default 3) are how long a
change must hold before it is announced; 0 announces at once. ``presence = "link"`` (the
default) takes it from the device's own link, or for devices behind a shared Modbus gateway
or MQTT broker from the unit probe or MQTT availability. ``presence = "mdns"`` adds mDNS
(zeroconf; ``pip install 'keeplink[mdns]'``) announcements: an announcement reports the
device online for its record's TTL and wakes its link out of a backoff wait at once; a
goodbye reports it offline (the link's own word, when it has one, outranks mDNS).
``mdns_service`` says what to watch: a service type (``"_keeplink._tcp"``, the default;
``.local.`` may be written or left out), where the device is the instance whose TXT ``id``,
or failing that whose instance name, is the device's ``id``; or one full instance name
(``"Hall Thermostat._keeplink._tcp.local."``), which is then this device whatever it says.

Every error is a ConfigError: ``keeplink.toml: devices[1].port: must be an integer in
1..65535, got "70000"`` — and nothing starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from keeplink._core.backoff import Backoff
from keeplink._core.correlation import SEQUENCE_WIDTHS
from keeplink._core.errors import ConfigError
from keeplink.gateway.checks import MIN_TOKEN_CHARS, Checker
from keeplink.gateway.drivers import REGISTRY, DriverSpec

__all__ = [
    "BACKOFF_KEYS",
    "DEVICE_KEYS",
    "DRIVERS",
    "GATEWAY_KEYS",
    "MIN_TOKEN_CHARS",
    "DeviceConfig",
    "GatewayConfig",
    "load_config",
    "parse_config",
    "split_mdns_service",
]

DEFAULT_LISTEN: Final = "127.0.0.1:8470"
DEFAULT_STORE: Final = "sqlite:///keeplink.db"
DEFAULT_LEASE_S: Final = 10.0
MIN_LEASE_S: Final = 0.5
"""Below this a lease would be renewed more often than a database round trip is sure to
take on a loaded machine."""
DRIVERS: Final = tuple(REGISTRY)
"""The drivers a device's ``driver`` names (see :mod:`keeplink.gateway.drivers`)."""
DEFAULT_DEBOUNCE_ONLINE_S: Final = 1.0
DEFAULT_DEBOUNCE_OFFLINE_S: Final = 3.0
PRESENCE_SOURCES: Final = ("link", "mdns")
DEFAULT_MDNS_SERVICE: Final = "_keeplink._tcp.local."
MDNS_SERVICE_OF: Final = {"esphome": "_esphomelib._tcp.local."}
"""A driver whose devices announce themselves on a service of their own: its devices'
default ``mdns_service`` is their instance on it, named by their node name
(``expected_name``, default the ``id``)."""
_SECRET_KEYS: Final = frozenset({"noise_psk", "password", "ota_password"})
"""Device keys whose value an error never repeats."""
MAX_INSTANCE_BYTES: Final = 63
"""An mDNS instance label is one DNS label: at most 63 bytes of UTF-8 (RFC 6763 4.1.1)."""
_SERVICE_LABEL: Final = re.compile(r"_[A-Za-z0-9]([A-Za-z0-9-]{0,13}[A-Za-z0-9])?")
"""A DNS-SD service name label: '_' and 1..15 letters, digits or inner hyphens (RFC 6335)."""
DEFAULT_MAX_QUEUED: Final = 10_000
MAX_MAX_QUEUED: Final = 2**31 - 1
DEFAULT_HEADER_TIMEOUT_S: Final = 10.0
"""A client that has not sent its request headers by then is a slow-loris, not a slow link."""
DEFAULT_IDLE_TIMEOUT_S: Final = 20.0
"""Long enough for a dashboard that polls every few seconds to keep its connection."""
MAX_CLIENTS_LIMIT: Final = 1 << 20
GATEWAY_KEYS: Final = frozenset({
    "listen", "store", "token", "node", "lease_s", "read_token", "ttl_s",
    "max_clients", "header_timeout_s", "idle_timeout_s", "allowed_hosts",
})  # fmt: skip
"""The keys ``[gateway]`` takes; any other is refused."""
DEVICE_KEYS: Final = frozenset({
    "id", "driver", "host", "port", "token", "seq_bits", "max_in_flight",
    "heartbeat_s", "backoff", "hub", "hub_slots", "unit", "options", "max_queued",
    "device_id", "auth_retry_s", "debounce_online_s", "debounce_offline_s",
    "presence", "mdns_service",
}) | frozenset(key for spec in REGISTRY.values() for key in spec.keys.model_fields)  # fmt: skip
"""The keys each ``[[devices]]`` table takes; any other is refused. Those a driver declares
as its own (``keys`` in :mod:`keeplink.gateway.drivers`) only its devices take."""
BACKOFF_KEYS: Final = frozenset({"initial_s", "cap_s", "factor"})
"""The keys a device's ``backoff`` table takes."""
_HOST_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")
_ID_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    id: str
    driver: str
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    seq_bits: int = 32
    max_in_flight: int | None = None
    heartbeat_s: float | None = 30.0
    backoff: Backoff = field(default_factory=Backoff)
    """The reconnect schedule; ``auth_retry_s`` is its ``terminal_retry_s``."""
    device_id: str | None = None
    """The id the device names in its handshake (jsonline); ``None``: the same as ``id``."""
    hub: str | None = None
    """Devices with the same hub share one slot pool of ``hub_slots`` connections."""
    hub_slots: int = 1
    unit: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The driver's own device keys (its ``keys`` model: an ESPHome device's ``noise_psk``,
    ``mac``, ``ota_port`` …), checked, with their defaults filled in."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The driver's ``options`` as given (checked against its declared options model, see
    :mod:`keeplink.gateway.drivers`; defaults are not filled in)."""
    max_queued: int = DEFAULT_MAX_QUEUED
    """Commands that may wait for this device at once."""
    debounce_online_s: float = DEFAULT_DEBOUNCE_ONLINE_S
    """How long presence must hold online before it is announced (0: at once)."""
    debounce_offline_s: float = DEFAULT_DEBOUNCE_OFFLINE_S
    """How long presence must hold offline before it is announced (0: at once)."""
    presence: str = "link"
    """``"link"``: presence from the link (or a hub's probe / MQTT availability) only;
    ``"mdns"``: mDNS announcements too, which also wake the link."""
    mdns_service: str | None = None
    """With ``presence = "mdns"``: the service type (``_keeplink._tcp.local.``) or the full
    instance name to watch, normalised to end in ``.local.``; ``None`` otherwise."""

    @property
    def mdns_type(self) -> str | None:
        """The DNS-SD service type of ``mdns_service`` (``_keeplink._tcp.local.``)."""
        return None if self.mdns_service is None else split_mdns_service(self.mdns_service)[1]

    @property
    def mdns_instance(self) -> str | None:
        """The full instance name ``mdns_service`` names, or ``None`` for a bare type."""
        if self.mdns_service is None or split_mdns_service(self.mdns_service)[0] is None:
            return None
        return self.mdns_service


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8470
    store: str = DEFAULT_STORE
    token: str | None = None
    devices: tuple[DeviceConfig, ...] = ()
    source: str = "<config>"
    node: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """This gateway's name in a fleet (unique per node): default hostname-pid."""
    lease_s: float = DEFAULT_LEASE_S
    """How long a node owns a device without renewing its lease (fleets only)."""
    read_token: str | None = None
    """Bearer token for reads; None: reads are open (only allowed on loopback)."""
    ttl_s: float | None = None
    """Time to live of a command submitted without one; None: such commands never expire."""
    max_clients: int | None = None
    """HTTP + WebSocket connections at once; None: derived from the descriptor limit."""
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    """A connection that has not sent complete request headers within this is closed."""
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    """A keep-alive connection with no request for this long is closed."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names the API answers besides IP addresses and localhost (DNS rebinding)."""

    @property
    def fleet(self) -> bool:
        """Several nodes share the store (PostgreSQL): devices are owned through leases."""
        return self.store.startswith(("postgresql://", "postgres://"))

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


def _listen(source: str, value: object) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{source}: gateway.listen: must be 'host:port', got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(
                f"{source}: gateway.listen: {host!r} is not an IP address (or localhost)"
            ) from None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{source}: gateway.listen: port must be 0..65535, got {port_text!r}")
    return host, int(port_text)


def split_mdns_service(value: str) -> tuple[str | None, str]:
    """``(instance label or None, service type)`` of an ``mdns_service`` value, the type
    ending in ``.local.``: ``"Hall._keeplink._tcp"`` -> ``("Hall", "_keeplink._tcp.local.")``.
    Raises ValueError naming what is wrong."""
    name = value[:-1] if value.endswith(".") else value
    labels = name.split(".")
    if labels[-1].lower() != "local":
        labels.append("local")
    if len(labels) < 3 or labels[-2].lower() not in ("_tcp", "_udp"):
        raise ValueError("must be a service type like '_keeplink._tcp' or an instance name")
    if not _SERVICE_LABEL.fullmatch(labels[-3]):
        raise ValueError(
            f"the service name {labels[-3]!r} must be '_' and 1..15 letters, digits or '-'"
        )
    service_type = ".".join(labels[-3:]).lower() + "."  # DNS names ignore case
    if len(labels) == 3:
        return None, service_type
    instance = ".".join(labels[:-3])
    if not instance or instance.startswith(".") or len(instance.encode()) > MAX_INSTANCE_BYTES:
        raise ValueError(
            f"the instance name must be 1..{MAX_INSTANCE_BYTES} bytes of UTF-8, not starting"
            " with '.'"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in instance):
        raise ValueError("the instance name must not contain control characters")
    return instance, service_type


def _mdns_service(c: Checker, table: Mapping[str, Any], presence: str, default: str) -> str | None:
    """``mdns_service`` normalised (``….local.``), or None when presence is not mDNS."""
    if presence != "mdns":
        if "mdns_service" in table:
            c.fail("mdns_service", f'is only for presence = "mdns", this device has {presence!r}')
        return None
    value = c.text("mdns_service", default) or default
    try:
        instance, service_type = split_mdns_service(value)
    except ValueError as exc:
        c.fail("mdns_service", f"{exc}, got {value[:80]!r}")
    return service_type if instance is None else f"{instance}.{service_type}"


def _is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _options(c: Checker, spec: DriverSpec, raw: object) -> dict[str, Any]:
    """The device's ``options`` as given, checked against what its driver declares."""
    if not isinstance(raw, Mapping):
        c.fail("options", "must be a table")
    declared = spec.options.model_fields
    for key in raw:
        if key not in declared:
            takes = f"one of {', '.join(sorted(declared))}" if declared else "no options"
            c.fail(f"options.{key}", f"unknown option; the {spec.name} driver takes {takes}")
    try:
        options = spec.options.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in first["loc"])
        got = repr(first.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        problem = str(first["msg"]).removeprefix("Value error, ")
        c.fail(f"options.{key}", f"{problem}, got {got}")
    return options.model_dump(exclude_unset=True)


def _settings(c: Checker, spec: DriverSpec, table: Mapping[str, Any]) -> dict[str, Any]:
    """The driver's own device keys, checked against its ``keys`` model, defaults filled;
    another driver's own key is refused, naming whose it is."""
    declared = spec.keys.model_fields
    for other in REGISTRY.values():
        for key in other.keys.model_fields:
            if key in table and key not in declared:
                c.fail(key, f"only {other.name} devices take it, this one is {spec.name}")
    given = {key: table[key] for key in declared if key in table}
    try:
        keys = spec.keys.model_validate(given)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in first["loc"])
        got = repr(first.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        if key in _SECRET_KEYS:
            got = f"a value of {len(str(first.get('input')))} characters"
        problem = str(first["msg"]).removeprefix("Value error, ")
        c.fail(key, f"{problem}, got {got}")
    return keys.model_dump()


def _device(source: str, index: int, table: object) -> DeviceConfig:
    where = f"devices[{index}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: {where}: must be a table")
    c = Checker(source, where, table, set(DEVICE_KEYS))
    device_id = c.text("id", required=True)
    assert device_id is not None
    if not set(device_id) <= _ID_CHARS or len(device_id) > 64:
        c.fail("id", f"use up to 64 letters, digits, '-', '_' or '.', got {device_id!r}")
    driver = c.text("driver", required=True)
    if driver not in REGISTRY:
        c.fail("driver", f"must be one of {', '.join(DRIVERS)}, got {driver!r}")
    assert driver is not None
    spec = REGISTRY[driver]
    port = c.integer("port", None, 1, 65535)
    if port is None:
        c.fail("port", "is required")
    seq_bits = c.integer("seq_bits", spec.seq_bits, 8, 32)
    if seq_bits not in SEQUENCE_WIDTHS:
        c.fail("seq_bits", f"must be 8, 16 or 32, got {seq_bits!r}")
    auth_retry_s = c.seconds("auth_retry_s", None)
    backoff = Backoff(terminal_retry_s=auth_retry_s)
    if "backoff" in table:
        raw = table["backoff"]
        if not isinstance(raw, Mapping):
            c.fail("backoff", "must be a table like { initial_s = 5, cap_s = 300 }")
        b = Checker(source, f"{where}.backoff", raw, set(BACKOFF_KEYS))
        try:
            backoff = Backoff(
                initial_s=b.seconds("initial_s", 1.0) or 1.0,
                cap_s=b.seconds("cap_s", 60.0) or 60.0,
                factor=b.factor("factor", 2.0),
                terminal_retry_s=auth_retry_s,
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {where}.backoff: {exc.message}") from exc
    options = _options(c, spec, table.get("options", {}))
    max_in_flight = c.integer("max_in_flight", None, 1, 1 << 16)
    if max_in_flight is not None and seq_bits is not None and max_in_flight > 1 << seq_bits:
        c.fail(
            "max_in_flight",
            f"must be at most {1 << seq_bits} with seq_bits = {seq_bits}, got {max_in_flight}",
        )
    for key, what in spec.required.items():
        if key not in table:
            c.fail(key, f"is required for a {driver} device ({what})")
    for other in REGISTRY.values():
        for key, why in other.own.items():
            if key in table and key not in spec.own:
                c.fail(key, f"{why}, this one is {driver}")
    for key in sorted(spec.refused & set(table)):
        c.fail(key, f"a {driver} device does not use it (see docs/gateway.md)")
    named = c.text("device_id", device_id) if "device_id" in spec.own else None
    if named is not None and len(named) > 256:
        c.fail("device_id", "must be at most 256 characters")
    settings = _settings(c, spec, table)
    mdns_default = DEFAULT_MDNS_SERVICE
    if driver in MDNS_SERVICE_OF:
        mdns_default = f"{settings.get('expected_name') or device_id}.{MDNS_SERVICE_OF[driver]}"
    presence = c.text("presence", "link") or "link"
    if presence not in PRESENCE_SOURCES:
        c.fail("presence", f'must be "link" or "mdns", got {presence!r}')
    assert port is not None
    assert seq_bits is not None
    return DeviceConfig(
        id=device_id,
        driver=driver,
        host=c.host("host", "127.0.0.1"),
        port=port,
        token=c.text("token"),
        seq_bits=seq_bits,
        max_in_flight=max_in_flight,
        heartbeat_s=c.seconds("heartbeat_s", 30.0, allow_none=True),
        backoff=backoff,
        device_id=named,
        hub=c.text("hub"),
        hub_slots=c.integer("hub_slots", 1, 1, 64) or 1,
        unit=c.integer("unit", None, 0, 247),
        settings=settings,
        options=options,
        max_queued=c.integer("max_queued", DEFAULT_MAX_QUEUED, 1, MAX_MAX_QUEUED)
        or DEFAULT_MAX_QUEUED,
        debounce_online_s=c.debounce("debounce_online_s", DEFAULT_DEBOUNCE_ONLINE_S),
        debounce_offline_s=c.debounce("debounce_offline_s", DEFAULT_DEBOUNCE_OFFLINE_S),
        presence=presence,
        mdns_service=_mdns_service(c, table, presence, mdns_default),
    )


def _shared_options(source: str, devices: tuple[DeviceConfig, ...]) -> None:
    """Devices of a hub driver (Modbus, MQTT) on one host and port share one link, made with
    the first one's settings (its spec's ``hub_settings`` and ``options``), and devices of
    one ``hub`` share one slot pool: another device's own settings would be silently
    ignored, so they must agree."""
    first: dict[tuple[str, str, int], int] = {}
    for i, device in enumerate(devices):
        spec = REGISTRY[device.driver]
        if not spec.hub:
            continue
        j = first.setdefault((device.driver, device.host, device.port), i)
        if device.options and device.options != devices[j].options:
            raise ConfigError(
                f"{source}: devices[{i}].options: this {device.driver} device shares one link "
                f"to {device.host}:{device.port} with devices[{j}], whose options it uses; "
                f"give both the same options, or options on devices[{j}] only"
            )
        for key in spec.hub_settings:
            if getattr(device, key) != getattr(devices[j], key):
                if key == "backoff" and device.backoff.terminal_retry_s != (
                    devices[j].backoff.terminal_retry_s
                ):
                    key = "auth_retry_s"  # name the key the user wrote
                raise ConfigError(
                    f"{source}: devices[{i}].{key}: this {device.driver} device shares one "
                    f"link to {device.host}:{device.port} with devices[{j}], made with its "
                    f"{key}; give both the same {key}"
                )
    hubs: dict[str, int] = {}
    for i, device in enumerate(devices):
        if device.hub is None:
            continue
        j = hubs.setdefault(device.hub, i)
        if device.hub_slots != devices[j].hub_slots:
            raise ConfigError(
                f"{source}: devices[{i}].hub_slots: hub {device.hub!r} has one slot pool, "
                f"made with devices[{j}]'s hub_slots ({devices[j].hub_slots}); give every "
                f"device of the hub the same hub_slots"
            )


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> GatewayConfig:
    """Validate a parsed TOML document. Raises ConfigError naming the key and the problem."""
    top = Checker(source, "", data, {"gateway", "devices"})
    gateway = data.get("gateway", {})
    if not isinstance(gateway, Mapping):
        top.fail("gateway", "must be a table")
    g = Checker(source, "gateway", gateway, set(GATEWAY_KEYS))
    host, port = _listen(source, gateway.get("listen", DEFAULT_LISTEN))
    store = g.text("store", DEFAULT_STORE) or DEFAULT_STORE
    if not store.startswith(("sqlite://", "postgresql://", "postgres://", "memory:")):
        g.fail(
            "store",
            f"must be a sqlite:///path or postgresql://user@host/db URL (or memory:), "
            f"got {store!r}",
        )
    token = g.token("token")
    read_token = g.token("read_token")
    if read_token is None and not _is_loopback(host):
        g.fail(
            "read_token",
            f"is required when gateway.listen is not a loopback address ({host}): "
            "without it anyone on the network can read devices, commands and events",
        )
    if read_token is not None and read_token == token:
        g.fail("read_token", "must differ from gateway.token (a reader could write)")
    ttl_s = g.seconds("ttl_s", None)
    max_clients = g.integer("max_clients", None, 1, MAX_CLIENTS_LIMIT)
    header_timeout_s = g.seconds("header_timeout_s", DEFAULT_HEADER_TIMEOUT_S)
    idle_timeout_s = g.seconds("idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S)
    node = g.text("node") or f"{socket.gethostname()}-{os.getpid()}"
    lease_s = g.seconds("lease_s", DEFAULT_LEASE_S) or DEFAULT_LEASE_S
    if lease_s < MIN_LEASE_S:
        g.fail("lease_s", f"must be at least {MIN_LEASE_S:g} seconds, got {lease_s!r}")
    allowed_hosts = _host_names(source, gateway.get("allowed_hosts", []))
    raw_devices = data.get("devices", [])
    if not isinstance(raw_devices, list):
        top.fail("devices", "must be an array of tables ([[devices]])")
    devices = tuple(_device(source, i, t) for i, t in enumerate(raw_devices))
    seen: set[str] = set()
    for i, device in enumerate(devices):
        if device.id in seen:
            raise ConfigError(f"{source}: devices[{i}].id: duplicate id {device.id!r}")
        seen.add(device.id)
    _shared_options(source, devices)
    return GatewayConfig(
        listen_host=host,
        listen_port=port,
        store=store,
        token=token,
        devices=devices,
        source=source,
        node=node,
        lease_s=lease_s,
        read_token=read_token,
        ttl_s=ttl_s,
        max_clients=max_clients,
        header_timeout_s=header_timeout_s or DEFAULT_HEADER_TIMEOUT_S,
        idle_timeout_s=idle_timeout_s or DEFAULT_IDLE_TIMEOUT_S,
        allowed_hosts=allowed_hosts,
    )


def _host_names(source: str, value: object) -> tuple[str, ...]:
    """``allowed_hosts``: names like ``gw.example.com`` (lower-cased, no port)."""
    if not isinstance(value, list):
        raise ConfigError(f"{source}: gateway.allowed_hosts: must be a list of host names")
    names: list[str] = []
    for i, name in enumerate(value):
        if (
            not isinstance(name, str)
            or not name
            or len(name) > 253
            or not set(name.lower()) <= _HOST_CHARS
        ):
            raise ConfigError(
                f"{source}: gateway.allowed_hosts[{i}]: must be a host name "
                f"(letters, digits, '-', '.'), got {name!r}"
            )
        names.append(name.lower().rstrip("."))
    return tuple(names)


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a TOML file. Raises ConfigError (file, key, problem)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, source=str(path))
