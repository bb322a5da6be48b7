"""The ESPHome driver's frames and its channel over one aioesphomeapi connection.

Private to :mod:`keeplink.drivers.esphome`, which documents and re-exports what is public.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

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
from aioesphomeapi.model import ConnectionClosedEvent, DeviceInfo, EntityInfo, EntityState

from keeplink._core.classify import broken_from, describe
from keeplink._core.errors import (
    AuthError,
    DeviceMismatchError,
    ErrorCode,
    InvalidRequestError,
    KeeplinkError,
    LinkBrokenError,
    RequestTimeout,
)
from keeplink._core.jsonline import Malformed, StatePush

if TYPE_CHECKING:
    from keeplink.drivers.esphome import EsphomeDriver

_log = logging.getLogger("keeplink.esphome")

HEARTBEAT_TIMEOUT_S: Final = 10.0
"""How long one heartbeat's DeviceInfoRequest waits; the link's liveness limit decides."""


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
