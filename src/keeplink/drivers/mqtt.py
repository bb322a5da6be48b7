"""The MQTT driver: one link to a broker, many devices behind it (a hub link).

    presence = PresenceTracker()
    driver = MqttDriver(
        "broker.lan", 1883,
        client_id="keeplink-gw1",
        devices=["plug-1", "plug-2"],
        presence=presence,
        response_topic="{device}/resp",
    )
    async with Link(driver, name="broker", heartbeat_s=None) as link:
        await link.wait_connected()
        outcome = await link.request("set", {"device": "plug-1", "on": True}, timeout=5)

The link supervises the broker connection (aiomqtt does not reconnect by itself; every
session is a fresh :class:`aiomqtt.Client`). Keepalive is MQTT's own (``keepalive_s``, run by
paho): the driver has no heartbeat frame, so construct the link with ``heartbeat_s=None``. A
broker that stops answering PINGREQ is dropped by paho after about two keepalive periods, and
that ends the channel like any other disconnect.

Wire contract, per configured device ``D`` (topics are the format strings, ``{device}`` → D;
MQTT 3.1.1, QoS 1 both ways):

``availability_topic`` (device → us, retained, plus the device's last will)
    ``payload_online`` or ``payload_offline`` (anything else counts as offline). Reported to
    ``presence`` as :attr:`Source.MQTT` claims. When the broker session ends, the driver
    forgets its MQTT claims: with the broker gone it knows nothing about the devices.
``command_topic`` (us → device)
    ``{"op": OP, "args": ARGS, "key": IDEMPOTENCY_KEY or null, "cid": SEQ}``, UTF-8 JSON.
    ``ARGS`` is the request's args as given, ``device`` included. A device that sees a
    ``key`` again must acknowledge without applying it twice (delivery is at least once).
``response_topic`` (device → us, only when configured)
    ``{"cid": SEQ, "ok": true, "result": {...}}`` or
    ``{"cid": SEQ, "ok": false, "code": "CODE", "msg": "..."}``; other members are side data
    (e.g. ``"rssi": -61``). Correlation is by ``cid`` in the payload only. MQTT 5
    correlation data is not used: the payload field works with every broker and device
    firmware, and 3.1.1 is what most devices speak.

Without a response topic, a request is acknowledged when the broker's PUBACK arrives: the
broker has the command, which says nothing about the device having it. The channel then puts
a :class:`Delivered` frame carrying the request's sequence number into the incoming stream,
so the link's correlator resolves it like any reply. Sending returns once paho has the
packet, without waiting for the PUBACK: a late PUBACK times one request out, and never
counts as a send timeout, which would close the session of every device behind the broker.

A request on the link itself names its device in ``args["device"]`` (one of ``devices``);
anything else is an InvalidRequestError before a byte is sent. Through an
:class:`~keeplink.outbox.Outbox`, naming the device once is enough:
``outbox.submit("plug-1", "set", {"on": True})`` on a device attached with
``outbox.attach("plug-1", link, hub=True)`` is delivered with ``args["device"]`` filled in
from :meth:`MqttDriver.device_args`. Args that name the device themselves still work, and
args that name another device are refused at submit (an InvalidRequestError, nothing
stored).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import json
import logging
import math
import socket
import ssl
import string
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeAlias

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from keeplink._core.classify import broken_from, describe
from keeplink._core.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    InvalidRequestError,
    KeeplinkError,
    LinkBrokenError,
    ProtocolError,
    RequestTimeout,
)
from keeplink._core.jsonline import Malformed, load_object
from keeplink._core.presence import Source
from keeplink._core.requests import check_request
from keeplink._driver import FrameChannel, HeartbeatReply, Reply, SessionInfo

__all__ = [
    "Availability",
    "Delivered",
    "Message",
    "MqttChannel",
    "MqttDriver",
    "MqttFrame",
    "PresenceSink",
    "Publish",
    "Response",
    "Subscribe",
]

_log = logging.getLogger("keeplink.mqtt")


class _AtDebug(logging.Filter):
    """Lowers every record to DEBUG. paho logs a reset socket as an ERROR; the same failure
    ends the session, which the link logs once, with its code, at WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_paho_log = logging.getLogger("keeplink.mqtt.paho")
