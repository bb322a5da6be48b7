"""The dispatcher's rules, sans-IO: what to do next for a device, how an outcome settles.

The outbox's delivery loop asks :func:`next_step` what to do for a device, given the device's
record, the head of its queue, whether it can be reached (:class:`Gate`) and ``now``; it
carries the answer out (persist, send, wait) and asks again. When an attempt ends,
:func:`settle` says what the command becomes and :func:`breaker` what that does to the
device's record. Nothing here awaits, reads a clock or touches a store: every rule is tested
synchronously, exhaustively (``tests/test_core_dispatch.py``).

Delivery cycles
---------------
A *cycle* begins each time a device becomes deliverable: present (debounced presence says
online) and its link connected, after not being both. A command is sent at most once per
cycle, so a device that flaps gets one attempt per appearance, bounded by ``max_attempts``,
and the breaker parks it after ``breaker_cycles`` failed cycles in a row. The one exception
is an attempt that failed while the link stayed up the whole time (a lost ack: the device
applied it, or never got it, and said nothing): that is not a new appearance, so waiting
for one would strand the command on a healthy link. It is retried in the same cycle after
a jittered ``retry_after_s``, with the same idempotency key, within ``max_attempts``.

So while a device is deliverable every queued command either goes out, or waits for a
reason (:class:`Waiting`) that the API shows, or ends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Final, TypeAlias

from keeplink._core.commands import Command, CommandState, DeviceRecord, transition
from keeplink._core.errors import ErrorCode, ErrorInfo
from keeplink._core.outcomes import Acknowledged, Outcome, Rejected

__all__ = [
    "RETRYABLE_REJECTIONS",
    "CheckPrecondition",
    "Expire",
    "Fail",
    "Gate",
    "Hold",
    "Idle",
    "PreconditionResult",
    "Resume",
    "Send",
    "Settlement",
    "Step",
    "WaitReason",
    "Waiting",
    "begin_cycles",
    "breaker",
    "cancelled",
    "expired_info",
    "next_step",
    "retry_delay",
    "settle",
    "superseded_info",
    "wait_of",
]

_Q = CommandState

RETRYABLE_REJECTIONS: Final = frozenset(
    {
        ErrorCode.OUT_OF_CONNECTION_SLOTS.value,
        ErrorCode.DEVICE_UNAVAILABLE.value,
        ErrorCode.TIMEOUT.value,
        ErrorCode.CONNECTION_FAILED.value,
    }
)
"""Device codes that say "not now" rather than "no": a retry may succeed."""

RETRY_JITTER: Final = 0.5
"""An in-cycle retry waits between ``(1 - RETRY_JITTER)`` and all of ``retry_after_s``:
devices behind one hub that lost their acks together do not come back in lockstep."""


class Gate(enum.Enum):
    """Whether a device can be delivered to now, and if not, why."""

    OPEN = "open"
    NO_LINK = "no_link"
    LINK_DOWN = "link_down"
    OFFLINE = "device_offline"


class WaitReason(enum.StrEnum):
    """Why a queued command is not going out right now (shown by the API)."""

    NO_LINK = "no_link"
    """No link is attached for the device."""
    LINK_DOWN = "link_down"
    """The device's link is not connected."""
    DEVICE_OFFLINE = "device_offline"
    """Presence says the device is away."""
    PARKED = "parked"
    """The breaker parked delivery to the device (until ``until``, or ``resume()``)."""
    PRECONDITION = "precondition"
    """Its precondition is not met yet; checked again at ``until``."""
    RETRY = "retry"
    """An attempt failed on a live link; tried again at ``until``."""
    NEXT_CYCLE = "next_cycle"
    """Tried in this delivery cycle already; the device must go away and come back."""
    BEHIND = "behind"
    """Per-device order: it waits for ``command`` ahead of it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Waiting:
    """Why a command waits, until when (``None``: until something happens), for which one."""

    reason: WaitReason
    message: str
    until: float | None = None
    command: str | None = None
    """The command this is about: the waiting head itself, or the one a command is behind."""


@dataclass(frozen=True, slots=True)
class PreconditionResult:
    """``ok``; or wait until ``retry_at`` (same cycle); or fail for good with ``reason``."""

    ok: bool
    retry_at: float | None = None
    reason: str | None = None

    @classmethod
    def passed(cls) -> PreconditionResult:
        return cls(ok=True)

    @classmethod
    def wait_until(cls, when: float) -> PreconditionResult:
        return cls(ok=False, retry_at=when)

    @classmethod
    def failed(cls, reason: str) -> PreconditionResult:
        return cls(ok=False, reason=reason)


# ---------------------------------------------------------------------- steps


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing is queued for the device."""


@dataclass(frozen=True, slots=True)
class Hold:
    """Do nothing now. Look again at ``waiting.until`` if set, else when something changes
    (presence, the link, a submit, a cancel, ``resume()``)."""

    waiting: Waiting


