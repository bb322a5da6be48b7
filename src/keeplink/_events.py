"""Typed, frozen events a link announces to its subscribers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeAlias, TypeVar

from keeplink._core.errors import ErrorInfo
from keeplink._core.states import LinkState
from keeplink._logs import Repeats

__all__ = [
    "ErrorInfo",
    "EventHub",
    "FrameReceived",
    "LinkEvent",
    "LinkStateChanged",
    "ProtocolErrorSeen",
    "SideDataReceived",
]

_log = logging.getLogger("keeplink.events")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkStateChanged:
    link: str
    old: LinkState
    new: LinkState
    at: float
    attempt: int
    """Failed attempts since the last completed handshake."""
    error: ErrorInfo | None = None
    """Why the link left ``connected`` or entered ``backoff``/``failed``."""
    retry_at: float | None = None
    """Clock time of the next attempt, when entering ``backoff``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameReceived:
    """An unsolicited frame from the peer (e.g. a state push)."""

    link: str
    at: float
    frame: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class SideDataReceived:
    """A reply carried side data about the device (e.g. a fresh ``rssi``)."""

    link: str
    at: float
    device_id: str | None
    values: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolErrorSeen:
    """The peer sent input that is not a valid frame. It was dropped; the link goes on."""

    link: str
    at: float
    reason: str
    sample: bytes
    count: int
    """Protocol errors on this link so far, this one included."""


LinkEvent: TypeAlias = LinkStateChanged | FrameReceived | SideDataReceived | ProtocolErrorSeen

E = TypeVar("E")


class EventHub(Generic[E]):
    """Synchronous fan-out to subscribers. A subscriber that raises is logged, never felt.

    The first failure of a subscriber is logged at ERROR with its traceback; repeats of it
    at DEBUG, so a broken callback cannot flood the log or touch the publisher.
    """

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._subscribers: list[Callable[[E], object]] = []
        self._failed: Repeats[int] = Repeats()  # by id(callback)
        self.subscriber_errors = 0

    def subscribe(self, callback: Callable[[E], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def __bool__(self) -> bool:
        """True if anyone listens (so a publisher can skip building an event)."""
        return bool(self._subscribers)

    def emit(self, event: E) -> None:
        for callback in tuple(self._subscribers):
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - see below
                # Deliberately broad: a subscriber's bug must not reach the publisher (the
                # link supervisor). It is counted and logged, first time with a traceback.
                self.subscriber_errors += 1
                if not self._failed.first(id(callback)):
                    _log.debug("%s: event subscriber %r raised again", self._owner, callback)
                else:
                    _log.exception(
                        "%s: event subscriber %r raised on %s; the link carries on",
                        self._owner,
                        callback,
                        type(event).__name__,
                    )
