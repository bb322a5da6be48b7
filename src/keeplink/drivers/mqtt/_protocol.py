"""Sans-IO pieces of the MQTT driver: the packet codec, keepalive decisions, packet ids and
the typed errors for what a broker says. Nothing here awaits, reads a clock or touches a
socket: time comes in as ``now``.

Packets are :mod:`mqtt5`'s (a maintained Rust codec, the one aiomqtt 3 is built on); this
module only frames them: it finds where a packet ends from MQTT's fixed header, so a short
read is told apart from a broken packet without guessing from the codec's exceptions (and
it reads the one MQTT 3.1.1 packet we may get, a 3.1.1 broker's refusal, as MQTT 5's).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Sequence
from typing import Final

import mqtt5

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
from keeplink._core.jsonline import Malformed
from keeplink.drivers.mqtt._frames import Publish, Subscribe

__all__ = [
    "MAX_REMAINING_LENGTH",
    "Keepalive",
    "KeepaliveAction",
    "MqttCodec",
    "PacketIds",
    "PublishWindow",
    "connack_error",
    "connect_failure",
    "connect_packet",
    "puback_refusal",
    "publish_packet",
    "session_error",
    "suback_failure",
    "subscribe_packet",
]

MAX_REMAINING_LENGTH: Final = 268_435_455
"""MQTT's largest packet body (four bytes of variable-length integer)."""
SAMPLE_BYTES: Final = 64
"""How much of a bad packet a Malformed item keeps, for the log."""

_AUTH_CODES: Final = frozenset(
    {
        int(mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD),
        int(mqtt5.ConnAckReasonCode.NOT_AUTHORIZED),
        int(mqtt5.ConnAckReasonCode.BANNED),
        int(mqtt5.ConnAckReasonCode.BAD_AUTHENTICATION_METHOD),
    }
)
_CONFIG_CODES: Final = frozenset(
    {
        int(mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION),
        int(mqtt5.ConnAckReasonCode.CLIENT_ID_NOT_VALID),
    }
)
_REFUSED: Final = 0x80
"""Reason codes from here on refuse (MQTT 5, 2.4): below it, a SUBACK or PUBACK agrees.
(mqtt5's reason codes compare equal to their numbers but are neither hashable nor
ordered: sets and comparisons here go through ``int()``.)"""


# ---------------------------------------------------------------------------- codec

_V311_REFUSED: Final = {
    b"\x20\x02\x00\x01": mqtt5.ConnAckPacket(
        reason_code=mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION
    ),
}
"""What a broker that does not speak MQTT 5 answers our CONNECT with (an MQTT 3.1.1 CONNACK,
return code 1: unacceptable protocol version), read as the MQTT 5 CONNACK that means it."""


class MqttCodec:
    """MQTT 5 packets as a keeplink :class:`~keeplink.Codec` (bytes in, packets out).

    A packet the codec cannot read becomes a :class:`Malformed` item (MQTT has no way to
    resynchronise, so the channel ends the session on it); a broken fixed header stops the
    decoding for good.
    """

    __slots__ = ("_broken", "_buffer")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> list[mqtt5.Packet | Malformed]:
        if self._broken:
            return []
        buffer = self._buffer
        buffer += data
        out: list[mqtt5.Packet | Malformed] = []
        while True:
            size = _packet_size(buffer)
            if size is None or len(buffer) < size:
                break  # the rest of the packet is still on its way
            if size < 0:
                self._broken = True
                out.append(Malformed("MQTT packet length over 4 bytes", bytes(buffer[:5])))
                buffer.clear()
                break
            chunk = bytes(buffer[:size])
            del buffer[:size]
            if chunk in _V311_REFUSED:
                out.append(_V311_REFUSED[chunk])
                continue
            try:
                packet, used = mqtt5.read(memoryview(chunk))
            except (ValueError, IndexError) as exc:
                out.append(Malformed(f"MQTT packet: {exc}", chunk[:SAMPLE_BYTES]))
                continue
            if used != size:
                out.append(Malformed("MQTT packet: length disagrees", chunk[:SAMPLE_BYTES]))
                continue
            out.append(packet)
        return out

    def encode(self, packet: mqtt5.Packet) -> bytes:
        return packet.write()


def _packet_size(buffer: bytearray) -> int | None:
    """Bytes in the packet at the start of ``buffer``: None if the header is incomplete,
    -1 if it is broken (more than four length bytes)."""
    length = 0
    for index in range(1, 5):
        if index >= len(buffer):
            return None
        byte = buffer[index]
        length |= (byte & 0x7F) << (7 * (index - 1))
        if not byte & 0x80:
            return index + 1 + length
    return -1


_QOS: Final = {0: mqtt5.QoS.AT_MOST_ONCE, 1: mqtt5.QoS.AT_LEAST_ONCE, 2: mqtt5.QoS.EXACTLY_ONCE}


