"""The outbox dispatcher's rules, sans-IO: every branch of ``next_step``, ``settle``,
``breaker`` and ``wait_of``, with exact records and times. No loop, no clock, no store."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from keeplink._core.commands import (
    COMMAND_TRANSITIONS,
    Command,
    CommandState,
    DeviceRecord,
    new_command,
    transition,
)
from keeplink._core.dispatch import (
    RETRYABLE_REJECTIONS,
    CheckPrecondition,
    Expire,
    Fail,
    Gate,
    Hold,
    Idle,
    PreconditionResult,
    Resume,
    Send,
    Settlement,
    Waiting,
    WaitReason,
    begin_cycles,
    breaker,
    cancelled,
    next_step,
    retry_delay,
    settle,
    wait_of,
)
from keeplink._core.errors import DeviceUnavailableError, ErrorInfo, LinkBrokenError
from keeplink._core.outcomes import (
    Acknowledged,
    Cancelled,
    Outcome,
    Rejected,
    TimedOut,
    Unavailable,
)
from keeplink._core.states import IllegalTransitionError

S = CommandState

NOW = 1_000.0
CYCLE = 5
"""The device's current delivery cycle in most tests."""
RETRY_AFTER_S = 10.0
MAX_ATTEMPTS = 3
"""``new_command``'s default."""


def queued(**changes: Any) -> Command:
    """A command submitted at t=0 and never tried (``cycle`` 0), with ``changes``."""
    command = new_command(device="dev-1", op="set", args={"target": 21.5}, now=0.0)
    return replace(command, **changes)


def sending(*, attempts: int = 1, **changes: Any) -> Command:
    """A command in flight in cycle ``CYCLE`` with ``attempts`` made (this one included)."""
    return transition(queued(**changes), S.SENDING, now=NOW - 1, attempts=attempts, cycle=CYCLE)


def device(**changes: Any) -> DeviceRecord:
    """The device's record in cycle ``CYCLE``, with ``changes``."""
    return replace(DeviceRecord(device="dev-1", cycle=CYCLE), **changes)


def step(head: Command | None, **kwargs: Any) -> Any:
    """``next_step`` at ``NOW`` for a device in cycle ``CYCLE`` whose gate is open."""
    kwargs.setdefault("record", device())
    kwargs.setdefault("gate", Gate.OPEN)
    kwargs.setdefault("now", NOW)
    return next_step(head, **kwargs)


def settle_now(command: Command, outcome: Outcome, **kwargs: Any) -> Settlement:
    """``settle`` at ``NOW`` on a live link, retry after ``RETRY_AFTER_S``, jitter 0.5."""
    kwargs.setdefault("now", NOW)
    kwargs.setdefault("live", True)
    kwargs.setdefault("retry_after_s", RETRY_AFTER_S)
    kwargs.setdefault("jitter", 0.5)
    return settle(command, outcome, **kwargs)


# ---------------------------------------------------------------------- outcomes

ACK = Acknowledged(seq=7, result={"target": 21.5, "applied": True})

RETRYABLE = [
    pytest.param(
        Rejected(seq=7, code="out_of_connection_slots", message="hub full"),
        ErrorInfo("out_of_connection_slots", "hub full"),
        id="rejected-out_of_connection_slots",
    ),
    pytest.param(
        Rejected(seq=7, code="device_unavailable", message="asleep"),
        ErrorInfo("device_unavailable", "asleep"),
        id="rejected-device_unavailable",
    ),
    pytest.param(
        Rejected(seq=7, code="timeout", message="bus timeout"),
        ErrorInfo("timeout", "bus timeout"),
        id="rejected-timeout",
    ),
    pytest.param(
        Rejected(seq=7, code="connection_failed", message="downstream gone"),
        ErrorInfo("connection_failed", "downstream gone"),
        id="rejected-connection_failed",
    ),
    pytest.param(
        TimedOut(after_s=5.0, seq=7),
        ErrorInfo("timeout", "no reply within 5s"),
        id="timed-out",
    ),
    pytest.param(
        TimedOut(after_s=5.0, sent=False),
        ErrorInfo("timeout", "no free window to send within 5s"),
        id="timed-out-unsent",
    ),
    pytest.param(
        Unavailable(cause=LinkBrokenError("connection reset by peer")),
        ErrorInfo("connection_failed", "connection reset by peer"),
        id="unavailable-broken",
    ),
    pytest.param(
        Unavailable(cause=DeviceUnavailableError("not connected")),
        ErrorInfo("device_unavailable", "not connected"),
        id="unavailable-down",
    ),
    pytest.param(
        Cancelled(reason="link stopped"),
        ErrorInfo("cancelled", "link stopped"),
        id="cancelled",
    ),
]
"""Outcomes that say "not now", each with the error it records."""