@dataclass(frozen=True, slots=True)
class Resume:
    """The breaker's parking time is over: persist ``record`` (un-parked), then look again."""

    record: DeviceRecord


@dataclass(frozen=True, slots=True)
class Expire:
    """The head's deadline passed: persist ``expired``, then look again."""

    expired: Command


@dataclass(frozen=True, slots=True)
class CheckPrecondition:
    """Run the head's precondition, then ask again with its verdict."""

    command: Command


@dataclass(frozen=True, slots=True)
class Fail:
    """The head's precondition failed for good: persist ``failed``, then look again."""

    failed: Command


@dataclass(frozen=True, slots=True)
class Send:
    """Persist ``sending`` (its attempt counted), then deliver it."""

    sending: Command


Step: TypeAlias = Idle | Hold | Resume | Expire | CheckPrecondition | Fail | Send

_GATE_WAIT: Final = {
    Gate.NO_LINK: (WaitReason.NO_LINK, "no link is attached for the device"),
    Gate.LINK_DOWN: (WaitReason.LINK_DOWN, "the device's link is not connected"),
    Gate.OFFLINE: (WaitReason.DEVICE_OFFLINE, "the device is away"),
}


def next_step(
    head: Command | None,
    *,
    record: DeviceRecord,
    gate: Gate,
    now: float,
    verdict: PreconditionResult | None = None,
) -> Step:
    """What to do next for a device whose queue head is ``head`` (``None``: empty queue).

    ``verdict`` is the head's precondition result, once :class:`CheckPrecondition` asked
    for it. Raises ValueError if ``head`` is not queued.
    """
    if head is not None and head.state is not _Q.QUEUED:
        raise ValueError(f"the head of a queue must be queued, got {head.state.value} ({head.id})")
    if head is not None and head.expires_at is not None and now >= head.expires_at:
        # A deadline is kept whatever else holds delivery (the breaker, a closed gate).
        return Expire(
            transition(head, _Q.EXPIRED, now=now, last_error=expired_info(head), retry_at=None)
        )
    if record.parked_reason is not None:
        until = record.parked_until
        if until is None or now < until:
            return Hold(
                Waiting(reason=WaitReason.PARKED, message=record.parked_reason, until=until)
            )
        return Resume(unparked(record))
    if head is None:
        return Idle()
    if gate is not Gate.OPEN:
        reason, message = _GATE_WAIT[gate]
        return Hold(Waiting(reason=reason, message=message, command=head.id))
    if head.cycle >= record.cycle:  # already tried in this cycle
        if head.retry_at is None:
            return Hold(
                Waiting(
                    reason=WaitReason.NEXT_CYCLE,
                    message="tried in this delivery cycle; waits for the device to come back",
                    command=head.id,
                )
            )
        if now < head.retry_at:
            return Hold(
                Waiting(
                    reason=WaitReason.RETRY,
                    message=_retry_message(head),
                    until=head.retry_at,
                    command=head.id,
                )
            )
    if head.precondition is not None:
        if verdict is None:
            return CheckPrecondition(head)
        if not verdict.ok:
            if verdict.retry_at is not None:
                return Hold(
                    Waiting(
                        reason=WaitReason.PRECONDITION,
                        message=f"precondition {head.precondition} not met yet",
                        until=verdict.retry_at,
                        command=head.id,
                    )
                )
            return Fail(
                transition(
                    head,
                    _Q.FAILED,
                    now=now,
                    retry_at=None,
                    last_error=ErrorInfo(
                        ErrorCode.PRECONDITION_FAILED.value,
                        f"precondition {head.precondition} failed: {verdict.reason}",
                    ),
                )
            )
    return Send(
        transition(
            head,
            _Q.SENDING,
            now=now,
            attempts=head.attempts + 1,
            cycle=record.cycle,
            retry_at=None,
        )
    )


def _retry_message(command: Command) -> str:
    last = command.last_error
    because = f" (last: [{last.code}] {last.message})" if last is not None else ""
    return (
        f"attempt {command.attempts} of {command.max_attempts} failed on a live link{because}; "
        "retried with the same idempotency key"
    )


def unparked(record: DeviceRecord) -> DeviceRecord:
    """The record with the breaker reset and delivery resumed."""
    return replace(record, parked_reason=None, parked_until=None, failed_cycles=0)


def begin_cycles(record: DeviceRecord, count: int) -> DeviceRecord:
    """The record after ``count`` new delivery cycles began."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return replace(record, cycle=record.cycle + count)


# ---------------------------------------------------------------------- settling


@dataclass(frozen=True, slots=True)
class Settlement:
    """What an attempt's outcome makes of the command."""

    command: Command
    failure: ErrorInfo | None = None
    """Set for a retryable failure (it counts against the breaker); ``None`` otherwise."""


def retry_delay(retry_after_s: float, jitter: float) -> float:
    """The in-cycle retry delay for a ``jitter`` draw in [0, 1]."""
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter!r}")
    return retry_after_s * (1.0 - RETRY_JITTER * (1.0 - jitter))


