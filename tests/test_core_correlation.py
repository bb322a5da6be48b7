"""The request correlator, sans-IO: allocation order, exhaustion, the modulo echo, expiry,
drain, and "every request leaves exactly once" checked against a plain model."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from keeplink import ErrorCode, KeeplinkError
from keeplink._core.correlation import (
    Correlator,
    CorrelatorStatistics,
    Pending,
    SequenceExhaustedError,
)


def _fill(correlator: Correlator[str], count: int) -> list[int]:
    return [correlator.allocate_nowait(f"t{n}", deadline=None) for n in range(count)]


# --- allocation order and exhaustion -------------------------------------------------------


def test_8_bit_space_allocates_0_to_255_then_is_exhausted() -> None:
    correlator: Correlator[str] = Correlator(bits=8, name="thermo-1")
    assert correlator.modulus == 256
    assert correlator.max_in_flight == 256
    assert _fill(correlator, 256) == list(range(256))
    assert correlator.full
    assert len(correlator) == correlator.in_flight == 256

    with pytest.raises(SequenceExhaustedError) as info:
        correlator.allocate_nowait("t256", deadline=None)
    assert isinstance(info.value, KeeplinkError)
    assert info.value.code is ErrorCode.DEVICE_UNAVAILABLE
    assert info.value.wire_code == "device_unavailable"
    assert info.value.message == (
        "all 256 sequence numbers of the 8-bit space are in flight on link 'thermo-1'"
    )
    # The failed call changed nothing.
    assert len(correlator) == 256
    assert correlator.statistics().allocated_total == 256


def test_in_flight_limit_below_the_space_has_its_own_message() -> None:
    correlator: Correlator[str] = Correlator(bits=16, max_in_flight=3, name="plug")
    assert _fill(correlator, 3) == [0, 1, 2]
    assert correlator.full
    with pytest.raises(SequenceExhaustedError, match=r"in-flight limit 3 reached on link 'plug'"):
        correlator.allocate_nowait("t3", deadline=1.0)
    assert correlator.next_deadline() is None  # the refused request left no trace
    assert correlator.resolve(1) is not None
    assert not correlator.full
    assert correlator.allocate_nowait("t4", deadline=None) == 3  # the cycle goes on, not back


def test_a_freed_number_comes_back_only_when_it_is_the_only_free_one() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    _fill(correlator, 20)
    assert correlator.resolve(17) == Pending(17, None, "t17")
    assert correlator.allocate_nowait("next", deadline=None) == 20  # not 17: too soon

    full: Correlator[str] = Correlator(bits=8)
    _fill(full, 256)
    assert full.resolve(17) == Pending(17, None, "t17")
    assert full.allocate_nowait("again", deadline=None) == 17  # the only free one
    assert full.full


def test_wraps_from_255_to_0() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    for expected in range(256):
        seq = correlator.allocate_nowait("t", deadline=None)
        assert seq == expected
        assert correlator.resolve(seq) is not None
    assert correlator.allocate_nowait("wrapped", deadline=None) == 0


def test_wrap_around_skips_numbers_still_in_flight() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    assert _fill(correlator, 2) == [0, 1]  # these stay in flight
    for expected in range(2, 256):
        seq = correlator.allocate_nowait("t", deadline=None)
        assert seq == expected
        correlator.resolve(seq)
    assert correlator.allocate_nowait("after wrap", deadline=None) == 2
    # Free 0 now: the cursor is at 2, so 0 waits for the next lap.
    correlator.resolve(0)
    assert correlator.allocate_nowait("x", deadline=None) == 3


def test_default_width_is_32_bits() -> None:
    correlator: Correlator[None] = Correlator()
    assert correlator.bits == 32
    assert correlator.modulus == 2**32
    assert correlator.max_in_flight == 2**32
    assert correlator.name == "link"
    assert correlator.allocate_nowait(None, deadline=None) == 0
    assert correlator.resolve(2**32) is not None  # 2**32 echoes 0


# --- resolve, cancel, the modulo echo ------------------------------------------------------


def test_unknown_reply_returns_none_and_is_counted() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    _fill(correlator, 3)
    assert correlator.resolve(200) is None
    assert correlator.resolve(1) == Pending(1, None, "t1")
    assert correlator.resolve(1) is None  # a duplicate reply
    stats = correlator.statistics()
    assert stats.unknown_replies == 2
    assert stats.resolved_total == 1
    assert len(correlator) == 2


def test_reply_seq_is_taken_modulo_the_width() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    _fill(correlator, 10)
    assert 7 + 256 in correlator
    assert correlator.resolve(7 + 256) == Pending(7, None, "t7")
    assert 7 not in correlator
    assert correlator.cancel(3 + 2 * 256) == Pending(3, None, "t3")
    assert correlator.resolve(7) is None


def test_contains_accepts_any_object() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    _fill(correlator, 1)
    assert 0 in correlator
    assert 1 not in correlator
    assert "0" not in correlator
    assert None not in correlator


def test_cancel_removes_once_and_is_not_an_unknown_reply() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    _fill(correlator, 2)
    assert correlator.cancel(0) == Pending(0, None, "t0")
    assert correlator.cancel(0) is None
    assert correlator.resolve(0) is None  # the late reply to the cancelled request
    stats = correlator.statistics()
    assert (stats.cancelled_total, stats.resolved_total, stats.unknown_replies) == (1, 0, 1)


# --- expiry and deadlines ------------------------------------------------------------------


def test_expire_returns_exactly_the_due_entries_earliest_first() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    deadlines = {"a": 5.0, "b": 2.0, "c": None, "d": 2.0, "e": 9.0, "f": 4.999}
    seqs = {token: correlator.allocate_nowait(token, deadline=d) for token, d in deadlines.items()}
    assert correlator.next_deadline() == 2.0

    assert correlator.expire(1.999) == []
    due = correlator.expire(5.0)  # inclusive: a deadline equal to now is due
    # Equal deadlines leave in allocation order.
    assert [p.token for p in due] == ["b", "d", "f", "a"]
    assert due[0] == Pending(seqs["b"], 2.0, "b")
    assert [p.seq for p in due] == [seqs[t] for t in ("b", "d", "f", "a")]
    assert len(correlator) == 2
    assert seqs["c"] in correlator and seqs["e"] in correlator
    assert correlator.next_deadline() == 9.0

    assert [p.token for p in correlator.expire(math.inf)] == ["e"]
    assert correlator.next_deadline() is None  # only the one without a deadline is left
    assert correlator.expire(1e300) == []
    assert seqs["c"] in correlator
    assert correlator.statistics().expired_total == 5


def test_resolved_entries_never_expire_and_leave_next_deadline() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    first = correlator.allocate_nowait("first", deadline=1.0)
    correlator.allocate_nowait("second", deadline=3.0)
    assert correlator.next_deadline() == 1.0
    assert correlator.resolve(first) is not None
    assert correlator.next_deadline() == 3.0
    assert [p.token for p in correlator.expire(10.0)] == ["second"]
    assert correlator.expire(10.0) == []


def test_a_reused_number_is_not_expired_by_its_predecessors_deadline() -> None:
    correlator: Correlator[str] = Correlator(bits=8, max_in_flight=256)
    _fill(correlator, 255)
    old = correlator.allocate_nowait("old", deadline=1.0)
    assert old == 255
    assert correlator.cancel(old) is not None
    # 255 is the only free number, so the new request gets it, with a later deadline.
    assert correlator.allocate_nowait("new", deadline=50.0) == 255
    # The old slot (1.0, 255) is still in the heap: expire must see it is dead.
    assert correlator.expire(2.0) == []
    assert correlator.next_deadline() == 50.0
    assert correlator.expire(50.0) == [Pending(255, 50.0, "new")]


def test_nan_deadline_and_nan_now_are_rejected_without_change() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    with pytest.raises(ValueError, match="deadline"):
        correlator.allocate_nowait("x", deadline=math.nan)
    assert len(correlator) == 0
    assert correlator.allocate_nowait("y", deadline=1.0) == 0  # 0 was not consumed
    with pytest.raises(ValueError, match="now"):
        correlator.expire(math.nan)
    assert 0 in correlator


def test_dead_heap_slots_do_not_pile_up_with_a_sliding_window() -> None:
    # 200 of 256 numbers in flight, the oldest answered as a new one goes out: every
    # number is reused while dead slots for it may still sit in the heap.
    correlator: Correlator[int] = Correlator(bits=8)
    window = [correlator.allocate_nowait(n, deadline=float(n)) for n in range(200)]
    for n in range(200, 20_000):
        assert correlator.resolve(window.pop(0)) is not None
        window.append(correlator.allocate_nowait(n, deadline=float(n)))
        assert len(correlator._heap) <= 2 * 200 + 2  # white-box, as below
    assert correlator.next_deadline() == 19_800.0
    assert [p.token for p in correlator.expire(19_899.0)] == list(range(19_800, 19_900))


def test_dead_heap_slots_do_not_pile_up() -> None:
    correlator: Correlator[int] = Correlator(bits=8)
    keep = correlator.allocate_nowait(-1, deadline=1e9)
    for n in range(10_000):
        seq = correlator.allocate_nowait(n, deadline=float(n))
        assert correlator.resolve(seq) is not None
    # White-box: the heap of deadlines is compacted instead of growing with every reply.
    assert len(correlator._heap) <= 2 * 64 + 2
    assert correlator.next_deadline() == 1e9
    assert correlator.expire(1e9) == [Pending(keep, 1e9, -1)]


# --- drain ---------------------------------------------------------------------------------


def test_drain_returns_everything_in_allocation_order_and_empties() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    _fill(correlator, 254)
    for seq in range(254):
        if seq not in (10, 253):
            correlator.resolve(seq)
    a = correlator.allocate_nowait("a", deadline=3.0)  # 254
    b = correlator.allocate_nowait("b", deadline=1.0)  # 255
    c = correlator.allocate_nowait("c", deadline=None)  # wraps to 0
    assert (a, b, c) == (254, 255, 0)

    drained = correlator.drain()
    assert drained == [
        Pending(10, None, "t10"),
        Pending(253, None, "t253"),
        Pending(254, 3.0, "a"),
        Pending(255, 1.0, "b"),
        Pending(0, None, "c"),
    ]
    assert len(correlator) == 0
    assert not correlator.full
    assert correlator.next_deadline() is None
    assert correlator.expire(math.inf) == []
    assert correlator.drain() == []
    assert correlator.resolve(10) is None
    # The cycle goes on from where it was: the drained numbers are not handed out at once.
    assert correlator.allocate_nowait("after", deadline=None) == 1
    stats = correlator.statistics()
    assert stats == CorrelatorStatistics(
        allocated_total=258,
        resolved_total=252,
        expired_total=0,
        cancelled_total=5,
        unknown_replies=1,
        in_flight=1,
        max_in_flight_seen=254,
    )


# --- construction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 0},
        {"bits": 7},
        {"bits": 12},
        {"bits": 64},
        {"bits": True},
        {"bits": 8.0},
        {"max_in_flight": 0},
        {"max_in_flight": -1},
        {"bits": 8, "max_in_flight": 257},
        {"bits": 16, "max_in_flight": 2**16 + 1},
        {"max_in_flight": True},
        {"max_in_flight": 2.0},
    ],
)
def test_bad_construction_arguments_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"bits|max_in_flight"):
        Correlator(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("bits", "limit"), [(8, 1), (8, 256), (16, 65536), (32, 2**32)])
def test_limits_up_to_the_whole_space_are_accepted(bits: int, limit: int) -> None:
    correlator: Correlator[None] = Correlator(bits=bits, max_in_flight=limit)
    assert correlator.max_in_flight == limit


def test_statistics_are_a_frozen_snapshot() -> None:
    correlator: Correlator[str] = Correlator(bits=8)
    before = correlator.statistics()
    correlator.allocate_nowait("x", deadline=None)
    assert before.allocated_total == 0
    with pytest.raises(AttributeError):
        before.allocated_total = 5  # type: ignore[misc]


# --- a long random run ---------------------------------------------------------------------


def test_a_thousand_requests_at_8_bits_never_reuse_an_in_flight_number() -> None:
    rng = random.Random(20240611)
    correlator: Correlator[int] = Correlator(bits=8)
    in_flight: dict[int, int] = {}
    returned: set[int] = set()
    issued = 0
    steps = 0
    while issued < 1_000:
        steps += 1
        assert steps < 10_000  # bounded, whatever the draws
        # Keep the space mostly full so allocation must skip in-flight numbers.
        if in_flight and (correlator.full or rng.random() < 0.3):
            seq = rng.choice(list(in_flight))
            pending = correlator.resolve(seq + 256 * rng.randrange(3))
            assert pending is not None
            assert pending.seq == seq
            assert pending.token == in_flight.pop(seq)
            assert pending.token not in returned
            returned.add(pending.token)
        else:
            seq = correlator.allocate_nowait(issued, deadline=None)
            assert 0 <= seq < 256
            assert seq not in in_flight, f"seq {seq} reused while in flight"
            in_flight[seq] = issued
            issued += 1
        assert len(correlator) == len(in_flight)
    assert correlator.statistics().max_in_flight_seen == 256  # the space did fill up
    assert {p.token for p in correlator.drain()} == set(in_flight.values())


# --- the stateful model --------------------------------------------------------------------


class CorrelatorMachine(RuleBasedStateMachine):
    """Drive a correlator with random operations and compare it with a dict.

    The model holds seq -> (token, deadline) in allocation order, and the counters expected
    in ``statistics()``. Allocation is checked against the rule itself: the first number
    after the last one handed out that the model does not hold.
    """

    def __init__(self) -> None:
        super().__init__()
        self.correlator: Correlator[int] = Correlator(bits=8)
        self.model: dict[int, tuple[int, float | None]] = {}
        self.last = -1
        self.now = 0.0
        self.next_token = 0
        self.returned: set[int] = set()
        self.allocated = self.resolved = self.expired = self.cancelled = 0
        self.unknown = self.seen = 0

    @initialize(
        config=st.one_of(
            st.tuples(st.just(8), st.integers(1, 6)),
            st.tuples(st.just(8), st.just(256)),
            st.tuples(st.just(16), st.integers(1, 6)),
        )
    )
    def configure(self, config: tuple[int, int]) -> None:
        bits, limit = config
        self.correlator = Correlator(bits=bits, max_in_flight=limit, name="model")
        self.last = 2**bits - 1

    @property
    def modulus(self) -> int:
        return self.correlator.modulus

    def _take(self, seq: int, pending: Pending[int] | None) -> None:
        if seq not in self.model:
            assert pending is None
            return
        token, deadline = self.model.pop(seq)
        assert pending == Pending(seq, deadline, token)
        self._returned(token)

    def _returned(self, token: int) -> None:
        assert token not in self.returned, f"token {token} returned twice"
        self.returned.add(token)

    def _expected_next(self) -> int:
        seq = self.last
        for _ in range(self.modulus):
            seq = (seq + 1) % self.modulus
            if seq not in self.model:
                return seq
        raise AssertionError("model is full")

    def _allocate(self, deadline: float | None) -> None:
        token = self.next_token
        self.next_token += 1
        if len(self.model) == self.correlator.max_in_flight:
            with pytest.raises(SequenceExhaustedError):
                self.correlator.allocate_nowait(token, deadline=deadline)
            return
        seq = self.correlator.allocate_nowait(token, deadline=deadline)
        assert seq not in self.model, f"seq {seq} handed out while in flight"
        assert seq == self._expected_next()
        self.model[seq] = (token, deadline)
        self.last = seq
        self.allocated += 1
        self.seen = max(self.seen, len(self.model))

    @rule(delay=st.one_of(st.none(), st.integers(0, 6)))
    def allocate(self, delay: int | None) -> None:
        self._allocate(None if delay is None else self.now + delay)

    @rule()
    def fill(self) -> None:
        # Up to the limit (and one past it) in one step, so fullness is reached often.
        for _ in range(self.correlator.max_in_flight - len(self.model) + 1):
            self._allocate(self.now + 3)

    @rule(count=st.integers(1, 300))
    def churn(self, count: int) -> None:
        # Allocate and answer at once: moves the cursor around the space (and past the
        # wrap) while the other requests stay in flight.
        for _ in range(count):
            if len(self.model) == self.correlator.max_in_flight:
                return
            self._allocate(self.now + 1)
            self._take(self.last, self.correlator.resolve(self.last))
            self.resolved += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data(), lap=st.integers(0, 3))
    def resolve_in_flight(self, data: st.DataObject, lap: int) -> None:
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self._take(seq, self.correlator.resolve(seq + lap * self.modulus))
        self.resolved += 1

    @rule(seq=st.integers(0, 2**17))
    def resolve_any(self, seq: int) -> None:
        known = seq % self.modulus in self.model
        self._take(seq % self.modulus, self.correlator.resolve(seq))
        if known:
            self.resolved += 1
        else:
            self.unknown += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def cancel_in_flight(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self._take(seq, self.correlator.cancel(seq))
        self.cancelled += 1

    @rule(seq=st.integers(0, 2**17))
    def cancel_any(self, seq: int) -> None:
        known = seq % self.modulus in self.model
        self._take(seq % self.modulus, self.correlator.cancel(seq))
        self.cancelled += int(known)

    @rule(advance=st.integers(0, 4))
    def expire(self, advance: int) -> None:
        self.now += advance
        order = list(self.model)
        due = sorted(
            (
                (deadline, order.index(seq), seq, token)
                for seq, (token, deadline) in self.model.items()
                if deadline is not None and deadline <= self.now
            ),
        )
        expected = [Pending(seq, deadline, token) for deadline, _, seq, token in due]
        assert self.correlator.expire(self.now) == expected
        for pending in expected:
            del self.model[pending.seq]
            self._returned(pending.token)
        self.expired += len(expected)

    @rule()
    def drain(self) -> None:
        expected = [Pending(seq, d, token) for seq, (token, d) in self.model.items()]
        assert self.correlator.drain() == expected
        for pending in expected:
            self._returned(pending.token)
        self.cancelled += len(expected)
        self.model.clear()

    @invariant()
    def matches_the_model(self) -> None:
        correlator = self.correlator
        assert len(correlator) == correlator.in_flight == len(self.model)
        for seq in self.model:
            assert seq in correlator
        assert correlator.full == (len(self.model) == correlator.max_in_flight)
        deadlines = [d for _, d in self.model.values() if d is not None]
        assert correlator.next_deadline() == (min(deadlines) if deadlines else None)
        stats = correlator.statistics()
        assert stats == CorrelatorStatistics(
            allocated_total=self.allocated,
            resolved_total=self.resolved,
            expired_total=self.expired,
            cancelled_total=self.cancelled,
            unknown_replies=self.unknown,
            in_flight=len(self.model),
            max_in_flight_seen=self.seen,
        )
        removed = stats.resolved_total + stats.expired_total + stats.cancelled_total
        assert len(correlator) == stats.allocated_total - removed
        assert len(self.returned) == removed


CorrelatorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_correlator_matches_its_model = CorrelatorMachine.TestCase