FINAL_REJECTIONS = [
    pytest.param(
        Rejected(seq=7, code="rejected", message="target out of range"),
        ErrorInfo("rejected", "target out of range"),
        id="rejected",
    ),
    pytest.param(
        Rejected(seq=7, code="invalid_request", message="no such field"),
        ErrorInfo("invalid_request", "no such field"),
        id="invalid_request",
    ),
    pytest.param(
        Rejected(seq=7, code="auth_failed", message="locked"),
        ErrorInfo("auth_failed", "locked"),
        id="auth_failed",
    ),
    pytest.param(
        Rejected(seq=7, code="x_vendor_busy", message="firmware says no"),
        ErrorInfo("x_vendor_busy", "firmware says no"),
        id="unknown-code-kept-verbatim",
    ),
]
"""Rejections that say "no": never retried."""

NON_ACKS = [p.values[0] for p in (*RETRYABLE, *FINAL_REJECTIONS)]

LIVE_X_ATTEMPTS = [
    pytest.param(True, MAX_ATTEMPTS - 1, id="live-attempts-left"),
    pytest.param(False, MAX_ATTEMPTS - 1, id="not-live-attempts-left"),
    pytest.param(True, MAX_ATTEMPTS, id="live-last-attempt"),
    pytest.param(False, MAX_ATTEMPTS, id="not-live-last-attempt"),
]


def test_the_retryable_rejections_are_the_not_now_codes() -> None:
    assert sorted(RETRYABLE_REJECTIONS) == [
        "connection_failed",
        "device_unavailable",
        "out_of_connection_slots",
        "timeout",
    ]


# ---------------------------------------------------------------------- next_step: parking


@pytest.mark.parametrize("head", [None, queued()], ids=["empty-queue", "with-head"])
def test_parked_until_a_future_time_holds(head: Command | None) -> None:
    record = device(parked_reason="delivery parked: 3 cycles failed", parked_until=NOW + 0.5)
    assert step(head, record=record) == Hold(
        Waiting(reason=WaitReason.PARKED, message="delivery parked: 3 cycles failed", until=1000.5)
    )


def test_parked_without_an_end_holds_until_resume() -> None:
    record = device(parked_reason="parked by hand", parked_until=None)
    assert step(queued(), record=record) == Hold(
        Waiting(reason=WaitReason.PARKED, message="parked by hand", until=None)
    )


@pytest.mark.parametrize("until", [NOW, NOW - 60], ids=["exactly-over", "long-over"])
@pytest.mark.parametrize("head", [None, queued()], ids=["empty-queue", "with-head"])
def test_parking_over_resumes_with_the_breaker_reset(head: Command | None, until: float) -> None:
    record = device(failed_cycles=3, failed_cycle=4, parked_reason="parked", parked_until=until)
    assert step(head, record=record, gate=Gate.OFFLINE) == Resume(
        DeviceRecord(device="dev-1", cycle=CYCLE, failed_cycles=0, failed_cycle=4)
    )


# ---------------------------------------------------------------------- next_step: the head


@pytest.mark.parametrize("gate", list(Gate))
def test_an_empty_queue_is_idle(gate: Gate) -> None:
    assert step(None, gate=gate) == Idle()


@pytest.mark.parametrize("state", [s for s in CommandState if s is not S.QUEUED])
def test_a_head_that_is_not_queued_is_a_caller_bug(state: CommandState) -> None:
    head = queued(state=state)
    with pytest.raises(ValueError, match=f"must be queued, got {state.value} \\({head.id}\\)"):
        step(head)


@pytest.mark.parametrize("gate", list(Gate))
@pytest.mark.parametrize("expires_at", [NOW, NOW - 1], ids=["at-deadline", "past-deadline"])
def test_an_expired_head_expires_whatever_the_gate(gate: Gate, expires_at: float) -> None:
    head = queued(expires_at=expires_at, attempts=2, cycle=CYCLE - 1)
    assert step(head, gate=gate) == Expire(
        replace(
            head,
            state=S.EXPIRED,
            updated_at=NOW,
            last_error=ErrorInfo(
                "expired", "not delivered before its deadline (2 attempt(s) made)"
            ),
        )
    )


