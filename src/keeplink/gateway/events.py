"""The gateway's event stream: every typed event (link state, command state, presence,
firmware progress, the breaker) as one JSON object with a sequence number, for the API's
WebSocket, the history and metrics. A late client catches up from a bounded backlog.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable
from typing import Any, Final

from keeplink._core.commands import Command
from keeplink._events import LinkStateChanged
from keeplink.gateway.views import waiting_json
from keeplink.outbox import (
    CommandStateChanged,
    CommandWaiting,
    DeliveryParked,
    FirmwareProgress,
    OutboxEvent,
)
from keeplink.presence import PresenceChanged

__all__ = [
    "EVENT_BACKLOG",
    "EventStream",
    "link_event_json",
    "outbox_event_json",
    "presence_event_json",
]

EVENT_BACKLOG: Final = 1000
"""Events kept for a WebSocket client that connects late (``?since=SEQ``)."""

Listener = Callable[[dict[str, Any]], None]


class EventStream:
    """Numbered JSON events, handed to every listener and kept in a bounded backlog."""

    def __init__(self) -> None:
        self.seq = 0
        """The sequence number of the newest event (0: none yet)."""
        self.listeners: list[Listener] = []
        self._backlog: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_BACKLOG)

    def listen(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback`` with every event from now on; returns the unsubscriber."""
        self.listeners.append(callback)
        return lambda: self.listeners.remove(callback) if callback in self.listeners else None

    def backlog(self, since: int = 0) -> list[dict[str, Any]]:
        """The kept events numbered after ``since``, oldest first."""
        return [event for event in self._backlog if event["seq"] > since]

    def publish(self, event: dict[str, Any]) -> None:
        """Number the event (and stamp ``at`` unless it has one) and hand it out."""
        self.seq += 1
        event = {"at": time.time(), **event, "seq": self.seq}
        self._backlog.append(event)
        for listener in tuple(self.listeners):
            with contextlib.suppress(Exception):  # a slow or gone client never hurts delivery
                listener(event)


def link_event_json(event: LinkStateChanged, *, retry_in: float | None) -> dict[str, Any]:
    """A link's state change (``retry_in``: seconds until its next attempt, if waiting)."""
    return {
        "type": "link",
        "device": event.link,
        "old": event.old.value,
        "new": event.new.value,
        "error": (event.error.to_wire() if event.error is not None else None),
        "retry_in_s": retry_in,
    }


def presence_event_json(change: PresenceChanged) -> dict[str, Any]:
    return {
        "type": "presence",
        "device": change.device,
        "old": change.old.value,
        "new": change.new.value,
        "cycle": change.cycle,
    }


def outbox_event_json(
    event: OutboxEvent, *, command_json: Callable[[Command], dict[str, Any]]
) -> dict[str, Any] | None:
    """An outbox event as the stream shows it (``command_json`` renders a command), or
    None for a kind the stream does not carry."""
    if isinstance(event, CommandStateChanged):
        return {
            "type": "command",
            "old": event.old.value if event.old is not None else None,
            "command": command_json(event.command),
        }
    if isinstance(event, FirmwareProgress):
        return {
            "type": "firmware_progress",
            "command_id": event.command_id,
            "device": event.device,
            "offset": event.offset,
            "size": event.size,
            "percent": round(event.percent, 2),
            "rate_bps": round(event.rate_bps, 1),
            "resumes": event.resumes,
        }
    if isinstance(event, CommandWaiting):
        return {
            "type": "waiting",
            "device": event.device,
            "command_id": event.command_id,
            "waiting": waiting_json(event.waiting),
        }
    if isinstance(event, DeliveryParked):
        return {
            "type": "parked",
            "device": event.device,
            "reason": event.reason,
            "until": event.until,
        }
    return None