def connect_packet(
    client_id: str, username: str | None, password: str | None, keepalive_s: int
) -> mqtt5.ConnectPacket:
    """Our CONNECT: a clean session (nothing is kept at the broker between sessions).
    Raises ConfigError for what the codec refuses."""
    try:
        return mqtt5.ConnectPacket(
            client_id,
            username=username,
            password=password.encode() if password is not None else None,
            clean_start=True,
            keep_alive=keepalive_s,
        )
    except ValueError as exc:
        raise ConfigError(f"mqtt: cannot connect as {client_id!r}: {exc}") from exc


def publish_packet(frame: Publish, packet_id: int | None) -> mqtt5.PublishPacket:
    """The PUBLISH for ``frame``. Raises InvalidRequestError for what the codec refuses."""
    try:
        return mqtt5.PublishPacket(
            frame.topic,
            frame.payload,
            qos=_QOS[frame.qos],
            retain=frame.retain,
            packet_id=packet_id,
        )
    except (ValueError, KeyError) as exc:  # a topic with wildcards, an empty one, a bad QoS
        raise InvalidRequestError(f"mqtt: cannot publish to {frame.topic!r}: {exc}") from exc


def subscribe_packet(packet_id: int, frame: Subscribe) -> mqtt5.SubscribePacket:
    """The SUBSCRIBE for ``frame``. retain_as_published is off: the retain flag then marks
    what the broker kept (as in MQTT 3.1.1), not how a device published it."""
    return mqtt5.SubscribePacket(
        packet_id,
        [
            mqtt5.TopicFilter(topic, max_qos=_QOS[frame.qos], retain_as_published=False)
            for topic in frame.topics
        ],
    )


# ---------------------------------------------------------------------------- keepalive


class KeepaliveAction(enum.Enum):
    WAIT = "wait"
    PING = "ping"
    DEAD = "dead"


class Keepalive:
    """When to send PINGREQ and when a silent broker is dead, on the caller's clock.

    A ping goes out once we have sent nothing, or heard nothing, for a whole period (the
    broker must hear from us within it, and silence from the broker is what a ping asks
    about). Any packet from the broker proves it alive, the PINGRESP included ("traffic is
    proof of life"); a broker that sends nothing for a period after our ping is dead. A
    broker that stops answering is therefore dropped within about two periods.
    """

    __slots__ = ("_last_in", "_last_out", "_ping_at", "period_s")

    def __init__(self, period_s: float, now: float) -> None:
        self.period_s = period_s
        self._last_in = now
        self._last_out = now
        self._ping_at: float | None = None

    def sent(self, now: float) -> None:
        self._last_out = now

    def received(self, now: float) -> None:
        self._last_in = now
        self._ping_at = None

    @property
    def ping_outstanding(self) -> bool:
        return self._ping_at is not None

    def due(self) -> float:
        """When :meth:`decide` has something to do next."""
        if self._ping_at is not None:
            return self._ping_at + self.period_s
        return min(self._last_in, self._last_out) + self.period_s

    def decide(self, now: float) -> KeepaliveAction:
        """What to do at ``now``. PING means the caller sends PINGREQ now (counted here)."""
        if now < self.due():
            return KeepaliveAction.WAIT
        if self._ping_at is not None:
            return KeepaliveAction.DEAD
        self._ping_at = now
        self._last_out = now
        return KeepaliveAction.PING


# ---------------------------------------------------------------------------- packet ids


class PacketIds:
    """MQTT packet identifiers (1..65535) for our publishes and subscribes, each in use
    until its acknowledgement releases it."""

    __slots__ = ("_next", "_used")

    LIMIT: Final = 65535

    def __init__(self) -> None:
        self._next = 1
        self._used: set[int] = set()

    def __len__(self) -> int:
        return len(self._used)

    def take(self) -> int:
        """A free identifier. Raises ProtocolError if all are in use (the broker's receive
        maximum and the link's window keep far fewer in flight)."""
        if len(self._used) >= self.LIMIT:
            raise ProtocolError("mqtt: every packet identifier is in use")
        while self._next in self._used:
            self._next = self._next % self.LIMIT + 1
        taken = self._next
        self._used.add(taken)
        self._next = taken % self.LIMIT + 1
        return taken

    def release(self, packet_id: int) -> bool:
        """Free ``packet_id``; False if it was not in use (an unsolicited acknowledgement)."""
        if packet_id in self._used:
            self._used.discard(packet_id)
            return True
        return False


