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

import asyncio
import binascii
import collections
import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

try:
    from aioesphomeapi.client import APIClient
    from aioesphomeapi.core import (
        APIConnectionError,
        BadMACAddressAPIError,
        BadNameAPIError,
        EncryptionPlaintextAPIError,
        InvalidAuthAPIError,
        InvalidEncryptionKeyAPIError,
        PingFailedAPIError,
        RequiresEncryptionAPIError,
        ResolveAPIError,
        TimeoutAPIError,
    )
    from aioesphomeapi.model import (
        ButtonInfo,
        ConnectionClosedEvent,
        DeviceInfo,
        EntityInfo,
        EntityState,
        LightInfo,
        LightState,
        NumberInfo,
        SwitchInfo,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keeplink.drivers.esphome needs aioesphomeapi: pip install 'keeplink[esphome]'"
    ) from exc

from keeplink._core.classify import broken_from, describe
from keeplink._core.errors import (
    AuthError,
    ConfigError,
    DeviceMismatchError,
    ErrorCode,
    InvalidRequestError,
    KeeplinkError,
    LinkBrokenError,
    RequestTimeout,
)
from keeplink._core.jsonline import Malformed, StatePush
from keeplink._core.requests import check_request
from keeplink._driver import FrameChannel, HeartbeatReply, Reply, SessionInfo

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
HEARTBEAT_TIMEOUT_S: Final = 10.0
"""How long one heartbeat's DeviceInfoRequest waits; the link's liveness limit decides."""
MAX_AWAITING: Final = 32
"""Commands per entity waiting for their state: past this the oldest is forgotten (it
times out by its own deadline). A bound, so a device that never confirms grows nothing."""
FLOAT_TOLERANCE: Final = 1e-4
"""Numbers travel as 32-bit floats: 21.3 comes back as 21.2999992; closer than this is equal."""
OPS: Final = ("switch", "number", "light", "button")
_INFO_OF_OP: Final[dict[str, type[EntityInfo]]] = {
    "switch": SwitchInfo,
    "number": NumberInfo,
    "light": LightInfo,
    "button": ButtonInfo,
}


def normalize_mac(mac: str) -> str:
    """``AA:BB:CC:DD:EE:01``, ``aa-bb-…`` or ``aabbccddee01`` → ``aabbccddee01``.

    Raises ValueError for anything but 12 hex digits (separators aside)."""
    plain = mac.replace(":", "").replace("-", "").replace(".", "").lower()
    if len(plain) != 12 or any(c not in "0123456789abcdef" for c in plain):
        raise ValueError(f"not a MAC address: {mac!r}")
    return plain


