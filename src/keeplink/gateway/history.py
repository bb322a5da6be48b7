"""What each device did over the last hours, kept in memory: the dashboard's timelines and charts.

The gateway feeds :class:`History` the same events its ``/api/events`` stream carries (link
state, presence, command state; in a fleet also the events other nodes relay), plus the
protocol errors its own links see (those are not in the stream: a babbling device would
flood it). :meth:`History.view` answers ``GET /api/devices/{id}/history``.

Per device it keeps three bounded things, all in memory (a restart forgets them):

- **changes**: a ring of the last :data:`MAX_CHANGES` presence and link state changes, each
  with its time, old and new state and, for a link, the error that caused it. Changes older
  than :data:`HOURS_KEPT` hours are dropped too. What was dropped is not guessed at: the
  view says from when on it knows (``known_since``).
- **buckets**: per-minute counters (:data:`BUCKET_S`) for the last :data:`HOURS_KEPT` hours:
  queue depth (at the end of the minute, and its highest), connects, drops, protocol
  errors, commands delivered and failed. Only minutes in which something happened are
  stored (a quiet minute carries the depth of the one before), at most
  :data:`MAX_BUCKETS`.
- **errors**: the last :data:`MAX_ERRORS` distinct errors (link, protocol, command), each
  message at most :data:`MESSAGE_CHARS` characters; a repeat of the newest one is counted
  on it, not added.

So a device costs a few kB while quiet and at most about 0.4 MB when every ring is full
(1,000 changes, 1,441 buckets, 50 errors), whatever happens to it; a gateway's history is
that times its device count.

The queue depth follows command events (``queued`` in, out of ``queued``), anchored on the
store's count at start and corrected by a sample once a minute (:meth:`History.sample`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from keeplink._core.errors import ErrorInfo, KeeplinkError

if TYPE_CHECKING:
    from keeplink.outbox import CommandStore

__all__ = [
    "BUCKET_S",
    "HOURS_KEPT",
    "MAX_BUCKETS",
    "MAX_CHANGES",
    "MAX_ERRORS",
    "MESSAGE_CHARS",
    "History",
    "sample_queues",
]

_log = logging.getLogger("keeplink.gateway")

HOURS_KEPT: Final = 24
"""How far back the history reaches (and the most ``hours`` a view may ask for)."""
BUCKET_S: Final = 60
"""The width of one counter bucket, in seconds."""
MAX_BUCKETS: Final = HOURS_KEPT * 3600 // BUCKET_S + 1
"""Buckets kept per device: the whole window, plus the minute in progress."""
MAX_CHANGES: Final = 1000
"""Presence and link state changes kept per device (a device that flaps all day keeps
its last 1,000: about three hours of a drop a minute)."""
MAX_ERRORS: Final = 50
"""Distinct errors kept per device (repeats of the newest are counted on it)."""
MESSAGE_CHARS: Final = 300
"""Of an error message kept (the start of it is what tells)."""
STATE_CHARS: Final = 32
"""Of a state name kept (a relayed event could carry anything)."""

Kind = Literal["presence", "link"]
Source = Literal["link", "protocol", "command"]

_FINAL_BAD: Final = frozenset({"failed", "rejected", "expired"})
_DOWN: Final = frozenset({"lost", "backoff", "failed"})
"""Link states a drop goes to (``stopping`` is the gateway's own doing, not a drop)."""


@dataclass(slots=True)
class Change:
    at: float
    kind: Kind
    old: str
    new: str
    error: tuple[str, str] | None = None
    """(code, message) of the error that caused a link change."""


@dataclass(slots=True)
class Bucket:
    start: float
    queued: int
    """The depth at the end of the bucket (the latest depth while it is the current one)."""
    queued_max: int
    connects: int = 0
    drops: int = 0
    protocol_errors: int = 0
    delivered: int = 0
    failed: int = 0


@dataclass(slots=True)
class ErrorSeen:
    source: Source
    code: str
    message: str
    first_at: float
    last_at: float
    count: int = 1
    command: str | None = None
    """The (last) command it came from, for a command error."""
    key: str = ""
    """What repeats share: the message, or a protocol error's reason without its sample."""


@dataclass(slots=True)
class _Device:
    presence: str
    link: str
    queued: int
    known_since: float
    changes: collections.deque[Change] = field(default_factory=collections.deque)
    buckets: collections.deque[Bucket] = field(default_factory=collections.deque)
    errors: collections.deque[ErrorSeen] = field(default_factory=collections.deque)
    queued_before: int = 0
    """The depth before the oldest kept bucket."""
    last_at: float = 0.0
    """The newest time recorded: later events never go back before it."""
    command_events: int = 0
    """Command events seen, so a sample taken while one arrived can be told stale."""


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _state(value: Any) -> str | None:
    return _text(value, STATE_CHARS) if isinstance(value, str) and value else None


def _error(value: Any) -> tuple[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    code = value.get("code")
    if not isinstance(code, str) or not code:
        return None
    return _text(code, STATE_CHARS * 2), _text(value.get("message") or "", MESSAGE_CHARS)


class History:
    """Every device's bounded history; see the module's docstring. Times are epoch seconds.

    ``link_devices``: a link's name → the devices behind it (a link event names its link;
    a hub's link serves several devices). A name it does not list is taken as a device id.
    """

    def __init__(
        self,
        *,
        hours: int = HOURS_KEPT,
        bucket_s: int = BUCKET_S,
        max_changes: int = MAX_CHANGES,
        max_errors: int = MAX_ERRORS,
        now: Callable[[], float] = time.time,
    ) -> None:
        if hours < 1 or bucket_s < 1 or max_changes < 1 or max_errors < 1:
            raise ValueError("history bounds must be at least 1")
        self.hours = hours
        self.bucket_s = bucket_s
        self.max_changes = max_changes
        self.max_errors = max_errors
        self.max_buckets = hours * 3600 // bucket_s + 1
        self.now = now
        self.link_devices: dict[str, list[str]] = {}
        self._devices: dict[str, _Device] = {}

    # ------------------------------------------------------------------ recording

    def track(
        self,
        device: str,
        *,
        presence: str = "unknown",
        link: str = "unknown",
        queued: int = 0,
        at: float | None = None,
    ) -> None:
        """Start (or restart) the history of ``device`` in the states it is in now."""
        at = self.now() if at is None else at
        self._devices[device] = _Device(
            presence=presence, link=link, queued=queued, known_since=at, last_at=at
        )

    def __contains__(self, device: object) -> bool:
        return device in self._devices

    def feed(self, event: Mapping[str, Any]) -> None:
        """One event of the gateway's stream (anything it does not know is ignored)."""
        kind = event.get("type")
        at = event.get("at")
        when = self.now()
        if isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at):
            when = float(at)
        if kind == "presence":
            device, new = event.get("device"), _state(event.get("new"))
            if isinstance(device, str) and new is not None:
                self.presence_changed(device, new, at=when)
        elif kind == "link":
            name, new = event.get("device"), _state(event.get("new"))
            if isinstance(name, str) and new is not None:
                for device in self.link_devices.get(name, [name]):
                    self.link_changed(device, new, error=_error(event.get("error")), at=when)
        elif kind == "command":
            command = event.get("command")
            if isinstance(command, Mapping):
                device, new = command.get("device"), _state(command.get("state"))
                command_id = command.get("id")
                if isinstance(device, str) and new is not None:
                    self.command_changed(
                        device,
                        old=_state(event.get("old")),
                        new=new,
                        command=command_id if isinstance(command_id, str) else None,
                        error=_error(command.get("last_error")),
                        at=when,
                    )

    def _device(self, device: str, at: float) -> tuple[_Device, float] | None:
        """The device's record, and ``at`` no earlier than anything recorded before."""
        record = self._devices.get(device)
        if record is None:
            return None
        at = max(at, record.last_at)
        record.last_at = at
        return record, at

    def presence_changed(self, device: str, new: str, *, at: float) -> None:
        found = self._device(device, at)
        if found is None:
            return
        record, at = found
        if new == record.presence:
            return
        self._change(record, Change(at=at, kind="presence", old=record.presence, new=new))
        record.presence = new

    def link_changed(
        self, device: str, new: str, *, error: tuple[str, str] | None = None, at: float
    ) -> None:
        found = self._device(device, at)
        if found is None:
            return
        record, at = found
        old = record.link
        if new == "connecting" and old == "backoff":
            # A retry is folded into the backoff span until it gets further (a handshake):
            # a device that is away for hours would otherwise fill the ring with retries.
            return
        # A drop's error comes again with the backoff that follows it: kept once. A failed
        # retry's is counted on the error before it when it is the same.
        if error is not None and old != "lost":
            self._error(record, "link", error[0], error[1], at)
        if new == old:
            return
        self._change(record, Change(at=at, kind="link", old=old, new=new, error=error))
        record.link = new
        if new == "connected":
            self._bucket(record, at).connects += 1
        elif old == "connected" and new in _DOWN:
            self._bucket(record, at).drops += 1

    def command_changed(
        self,
        device: str,
        *,
        old: str | None,
        new: str,
        command: str | None = None,
        error: tuple[str, str] | None = None,
        at: float,
    ) -> None:
        found = self._device(device, at)
        if found is None:
            return
        record, at = found
        record.command_events += 1
        delta = (new == "queued") - (old == "queued")
        bucket = self._bucket(record, at)
        if delta:
            record.queued = max(0, record.queued + delta)
            bucket.queued = record.queued
            bucket.queued_max = max(bucket.queued_max, record.queued)
        if new == "succeeded" and old != new:
            bucket.delivered += 1
        elif new in _FINAL_BAD and old != new:
            bucket.failed += 1
            if error is not None:
                self._error(record, "command", error[0], error[1], at, command=command)

    def protocol_error(
        self, device: str, reason: str, *, sample: str = "", at: float, code: str = "protocol_error"
    ) -> None:
        """Malformed input from the device (dropped; the link goes on)."""
        found = self._device(device, at)
        if found is None:
            return
        record, at = found
        self._bucket(record, at).protocol_errors += 1
        message = f"{reason} (starts {sample})" if sample else reason
        self._error(record, "protocol", code, message, at, key=reason)

    def command_events(self, device: str) -> int:
        """Command events seen for ``device`` so far (compare before and after a count)."""
        record = self._devices.get(device)
        return record.command_events if record is not None else 0

    def sample(self, device: str, queued: int, *, at: float | None = None) -> None:
        """The queue depth as the store counts it now: corrects what the events made of it.
        A sample that changes nothing stores nothing."""
        found = self._device(device, self.now() if at is None else at)
        if found is None:
            return
        record, at = found
        if queued == record.queued:
            return
        record.queued = queued
        bucket = self._bucket(record, at)
        bucket.queued = queued
        bucket.queued_max = max(bucket.queued_max, queued)

    def _change(self, record: _Device, change: Change) -> None:
        changes = record.changes
        changes.append(change)
        horizon = change.at - self.hours * 3600
        while len(changes) > self.max_changes or changes[0].at < horizon:
            dropped = changes.popleft()
            # Between a dropped change and the next one the state is known (the next one's
            # old state); before it, not.
            record.known_since = max(record.known_since, dropped.at)

    def _bucket(self, record: _Device, at: float) -> Bucket:
        start = math.floor(at / self.bucket_s) * self.bucket_s
        buckets = record.buckets
        if buckets and buckets[-1].start >= start:
            return buckets[-1]
        bucket = Bucket(start=start, queued=record.queued, queued_max=record.queued)
        buckets.append(bucket)
        horizon = start - self.hours * 3600
        while len(buckets) > self.max_buckets or buckets[0].start < horizon:
            record.queued_before = buckets.popleft().queued
        return bucket

    def _error(
        self,
        record: _Device,
        source: Source,
        code: str,
        message: str,
        at: float,
        *,
        command: str | None = None,
        key: str | None = None,
    ) -> None:
        message = _text(message, MESSAGE_CHARS)
        key = message if key is None else _text(key, MESSAGE_CHARS)
        errors = record.errors
        if errors:
            last = errors[-1]
            if (last.source, last.code, last.key) == (source, code, key):
                last.count += 1
                last.last_at = at
                last.message = message
                last.command = command
                return
        errors.append(
            ErrorSeen(
                source=source,
                code=code,
                message=message,
                first_at=at,
                last_at=at,
                command=command,
                key=key,
            )
        )
        while len(errors) > self.max_errors:
            errors.popleft()

    # ------------------------------------------------------------------ reading

    def view(self, device: str, *, hours: float, until: float | None = None) -> dict[str, Any]:
        """The last ``hours`` of ``device`` as ``GET /api/devices/{id}/history`` shows it
        (without the fields the gateway adds: ``device``, ``node``, ``relayed``)."""
        until = self.now() if until is None else until
        since = until - min(float(hours), float(self.hours)) * 3600
        record = self._devices.get(device)
        if record is None:
            record = _Device(presence="unknown", link="unknown", queued=0, known_since=until)
        known = min(max(since, record.known_since), until)
        changes = [c for c in record.changes if c.at <= until]
        presence = _spans(changes, "presence", record.presence, since, known, until)
        link = _spans(changes, "link", record.link, since, known, until)
        buckets = [b for b in record.buckets if since - self.bucket_s < b.start <= until]
        before = [b for b in record.buckets if b.start <= since - self.bucket_s]
        return {
            "since": since,
            "until": until,
            "known_since": known,
            "bucket_s": self.bucket_s,
            "presence": presence,
            "link": link,
            "outages": _outages([c for c in changes if c.kind == "link"], since, until),
            "queued_at_start": before[-1].queued if before else record.queued_before,
            "buckets": [_bucket_json(b) for b in buckets],
            "errors": [
                _error_json(e) for e in reversed(record.errors) if since <= e.last_at <= until
            ],
        }


async def sample_queues(history: History, store: CommandStore, devices: Sequence[str]) -> None:
    """Correct the history's queue depths from the store's count (every device in one
    read): at once, then once a bucket, until cancelled. A device whose commands moved
    during the read keeps what the events made of it; while the store is away the events'
    counts stand."""
    failed = False
    while True:
        seen = {device: history.command_events(device) for device in devices}
        try:
            depths = await store.depths(list(devices))
        except KeeplinkError:
            depths = {}  # the store is away: the events' counts stand until it is back
        except Exception:  # noqa: BLE001 - see below
            # Deliberately broad: the history's correction must never end, nor reach
            # delivery. Logged once, with its traceback.
            depths = {}
            if not failed:
                failed = True
                _log.exception("gateway: the history's queue sample failed")
        for device, (queued, _) in depths.items():
            if history.command_events(device) == seen.get(device):
                history.sample(device, queued)
        await asyncio.sleep(BUCKET_S)


def _spans(
    changes: Iterable[Change],
    kind: Kind,
    current: str,
    since: float,
    known: float,
    until: float,
) -> list[dict[str, Any]]:
    """Spans of one kind's states from ``since`` to ``until``: ``unknown`` before
    ``known``, then each state for as long as it held."""
    mine = [c for c in changes if c.kind == kind]
    spans: list[dict[str, Any]] = []

    def add(state: str, start: float, end: float, error: tuple[str, str] | None) -> None:
        start, end = max(start, since), min(end, until)
        if end <= start and spans:
            return
        if spans and spans[-1]["state"] == state:
            spans[-1]["end"] = end
            return
        spans.append(
            {
                "state": state,
                "start": start,
                "end": end,
                "error": ErrorInfo(*error).to_wire() if error else None,
            }
        )

    if known > since:
        add("unknown", since, known, None)
    # the state at `known`: the last change at or before it, else the first one's old
    before = [c for c in mine if c.at <= known]
    after = [c for c in mine if c.at > known]
    if before:
        state, error = before[-1].new, before[-1].error
    elif after:
        state, error = after[0].old, None
    else:
        state, error = current, None
    start = known
    for change in after:
        add(state, start, change.at, error)
        state, error, start = change.new, change.error, change.at
    add(state, start, until, error)
    return spans


def _outages(changes: list[Change], since: float, until: float) -> list[dict[str, Any]]:
    """Each time the link left ``connected``, until it was connected again (``end`` null
    while it is not yet), that overlaps the window."""
    out: list[dict[str, Any]] = []
    start: Change | None = None
    for change in changes:
        if change.old == "connected" and change.new in _DOWN:
            start = change
        elif change.new == "connected" and start is not None:
            if change.at >= since:
                out.append(_outage(start, change.at))
            start = None
    if start is not None and start.at <= until:
        out.append(_outage(start, None, until=until))
    return out


def _outage(start: Change, end: float | None, *, until: float = 0.0) -> dict[str, Any]:
    error = start.error
    return {
        "start": start.at,
        "end": end,
        "duration_s": round((end if end is not None else until) - start.at, 3),
        "state": start.new,
        "error": ErrorInfo(*error).to_wire() if error else None,
    }


def _bucket_json(bucket: Bucket) -> dict[str, Any]:
    return {
        "start": bucket.start,
        "queued": bucket.queued,
        "queued_max": bucket.queued_max,
        "connects": bucket.connects,
        "drops": bucket.drops,
        "protocol_errors": bucket.protocol_errors,
        "delivered": bucket.delivered,
        "failed": bucket.failed,
    }


def _error_json(error: ErrorSeen) -> dict[str, Any]:
    return {
        "source": error.source,
        "code": error.code,
        "message": error.message,
        "first_at": error.first_at,
        "last_at": error.last_at,
        "count": error.count,
        "command": error.command,
    }
