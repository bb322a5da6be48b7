"""The driver seam: what a link speaks.

A :class:`Driver` opens a :class:`Channel` (TCP, TLS, a broker session…), runs the handshake
over it, and says what a heartbeat is and how a reply is matched to its request. The
:class:`~keeplink.Link` does everything else: supervision, reconnects, liveness, deadlines.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from keeplink._core.jsonline import Malformed

__all__ = [
    "Channel",
    "Driver",
    "FrameChannel",
    "HeartbeatReply",
    "Reply",
    "SessionInfo",
]

F = TypeVar("F")
F_co = TypeVar("F_co", covariant=True)


class Channel(Protocol[F]):
    """An open, framed, bidirectional channel. Owned by the link once handed over.

    ``receive`` returns the next frame, or a :class:`Malformed` item for an input the codec
    could not parse; it raises :class:`~keeplink.LinkBrokenError` when the channel ends (EOF,
    reset, closed). ``send`` raises ``LinkBrokenError`` if the channel is broken and
    :class:`~keeplink.InvalidRequestError` (before writing anything) if the frame cannot be
    encoded. ``close`` is synchronous, idempotent and immediate: it never waits for the peer.
    """

    async def receive(self) -> F | Malformed: ...

    async def send(self, frame: F) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class FrameChannel(Protocol[F]):
    """What a driver's handshake sees: frames only; malformed input is counted by the link."""

    async def receive(self) -> F: ...

    async def send(self, frame: F) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """What the handshake learned about the peer."""

    device_id: str | None = None
    firmware: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """A reply frame matched to a request sequence number.

    ``ok`` true: ``result`` is the payload. False: ``code``/``message`` are the device's.
    ``side`` is side data that updates device state (e.g. ``{"rssi": -61}``).
    """

    seq: int
    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)
    code: str | None = None
    message: str | None = None
    side: Mapping[str, Any] = field(default_factory=dict)


class HeartbeatReply(enum.Enum):
    """Whether the peer answers a heartbeat, which decides if its silence means death."""

    EXPECTED = "expected"
    """The peer always answers: silence for the liveness limit means the link is dead."""
    NEVER = "never"
    """Fire and forget: the peer never answers, so its silence proves nothing."""
    MAYBE = "maybe"
    """Some peers answer, some don't. Silence counts only once this peer has answered one."""


class Driver(Protocol[F]):
    """A protocol a link speaks. Implement this to teach keeplink a new kind of device.

    ``open`` raises a :class:`~keeplink.KeeplinkError` (usually ``LinkBrokenError`` with the
    OS error as ``__cause__``); anything else it raises is classified by the link. The link
    applies its own connect and handshake deadlines around ``open`` and ``handshake``.

    Optional: ``renumber_request(frame, seq) -> F``, the request ``build_request`` made
    under another sequence number, without checking or encoding its arguments again. A
    request that waits for the window is built once to fail bad arguments at once; with
    this method it is renumbered when its turn comes instead of built a second time. The
    link uses it only when the class that defines ``build_request`` defines it too.
    """

    name: str
    """Protocol name for logs and metrics, e.g. ``"jsonline"``."""
    seq_bits: int
    """Width of request sequence numbers: 8, 16 or 32."""
    max_in_flight: int
    """How many requests may be in flight on one link (1 for strict devices)."""
    heartbeat_reply: HeartbeatReply

    async def open(self) -> Channel[F]: ...

    async def handshake(self, channel: FrameChannel[F]) -> SessionInfo: ...

    def heartbeat_frame(self) -> F | None:
        """The frame to send as a heartbeat, or None for no heartbeat."""
        ...

    def is_heartbeat_reply(self, frame: F) -> bool: ...

    def build_request(self, seq: int, op: str, args: Mapping[str, Any], key: str | None) -> F:
        """Encode a request. Raises InvalidRequestError for arguments the peer cannot take."""
        ...

    def match_reply(self, frame: F) -> Reply | None:
        """The reply this frame carries, or None if it is not a reply."""
        ...