def test_an_expired_head_expires_while_the_device_is_parked() -> None:
    """A deadline is kept whatever holds delivery, the breaker included."""
    head = queued(expires_at=NOW, retry_at=NOW + 5, cycle=CYCLE)
    parked = device(parked_reason="parked", parked_until=NOW + 3600)
    assert step(head, record=parked) == Expire(
        replace(
            head,
            state=S.EXPIRED,
            updated_at=NOW,
            retry_at=None,  # a finished command keeps no retry time
            last_error=ErrorInfo(
                "expired", "not delivered before its deadline (0 attempt(s) made)"
            ),
        )
    )


def test_a_head_just_before_its_deadline_is_sent() -> None:
    head = queued(expires_at=NOW + 0.001)
    result = step(head)
    assert isinstance(result, Send)
    assert result.sending.state is S.SENDING


@pytest.mark.parametrize(
    ("gate", "reason", "message"),
    [
        (Gate.NO_LINK, WaitReason.NO_LINK, "no link is attached for the device"),
        (Gate.LINK_DOWN, WaitReason.LINK_DOWN, "the device's link is not connected"),
        (Gate.OFFLINE, WaitReason.DEVICE_OFFLINE, "the device is away"),
    ],
)
def test_a_closed_gate_holds_the_head(gate: Gate, reason: WaitReason, message: str) -> None:
    head = queued(expires_at=NOW + 1, precondition="door_closed")
    assert step(head, gate=gate) == Hold(Waiting(reason=reason, message=message, command=head.id))


def test_tried_this_cycle_waits_for_the_next_one() -> None:
    head = queued(attempts=1, cycle=CYCLE, retry_at=None)
    assert step(head) == Hold(
        Waiting(
            reason=WaitReason.NEXT_CYCLE,
            message="tried in this delivery cycle; waits for the device to come back",
            command=head.id,
        )
    )


def test_a_never_tried_command_waits_for_the_first_cycle() -> None:
    # A device that was never deliverable is in cycle 0, where a new command already is.
    head = queued()
    result = step(head, record=DeviceRecord(device="dev-1"))
    assert isinstance(result, Hold)
    assert result.waiting.reason is WaitReason.NEXT_CYCLE


def test_a_pending_in_cycle_retry_holds_until_retry_at() -> None:
    last = ErrorInfo("timeout", "no reply within 5s")
    head = queued(attempts=1, cycle=CYCLE, retry_at=NOW + 7.5, last_error=last)
    assert step(head) == Hold(
        Waiting(
            reason=WaitReason.RETRY,
            message=(
                "attempt 1 of 3 failed on a live link (last: [timeout] no reply within 5s); "
                "retried with the same idempotency key"
            ),
            until=1007.5,
            command=head.id,
        )
    )


def test_the_retry_message_without_a_last_error() -> None:
    head = queued(attempts=2, cycle=CYCLE, retry_at=NOW + 1)
    result = step(head)
    assert isinstance(result, Hold)
    assert result.waiting.message == (
        "attempt 2 of 3 failed on a live link; retried with the same idempotency key"
    )


def test_a_pending_retry_holds_before_its_precondition_is_checked() -> None:
    head = queued(attempts=1, cycle=CYCLE, retry_at=NOW + 1, precondition="door_closed")
    result = step(head)
    assert isinstance(result, Hold)
    assert result.waiting.reason is WaitReason.RETRY


@pytest.mark.parametrize("retry_at", [NOW, NOW - 5], ids=["exactly-due", "overdue"])
def test_a_due_retry_is_sent_in_the_same_cycle(retry_at: float) -> None:
    head = queued(attempts=1, cycle=CYCLE, retry_at=retry_at)
    assert step(head) == Send(
        replace(head, state=S.SENDING, attempts=2, cycle=CYCLE, retry_at=None, updated_at=NOW)
    )


def test_a_new_cycle_sends_even_before_retry_at() -> None:
    head = queued(attempts=1, cycle=CYCLE - 1, retry_at=NOW + 60)
    assert step(head) == Send(
        replace(head, state=S.SENDING, attempts=2, cycle=CYCLE, retry_at=None, updated_at=NOW)
    )


def test_send_counts_the_attempt_and_stamps_the_cycle() -> None:
    head = queued(attempts=0, cycle=0, key="setpoint", priority=2, seq=41)
    result = step(head, record=device(cycle=12))
    assert isinstance(result, Send)
    sent = result.sending
    assert (sent.state, sent.attempts, sent.cycle, sent.retry_at, sent.updated_at) == (
        S.SENDING,
        1,
        12,
        None,
        NOW,
    )
    # Everything else, the idempotency key above all, travels unchanged.
    assert sent == replace(
        head, state=S.SENDING, attempts=1, cycle=12, retry_at=None, updated_at=NOW
    )
    assert sent.idempotency_key == head.idempotency_key


