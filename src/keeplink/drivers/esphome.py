"""The ESPHome driver: the native API (TCP 6053, plaintext or Noise) under a keeplink Link.

    driver = EsphomeDriver(host="192.168.1.40", expected_name="kitchen",
                           noise_psk="base64-of-32-bytes", mac="AA:BB:CC:DD:EE:01")
    async with Link(driver, name="kitchen", heartbeat_s=15) as link:
        await link.wait_connected()
        outcome = await link.request("switch", {"entity": "relay", "state": True}, timeout=5)

Each session is one :class:`aioesphomeapi.APIClient` connection, opened with ``connect()``
once per attempt: the link owns every retry (its backoff, its error classes), and
aioesphomeapi's ``ReconnectLogic`` is never used, so nothing else reconnects behind its back.
A session ends in one place: aioesphomeapi's connection-closed callback (or the link closing
the channel) ends :meth:`EsphomeChannel.receive`, and the link's reader sees it.

Identity. ``expected_name`` (default: ``device_id``) must be the node name the device
reports; aioesphomeapi refuses another name itself (in the Noise hello, or the plaintext
HelloResponse) and keeplink checks it again in ``DeviceInfo``. ``mac`` (any case, with or
without separators) must match the MAC in ``DeviceInfo``: aioesphomeapi checks a MAC only in
the Noise hello, so on plaintext this check is keeplink's alone. Either mismatch refuses the
session with :class:`~keeplink.DeviceMismatchError` (``device_mismatch``, terminal) before
anything is sent. A wrong Noise key, a missing key for a device that requires one, a key for
a plaintext device, or a wrong legacy password is an :class:`~keeplink.AuthError`
(``auth_failed``); a refused connection is ``connection_failed``.

Commands (``link.request(op, args)``), by entity object id, each one correlated request:

``switch``  ``{"entity": "relay", "state": true}``
``number``  ``{"entity": "setpoint", "value": 21.5}``
``light``   ``{"entity": "lamp", "state": true, "brightness": 0.5}`` (either or both)
``button``  ``{"entity": "reboot"}``

ESPHome never answers a command. A command is therefore acknowledged by the entity's next
state update that shows what was asked (``result`` is ``{"entity", "state"}``, the state as
the device reports it); it times out if none comes within the request's deadline. A button
has no state: it is acknowledged once the command is written. An unknown entity (once the
device has listed its entities), an op that does not fit the entity, or a number outside the
entity's range is an :class:`~keeplink.InvalidRequestError` before anything is sent.
ESPHome has no idempotency keys: a retried ``switch``/``number``/``light`` sets the same
state again, but a retried ``button`` presses again.

State updates arrive as :class:`~keeplink.FrameReceived` events whose ``frame`` is a
:class:`~keeplink.StatePush` with ``values`` ``{object_id: state}`` (a light's state is
``{"state", "brightness"}``), as the jsonline driver's pushes do. Right after each connect
the device sends every entity's current state.

Session info: ``device_id`` is the node name, ``firmware`` the project version (or the
ESPHome version for a device without a project), and ``extra`` holds the ``DeviceInfo``:
``name``, ``friendly_name``, ``mac``, ``esphome_version``, ``project_name``,
``project_version``, ``compilation_time``, ``model``, ``manufacturer``, ``has_deep_sleep``,
``api_version`` and ``encrypted``. ``compilation_time`` and ``project_version`` together name
the build a device runs.

Liveness. The heartbeat is a ``DeviceInfoRequest`` (the API client has no public ping, and
every ESPHome firmware answers this one), so the link's heartbeat is always answered and its
liveness limit (``LIVENESS_RATIO × heartbeat_s``) finds a silent, half-open device.
aioesphomeapi keeps its own keepalive (``client_keepalive_s``, silence limit 4.5× that) as a
backstop; its end is reported through the same single disconnect path.

Needs aioesphomeapi (keeplink's ``esphome`` extra).
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Mapping
from typing import Any, Final

try:
    from aioesphomeapi.client import APIClient
    from aioesphomeapi.core import APIConnectionError
    from aioesphomeapi.model import DeviceInfo, EntityInfo, EntityState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keeplink.drivers.esphome needs aioesphomeapi: pip install 'keeplink[esphome]'"
    ) from exc

from keeplink._core.errors import ConfigError, DeviceMismatchError, InvalidRequestError
from keeplink._core.jsonline import StatePush
from keeplink._core.requests import check_request
from keeplink._driver import FrameChannel, HeartbeatReply, Reply, SessionInfo
from keeplink.drivers._esphome_channel import (
    Confirmed,
    EntityCommand,
    EsphomeChannel,
    EsphomeFrame,
    Heartbeat,
    HeartbeatAnswer,
    Introduce,
    Introduced,
    Subscribe,
    api_error,
)
from keeplink.drivers._esphome_entities import MAX_AWAITING as MAX_AWAITING
from keeplink.drivers._esphome_entities import OPS, Entities, number_arg

__all__ = [
    "Confirmed",
    "EntityCommand",
    "EsphomeChannel",
    "EsphomeDriver",
    "EsphomeFrame",
    "Heartbeat",
    "HeartbeatAnswer",
    "Introduce",
    "Introduced",
    "StatePush",
    "Subscribe",
    "normalize_mac",
]

_log = logging.getLogger("keeplink.esphome")

DEFAULT_PORT: Final = 6053
CLIENT_KEEPALIVE_S: Final = 20.0
"""aioesphomeapi's own ping interval: its default, a backstop behind keeplink's liveness."""


def normalize_mac(mac: str) -> str:
    """``AA:BB:CC:DD:EE:01``, ``aa-bb-…`` or ``aabbccddee01`` → ``aabbccddee01``.

    Raises ValueError for anything but 12 hex digits (separators aside)."""
    plain = mac.replace(":", "").replace("-", "").replace(".", "").lower()
    if len(plain) != 12 or any(c not in "0123456789abcdef" for c in plain):
        raise ValueError(f"not a MAC address: {mac!r}")
    return plain


# ---------------------------------------------------------------------------- driver


class EsphomeDriver:
    """Speaks the ESPHome native API to one device. Keyword-only, checked at construction.

    ``noise_psk``: the device's ``api: encryption: key`` (base64 of 32 bytes); ``password``:
    the legacy plaintext API password (not both). ``expected_name`` defaults to
    ``device_id``; one of them is required. ``mac`` is optional.

    Raises :class:`ConfigError` for a bad port, a key that is not 32 bytes of base64, a key
    and a password together, a bad MAC, or no name to expect.
    """

    name = "esphome"
    seq_bits = 32
    max_in_flight = 16
    heartbeat_reply = HeartbeatReply.EXPECTED

    def __init__(
        self,
        *,
        host: str,
        port: int = DEFAULT_PORT,
        device_id: str | None = None,
        expected_name: str | None = None,
        noise_psk: str | None = None,
        password: str | None = None,
        mac: str | None = None,
        client_info: str = "keeplink",
        client_keepalive_s: float = CLIENT_KEEPALIVE_S,
        provide_time: bool = False,
        heartbeat: bool = True,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ConfigError(f"esphome: host must be a non-empty string, got {host!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"esphome: port must be 1..65535, got {port!r}")
        name = expected_name if expected_name is not None else device_id
        if not isinstance(name, str) or not name:
            raise ConfigError("esphome: expected_name (or device_id) must be a non-empty string")
        if noise_psk is not None and password is not None:
            raise ConfigError("esphome: noise_psk and password do not go together")
        if noise_psk is not None:
            try:
                raw = binascii.a2b_base64(noise_psk, strict_mode=True)
            except (binascii.Error, ValueError) as exc:
                raise ConfigError(f"esphome: noise_psk is not base64: {exc}") from exc
            if len(raw) != 32:
                raise ConfigError(f"esphome: noise_psk must be 32 bytes, got {len(raw)}")
        try:
            self.mac = normalize_mac(mac) if mac is not None else None
        except ValueError as exc:
            raise ConfigError(f"esphome: mac: {exc}") from exc
        if not client_keepalive_s > 0:
            raise ConfigError(f"esphome: client_keepalive_s must be > 0, got {client_keepalive_s}")
        self.host = host
        self.port = port
        self.device_id = device_id
        self.expected_name: str = name
        self.noise_psk = noise_psk
        self.password = password
        self.client_info = client_info
        self.client_keepalive_s = client_keepalive_s
        self.provide_time = provide_time
        self._heartbeat = heartbeat
        self.entities = Entities()
        """The last entity list the device gave; kept across reconnects (never wiped)."""
        self.device_info: DeviceInfo | None = None
        """The last DeviceInfo the device sent (handshake or heartbeat)."""

    def __repr__(self) -> str:
        mode = " noise" if self.noise_psk is not None else ""
        return f"EsphomeDriver({self.host}:{self.port}{mode} {self.expected_name!r})"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ Driver

    async def open(self) -> EsphomeChannel:
        """Connect and log in (one attempt; the link retries). Raises LinkBrokenError
        (``connection_failed``), RequestTimeout, AuthError or DeviceMismatchError; the
        aioesphomeapi error is ``__cause__``. Cancelled, it leaves no connection behind."""
        client = APIClient(
            self.host,
            self.port,
            self.password,
            client_info=self.client_info,
            keepalive=self.client_keepalive_s,
            noise_psk=self.noise_psk,
            expected_name=self.expected_name,
            expected_mac=self.mac,
            provide_time=self.provide_time,
        )
        channel = EsphomeChannel(self, client)
        try:
            # log_errors=False: the link logs each failure once, with its code; aioesphomeapi
            # would log every retry at WARNING.
            await client.connect(login=True, log_errors=False)
        except APIConnectionError as exc:
            channel.close()
            raise api_error(exc, f"cannot connect to ESPHome device {self.address}") from exc
        except BaseException:
            channel.close()
            raise
        return channel

    async def handshake(self, channel: FrameChannel[EsphomeFrame]) -> SessionInfo:
        """Fetch DeviceInfo and the entities, check the name and MAC, subscribe to states.
        Raises DeviceMismatchError (nothing subscribed, nothing sent) on a mismatch."""
        await channel.send(Introduce())
        while True:
            frame = await channel.receive()
            if isinstance(frame, Introduced):
                break
        info = frame.info
        self._check_identity(info)
        self.entities.learn(frame.entities)
        self.device_info = info
        await channel.send(Subscribe())
        return self.session_info(info)

    def _check_identity(self, info: DeviceInfo) -> None:
        where = f"the ESPHome device at {self.address}"
        if info.name != self.expected_name:
            raise DeviceMismatchError(
                f"{where} says it is {info.name[:64]!r}, not {self.expected_name!r}; "
                "session refused, nothing sent"
            )
        if self.mac is not None:
            try:
                reported = normalize_mac(info.mac_address)
            except ValueError:
                reported = info.mac_address[:32]
            if reported != self.mac:
                raise DeviceMismatchError(
                    f"{where} has MAC {info.mac_address[:32]!r}, not {self.mac!r}; "
                    "session refused, nothing sent"
                )

    def session_info(self, info: DeviceInfo) -> SessionInfo:
        """What the session says about the device (see the module docs)."""
        return SessionInfo(
            device_id=info.name,
            firmware=info.project_version or info.esphome_version or None,
            extra={
                "name": info.name,
                "friendly_name": info.friendly_name,
                "mac": info.mac_address,
                "esphome_version": info.esphome_version,
                "project_name": info.project_name,
                "project_version": info.project_version,
                "compilation_time": info.compilation_time,
                "model": info.model,
                "manufacturer": info.manufacturer,
                "has_deep_sleep": info.has_deep_sleep,
                "encrypted": self.noise_psk is not None,
            },
        )

    def heartbeat_frame(self) -> EsphomeFrame | None:
        return Heartbeat() if self._heartbeat else None

    def is_heartbeat_reply(self, frame: EsphomeFrame) -> bool:
        if isinstance(frame, HeartbeatAnswer):
            self.device_info = frame.info
            return True
        return False

    def build_request(
        self, seq: int, op: str, args: Mapping[str, Any], key: str | None
    ) -> EsphomeFrame:
        """The command for ``args["entity"]``. Raises InvalidRequestError (nothing sent) for
        an unknown op, missing or wrong args, or (once the entities are known) an entity the
        device does not have or that the op does not fit."""
        check_request(op, args, key)
        if op not in OPS:
            raise InvalidRequestError(f"esphome: unknown op {op!r}; ops are {list(OPS)}")
        entity = args.get("entity")
        if not isinstance(entity, str) or not entity:
            raise InvalidRequestError(f"esphome {op}: args['entity'] must be an object id")
        allowed = {
            "switch": {"entity", "state"},
            "number": {"entity", "value"},
            "light": {"entity", "state", "brightness"},
            "button": {"entity"},
        }[op]
        extra = sorted(set(args) - allowed)
        if extra:
            raise InvalidRequestError(f"esphome {op}: unexpected args {extra}")
        state = args.get("state")
        if state is not None and not isinstance(state, bool):
            raise InvalidRequestError(f"esphome {op}: state must be true or false, got {state!r}")
        value = number_arg(op, "value", args.get("value"))
        brightness = number_arg(op, "brightness", args.get("brightness"))
        if op == "switch" and state is None:
            raise InvalidRequestError("esphome switch: args['state'] (true/false) is required")
        if op == "number" and value is None:
            raise InvalidRequestError("esphome number: args['value'] is required")
        if op == "light":
            if state is None and brightness is None:
                raise InvalidRequestError("esphome light: give state, brightness or both")
            if brightness is not None and not 0.0 <= brightness <= 1.0:
                raise InvalidRequestError(
                    f"esphome light: brightness must be 0..1, got {brightness!r}"
                )
        frame = EntityCommand(
            seq=seq, op=op, entity=entity, state=state, value=value, brightness=brightness
        )
        if self.entities.by_id:
            info = self.entities.by_id.get(entity)
            if info is None:
                raise InvalidRequestError(
                    f"esphome: the device has no entity {entity!r}; "
                    f"it has {sorted(self.entities.by_id)}"
                )
            self.check_fits(frame, info)
        return frame

    def match_reply(self, frame: EsphomeFrame) -> Reply | None:
        if isinstance(frame, Confirmed):
            result: dict[str, Any] = {"entity": frame.entity}
            if frame.state is not None:
                result["state"] = frame.state
            return Reply(seq=frame.seq, ok=True, result=result)
        return None

    # ------------------------------------------------------------------ entities (sans-IO)

    def entity(self, object_id: str) -> EntityInfo | None:
        """The entity with this object id, from the last entity list (None if unknown)."""
        return self.entities.by_id.get(object_id)

    def entity_ids(self) -> list[str]:
        return list(self.entities.by_id)

    def check_fits(self, frame: EntityCommand, info: EntityInfo) -> None:
        """Raise InvalidRequestError if the command does not fit the entity."""
        self.entities.check_fits(frame, info)

    def expect(self, frame: EntityCommand) -> None:
        """Note that ``frame`` waits for the state that shows it applied."""
        self.entities.expect(frame)

    def on_state(self, state: EntityState) -> list[EsphomeFrame]:
        """The frames one state update makes (see :meth:`Entities.on_state`)."""
        return self.entities.on_state(state)