"""paho's and aiomqtt's own log, all at DEBUG."""
_paho_log.addFilter(_AtDebug())

CLIENT_TIMEOUT_S: Final = 5.0
"""Bounds aiomqtt's own waits that take no timeout argument: the CONNACK after a connect and
the broker closing after our DISCONNECT. Publishes and subscribes wait under the link's
deadlines instead."""
MAX_REMAINING_LENGTH: Final = 268_435_455
"""MQTT's largest packet body: a command that does not fit is refused before sending."""
ABANDON_POLL_S: Final = 0.01
"""How often an abandoned connect is checked for a socket to shut down (see _abandon)."""
SAMPLE_BYTES: Final = 64
"""How much of a bad payload a Malformed item keeps, for the log."""

# MQTT reason codes (CONNACK, SUBACK, DISCONNECT) that say something we act on. MQTT 3.1.1
# return codes arrive converted to these by paho.
_RC_UNSUPPORTED_PROTOCOL: Final = 0x84
_RC_CLIENT_ID_REJECTED: Final = 0x85
_RC_BAD_CREDENTIALS: Final = 0x86
_RC_NOT_AUTHORIZED: Final = 0x87
_RC_KEEPALIVE_TIMEOUT: Final = 0x8D
_RC_SESSION_TAKEN_OVER: Final = 0x8E
_RC_BANNED: Final = 0x8A
_RC_BAD_AUTH_METHOD: Final = 0x8C
_AUTH_CODES: Final = frozenset(
    {_RC_BAD_CREDENTIALS, _RC_NOT_AUTHORIZED, _RC_BANNED, _RC_BAD_AUTH_METHOD}
)
_CONFIG_CODES: Final = frozenset({_RC_UNSUPPORTED_PROTOCOL, _RC_CLIENT_ID_REJECTED})
# MQTT 3.1.1 CONNACK return codes, for a paho that hands over the raw number.
_V311_CONNACK: Final[dict[int, int]] = {
    1: _RC_UNSUPPORTED_PROTOCOL,
    2: _RC_CLIENT_ID_REJECTED,
    4: _RC_BAD_CREDENTIALS,
    5: _RC_NOT_AUTHORIZED,
}


class PresenceSink(Protocol):
    """Where availability goes; a :class:`keeplink.presence.PresenceTracker` is one.

    (A Protocol, not the tracker's class: drivers sit below presence in the layers.)
    """

    def report(self, device: str, source: Source, online: bool) -> None: ...

    def forget(self, device: str, source: Source) -> None: ...