# ---------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True, kw_only=True)
class EntityCommand:
    """Outgoing: a command for one entity (what :meth:`EsphomeDriver.build_request` makes)."""

    seq: int
    op: str
    entity: str
    state: bool | None = None
    value: float | None = None
    brightness: float | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Outgoing: ask for DeviceInfo; the answer proves the device is alive."""


@dataclass(frozen=True, slots=True)
class Introduce:
    """Outgoing, in the handshake: fetch DeviceInfo and the entity list."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Outgoing, in the handshake: subscribe to state updates."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Introduced:
    """Incoming, in the handshake: what the device said it is and has."""

    info: DeviceInfo
    entities: tuple[EntityInfo, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAnswer:
    """Incoming: the DeviceInfo a heartbeat asked for."""

    info: DeviceInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class Confirmed:
    """Incoming, synthetic: the state update that confirms request ``seq`` (or, for a
    button, the command was written)."""

    seq: int
    entity: str
    state: Any = None


EsphomeFrame: TypeAlias = (
    EntityCommand
    | Heartbeat
    | Introduce
    | Subscribe
    | Introduced
    | HeartbeatAnswer
    | Confirmed
    | StatePush
)


# ---------------------------------------------------------------------------- errors


def api_error(exc: BaseException, where: str) -> KeeplinkError:
    """The typed error for what aioesphomeapi raised (the caller chains it)."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, BadNameAPIError | BadMACAddressAPIError):
        return DeviceMismatchError(f"{where}: {detail}; session refused, nothing sent")
    if isinstance(exc, InvalidEncryptionKeyAPIError):
        return AuthError(f"{where}: the device refused the Noise key ({detail})")
    if isinstance(exc, RequiresEncryptionAPIError):
        return AuthError(f"{where}: the device requires encryption; configure its noise_psk")
    if isinstance(exc, EncryptionPlaintextAPIError):
        return AuthError(f"{where}: a noise_psk is configured but the device is plaintext")
    if isinstance(exc, InvalidAuthAPIError):
        return AuthError(f"{where}: the device refused the API password")
    if isinstance(exc, ResolveAPIError):
        return LinkBrokenError(f"{where}: {detail}", code=ErrorCode.DISCOVERY_FAILED)
    if isinstance(exc, TimeoutAPIError | TimeoutError):
        return RequestTimeout(f"{where}: {detail}")
    if isinstance(exc, PingFailedAPIError):
        return LinkBrokenError(f"{where}: {detail}", code=ErrorCode.TIMEOUT)
    cause = exc.__cause__
    if isinstance(cause, OSError):
        err = broken_from(cause, where)
        return err if isinstance(err, LinkBrokenError | AuthError) else LinkBrokenError(err.message)
    if isinstance(exc, OSError):
        err = broken_from(exc, where)
        return err if isinstance(err, LinkBrokenError) else LinkBrokenError(err.message)
    return LinkBrokenError(f"{where}: {describe(exc)}")


# ---------------------------------------------------------------------------- channel


class EsphomeChannel:
    """A :class:`~keeplink.Channel` over one connected :class:`aioesphomeapi.APIClient`.

    Incoming items (state pushes, confirmations, heartbeat answers) queue for
    :meth:`receive`, which raises :class:`LinkBrokenError` once the session is over: the
    device closed it, aioesphomeapi gave up on it, or :meth:`close` was called.
    """

    def __init__(self, driver: EsphomeDriver, client: APIClient) -> None:
        self._driver = driver
        self.client = client
        self.peer = f"{driver.host}:{driver.port}"
        self._queue: collections.deque[EsphomeFrame] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        self._ended: KeeplinkError | None = None
        """Why the session is over: the typed error send() raises."""
        self._broken: LinkBrokenError | None = None
        """The same as receive() raises it (the channel contract: LinkBrokenError)."""
        self._closed_error: BaseException | None = None
        """The error aioesphomeapi reported when the connection closed, if any."""
        self._beat: asyncio.Task[None] | None = None
        self._unsubscribe = client.add_connection_closed_callback(self._on_closed)

    # ------------------------------------------------------------------ Channel

    async def receive(self) -> EsphomeFrame | Malformed:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._broken is not None:
                raise self._broken
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None

    async def send(self, frame: EsphomeFrame) -> None:
        """Carry out an outgoing frame. Raises LinkBrokenError (the session is over, or
        aioesphomeapi refused), the typed error of a failed handshake step, or
        InvalidRequestError (nothing sent) for a command the device's entities cannot take."""
        if self._ended is not None:
            raise self._ended
        client = self.client
        try:
            if isinstance(frame, EntityCommand):
                self._command(frame)
            elif isinstance(frame, Heartbeat):
                if self._beat is None or self._beat.done():
                    self._beat = asyncio.get_running_loop().create_task(
                        self._heartbeat(), name=f"keeplink.esphome[{self.peer}].heartbeat"
                    )
            elif isinstance(frame, Introduce):
                info, entities, _services = await client.device_info_and_list_entities()
                self._put(Introduced(info=info, entities=tuple(entities)))
            elif isinstance(frame, Subscribe):
                client.subscribe_states(self._on_state)
            else:
                raise InvalidRequestError(f"esphome: cannot send a {type(frame).__name__} frame")
        except APIConnectionError as exc:
            raise self._failure(exc, f"esphome device {self.peer}") from exc

    def close(self) -> None:
        """End the session now (a DisconnectRequest is sent, not waited for). Idempotent."""
        self._end(LinkBrokenError(f"channel to ESPHome device {self.peer} is closed"))
        self.client.force_disconnect()

    async def wait_closed(self) -> None:
        beat = self._beat
        if beat is not None and not beat.done():
            await asyncio.wait((beat,))

    # ------------------------------------------------------------------ machinery

    def _command(self, frame: EntityCommand) -> None:
        info = self._driver.entity(frame.entity)
        if info is None:
            raise InvalidRequestError(
                f"esphome: the device {self.peer} has no entity {frame.entity!r}; "
                f"it has {sorted(self._driver.entity_ids())}"
            )
        self._driver.check_fits(frame, info)
        client, key = self.client, info.key
        if frame.op == "button":
            client.button_command(key)
            self._put(Confirmed(seq=frame.seq, entity=frame.entity))
            return
        self._driver.expect(frame)  # before the write: the state may follow at once
        if frame.op == "switch":
            assert frame.state is not None
            client.switch_command(key, frame.state)
        elif frame.op == "number":
            assert frame.value is not None
            client.number_command(key, frame.value)
        else:
            client.light_command(key, state=frame.state, brightness=frame.brightness)

    async def _heartbeat(self) -> None:
        try:
            async with asyncio.timeout(HEARTBEAT_TIMEOUT_S):
                info = await self.client.device_info()
        except (APIConnectionError, TimeoutError) as exc:
            # Not an error of its own: silence is the link's liveness limit to judge, and a
            # closed connection ends the session through _on_closed.
            _log.debug("esphome %s: heartbeat unanswered: %s", self.peer, exc)
            return
        self._put(HeartbeatAnswer(info=info))

    def _on_state(self, state: EntityState) -> None:
        for frame in self._driver.on_state(state):
            self._put(frame)

    def _on_closed(self, event: ConnectionClosedEvent) -> None:
        self._closed_error = event.error
        if event.error is not None:
            err = self._failure(event.error, f"ESPHome device {self.peer}")
        elif event.expected_disconnect:
            err = LinkBrokenError(
                f"ESPHome device {self.peer} closed the session (reboot, deep sleep or "
                "another disconnect it asked for)"
            )
        else:
            err = LinkBrokenError(f"ESPHome device {self.peer}: connection lost")
        self._end(err)

    def _failure(self, exc: BaseException, where: str) -> KeeplinkError:
        # A refused password arrives after connect() returned, as the closed connection's
        # error; whatever failed next only says "not connected". The first error tells why.
        first = self._closed_error
        if first is not None and first is not exc and isinstance(exc, APIConnectionError):
            err = api_error(first, where)
            err.__cause__ = first
            return err
        return api_error(exc, where)

    def _put(self, frame: EsphomeFrame) -> None:
        self._queue.append(frame)
        self._wake_up()

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _end(self, reason: KeeplinkError) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        if isinstance(reason, LinkBrokenError):
            self._broken = reason
        else:
            # receive() raises LinkBrokenError by contract; the code says what it was.
            self._broken = LinkBrokenError(reason.message, code=reason.code)
            self._broken.__cause__ = reason
        self._unsubscribe()
        if self._beat is not None and not self._beat.done():
            self._beat.cancel()
        self._wake_up()


# ---------------------------------------------------------------------------- driver


@dataclass(slots=True)
class _Awaiting:
    seq: int
    want: dict[str, Any] = field(default_factory=dict)


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
        # The last entity list the device gave; kept across reconnects (never wiped).
        self._entities: dict[str, EntityInfo] = {}
        self._object_ids: dict[int, str] = {}
        self._awaiting: dict[str, list[_Awaiting]] = {}
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
        self._entities = {e.object_id: e for e in frame.entities if e.object_id}
        self._object_ids = {e.key: e.object_id for e in frame.entities if e.object_id}
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
        value = _number(op, "value", args.get("value"))
        brightness = _number(op, "brightness", args.get("brightness"))
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
        if self._entities:
            info = self._entities.get(entity)
            if info is None:
                raise InvalidRequestError(
                    f"esphome: the device has no entity {entity!r}; it has {sorted(self._entities)}"
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
        return self._entities.get(object_id)

    def entity_ids(self) -> list[str]:
        return list(self._entities)

    def check_fits(self, frame: EntityCommand, info: EntityInfo) -> None:
        """Raise InvalidRequestError if the command does not fit the entity."""
        if not isinstance(info, _INFO_OF_OP[frame.op]):
            raise InvalidRequestError(
                f"esphome {frame.op}: {frame.entity!r} is a {entity_kind(info)}, not a {frame.op}"
            )
        if isinstance(info, NumberInfo) and frame.value is not None:
            low, high = float(info.min_value), float(info.max_value)
            # A device that leaves the range out sends 0..0: then there is nothing to check.
            if low < high and not low <= frame.value <= high:
                raise InvalidRequestError(
                    f"esphome number: {frame.value!r} is outside {frame.entity!r}'s "
                    f"range {low:g}..{high:g}"
                )

    def expect(self, frame: EntityCommand) -> None:
        """Note that ``frame`` waits for the state that shows it applied."""
        want: dict[str, Any] = {}
        if frame.op == "number":
            want["value"] = frame.value
        else:
            if frame.state is not None:
                want["state"] = frame.state
            if frame.brightness is not None and frame.state is not False:
                want["brightness"] = frame.brightness
        waiting = self._awaiting.setdefault(frame.entity, [])
        waiting.append(_Awaiting(frame.seq, want))
        del waiting[:-MAX_AWAITING]

    def on_state(self, state: EntityState) -> list[EsphomeFrame]:
        """The frames one state update makes: a Confirmed for each command it shows
        applied, then the StatePush. Pure apart from the waiting list it updates."""
        object_id = self._object_ids.get(state.key)
        if object_id is None:
            return []  # an entity we were not told about (listed after we asked)
        value = state_value(state)
        frames: list[EsphomeFrame] = []
        waiting = self._awaiting.get(object_id)
        if waiting:
            for entry in list(waiting):
                if _satisfied(entry.want, value):
                    waiting.remove(entry)
                    frames.append(Confirmed(seq=entry.seq, entity=object_id, state=value))
            if not waiting:
                del self._awaiting[object_id]
        frames.append(StatePush(values={object_id: value}))
        return frames


def entity_kind(info: EntityInfo) -> str:
    """``SwitchInfo`` → ``"switch"``, ``BinarySensorInfo`` → ``"binarysensor"``, …"""
    name = type(info).__name__
    return name.removesuffix("Info").lower()


def state_value(state: EntityState) -> Any:
    """A state update's value as plain data: a bool, a number, a string, None (missing),
    or for a light ``{"state", "brightness"}``; other kinds: their fields."""
    if isinstance(state, LightState):
        return {"state": state.state, "brightness": state.brightness}
    if getattr(state, "missing_state", False):
        return None
    fields = state.to_dict()
    if "state" in fields:
        return _plain(fields["state"])
    return {k: _plain(v) for k, v in fields.items() if k not in ("key", "device_id")}


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def _number(op: str, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError(f"esphome {op}: {name} must be a finite number, got {value!r}")
    return float(value)


def _satisfied(want: Mapping[str, Any], value: Any) -> bool:
    if "value" in want:
        return isinstance(value, int | float) and math.isclose(
            value, want["value"], rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE
        )
    if isinstance(value, dict):  # a light
        if "state" in want and value.get("state") != want["state"]:
            return False
        if "brightness" in want:
            got = value.get("brightness")
            return isinstance(got, int | float) and abs(got - want["brightness"]) <= 1e-3
        return True
    return "state" in want and value == want["state"]