def cancelled(command: Command, *, now: float) -> Command:
    """The command cancelled by a user."""
    return transition(
        command,
        _Q.CANCELLED,
        now=now,
        retry_at=None,
        last_error=ErrorInfo(ErrorCode.CANCELLED.value, "cancelled by a user"),
    )


def settle(
    sending: Command,
    outcome: Outcome,
    *,
    now: float,
    live: bool,
    retry_after_s: float,
    jitter: float,
    cancel_requested: bool = False,
) -> Settlement:
    """What ``outcome`` makes of the ``sending`` command.

    ``live``: the link stayed up, in the same cycle, from the send until now; a retryable
    failure then comes back in this cycle after :func:`retry_delay`. Otherwise it waits for
    the next cycle. ``cancel_requested``: a user cancelled it while it was in flight; an
    ack still wins (the device applied it). Raises ValueError if ``sending`` is not sending.
    """
    if sending.state is not _Q.SENDING:
        raise ValueError(f"only a sending command settles, got {sending.state.value}")
    if isinstance(outcome, Acknowledged):
        return Settlement(
            transition(sending, _Q.SUCCEEDED, now=now, result=dict(outcome.result), last_error=None)
        )
    if cancel_requested:
        return Settlement(cancelled(sending, now=now))
    error = ErrorInfo.of(outcome.error)
    if isinstance(outcome, Rejected) and outcome.code not in RETRYABLE_REJECTIONS:
        return Settlement(transition(sending, _Q.REJECTED, now=now, last_error=error))
    if sending.expires_at is not None and now >= sending.expires_at:
        nxt = transition(sending, _Q.EXPIRED, now=now, last_error=expired_info(sending))
        # (a sending command has no retry_at: Send cleared it)
    elif sending.attempts >= sending.max_attempts:
        message = f"gave up after {sending.attempts} attempts; last: {error.message}"
        nxt = transition(sending, _Q.FAILED, now=now, last_error=ErrorInfo(error.code, message))
    elif live:
        nxt = transition(
            sending,
            _Q.QUEUED,
            now=now,
            last_error=error,
            retry_at=now + retry_delay(retry_after_s, jitter),
        )
    else:
        nxt = transition(sending, _Q.QUEUED, now=now, last_error=error, retry_at=None)
    return Settlement(nxt, failure=error)


def breaker(
    record: DeviceRecord,
    settlement: Settlement,
    *,
    attempt_cycle: int,
    now: float,
    breaker_cycles: int,
    park_s: float,
) -> DeviceRecord:
    """The device's record after a settled attempt made in cycle ``attempt_cycle``.

    A success resets the count of failed cycles. A retryable failure counts its cycle once;
    after ``breaker_cycles`` failed cycles in a row delivery is parked for ``park_s``.
    Returns ``record`` itself when nothing changes.
    """
    if settlement.command.state is _Q.SUCCEEDED:
        return replace(record, failed_cycles=0) if record.failed_cycles else record
    error = settlement.failure
    if error is None or record.failed_cycle == attempt_cycle:
        return record
    failed = record.failed_cycles + 1
    new = replace(record, failed_cycles=failed, failed_cycle=attempt_cycle)
    if failed >= breaker_cycles and new.parked_reason is None:
        new = replace(
            new,
            parked_reason=(
                f"delivery parked: {failed} delivery cycles in a row failed "
                f"(last error [{error.code}] {error.message}); retrying after "
                f"{park_s:g}s, or when resumed"
            ),
            parked_until=now + park_s,
        )
    return new


# ---------------------------------------------------------------------- views


def wait_of(
    command: Command,
    *,
    record: DeviceRecord | None,
    gate: Gate,
    in_flight: str | None,
    hold: Waiting | None,
) -> Waiting | None:
    """Why the queued ``command`` is not going out now, or ``None`` (it is about to).

    ``in_flight`` is the device's command being delivered now, ``hold`` the last
    :class:`Hold` of the device's delivery loop (``None`` while it is moving).
    """
    if command.state is not _Q.QUEUED:
        return None
    if record is not None and record.parked_reason is not None:
        return Waiting(
            reason=WaitReason.PARKED, message=record.parked_reason, until=record.parked_until
        )
    if gate is not Gate.OPEN:
        reason, message = _GATE_WAIT[gate]
        return Waiting(reason=reason, message=message)
    ahead = in_flight if in_flight is not None else (hold.command if hold else None)
    if ahead is not None and ahead != command.id:
        return Waiting(
            reason=WaitReason.BEHIND,
            message=f"delivered in order: waits for {ahead}",
            command=ahead,
        )
    if hold is not None and hold.command == command.id:
        return hold
    return None


def expired_info(command: Command) -> ErrorInfo:
    return ErrorInfo(
        ErrorCode.EXPIRED.value,
        f"not delivered before its deadline ({command.attempts} attempt(s) made)",
    )


def superseded_info(by: str) -> ErrorInfo:
    return ErrorInfo(ErrorCode.CANCELLED.value, f"superseded by {by}")