# ---------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    """Outgoing: publish ``payload`` on ``topic``. ``ack_seq``: once the broker's PUBACK
    arrives, the channel puts a :class:`Delivered` with this number into the incoming stream."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    ack_seq: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    """Outgoing: subscribe to ``topics`` (the handshake's). Raises on a refused topic."""

    topics: tuple[str, ...]
    qos: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Availability:
    """Incoming: a device's availability message (retained, or its last will)."""

    device: str
    online: bool
    payload: str
    retained: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """Incoming: a device's correlated reply on its response topic."""

    device: str
    cid: int
    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)
    code: str | None = None
    message: str | None = None
    side: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivered:
    """Synthetic, incoming: the broker acknowledged (PUBACK) the publish of request ``seq``."""

    seq: int
    topic: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Incoming: any other message (the link announces it as a FrameReceived event)."""

    topic: str
    payload: bytes
    retained: bool
    qos: int


MqttFrame: TypeAlias = Publish | Subscribe | Availability | Response | Delivered | Message


class _Kind(enum.Enum):
    AVAILABILITY = "availability"
    RESPONSE = "response"


# ---------------------------------------------------------------------------- channel


class MqttChannel:
    """A :class:`~keeplink.Channel` over one connected :class:`aiomqtt.Client`.

    Incoming messages are decoded by the driver. After :meth:`deliver_to` (the link does this
    when the session starts), :meth:`receive` pumps them to the link's sink and only returns
    by raising :class:`LinkBrokenError` when the session ends: the broker closed it, paho's
    keepalive gave up on a silent broker, or :meth:`close` was called.
    """

    def __init__(self, driver: MqttDriver, client: aiomqtt.Client) -> None:
        self._driver = driver
        self._client = client
        self.peer = f"{driver.host}:{driver.port}"
        self._sink: Callable[[MqttFrame | Malformed], None] | None = None
        self._held: collections.deque[MqttFrame | Malformed] = collections.deque()
        self._next: asyncio.Task[aiomqtt.Message] | None = None
        loop = asyncio.get_running_loop()
        self._over: asyncio.Future[None] = loop.create_future()
        """Resolved (never failed) when the session ends; waits race against it."""
        self._wake: asyncio.Future[None] | None = None
        self._ended: LinkBrokenError | None = None
        self._closer: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        """Publishes waiting for their PUBACK (aiomqtt would wait past the session's end)."""

    # ------------------------------------------------------------------ Channel

    @property
    def closed(self) -> bool:
        return self._ended is not None

    async def receive(self) -> MqttFrame | Malformed:
        """The next item; with a sink, pump items to it until the channel ends (raises)."""
        while True:
            if self._held and self._sink is None:
                return self._held.popleft()
            if self._ended is not None:
                raise self._ended
            message = await self._next_message()
            if message is None:
                continue  # woken: a held frame, or the end
            item = self._driver.decode(
                str(message.topic), _payload_bytes(message.payload), message.retain, message.qos
            )
            self._driver._observe(item)
            if self._sink is None:
                return item
            self._sink(item)

    def deliver_to(self, sink: Callable[[MqttFrame | Malformed], None]) -> None:
        """From now on, hand every item to ``sink`` (held ones first). Messages still come
        off the client in :meth:`receive`, which the link's reader keeps awaiting."""
        self._sink = sink
        while self._held:
            sink(self._held.popleft())

    def send_nowait(self, frame: MqttFrame) -> bool:
        """Always False: the link then awaits :meth:`send`, which reports a publish paho
        refuses at once (not connected) as an error rather than losing it."""
        return False

    async def send(self, frame: MqttFrame) -> None:
        """Hand a publish to paho, or subscribe (waiting for the SUBACK).

        A publish returns once paho has it: the broker's PUBACK is not awaited here, so a
        slow PUBACK never counts against the link's send deadline (which would close the
        broker session, for every device behind it). When it arrives, a publish with an
        ``ack_seq`` puts a :class:`Delivered` into the incoming stream.

        Raises LinkBrokenError if the session has ended, ends first, or paho refuses;
        AuthError or ProtocolError if the broker refuses a subscription; InvalidRequestError
        (nothing sent) for a frame that cannot be sent.
        """
        if self._ended is not None:
            raise self._ended
        client = self._client
        if isinstance(frame, Subscribe):
            what = f"subscribe to {len(frame.topics)} topic(s)"
            granted = await self._until_over(
                client.subscribe([(topic, frame.qos) for topic in frame.topics], timeout=math.inf),
                what,
            )
            _check_granted(frame.topics, granted, self.peer)
            return
        if not isinstance(frame, Publish):
            raise InvalidRequestError(f"mqtt: cannot send a {type(frame).__name__} frame")
        task = asyncio.get_running_loop().create_task(
            client.publish(
                frame.topic, frame.payload, qos=frame.qos, retain=frame.retain, timeout=math.inf
            ),
            name=f"keeplink.mqtt[{self._driver.client_id}].publish",
        )
        self._publishing.add(task)
        task.add_done_callback(functools.partial(self._published, frame))
        # One turn of the loop runs the task's first step, created just now and so queued
        # ahead of us: paho takes the packet there, or refuses it at once.
        await asyncio.sleep(0)
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            raise self._failure(exc, f"publish to {frame.topic!r}") from exc

    def close(self) -> None:
        """End the session now; disconnecting from the broker finishes in the background
        (:meth:`wait_closed` waits for it). Idempotent."""
        self._end(LinkBrokenError(f"channel to MQTT broker {self.peer} is closed"))
        if self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(
                self._shutdown(), name=f"keeplink.mqtt[{self._driver.client_id}].close"
            )

    async def wait_closed(self) -> None:
        if self._closer is not None:
            await asyncio.shield(self._closer)

    # ------------------------------------------------------------------ machinery

    def _put(self, item: MqttFrame | Malformed) -> None:
        if self._sink is not None:
            self._sink(item)
            return
        self._held.append(item)
        self._wake_up()

    def _published(self, frame: Publish, task: asyncio.Task[None]) -> None:
        self._publishing.discard(task)
        if task.cancelled():
            return  # the session ended first: the request resolves by its deadline
        exc = task.exception()
        if exc is not None:
            _log.debug("mqtt %s: publish to %r failed: %s", self.peer, frame.topic, exc)
            return  # raised by send() already: paho refused it at once
        if frame.ack_seq is not None:
            self._put(Delivered(seq=frame.ack_seq, topic=frame.topic))

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _end(self, reason: LinkBrokenError) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        if not self._over.done():
            self._over.set_result(None)
        for task in self._publishing:
            task.cancel()  # no PUBACK will come on this session
        self._wake_up()
        self._driver._session_over()

    async def _next_message(self) -> aiomqtt.Message | None:
        """The next message off the client, or None if woken first. Raises at the end."""
        loop = asyncio.get_running_loop()
        task = self._next
        if task is None:
            task = self._next = loop.create_task(
                anext(self._client.messages), name=f"keeplink.mqtt[{self._driver.client_id}].rx"
            )
        wake = self._wake = loop.create_future()
        try:
            await asyncio.wait((task, wake), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._wake = None
        if self._next is not task or not task.done():
            return None  # kept for the next call (or taken by close)
        self._next = None
        try:
            return task.result()
        except aiomqtt.MqttError as exc:
            err = _session_error(exc, self.peer)
            err.__cause__ = exc
            self._end(err)
            raise err from exc

    async def _until_over(self, operation: Coroutine[Any, Any, Any], what: str) -> Any:
        """Await an aiomqtt call, unless the session ends first (aiomqtt would wait on)."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(
            operation, name=f"keeplink.mqtt[{self._driver.client_id}].{what.split()[0]}"
        )
        try:
            await asyncio.wait((task, self._over), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()  # aiomqtt drops its pending entry in a finally
                await asyncio.wait((task,))
        if task.cancelled():
            assert self._ended is not None
            raise self._ended
        exc = task.exception()
        if exc is None:
            return task.result()
        raise self._failure(exc, what) from exc

    def _failure(self, exc: BaseException, what: str) -> KeeplinkError:
        if isinstance(exc, ValueError):  # paho: a topic or payload it will not send
            return InvalidRequestError(f"mqtt: cannot {what}: {exc}")
        return _session_error(exc, self.peer, f"{what} failed")

    async def _shutdown(self) -> None:
        """Disconnect politely (DISCONNECT, bounded by CLIENT_TIMEOUT_S), then make sure the
        socket is gone whatever happened."""
        pending = self._next
        self._next = None
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait((pending,))
        if pending is not None and not pending.cancelled():
            pending.exception()  # retrieved: the session is over, its end was reported
        if self._publishing:
            await asyncio.wait(self._publishing)  # cancelled by _end, unwinding
        try:
            await self._client.__aexit__(None, None, None)
        except aiomqtt.MqttError as exc:
            _log.debug("mqtt %s: no clean disconnect: %s", self.peer, exc)
        finally:
            _abort_socket(self._client)


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray):
        return bytes(payload)
    return str(payload).encode()  # paho hands over bytes; aiomqtt's type says more


def _paho(client: aiomqtt.Client) -> paho.Client:
    # aiomqtt keeps its paho client private and offers no way to drop a connection without
    # waiting for the broker; Channel.close() and a connect that was abandoned need one.
    return client._client


def _abort_socket(client: aiomqtt.Client) -> None:
    """Shut the socket down if paho still holds one: paho's reader then sees EOF and closes
    it through its own path (unregistering it from the loop). Never waits."""
    sock = _paho(client).socket()
    if isinstance(sock, socket.socket):  # ssl.SSLSocket included
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _reason_value(rc: object) -> int | None:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    if isinstance(rc, int):
        return rc
    return None


def _session_error(exc: BaseException, peer: str, what: str = "session ended") -> LinkBrokenError:
    """The typed end of a broker session, from what aiomqtt raised (or chained)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, BaseException) else None
    rc = _reason_value(getattr(cause, "rc", None) if cause is not None else None)
    if rc is None:
        rc = _reason_value(getattr(exc, "rc", None))
    detail = describe(cause) if cause is not None else describe(exc)
    if rc == _RC_KEEPALIVE_TIMEOUT:
        return LinkBrokenError(
            f"MQTT broker {peer}: no answer within the keepalive ({what})",
            code=ErrorCode.TIMEOUT,
        )
    if rc == _RC_SESSION_TAKEN_OVER:
        detail += " (another client connected with the same client id?)"
    if isinstance(cause, OSError):
        err = broken_from(cause, f"MQTT broker {peer}: {what}")
        return err if isinstance(err, LinkBrokenError) else LinkBrokenError(err.message)
    return LinkBrokenError(f"MQTT broker {peer}: {what}: {detail}")


def _check_granted(topics: tuple[str, ...], granted: object, peer: str) -> None:
    """Raise for a topic the broker refused in its SUBACK."""
    if not isinstance(granted, list | tuple):
        return
    for topic, rc in zip(topics, granted, strict=False):
        value = _reason_value(rc)
        if value is None or value < 0x80:
            continue
        message = f"MQTT broker {peer} refused the subscription to {topic!r}: {rc}"
        if value == _RC_NOT_AUTHORIZED:
            raise AuthError(message + "; check the broker's ACL for this client")
        raise ProtocolError(message)


# ---------------------------------------------------------------------------- driver


class MqttDriver:
    """Speaks MQTT to a broker on behalf of ``devices``. Checked at construction.

    ``command_topic``, ``response_topic`` and ``availability_topic`` are format strings with
    one ``{device}`` field. ``response_topic=None`` (the default) resolves requests at the
    broker's PUBACK; set it (e.g. ``"{device}/resp"``) for replies from the device.
    ``presence``: where availability messages are reported (:attr:`Source.MQTT`).

    Raises :class:`ConfigError` for a bad port, keepalive, client id, device name or topic
    template, or two topics that collide.
    """

    name = "mqtt"
    seq_bits = 32
    max_in_flight = 64
    heartbeat_reply = HeartbeatReply.NEVER

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive_s: int = 30,
        command_topic: str = "{device}/cmd",
        response_topic: str | None = None,
        availability_topic: str = "{device}/availability",
        payload_online: str = "online",
        payload_offline: str = "offline",
        devices: Iterable[str] = (),
        presence: PresenceSink | None = None,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ConfigError(f"mqtt: host must be a non-empty string, got {host!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"mqtt: port must be 1..65535, got {port!r}")
        if not isinstance(client_id, str) or not client_id or len(client_id.encode()) > 65535:
            raise ConfigError(f"mqtt: client_id must be a non-empty string, got {client_id!r}")
        if (
            not isinstance(keepalive_s, int)
            or isinstance(keepalive_s, bool)
            or not 1 <= keepalive_s <= 65535
        ):
            raise ConfigError(f"mqtt: keepalive_s must be 1..65535 seconds, got {keepalive_s!r}")
        if password is not None and username is None:
            raise ConfigError("mqtt: a password needs a username")
        for key, value in (
            ("payload_online", payload_online),
            ("payload_offline", payload_offline),
        ):
            if not isinstance(value, str):
                raise ConfigError(f"mqtt: {key} must be a string, got {value!r}")
        if payload_online == payload_offline:
            raise ConfigError("mqtt: payload_online and payload_offline must differ")
        devices = list(devices)
        for device in devices:
            if not isinstance(device, str) or not device or any(c in device for c in "+#\0"):
                raise ConfigError(
                    f"mqtt: device names must be non-empty, without '+', '#' or NUL: {device!r}"
                )
        if len(set(devices)) != len(devices):
            raise ConfigError(f"mqtt: devices listed twice in {devices!r}")
        templates = {"command_topic": command_topic, "availability_topic": availability_topic}
        if response_topic is not None:
            templates["response_topic"] = response_topic
        for key, template in templates.items():
            _check_template(key, template)

        self.host = host
        self.port = port
        self.client_id = client_id
        self.username = username
        self.password = password
        self.tls = tls
        self.keepalive_s = keepalive_s
        self.command_topic = command_topic
        self.response_topic = response_topic
        self.availability_topic = availability_topic
        self.payload_online = payload_online
        self.payload_offline = payload_offline
        self.devices: tuple[str, ...] = tuple(devices)
        self.presence = presence
        # Incoming topic → what it is and whose; outgoing commands are looked up per device.
        self._incoming: dict[str, tuple[_Kind, str]] = {}
        self._commands: dict[str, str] = {}
        for device in self.devices:
            self._commands[device] = command_topic.format(device=device)
            self._route(availability_topic.format(device=device), _Kind.AVAILABILITY, device)
            if response_topic is not None:
                self._route(response_topic.format(device=device), _Kind.RESPONSE, device)
        for device, topic in self._commands.items():
            if topic in self._incoming:
                raise ConfigError(
                    f"mqtt: command topic {topic!r} of {device!r} is also subscribed to"
                )

    def _route(self, topic: str, kind: _Kind, device: str) -> None:
        if topic in self._incoming:
            other_kind, other = self._incoming[topic]
            raise ConfigError(
                f"mqtt: topic {topic!r} is both {other_kind.value} of {other!r} "
                f"and {kind.value} of {device!r}"
            )
        self._incoming[topic] = (kind, device)

    def __repr__(self) -> str:
        tls = " tls" if self.tls is not None else ""
        return f"MqttDriver({self.host}:{self.port}{tls} {self.client_id!r})"

    # ------------------------------------------------------------------ Driver

    async def open(self) -> MqttChannel:
        """Connect to the broker (a fresh client each time).

        Raises LinkBrokenError (code ``connection_failed``) when the broker cannot be
        reached or refuses for a reason of its own, AuthError (terminal) for credentials or a
        certificate it refuses, ConfigError for a client id or protocol it refuses, and
        RequestTimeout when no CONNACK comes; the aiomqtt/paho error is ``__cause__``. If
        cancelled, it closes whatever the connect opened before it returns (see _abandon).
        """
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self.username,
            password=self.password,
            tls_context=self.tls,
            keepalive=self.keepalive_s,
            timeout=CLIENT_TIMEOUT_S,
            clean_session=True,
            logger=_paho_log,
        )
        # aiomqtt warns past this many unacknowledged calls; the link's window bounds them.
        client.pending_calls_threshold = self.max_in_flight + 1
        # In a task of its own: paho connects in a worker thread that a cancellation cannot
        # stop, and a connect that completes after we gave up must still be closed.
        connect = asyncio.get_running_loop().create_task(
            client.__aenter__(), name=f"keeplink.mqtt[{self.client_id}].connect"
        )
        try:
            await asyncio.shield(connect)
        except asyncio.CancelledError:
            await _abandon(client, connect)
            raise
        except aiomqtt.MqttError as exc:
            _abort_socket(client)
            raise self._connect_error(exc) from exc
        except ValueError as exc:  # paho refuses the arguments themselves
            _abort_socket(client)
            raise ConfigError(f"mqtt: cannot connect to {self.host}:{self.port}: {exc}") from exc
        return MqttChannel(self, client)

    def _connect_error(self, exc: aiomqtt.MqttError) -> KeeplinkError:
        where = f"MQTT broker {self.host}:{self.port}"
        if isinstance(exc, aiomqtt.MqttCodeError):  # during a connect: a refusing CONNACK
            rc = _reason_value(exc.rc)
            if isinstance(exc.rc, int) and not isinstance(exc.rc, ReasonCode):
                rc = _V311_CONNACK.get(exc.rc, rc)
            if rc in _AUTH_CODES:
                return AuthError(f"{where} refused the credentials: {exc.rc}")
            if rc in _CONFIG_CODES:
                return ConfigError(f"{where} refused the connection: {exc.rc}")
            return LinkBrokenError(f"{where} refused the connection: {exc.rc}")
        # aiomqtt re-raises connect failures "from None": the original is the context.
        context = exc.__context__
        if isinstance(context, TimeoutError):
            return RequestTimeout(f"{where}: no CONNACK within {CLIENT_TIMEOUT_S:g}s")
        if isinstance(context, OSError):
            err = broken_from(context, f"cannot connect to {where}")
            if isinstance(err, AuthError | RequestTimeout):
                return err
            # A broker is infrastructure, not a sleepy device: whatever keeps us from it is
            # a connection failure, retried with the usual backoff (never "absent").
            return LinkBrokenError(err.message)
        return LinkBrokenError(f"cannot connect to {where}: {describe(exc)}")

    async def handshake(self, channel: FrameChannel[MqttFrame]) -> SessionInfo:
        """Subscribe to every device's availability (and response) topic, QoS 1. Retained
        availability messages follow at once. Raises AuthError if the broker's ACL refuses
        a topic, ProtocolError for another refusal."""
        topics = tuple(self._incoming)
        if topics:
            await channel.send(Subscribe(topics=topics))
        return SessionInfo(
            device_id=None,
            extra={
                "broker": f"{self.host}:{self.port}",
                "client_id": self.client_id,
                "devices": self.devices,
            },
        )

    def heartbeat_frame(self) -> MqttFrame | None:
        return None  # MQTT keepalive (PINGREQ/PINGRESP) is paho's

    def is_heartbeat_reply(self, frame: MqttFrame) -> bool:
        return False

    def device_args(self, device: str) -> Mapping[str, Any]:
        """The args that address ``device`` on this link: ``{"device": device}``. What an
        :class:`~keeplink.outbox.Outbox` fills into the commands of a device attached to the
        link, so a command names its device once. Raises InvalidRequestError for a device
        this driver does not serve."""
        if device not in self._commands:
            raise InvalidRequestError(
                f"mqtt: unknown device {device!r}; this link serves {sorted(self.devices)}"
            )
        return {"device": device}

    def build_request(
        self, seq: int, op: str, args: Mapping[str, Any], key: str | None
    ) -> MqttFrame:
        """The command for ``args["device"]``. Raises InvalidRequestError (nothing sent) for
        a missing or unknown device, a bad op or key, or args JSON cannot carry."""
        check_request(op, args, key)
        if "device" not in args:
            raise InvalidRequestError(
                f"mqtt: args must name the device (args['device']), one of {sorted(self.devices)}"
            )
        device = args["device"]
        topic = self._commands.get(device) if isinstance(device, str) else None
        if topic is None:
            raise InvalidRequestError(
                f"mqtt: unknown device {device!r}; this link serves {sorted(self.devices)}"
            )
        try:
            payload = json.dumps(
                {"op": op, "args": dict(args), "key": key, "cid": seq},
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
            ).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"mqtt: args cannot be sent as JSON: {exc}") from exc
        if len(payload) + len(topic.encode()) + 4 > MAX_REMAINING_LENGTH:
            raise InvalidRequestError(f"mqtt: command of {len(payload)} bytes is too large")
        ack_seq = seq if self.response_topic is None else None
        return Publish(topic=topic, payload=payload, qos=1, ack_seq=ack_seq)

    def match_reply(self, frame: MqttFrame) -> Reply | None:
        if isinstance(frame, Delivered):
            return Reply(seq=frame.seq, ok=True)
        if isinstance(frame, Response):
            return Reply(
                seq=frame.cid,
                ok=frame.ok,
                result=frame.result,
                code=frame.code,
                message=frame.message,
                side=frame.side,
            )
        return None

    # ------------------------------------------------------------------ decoding (sans-IO)

    def decode(
        self, topic: str, payload: bytes, retained: bool = False, qos: int = 0
    ) -> MqttFrame | Malformed:
        """What an incoming message is: Availability, Response, Message, or Malformed (a
        response that breaks the contract). Pure: reports nothing."""
        route = self._incoming.get(topic)
        if route is None:
            return Message(topic=topic, payload=payload, retained=retained, qos=qos)
        kind, device = route
        if kind is _Kind.AVAILABILITY:
            text = payload.decode("utf-8", errors="replace")
            return Availability(
                device=device, online=text == self.payload_online, payload=text, retained=retained
            )
        return self._decode_response(device, topic, payload, retained, qos)

    def _decode_response(
        self, device: str, topic: str, payload: bytes, retained: bool, qos: int
    ) -> MqttFrame | Malformed:
        sample = payload[:SAMPLE_BYTES]
        try:
            obj = load_object(payload)
        except ValueError as exc:
            return Malformed(f"response from {device!r}: {exc}", sample)
        if "cid" not in obj:
            # Not a reply: something else the device says on that topic.
            return Message(topic=topic, payload=payload, retained=retained, qos=qos)
        cid, ok = obj.pop("cid"), obj.pop("ok", None)
        result, code, message = obj.pop("result", None), obj.pop("code", None), obj.pop("msg", None)
        if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < 1 << self.seq_bits:
            return Malformed(f"response from {device!r}: bad cid {cid!r}", sample)
        if not isinstance(ok, bool):
            return Malformed(f"response from {device!r}: 'ok' must be true or false", sample)
        if result is not None and not isinstance(result, dict):
            return Malformed(f"response from {device!r}: 'result' must be an object", sample)
        if not isinstance(code, str | None) or not isinstance(message, str | None):
            return Malformed(f"response from {device!r}: 'code'/'msg' must be strings", sample)
        return Response(
            device=device,
            cid=cid,
            ok=ok,
            result=result or {},
            code=code,
            message=message,
            side=obj,
        )

    # ------------------------------------------------------------------ presence

    def _observe(self, item: MqttFrame | Malformed) -> None:
        if not isinstance(item, Availability):
            return
        if item.payload not in (self.payload_online, self.payload_offline):
            _log.debug(
                "mqtt: %r availability payload %r is neither %r nor %r; taken as offline",
                item.device,
                item.payload,
                self.payload_online,
                self.payload_offline,
            )
        if self.presence is not None:
            self.presence.report(item.device, Source.MQTT, item.online)

    def _session_over(self) -> None:
        """The broker session ended: what it said about the devices no longer holds."""
        if self.presence is not None:
            for device in self.devices:
                self.presence.forget(device, Source.MQTT)