def test_a_verdict_is_ignored_without_a_precondition() -> None:
    head = queued()
    result = step(head, verdict=PreconditionResult.failed("irrelevant"))
    assert isinstance(result, Send)


# ---------------------------------------------------------------------- next_step: preconditions


def test_a_precondition_is_checked_first() -> None:
    head = queued(precondition="door_closed", precondition_args={"door": "front"})
    assert step(head) == CheckPrecondition(head)


def test_a_passed_precondition_sends() -> None:
    head = queued(precondition="door_closed")
    assert step(head, verdict=PreconditionResult.passed()) == Send(
        replace(head, state=S.SENDING, attempts=1, cycle=CYCLE, retry_at=None, updated_at=NOW)
    )


def test_a_precondition_not_met_yet_holds_until_its_retry_time() -> None:
    head = queued(precondition="door_closed")
    assert step(head, verdict=PreconditionResult.wait_until(NOW + 30)) == Hold(
        Waiting(
            reason=WaitReason.PRECONDITION,
            message="precondition door_closed not met yet",
            until=1030.0,
            command=head.id,
        )
    )


def test_a_failed_precondition_fails_the_command() -> None:
    head = queued(precondition="door_closed")
    assert step(head, verdict=PreconditionResult.failed("the door is open")) == Fail(
        replace(
            head,
            state=S.FAILED,
            updated_at=NOW,
            last_error=ErrorInfo(
                "precondition_failed", "precondition door_closed failed: the door is open"
            ),
        )
    )


# ---------------------------------------------------------------------- retry_delay


@pytest.mark.parametrize(
    ("jitter", "delay"), [(0.0, 5.0), (0.25, 6.25), (0.5, 7.5), (0.75, 8.75), (1.0, 10.0)]
)
def test_retry_delay_spans_half_to_all_of_retry_after(jitter: float, delay: float) -> None:
    assert retry_delay(10.0, jitter) == delay


