"""The MQTT driver: configuration, the handshake, requests and decoding by topic."""

from __future__ import annotations

import enum
import json
import logging
import ssl
import string
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import mqtt5

from keeplink._channel import StreamChannel, open_stream_channel
from keeplink._clock import SystemClock
from keeplink._core.clock import Clock
from keeplink._core.errors import ConfigError, InvalidRequestError, KeeplinkError
from keeplink._core.jsonline import Malformed, load_object
from keeplink._core.requests import check_request
from keeplink._driver import FrameChannel, HeartbeatReply, Reply, SessionInfo
from keeplink.drivers.mqtt._channel import MqttChannel
from keeplink.drivers.mqtt._frames import (
    Availability,
    BrokerSessionEnded,
    Delivered,
    Message,
    MqttFrame,
    Publish,
    Response,
    Subscribe,
)
from keeplink.drivers.mqtt._protocol import MAX_REMAINING_LENGTH, MqttCodec, connect_failure

__all__ = ["MqttDriver"]

_log = logging.getLogger("keeplink.mqtt")

SAMPLE_BYTES: Final = 64
"""How much of a bad payload a Malformed item keeps, for the log."""


class _Kind(enum.Enum):
    AVAILABILITY = "availability"
    RESPONSE = "response"


class MqttDriver:
    """Speaks MQTT to a broker on behalf of ``devices``. Checked at construction.

    ``command_topic``, ``response_topic`` and ``availability_topic`` are format strings with
    one ``{device}`` field. ``response_topic=None`` (the default) resolves requests at the
    broker's PUBACK; set it (e.g. ``"{device}/resp"``) for replies from the device.
    ``clock``: what keepalive reads and schedules on (the link's, in tests a
    :class:`~keeplink.testing.VirtualClock`); the event loop's monotonic clock by default.
    Availability messages go to the listeners of :meth:`on_availability` (presence sources
    such as :class:`keeplink.presence.mqtt.MqttAvailability`).

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
        clock: Clock | None = None,
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
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._listeners: list[Callable[[Availability | BrokerSessionEnded], None]] = []
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
        """Connect to the broker and wait for its CONNACK (a fresh session each time).

        Raises LinkBrokenError (code ``connection_failed``) when the broker cannot be
        reached or refuses for a reason of its own, AuthError (terminal) for credentials or a
        certificate it refuses, ConfigError for a client id or protocol it refuses; the
        socket's error is ``__cause__``. The link's connect deadline bounds the wait for the
        CONNACK; cancelled, it closes the connection before it returns.
        """
        where = f"MQTT broker {self.host}:{self.port}"
        try:
            stream: StreamChannel[mqtt5.Packet] = await open_stream_channel(
                self.host, self.port, MqttCodec(), ssl_context=self.tls, server_hostname=self.host
            )
        except KeeplinkError as exc:
            cause = exc.__cause__
            if cause is None:
                raise
            raise connect_failure(cause, where) from cause
        channel = MqttChannel(self, stream, clock=self.clock, announce=self._announce)
        await channel.connect()
        return channel

    def on_availability(
        self, listener: Callable[[Availability | BrokerSessionEnded], None]
    ) -> Callable[[], None]:
        """Call ``listener`` with every :class:`Availability` message, as it arrives, and
        with :class:`BrokerSessionEnded` when a broker session that was up ends. Returns the
        function that removes it. The listener runs in the channel's read path: it must not
        block (an exception it raises is logged and dropped)."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def _announce(self, event: Availability | BrokerSessionEnded) -> None:
        if isinstance(event, Availability) and event.payload not in (
            self.payload_online,
            self.payload_offline,
        ):
            _log.debug(
                "mqtt: %r availability payload %r is neither %r nor %r; taken as offline",
                event.device,
                event.payload,
                self.payload_online,
                self.payload_offline,
            )
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener's bug must not end the session
                _log.exception("mqtt %s:%d: availability listener failed", self.host, self.port)

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
        return None  # MQTT keepalive (PINGREQ/PINGRESP) is the channel's

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
            if frame.refused is not None:
                return Reply(
                    seq=frame.seq,
                    ok=False,
                    code=frame.refused,
                    message=f"the broker refused the publish to {frame.topic!r}",
                )
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
        return _decode_response(device, topic, payload, retained, qos, self.seq_bits)


def _decode_response(
    device: str, topic: str, payload: bytes, retained: bool, qos: int, seq_bits: int
) -> MqttFrame | Malformed:
    """A message on ``device``'s response topic: a Response, a Message (no ``cid``: not a
    reply), or Malformed (a reply that breaks the contract)."""
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
    if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < 1 << seq_bits:
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
