"""The MQTT driver's frames: what the link sends and receives over a broker session."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

__all__ = [
    "Availability",
    "BrokerSessionEnded",
    "Delivered",
    "Message",
    "MqttFrame",
    "Publish",
    "Response",
    "Subscribe",
]


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
    """Synthetic, incoming: the broker acknowledged (PUBACK) the publish of request ``seq``.

    ``refused``: the broker's reason when its PUBACK refuses the message (MQTT 5 reason
    codes of 0x80 and above, e.g. ``not_authorized``); None when it took it.
    """

    seq: int
    topic: str
    refused: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Incoming: any other message (the link announces it as a FrameReceived event)."""

    topic: str
    payload: bytes
    retained: bool
    qos: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerSessionEnded:
    """Told to availability listeners (not a frame): the broker session that carried the
    availability messages of ``devices`` is over, so what they said no longer holds."""

    devices: tuple[str, ...]


MqttFrame: TypeAlias = Publish | Subscribe | Availability | Response | Delivered | Message