@pytest.mark.parametrize("jitter", [-0.01, 1.01, float("nan"), float("inf")])
def test_retry_delay_refuses_a_draw_outside_the_unit_interval(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter must be in"):
        retry_delay(10.0, jitter)


# ---------------------------------------------------------------------- settle


@pytest.mark.parametrize(("live", "attempts"), LIVE_X_ATTEMPTS)
@pytest.mark.parametrize("cancel_requested", [False, True], ids=["", "cancel-requested"])
def test_an_ack_succeeds_with_its_result(live: bool, attempts: int, cancel_requested: bool) -> None:
    command = sending(attempts=attempts, last_error=ErrorInfo("timeout", "earlier"))
    settled = settle_now(command, ACK, live=live, cancel_requested=cancel_requested)
    assert settled == Settlement(
        replace(
            command,
            state=S.SUCCEEDED,
            updated_at=NOW,
            result={"target": 21.5, "applied": True},
            last_error=None,
        ),
        failure=None,
    )


def test_an_ack_wins_over_a_passed_deadline() -> None:
    command = sending(expires_at=NOW - 1)
    assert settle_now(command, ACK).command.state is S.SUCCEEDED


@pytest.mark.parametrize(("live", "attempts"), LIVE_X_ATTEMPTS)
@pytest.mark.parametrize("outcome", NON_ACKS)
def test_a_cancel_requested_in_flight_cancels_unless_acked(
    outcome: Outcome, live: bool, attempts: int
) -> None:
    command = sending(attempts=attempts)
    settled = settle_now(command, outcome, live=live, cancel_requested=True)
    assert settled == Settlement(
        replace(
            command,
            state=S.CANCELLED,
            updated_at=NOW,
            retry_at=None,
            last_error=ErrorInfo("cancelled", "cancelled by a user"),
        ),
        failure=None,
    )


@pytest.mark.parametrize(("live", "attempts"), LIVE_X_ATTEMPTS)
@pytest.mark.parametrize(("outcome", "error"), FINAL_REJECTIONS)
def test_a_final_rejection_is_rejected_and_spares_the_breaker(
    outcome: Outcome, error: ErrorInfo, live: bool, attempts: int
) -> None:
    command = sending(attempts=attempts)
    settled = settle_now(command, outcome, live=live)
    assert settled == Settlement(
        replace(command, state=S.REJECTED, updated_at=NOW, last_error=error), failure=None
    )


def test_a_final_rejection_wins_over_a_passed_deadline() -> None:
    outcome = Rejected(seq=7, code="rejected", message="no")
    assert settle_now(sending(expires_at=NOW - 1), outcome).command.state is S.REJECTED


@pytest.mark.parametrize(
    ("live", "attempts", "state", "retry_at"),
    [
        pytest.param(True, MAX_ATTEMPTS - 1, S.QUEUED, 1007.5, id="live-attempts-left"),
        pytest.param(False, MAX_ATTEMPTS - 1, S.QUEUED, None, id="not-live-attempts-left"),
        pytest.param(True, MAX_ATTEMPTS, S.FAILED, None, id="live-last-attempt"),
        pytest.param(False, MAX_ATTEMPTS, S.FAILED, None, id="not-live-last-attempt"),
    ],
)
@pytest.mark.parametrize(("outcome", "error"), RETRYABLE)
def test_a_retryable_failure_comes_back_or_gives_up(
    outcome: Outcome,
    error: ErrorInfo,
    live: bool,
    attempts: int,
    state: CommandState,
    retry_at: float | None,
) -> None:
    command = sending(attempts=attempts)
    settled = settle_now(command, outcome, live=live)
    if state is S.FAILED:
        last = ErrorInfo(error.code, f"gave up after {attempts} attempts; last: {error.message}")
    else:
        last = error
    assert settled == Settlement(
        replace(command, state=state, updated_at=NOW, retry_at=retry_at, last_error=last),
        failure=error,
    )


@pytest.mark.parametrize(("live", "attempts"), LIVE_X_ATTEMPTS)
@pytest.mark.parametrize(("outcome", "error"), RETRYABLE)
@pytest.mark.parametrize("expires_at", [NOW, NOW - 1], ids=["at-deadline", "past-deadline"])
def test_a_retryable_failure_past_the_deadline_expires(
    outcome: Outcome, error: ErrorInfo, live: bool, attempts: int, expires_at: float
) -> None:
    command = sending(attempts=attempts, expires_at=expires_at)
    settled = settle_now(command, outcome, live=live)
    assert settled == Settlement(
        replace(
            command,
            state=S.EXPIRED,
            updated_at=NOW,
            last_error=ErrorInfo(
                "expired", f"not delivered before its deadline ({attempts} attempt(s) made)"
            ),
        ),
        failure=error,
    )


def test_a_retryable_failure_just_before_the_deadline_is_retried() -> None:
    command = sending(expires_at=NOW + 0.001)
    settled = settle_now(command, TimedOut(after_s=5.0))
    assert (settled.command.state, settled.command.retry_at) == (S.QUEUED, 1007.5)


@pytest.mark.parametrize(
    ("max_attempts", "attempts", "state"),
    [
        (1, 1, S.FAILED),
        (5, 4, S.QUEUED),
        (5, 5, S.FAILED),
        (5, 6, S.FAILED),  # more than allowed (e.g. a lowered limit): still gives up
    ],
)
def test_the_attempt_limit_boundary(max_attempts: int, attempts: int, state: CommandState) -> None:
    command = sending(attempts=attempts, max_attempts=max_attempts)
    settled = settle_now(command, TimedOut(after_s=5.0))
    assert settled.command.state is state
    if state is S.FAILED:
        assert settled.command.last_error == ErrorInfo(
            "timeout", f"gave up after {attempts} attempts; last: no reply within 5s"
        )


@pytest.mark.parametrize(("jitter", "retry_at"), [(0.0, 1005.0), (0.5, 1007.5), (1.0, 1010.0)])
def test_a_live_retry_is_jittered(jitter: float, retry_at: float) -> None:
    settled = settle_now(sending(), TimedOut(after_s=5.0), jitter=jitter)
    assert settled.command.retry_at == retry_at


def test_a_live_retry_rejects_a_bad_jitter() -> None:
    with pytest.raises(ValueError, match="jitter"):
        settle_now(sending(), TimedOut(after_s=5.0), jitter=2.0)


@pytest.mark.parametrize("state", [s for s in CommandState if s is not S.SENDING])
def test_only_a_sending_command_settles(state: CommandState) -> None:
    with pytest.raises(ValueError, match=f"only a sending command settles, got {state.value}"):
        settle_now(replace(sending(), state=state), ACK)


# One outcome of each type; with the variants below, they reach every exit from SENDING.
OUTCOME_TYPES = [
    pytest.param(ACK, id="Acknowledged"),
    pytest.param(Rejected(seq=7, code="rejected", message="no"), id="Rejected-final"),
    pytest.param(Rejected(seq=7, code="timeout", message="busy"), id="Rejected-retryable"),
    pytest.param(TimedOut(after_s=5.0), id="TimedOut"),
    pytest.param(Cancelled(reason="link stopped"), id="Cancelled"),
    pytest.param(Unavailable(cause=LinkBrokenError("reset")), id="Unavailable"),
]

VARIANTS = list(
    itertools.product(
        [True, False],  # live
        [MAX_ATTEMPTS - 1, MAX_ATTEMPTS],  # attempts made
        [False, True],  # cancel requested
        [None, NOW + 60, NOW],  # expires_at: none, ahead, reached
    )
)


@pytest.mark.parametrize("outcome", OUTCOME_TYPES)
@pytest.mark.parametrize("state", list(CommandState))
def test_every_state_and_outcome_settles_legally_or_not_at_all(
    state: CommandState, outcome: Outcome
) -> None:
    for live, attempts, cancel_requested, expires_at in VARIANTS:
        command = replace(sending(attempts=attempts, expires_at=expires_at), state=state)
        if state is not S.SENDING:
            with pytest.raises(ValueError, match="only a sending command settles"):
                settle_now(command, outcome, live=live, cancel_requested=cancel_requested)
            continue
        settled = settle_now(command, outcome, live=live, cancel_requested=cancel_requested)
        done = settled.command
        assert done.state in COMMAND_TRANSITIONS[S.SENDING]
        assert (done.id, done.attempts, done.cycle, done.updated_at) == (
            command.id,
            attempts,
            CYCLE,
            NOW,
        )
        # Only a queued command may carry a retry time; only a retryable failure counts.
        assert done.retry_at is None or done.state is S.QUEUED
        assert settled.failure is None or done.state in {S.QUEUED, S.FAILED, S.EXPIRED}


def test_settling_reaches_every_exit_from_sending_and_no_other() -> None:
    reached = {
        settle_now(
            sending(attempts=attempts, expires_at=expires_at),
            outcome.values[0],
            live=live,
            cancel_requested=cancel_requested,
        ).command.state
        for outcome in OUTCOME_TYPES
        for live, attempts, cancel_requested, expires_at in VARIANTS
    }
    assert reached == COMMAND_TRANSITIONS[S.SENDING]


# ---------------------------------------------------------------------- cancelled, begin_cycles


@pytest.mark.parametrize("state", [S.QUEUED, S.SENDING])
def test_cancelled_by_a_user(state: CommandState) -> None:
    command = replace(queued(retry_at=NOW + 5), state=state)
    assert cancelled(command, now=NOW) == replace(
        command,
        state=S.CANCELLED,
        updated_at=NOW,
        retry_at=None,
        last_error=ErrorInfo("cancelled", "cancelled by a user"),
    )


def test_a_finished_command_cannot_be_cancelled() -> None:
    done = replace(queued(), state=S.SUCCEEDED)
    with pytest.raises(IllegalTransitionError, match="succeeded -> cancelled"):
        cancelled(done, now=NOW)


@pytest.mark.parametrize(("count", "cycle"), [(0, CYCLE), (1, CYCLE + 1), (3, CYCLE + 3)])
def test_begin_cycles_advances_the_cycle(count: int, cycle: int) -> None:
    record = device(failed_cycles=1, failed_cycle=CYCLE)
    assert begin_cycles(record, count) == replace(record, cycle=cycle)


def test_begin_cycles_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="count must be >= 0, got -1"):
        begin_cycles(device(), -1)