class PublishWindow:
    """Our QoS 1 publishes the broker has not acknowledged, within its receive maximum.

    MQTT 5 (4.9) lets a client have at most ``receive_max`` QoS 1 publishes unacknowledged
    (the broker says how many in its CONNACK; Mosquitto's default is 20, below the link's
    window of 64); a broker that gets more disconnects. A publish past it waits here and
    goes out as PUBACKs free room.
    """

    __slots__ = ("_unacked", "_waiting", "ids", "receive_max")

    def __init__(self, ids: PacketIds, receive_max: int = PacketIds.LIMIT) -> None:
        self.ids = ids
        self.receive_max = receive_max
        self._unacked: dict[int, Publish] = {}
        self._waiting: collections.deque[Publish] = collections.deque()

    def __len__(self) -> int:
        return len(self._unacked)

    def offer(self, publish: Publish) -> int | None:
        """The packet id to send ``publish`` with now, or None: it waits for room."""
        if len(self._unacked) >= self.receive_max:
            self._waiting.append(publish)
            return None
        packet_id = self.ids.take()
        self._unacked[packet_id] = publish
        return packet_id

    def withdraw(self, packet_id: int) -> None:
        """Forget a publish that could not be written after all."""
        if self._unacked.pop(packet_id, None) is not None:
            self.ids.release(packet_id)

    def acked(self, packet_id: int) -> tuple[Publish | None, list[tuple[int, Publish]]]:
        """The publish ``packet_id`` acknowledges (None: not ours, or acknowledged
        already) and the waiting ones to send now, with their packet ids."""
        publish = self._unacked.pop(packet_id, None)
        if publish is None:
            return None, []
        self.ids.release(packet_id)
        now: list[tuple[int, Publish]] = []
        while self._waiting and len(self._unacked) < self.receive_max:
            waiting = self._waiting.popleft()
            taken = self.ids.take()
            self._unacked[taken] = waiting
            now.append((taken, waiting))
        return publish, now

    def clear(self) -> None:
        for packet_id in self._unacked:
            self.ids.release(packet_id)
        self._unacked.clear()
        self._waiting.clear()


# ---------------------------------------------------------------------------- errors


def _name(code: enum.IntEnum) -> str:
    return f"{code.name.lower()} (0x{int(code):02X})"


def connect_failure(cause: BaseException, where: str) -> KeeplinkError:
    """What keeps us from the broker's socket, typed. A broker is infrastructure, not a
    sleepy device: whatever keeps us from it is a connection failure, retried with the usual
    backoff (never ``device_unavailable``); a certificate it refuses is an AuthError and a
    connect that timed out a RequestTimeout."""
    err = broken_from(cause, f"cannot connect to {where}")
    if isinstance(err, AuthError | RequestTimeout):
        return err
    return LinkBrokenError(err.message)


def connack_error(reason: mqtt5.ConnAckReasonCode, where: str) -> KeeplinkError:
    """The error for a CONNACK that refuses: AuthError for credentials, ConfigError for a
    client id or protocol the broker will not take, LinkBrokenError for the rest (busy,
    unavailable, ...), which the link retries."""
    if int(reason) in _AUTH_CODES:
        return AuthError(f"{where} refused the credentials: {_name(reason)}")
    if reason == mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
        return ConfigError(
            f"{where} refused the connection: {_name(reason)}; the MQTT driver needs a broker "
            "that speaks MQTT 5"
        )
    if int(reason) in _CONFIG_CODES:
        return ConfigError(f"{where} refused the connection: {_name(reason)}")
    return LinkBrokenError(f"{where} refused the connection: {_name(reason)}")


def session_error(
    peer: str,
    *,
    cause: BaseException | None = None,
    reason: mqtt5.DisconnectReasonCode | None = None,
    what: str = "session ended",
) -> LinkBrokenError:
    """The typed end of a broker session: from the socket's error (``cause``) or the
    broker's DISCONNECT (``reason``)."""
    if reason == mqtt5.DisconnectReasonCode.KEEP_ALIVE_TIMEOUT:
        return LinkBrokenError(
            f"MQTT broker {peer}: no answer within the keepalive ({what})", code=ErrorCode.TIMEOUT
        )
    if reason is not None:
        detail = f"the broker disconnected: {_name(reason)}"
        if reason == mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER:
            detail += " (another client connected with the same client id?)"
        return LinkBrokenError(f"MQTT broker {peer}: {what}: {detail}")
    if isinstance(cause, OSError):
        err = broken_from(cause, f"MQTT broker {peer}: {what}")
        if isinstance(err, LinkBrokenError) and err.code in (
            ErrorCode.CONNECTION_FAILED,
            ErrorCode.TIMEOUT,
        ):
            return err
        return LinkBrokenError(err.message)
    detail = describe(cause) if cause is not None else "closed"
    return LinkBrokenError(f"MQTT broker {peer}: {what}: {detail}")


def suback_failure(
    topics: Sequence[str], codes: Sequence[mqtt5.SubAckReasonCode], peer: str
) -> KeeplinkError | None:
    """The error for a SUBACK that refuses a topic (AuthError when the broker's ACL does),
    or None when every topic was granted."""
    if len(codes) != len(topics):
        return ProtocolError(
            f"MQTT broker {peer} answered {len(topics)} subscription(s) with "
            f"{len(codes)} reason code(s)"
        )
    for topic, code in zip(topics, codes, strict=True):
        if int(code) < _REFUSED:
            continue
        message = f"MQTT broker {peer} refused the subscription to {topic!r}: {_name(code)}"
        if code == mqtt5.SubAckReasonCode.NOT_AUTHORIZED:
            return AuthError(message + "; check the broker's ACL for this client")
        return ProtocolError(message)
    return None


def puback_refusal(reason: mqtt5.PubAckReasonCode) -> str | None:
    """The reason a PUBACK refuses the message (``not_authorized``, ...), or None."""
    return reason.name.lower() if int(reason) >= _REFUSED else None