def _check_template(key: str, template: object) -> None:
    if not isinstance(template, str):
        raise ConfigError(f"mqtt: {key} must be a format string, got {template!r}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template)]
        sample = template.format(device="d")
    except (ValueError, KeyError, IndexError) as exc:
        raise ConfigError(f"mqtt: {key} {template!r} is not a valid template: {exc}") from exc
    if [name for name in fields if name is not None] != ["device"]:
        raise ConfigError(f"mqtt: {key} {template!r} needs exactly one {{device}} field")
    if not sample or any(c in sample for c in "+#\0"):
        raise ConfigError(f"mqtt: {key} {template!r} must make a topic without '+' or '#'")


async def _abandon(client: aiomqtt.Client, connect: asyncio.Task[Any]) -> None:
    """Close a connect we gave up on (open() was cancelled), leaving nothing behind.

    While paho still connects in its worker thread, nothing can interrupt it: we wait, which
    paho's own connect timeout bounds (5 s). Once it has a socket, we shut that down and let
    paho close it, and only then stop waiting for the CONNACK: stopping first would leave
    aiomqtt's connect future cancelled under paho's disconnect callback, which then raises.
    Cancelled again meanwhile, it still finishes, then re-raises.
    """
    cancelled = False
    shut = False
    while not connect.done():
        has_socket = _paho(client).socket() is not None
        if has_socket and not shut:
            _abort_socket(client)
            shut = True
        elif shut and not has_socket:
            connect.cancel()
        try:
            await asyncio.wait((connect,), timeout=ABANDON_POLL_S)
        except asyncio.CancelledError:
            cancelled = True
    if not connect.cancelled() and connect.exception() is None:
        # Connected after all: a DISCONNECT, so the broker does not wait out a keepalive.
        # paho writes it from the loop and closes the socket behind it.
        _paho(client).disconnect()
    else:
        _abort_socket(client)
    if cancelled:
        raise asyncio.CancelledError
