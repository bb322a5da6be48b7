"""A link's counters, and the frozen record :meth:`Link.statistics` returns."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from keeplink._core.errors import ErrorCode, KeeplinkError
from keeplink._core.jsonline import Malformed
from keeplink._core.linkmachine import LinkMachine
from keeplink._core.outcomes import Acknowledged, Cancelled, Rejected, TimedOut, Unavailable
from keeplink._core.states import LinkState
from keeplink._driver import SessionInfo
from keeplink._events import ErrorInfo

__all__ = ["OUTCOME_NAMES", "Counters", "LinkStatistics", "snapshot"]

OUTCOME_NAMES: Final[dict[type, str]] = {
    Acknowledged: "acknowledged",
    Rejected: "rejected",
    TimedOut: "timed_out",
    Cancelled: "cancelled",
    Unavailable: "unavailable",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkStatistics:
    """A snapshot of a link's counters. Frozen: take another to see changes."""

    name: str
    state: LinkState
    attempt: int
    """Failed attempts since the last completed handshake."""
    connects: int
    """Completed handshakes."""
    disconnects: int
    """Sessions that ended (lost)."""
    failed_attempts: int
    frames_in: int
    frames_out: int
    heartbeats_sent: int
    protocol_errors: int
    subscriber_errors: int
    internal_errors: int
    """Unexpected exceptions the supervisor caught (each a bug, logged with a traceback)."""
    last_error: ErrorInfo | None
    retry_at: float | None
    connected_since: float | None
    session: SessionInfo | None
    requests_sent: int = 0
    requests_in_flight: int = 0
    late_replies: int = 0
    """Replies for no request in flight (after its deadline, or unknown): logged, dropped."""
    outcomes: Mapping[str, int] = field(default_factory=dict)
    """Resolved requests by outcome: acknowledged, rejected, timed_out, cancelled, unavailable."""
    last_protocol_error: ErrorInfo | None = None
    """The last malformed input dropped (code ``protocol_error``): what was wrong with it and
    how it began. Unlike ``last_error`` it never ended a session."""
    last_protocol_error_at: float | None = None
    """When it arrived, on the link's clock."""
    last_late_reply_seq: int | None = None
    """The sequence number of the last reply that matched no request in flight."""
    last_late_reply_at: float | None = None


class Counters:
    """The traffic counters every room of a link adds to; :class:`LinkStatistics` is their
    frozen snapshot (with the machine's connects, disconnects and attempts)."""

    __slots__ = ("frames_in", "frames_out", "heartbeats_sent", "internal_errors",
                 "last_late_reply", "last_malformed", "late_replies", "outcomes",
                 "protocol_errors", "requests_sent")  # fmt: skip

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.heartbeats_sent = 0
        self.protocol_errors = 0
        self.internal_errors = 0
        self.requests_sent = 0
        self.late_replies = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.last_malformed: tuple[Malformed, float] | None = None
        self.last_late_reply: tuple[int, float] | None = None


def snapshot(
    *,
    name: str,
    machine: LinkMachine,
    counters: Counters,
    session: _HasStart | None,
    last_error: KeeplinkError | None,
    subscriber_errors: int,
    in_flight: int,
) -> LinkStatistics:
    """The frozen record of a link's numbers, now."""
    c = counters
    malformed: ErrorInfo | None = None
    malformed_at: float | None = None
    if c.last_malformed is not None:
        item, malformed_at = c.last_malformed
        malformed = ErrorInfo(
            code=ErrorCode.PROTOCOL_ERROR.value,
            message=f"dropped malformed input: {item.reason} (it began {item.sample!r})",
        )
    late_seq, late_at = c.last_late_reply or (None, None)
    return LinkStatistics(
        name=name,
        state=machine.state,
        attempt=machine.attempt,
        connects=machine.connects,
        disconnects=machine.disconnects,
        failed_attempts=machine.failed_attempts,
        frames_in=c.frames_in,
        frames_out=c.frames_out,
        heartbeats_sent=c.heartbeats_sent,
        protocol_errors=c.protocol_errors,
        subscriber_errors=subscriber_errors,
        internal_errors=c.internal_errors,
        last_error=ErrorInfo.of(last_error) if last_error is not None else None,
        retry_at=machine.retry_at,
        connected_since=session.started if session is not None else None,
        session=session.info if session is not None else None,
        requests_sent=c.requests_sent,
        requests_in_flight=in_flight,
        late_replies=c.late_replies,
        outcomes=dict(c.outcomes),
        last_protocol_error=malformed,
        last_protocol_error_at=malformed_at,
        last_late_reply_seq=late_seq,
        last_late_reply_at=late_at,
    )


class _HasStart(Protocol):
    @property
    def started(self) -> float: ...

    @property
    def info(self) -> SessionInfo: ...