# ---------------------------------------------------------------------- breaker


def run_breaker(
    record: DeviceRecord, settlement: Settlement, *, attempt_cycle: int = CYCLE
) -> DeviceRecord:
    return breaker(
        record, settlement, attempt_cycle=attempt_cycle, now=NOW, breaker_cycles=3, park_s=300.0
    )


SUCCESS = Settlement(transition(sending(), S.SUCCEEDED, now=NOW, result={}))
TIMEOUT = ErrorInfo("timeout", "no reply within 5s")
FAILURE = Settlement(transition(sending(), S.QUEUED, now=NOW, last_error=TIMEOUT), TIMEOUT)


def test_a_success_resets_the_failed_cycles() -> None:
    record = device(failed_cycles=2, failed_cycle=CYCLE)
    assert run_breaker(record, SUCCESS) == replace(record, failed_cycles=0)


def test_a_success_with_nothing_to_reset_returns_the_same_record() -> None:
    record = device(failed_cycle=CYCLE - 2)
    assert run_breaker(record, SUCCESS) is record


def test_a_retryable_failure_counts_its_cycle() -> None:
    record = device(failed_cycles=0, failed_cycle=0)
    assert run_breaker(record, FAILURE) == replace(record, failed_cycles=1, failed_cycle=CYCLE)


def test_a_cycle_counts_once_however_many_of_its_attempts_fail() -> None:
    once = run_breaker(device(), FAILURE)
    assert run_breaker(once, FAILURE) is once
    assert run_breaker(once, FAILURE, attempt_cycle=CYCLE + 1) == replace(
        once, failed_cycles=2, failed_cycle=CYCLE + 1
    )


def test_a_given_up_or_expired_attempt_still_counts() -> None:
    for outcome_state in (S.FAILED, S.EXPIRED):
        settlement = Settlement(transition(sending(), outcome_state, now=NOW), TIMEOUT)
        assert run_breaker(device(), settlement).failed_cycles == 1


@pytest.mark.parametrize(
    "settled",
    [
        settle_now(sending(), Rejected(seq=7, code="rejected", message="no")),
        settle_now(sending(), TimedOut(after_s=5.0), cancel_requested=True),
    ],
    ids=["final-rejection", "cancelled-in-flight"],
)
def test_a_settlement_without_a_failure_changes_nothing(settled: Settlement) -> None:
    assert settled.failure is None
    record = device(failed_cycles=2, failed_cycle=CYCLE - 1)
    assert run_breaker(record, settled) is record


def test_the_last_failed_cycle_in_a_row_parks_delivery() -> None:
    record = device(failed_cycles=2, failed_cycle=CYCLE - 1)
    parked = run_breaker(record, FAILURE)
    assert parked == replace(
        record,
        failed_cycles=3,
        failed_cycle=CYCLE,
        parked_reason=(
            "delivery parked: 3 delivery cycles in a row failed "
            "(last error [timeout] no reply within 5s); retrying after 300s, or when resumed"
        ),
        parked_until=1300.0,
    )


def test_a_breaker_of_one_parks_at_the_first_failed_cycle() -> None:
    parked = breaker(device(), FAILURE, attempt_cycle=CYCLE, now=NOW, breaker_cycles=1, park_s=2.5)
    assert parked.parked_reason == (
        "delivery parked: 1 delivery cycles in a row failed "
        "(last error [timeout] no reply within 5s); retrying after 2.5s, or when resumed"
    )
    assert parked.parked_until == 1002.5


def test_an_already_parked_device_keeps_its_reason_and_time() -> None:
    record = device(
        failed_cycles=3, failed_cycle=CYCLE - 1, parked_reason="parked", parked_until=1100.0
    )
    assert run_breaker(record, FAILURE) == replace(record, failed_cycles=4, failed_cycle=CYCLE)


# ---------------------------------------------------------------------- wait_of


def view(command: Command, **kwargs: Any) -> Waiting | None:
    kwargs.setdefault("record", device())
    kwargs.setdefault("gate", Gate.OPEN)
    kwargs.setdefault("in_flight", None)
    kwargs.setdefault("hold", None)
    return wait_of(command, **kwargs)


@pytest.mark.parametrize("state", [s for s in CommandState if s is not S.QUEUED])
def test_only_a_queued_command_waits(state: CommandState) -> None:
    record = device(parked_reason="parked", parked_until=NOW + 5)
    assert view(replace(queued(), state=state), record=record, gate=Gate.OFFLINE) is None


def test_a_parked_device_shows_parked_before_anything_else() -> None:
    command = queued()
    record = device(parked_reason="delivery parked: 3 cycles", parked_until=1300.0)
    assert view(command, record=record, gate=Gate.LINK_DOWN, in_flight="other-id") == Waiting(
        reason=WaitReason.PARKED, message="delivery parked: 3 cycles", until=1300.0
    )


@pytest.mark.parametrize(
    ("gate", "reason", "message"),
    [
        (Gate.NO_LINK, WaitReason.NO_LINK, "no link is attached for the device"),
        (Gate.LINK_DOWN, WaitReason.LINK_DOWN, "the device's link is not connected"),
        (Gate.OFFLINE, WaitReason.DEVICE_OFFLINE, "the device is away"),
    ],
)
@pytest.mark.parametrize("record", [device(), None], ids=["known-device", "no-record"])
def test_a_closed_gate_shows_its_reason(
    gate: Gate, reason: WaitReason, message: str, record: DeviceRecord | None
) -> None:
    assert view(queued(), record=record, gate=gate, in_flight="other-id") == Waiting(
        reason=reason, message=message
    )


def test_a_command_behind_the_one_in_flight() -> None:
    ahead, command = queued(), queued()
    assert view(command, in_flight=ahead.id) == Waiting(
        reason=WaitReason.BEHIND,
        message=f"delivered in order: waits for {ahead.id}",
        command=ahead.id,
    )


def test_the_one_in_flight_comes_before_a_stale_hold() -> None:
    ahead, held, command = queued(), queued(), queued()
    hold = Waiting(reason=WaitReason.NEXT_CYCLE, message="later", command=held.id)
    result = view(command, in_flight=ahead.id, hold=hold)
    assert result is not None
    assert (result.reason, result.command) == (WaitReason.BEHIND, ahead.id)


def test_a_command_behind_a_holding_head() -> None:
    head, command = queued(), queued()
    hold = Waiting(reason=WaitReason.RETRY, message="retry", until=1007.5, command=head.id)
    assert view(command, hold=hold) == Waiting(
        reason=WaitReason.BEHIND,
        message=f"delivered in order: waits for {head.id}",
        command=head.id,
    )


def test_the_holding_head_shows_its_hold() -> None:
    head = queued()
    hold = Waiting(reason=WaitReason.PRECONDITION, message="not yet", until=1030.0, command=head.id)
    assert view(head, hold=hold) is hold


@pytest.mark.parametrize("record", [device(), None], ids=["known-device", "no-record"])
def test_nothing_in_the_way_is_no_wait(record: DeviceRecord | None) -> None:
    command = queued()
    assert view(command, record=record) is None
    assert view(command, record=record, in_flight=command.id) is None
    assert view(command, record=record, hold=Waiting(reason=WaitReason.PARKED, message="x")) is None


# ---------------------------------------------------------------------- a whole life


def test_a_flapping_device_gets_one_attempt_per_appearance_and_lost_acks_retry_live() -> None:
    record = DeviceRecord(device="dev-1")
    command = queued()
    lost = TimedOut(after_s=5.0)

    # It appears (cycle 1): sent, the link drops before the reply.
    record = begin_cycles(record, 1)
    sent = step(command, record=record, now=10.0)
    assert isinstance(sent, Send)
    assert (sent.sending.attempts, sent.sending.cycle) == (1, 1)
    settled = settle_now(sent.sending, lost, now=15.0, live=False)
    record = breaker(record, settled, attempt_cycle=1, now=15.0, breaker_cycles=3, park_s=300.0)
    assert (settled.command.state, settled.command.retry_at, record.failed_cycles) == (
        S.QUEUED,
        None,
        1,
    )
    assert step(settled.command, record=record, now=16.0) == Hold(
        Waiting(
            reason=WaitReason.NEXT_CYCLE,
            message="tried in this delivery cycle; waits for the device to come back",
            command=command.id,
        )
    )

    # It comes back (cycle 2): sent again, the ack is lost on a link that stays up.
    record = begin_cycles(record, 1)
    sent = step(settled.command, record=record, now=20.0)
    assert isinstance(sent, Send)
    assert (sent.sending.attempts, sent.sending.cycle) == (2, 2)
    settled = settle_now(sent.sending, lost, now=25.0, live=True, jitter=1.0)
    record = breaker(record, settled, attempt_cycle=2, now=25.0, breaker_cycles=3, park_s=300.0)
    assert (settled.command.retry_at, record.failed_cycles) == (35.0, 2)
    held = step(settled.command, record=record, now=30.0)
    assert isinstance(held, Hold)
    assert (held.waiting.reason, held.waiting.until) == (WaitReason.RETRY, 35.0)

    # Retried in the same cycle at retry_at: the last attempt, lost too. The cycle counts once.
    sent = step(settled.command, record=record, now=35.0)
    assert isinstance(sent, Send)
    assert (sent.sending.attempts, sent.sending.cycle) == (3, 2)
    settled = settle_now(sent.sending, lost, now=40.0, live=True)
    assert settled.command.state is S.FAILED
    assert settled.command.last_error == ErrorInfo(
        "timeout", "gave up after 3 attempts; last: no reply within 5s"
    )
    assert (
        breaker(record, settled, attempt_cycle=2, now=40.0, breaker_cycles=3, park_s=300.0)
        is record
    )
