"""Connection slots: FIFO grants, the ways a queued acquire ends, cancellation that never loses
a slot, orphan teardown, the generation check, reference-counted scopes — and a property test
that drives the real pool with random operation sequences in virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keeplink import (
    AbortedError,
    ConfigError,
    ErrorCode,
    InvalidRequestError,
    SlotsExhaustedError,
    VirtualClock,
)
from keeplink._slots import Slot, SlotPool, SlotPools


def make_pool(
    clock: VirtualClock, size: int = 1, acquire_timeout_s: float | None = 20.0
) -> SlotPool:
    return SlotPool(size=size, name="ble-hub", clock=clock, acquire_timeout_s=acquire_timeout_s)


async def queue_up(
    clock: VirtualClock,
    pool: SlotPool,
    holder: str,
    *,
    abort: asyncio.Event | None = None,
    timeout: float | str | None = "pool default",
) -> asyncio.Task[Slot]:
    """Start ``pool.acquire(holder)`` in a task and let it reach the queue."""
    if isinstance(timeout, str):
        task = asyncio.create_task(pool.acquire(holder, abort=abort))
    else:
        task = asyncio.create_task(pool.acquire(holder, abort=abort, timeout=timeout))
    await clock.settle()
    assert not task.done(), "expected the acquire to queue"
    return task


class Closer:
    """A channel's sync close function that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize("size", [0, -1, True, 1.5])
def test_size_must_be_an_integer_of_at_least_one(size: object) -> None:
    with pytest.raises(ConfigError, match="size must be an integer >= 1"):
        SlotPool(size=size, name="hub")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -5.0])
def test_acquire_timeout_must_be_positive_or_none(bad: float) -> None:
    with pytest.raises(ConfigError, match="acquire_timeout_s"):
        SlotPool(size=1, name="hub", acquire_timeout_s=bad)
    assert SlotPool(size=1, name="hub", acquire_timeout_s=None).acquire_timeout_s is None


async def test_the_default_clock_is_the_event_loop() -> None:
    pool = SlotPool(size=1, name="hub")
    async with await pool.acquire("dev") as slot:
        assert slot.acquired_at == pytest.approx(asyncio.get_running_loop().time(), abs=1)
    assert pool.statistics().held == 0
    await pool.close()


# ---------------------------------------------------------------------- FIFO and capacity


async def test_grants_follow_arrival_order_and_a_newcomer_goes_to_the_back(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock, acquire_timeout_s=None)
    first = pool.acquire_nowait("first")
    tasks = [await queue_up(virtual_clock, pool, f"w{i}") for i in range(5)]
    assert pool.statistics().waiting == 5

    granted: list[str] = []
    current = first
    for step in range(5):
        current.release()
        if step == 1:
            # A newcomer while others queue: even in the instant the slot changes hands, it
            # neither takes the slot nor jumps the queue.
            with pytest.raises(SlotsExhaustedError):
                pool.acquire_nowait("newcomer-nowait")
            tasks.append(await queue_up(virtual_clock, pool, "newcomer"))
        await virtual_clock.settle()
        done = [t for t in tasks if t.done()]
        assert len(done) == 1, "exactly one waiter is granted per release"
        current = done[0].result()
        tasks.remove(done[0])
        granted.append(current.holder)
    assert granted == ["w0", "w1", "w2", "w3", "w4"]

    current.release()
    assert (await tasks[0]).holder == "newcomer"
    assert pool.statistics().holders == ("newcomer",)
    await pool.close()


async def test_held_never_exceeds_size(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock, size=2, acquire_timeout_s=None)
    peak = 0

    async def worker(i: int) -> None:
        nonlocal peak
        async with await pool.acquire(f"dev{i}"):
            peak = max(peak, pool.statistics().held)
            assert pool.statistics().held <= 2
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(i) for i in range(7)))
    stats = pool.statistics()
    assert peak == 2
    assert (stats.held, stats.acquired_total, stats.released_total) == (0, 7, 7)


# ---------------------------------------------------------------------- how a queued acquire ends


async def test_queued_acquire_ends_when_the_pool_closes(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock)
    holder = pool.acquire_nowait("dev-a")
    task = await queue_up(virtual_clock, pool, "dev-b")
    await pool.close()
    with pytest.raises(AbortedError, match="pool closed") as info:
        await task
    assert info.value.code is ErrorCode.CONNECTION_ABORTED
    assert "'ble-hub'" in info.value.message
    assert holder.released, "close frees every slot"
    await pool.close()  # idempotent
    with pytest.raises(AbortedError, match="pool closed"):
        await pool.acquire("dev-c")
    with pytest.raises(AbortedError, match="pool closed"):
        pool.acquire_nowait("dev-c")
    assert pool.statistics().aborted_total == 3


async def test_queued_acquire_ends_on_the_callers_abort_event(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock)
    pool.acquire_nowait("dev-a")
    abort = asyncio.Event()
    task = await queue_up(virtual_clock, pool, "dev-b", abort=abort)
    abort.set()
    await virtual_clock.settle()
    assert task.done()
    with pytest.raises(AbortedError, match="abort signal") as info:
        await task
    assert info.value.code is ErrorCode.CONNECTION_ABORTED
    assert "'ble-hub'" in info.value.message
    stats = pool.statistics()
    assert (stats.waiting, stats.held, stats.aborted_total) == (0, 1, 1)
    # An event already set refuses at once, even with a slot free.
    with pytest.raises(AbortedError):
        await SlotPool(size=1, name="other", clock=virtual_clock).acquire("x", abort=abort)
    await pool.close()


async def test_a_slot_handed_over_as_the_abort_event_is_set_is_given_back(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock)
    held = pool.acquire_nowait("dev-a")
    abort = asyncio.Event()
    task = await queue_up(virtual_clock, pool, "dev-b", abort=abort)
    held.release()  # the slot is handed to dev-b's future ...
    abort.set()  # ... and the abort comes in the same instant: the abort wins
    with pytest.raises(AbortedError, match="abort signal"):
        await task
    assert pool.statistics().held == 0
    await pool.close()


async def test_queued_acquire_ends_on_abort_pending(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock)
    held = pool.acquire_nowait("dev-a")
    tasks = [await queue_up(virtual_clock, pool, f"dev-{c}") for c in "bc"]
    assert pool.abort_pending("commissioning cancelled") == 2
    for task in tasks:
        with pytest.raises(AbortedError, match="commissioning cancelled") as info:
            await task
        assert info.value.code is ErrorCode.CONNECTION_ABORTED
    stats = pool.statistics()
    assert (stats.waiting, stats.generation, stats.aborted_total) == (0, 1, 2)
    assert not held.released, "a slot without an attached channel stays held"
    assert held.stale
    held.release()
    await pool.close()


async def test_queued_acquire_times_out_exactly_at_twenty_seconds_with_an_actionable_error(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock)
    pool.acquire_nowait("dev-a")
    await virtual_clock.advance(4)
    task = await queue_up(virtual_clock, pool, "dev-b")  # queued at t=4
    other = await queue_up(virtual_clock, pool, "dev-c", timeout=None)

    await virtual_clock.advance_to(23.999)
    assert not task.done()
    await virtual_clock.advance_to(24)
    assert task.done()
    with pytest.raises(SlotsExhaustedError) as info:
        await task
    error = info.value
    assert error.code is ErrorCode.OUT_OF_CONNECTION_SLOTS
    assert str(error).startswith("[out_of_connection_slots] ")
    message = error.message
    assert "'ble-hub'" in message
    assert "1 slot)" in message
    assert "'dev-a' (for 24.0 s)" in message  # who holds it, and for how long
    assert "'dev-b' after waiting 20 s" in message
    assert "1 other acquire(s) waiting" in message  # dev-c
    assert "Increase the pool size / connection_slots on the hub" in message
    assert "add another hub" in message
    assert "stop holder 'dev-a'" in message
    stats = pool.statistics()
    assert (stats.timeouts, stats.waiting) == (1, 1)
    assert not other.done(), "timeout=None waits without bound"
    await pool.close()
    with pytest.raises(AbortedError):
        await other


async def test_a_per_call_timeout_overrides_the_pool_default(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock)
    pool.acquire_nowait("dev-a")
    task = await queue_up(virtual_clock, pool, "dev-b", timeout=3)
    await virtual_clock.advance(3)
    with pytest.raises(SlotsExhaustedError, match="after waiting 3 s"):
        await task
    with pytest.raises(SlotsExhaustedError):
        await pool.acquire("dev-c", timeout=0)
    assert pool.statistics().timeouts == 2
    await pool.close()


# ---------------------------------------------------------------------- cancellation


async def test_cancelling_a_queued_acquire_removes_the_waiter(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock)
    held = pool.acquire_nowait("dev-a")
    task = await queue_up(virtual_clock, pool, "dev-b")
    assert pool.statistics().waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.statistics().waiting == 0
    assert virtual_clock.live_timers == 0, "its bounded-wait timer is gone too"
    held.release()
    stats = pool.statistics()
    assert (stats.held, stats.acquired_total, stats.released_total) == (0, 1, 1)
    again = pool.acquire_nowait("dev-c")  # the slot was not lost
    again.release()
    await pool.close()


async def test_cancel_in_the_instant_the_slot_is_handed_over_gives_it_back(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock)
    held = pool.acquire_nowait("dev-a")
    first = await queue_up(virtual_clock, pool, "dev-b")
    second = await queue_up(virtual_clock, pool, "dev-c")
    held.release()  # hands the slot to dev-b's future synchronously ...
    assert pool.statistics().holders == ("dev-b",)
    first.cancel()  # ... but dev-b is cancelled before its task runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await virtual_clock.settle()
    assert second.done(), "the slot went on to the next waiter: never lost"
    slot = second.result()
    assert slot.holder == "dev-c"
    slot.release()
    stats = pool.statistics()
    assert (stats.held, stats.waiting) == (0, 0)
    assert stats.acquired_total == stats.released_total == 3
    await pool.close()


async def test_a_slot_handed_over_just_before_abort_pending_is_not_returned(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock)
    held = pool.acquire_nowait("dev-a")
    task = await queue_up(virtual_clock, pool, "dev-b")
    held.release()  # dev-b's future has the slot, its task has not run yet
    pool.abort_pending("commissioning ended")
    with pytest.raises(AbortedError, match="commissioning ended"):
        await task
    assert pool.statistics().held == 0
    await pool.close()


# ---------------------------------------------------------------------- release


async def test_double_release_frees_exactly_one_slot(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock, size=2)
    a = pool.acquire_nowait("dev-a")
    b = pool.acquire_nowait("dev-b")
    a.release()
    a.release()
    assert a.released
    stats = pool.statistics()
    assert (stats.held, stats.released_total, stats.holders) == (1, 1, ("dev-b",))
    c = pool.acquire_nowait("dev-c")
    with pytest.raises(SlotsExhaustedError):
        pool.acquire_nowait("dev-d")  # a second release did not free a second slot
    for slot in (b, c):
        slot.release()
    await pool.close()


async def test_async_with_releases_on_an_exception(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock)
    with pytest.raises(RuntimeError):
        async with await pool.acquire("dev-a") as slot:
            raise RuntimeError("connect failed")
    assert slot.released
    assert pool.statistics().held == 0
    await pool.close()


def test_acquire_nowait_takes_a_free_slot_or_raises_at_once() -> None:
    clock = VirtualClock()
    pool = SlotPool(size=2, name="modbus-gw", clock=clock)
    a = pool.acquire_nowait("meter-1")
    b = pool.acquire_nowait("meter-2")
    assert (a.holder, b.holder, a.generation, a.acquired_at) == ("meter-1", "meter-2", 0, 0)
    with pytest.raises(SlotsExhaustedError) as info:
        pool.acquire_nowait("meter-3")
    message = info.value.message
    assert "'modbus-gw' (2 slots)" in message
    assert "'meter-1' (for 0.0 s), 'meter-2' (for 0.0 s)" in message
    assert "stop holder 'meter-1'" in message
    assert pool.statistics().timeouts == 0, "nothing waited, nothing timed out"
    b.release()
    assert pool.acquire_nowait("meter-3").holder == "meter-3"


# ---------------------------------------------------------------------- orphans and generations


async def test_abort_pending_tears_down_an_attached_orphan(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock)
    slot = await pool.acquire("dev-a")
    closer = Closer()
    slot.attach(closer)
    assert slot.attached
    assert pool.abort_pending() == 1
    assert closer.calls == 1
    assert slot.released
    stats = pool.statistics()
    assert (stats.held, stats.orphans_torn_down, stats.generation) == (0, 1, 1)
    slot.release()  # the channel's own close path releasing again is harmless
    pool.abort_pending()
    assert closer.calls == 1
    await pool.close()


async def test_a_closer_that_releases_its_own_slot_is_fine(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock)
    slot = await pool.acquire("dev-a")
    calls: list[str] = []

    def close_channel() -> None:  # a real channel's close path releases its slot
        calls.append("close")
        slot.release()

    slot.attach(close_channel)
    await pool.close()
    assert calls == ["close"]
    stats = pool.statistics()
    assert (stats.held, stats.released_total, stats.orphans_torn_down) == (0, 1, 1)


async def test_a_failing_closer_is_logged_and_its_slot_still_freed(
    virtual_clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(virtual_clock)
    slot = await pool.acquire("dev-a")

    def broken() -> None:
        raise OSError("already gone")

    slot.attach(broken)
    with caplog.at_level(logging.ERROR, logger="keeplink.slots"):
        assert pool.abort_pending() == 1
    assert slot.released
    assert "closing the channel of 'dev-a' raised" in caplog.text
    await pool.close()


async def test_a_connect_that_completes_after_an_abort_is_torn_down(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock)
    slot = await pool.acquire("dev-a")  # the connect is now in flight ...
    assert pool.abort_pending("commissioning ended") == 0  # ... nothing attached yet
    assert slot.stale
    assert not slot.released
    closer = Closer()
    with pytest.raises(AbortedError, match="completed after an abort") as info:
        slot.attach(closer)  # ... and completes after the abort
    assert info.value.code is ErrorCode.CONNECTION_ABORTED
    assert "'ble-hub'" in info.value.message
    assert "commissioning ended" in info.value.message
    assert closer.calls == 1
    assert slot.released
    assert pool.statistics().orphans_torn_down == 1
    await pool.close()


async def test_attach_after_release_or_twice_is_refused(virtual_clock: VirtualClock) -> None:
    pool = make_pool(virtual_clock, size=2)
    slot = pool.acquire_nowait("dev-a")
    slot.attach(Closer())
    with pytest.raises(InvalidRequestError, match="already has a channel"):
        slot.attach(Closer())
    slot.release()
    late = Closer()
    with pytest.raises(AbortedError, match="after its slot was released"):
        slot.attach(late)
    assert late.calls == 1
    assert pool.statistics().held == 0
    await pool.close()


async def test_check_current_raises_once_stale_and_frees_the_slot(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock, size=2)
    slot = pool.acquire_nowait("dev-a")
    slot.check_current()  # current: nothing happens
    pool.abort_pending("user cancelled")
    fresh = pool.acquire_nowait("dev-b")
    with pytest.raises(AbortedError, match="user cancelled"):
        slot.check_current()
    assert slot.released
    fresh.check_current()
    assert fresh.generation == 1
    await pool.close()
    assert fresh.stale
    assert fresh.released


# ---------------------------------------------------------------------- scopes


async def test_ending_one_of_two_scopes_aborts_nothing_ending_the_last_does(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock)
    first = pool.scope("commission node 1")
    second = pool.scope("commission node 2")
    await first.__aenter__()
    await second.__aenter__()
    assert pool.statistics().open_scopes == 2

    slot = await pool.acquire("node-1")
    closer = Closer()
    slot.attach(closer)
    waiter = await queue_up(virtual_clock, pool, "node-2", timeout=None)

    await first.__aexit__(None, None, None)
    await virtual_clock.settle()
    stats = pool.statistics()
    assert (stats.open_scopes, stats.generation, stats.waiting) == (1, 0, 1)
    assert closer.calls == 0
    assert not slot.released
    assert not waiter.done()

    await second.__aexit__(None, None, None)
    stats = pool.statistics()
    assert (stats.open_scopes, stats.generation, stats.waiting, stats.held) == (0, 1, 0, 0)
    assert closer.calls == 1
    with pytest.raises(AbortedError, match="scope commission node 2 ended"):
        await waiter
    await pool.close()


async def test_a_scope_as_a_context_manager_aborts_on_exit_even_on_error(
    virtual_clock: VirtualClock,
) -> None:
    pool = make_pool(virtual_clock)
    closer = Closer()

    async def commission() -> None:
        async with pool.scope("commissioning"):
            (await pool.acquire("node")).attach(closer)
            raise RuntimeError("commissioning failed")

    with pytest.raises(RuntimeError):
        await commission()
    assert closer.calls == 1
    stats = pool.statistics()
    assert (stats.open_scopes, stats.held, stats.orphans_torn_down) == (0, 0, 1)
    await pool.close()


# ---------------------------------------------------------------------- property


# Weighted by repetition: mostly acquire, release and time passing; the big hammers
# (abort_pending, close) are rare so that queues build up between them.
OP_NAMES = (
    *("acquire",) * 8,
    *("release",) * 4,
    "release_twice",
    *("attach",) * 2,
    *("advance",) * 3,
    *("settle",) * 3,
    "cancel",
    "release_then_cancel",
    "abort_event",
    "nowait",
    "check_current",
    "scope_enter",
    "scope_leave",
    "abort_pending",
    "close",
)
OPS = st.lists(
    # (operation, a small number to pick a target with, whether the loop runs afterwards:
    # without it the next operation lands in the same instant, e.g. before a woken waiter runs)
    st.tuples(st.sampled_from(OP_NAMES), st.integers(min_value=0, max_value=7), st.booleans()),
    min_size=15,
    max_size=60,
)
TIMEOUTS: tuple[float | None, ...] = (20.0, None, 3.0)
ADVANCES = (0.5, 3.0, 21.0)


class PoolDriver:
    """Drives a real pool with one operation at a time and checks the invariants."""

    def __init__(self, size: int) -> None:
        self.clock = VirtualClock()
        self.pool = SlotPool(size=size, name="prop", clock=self.clock)
        self.tasks: list[tuple[asyncio.Task[Slot], asyncio.Event]] = []
        self.harvested: set[asyncio.Task[Slot]] = set()
        self.slots: list[Slot] = []
        self.closers: dict[int, int] = {}
        self.scopes: list[contextlib.AbstractAsyncContextManager[None]] = []
        self.arrivals = itertools.count()
        self.queued_grants: list[int] = []
        self.closed = False
        self.started: dict[asyncio.Task[Slot] | None, tuple[float, float | None]] = {}

    # -- helpers

    def pending(self) -> list[tuple[asyncio.Task[Slot], asyncio.Event]]:
        return [(t, e) for t, e in self.tasks if not t.done()]

    def unreleased(self) -> list[Slot]:
        return [s for s in self.slots if not s.released]

    async def acquirer(self, holder: str, abort: asyncio.Event, timeout: float | None) -> Slot:
        arrival = next(self.arrivals)
        stats = self.pool.statistics()
        queued = stats.held >= stats.size or stats.waiting > 0
        started = self.clock.now()
        self.started[asyncio.current_task()] = (started, timeout)
        try:
            slot = await self.pool.acquire(holder, abort=abort, timeout=timeout)
        except SlotsExhaustedError:
            assert self.clock.now() - started == timeout, "timed out at the wrong time"
            raise
        # What a caller gets is live: never released, never stale, never after an abort.
        assert not slot.released
        assert not slot.stale
        assert not abort.is_set()
        if queued:
            self.queued_grants.append(arrival)
        return slot

    def make_closer(self, slot: Slot, reentrant: bool) -> Callable[[], None]:
        key = id(slot)
        self.closers[key] = 0

        def close() -> None:
            self.closers[key] += 1
            if reentrant:
                slot.release()

        return close

    def harvest(self) -> None:
        for task, _ in self.tasks:
            if not task.done() or task in self.harvested:
                continue
            self.harvested.add(task)
            if task.cancelled():
                continue
            error = task.exception()
            if error is None:
                self.slots.append(task.result())
            elif isinstance(error, SlotsExhaustedError):
                assert error.code is ErrorCode.OUT_OF_CONNECTION_SLOTS
            else:
                assert isinstance(error, AbortedError), repr(error)
                assert error.code is ErrorCode.CONNECTION_ABORTED

    # -- operations

    async def apply(self, op: str, n: int, pause: bool = True) -> None:
        pool = self.pool
        self.harvest()
        if op == "acquire":
            abort = asyncio.Event()
            task = asyncio.create_task(self.acquirer(f"h{n % 4}", abort, TIMEOUTS[n % 3]))
            self.tasks.append((task, abort))
        elif op in ("release", "release_twice") and self.unreleased():
            slot = self.unreleased()[n % len(self.unreleased())]
            before = pool.statistics().released_total
            slot.release()
            if op == "release_twice":
                slot.release()
            assert pool.statistics().released_total == before + 1
        elif op == "attach" and self.unreleased():
            candidates = [s for s in self.unreleased() if not s.attached]
            if candidates:
                slot = candidates[n % len(candidates)]
                closer = self.make_closer(slot, reentrant=n % 2 == 0)
                if slot.stale:
                    with pytest.raises(AbortedError):
                        slot.attach(closer)
                    assert slot.released
                    assert self.closers[id(slot)] == 1
                else:
                    slot.attach(closer)
        elif op == "cancel" and self.pending():
            task, _ = self.pending()[n % len(self.pending())]
            task.cancel()
        elif op == "release_then_cancel" and self.unreleased() and self.pending():
            self.unreleased()[0].release()  # hands the slot to the head waiter ...
            self.pending()[0][0].cancel()  # ... which is cancelled before it runs
        elif op == "abort_event" and self.pending():
            self.pending()[n % len(self.pending())][1].set()
        elif op == "abort_pending":
            generation = pool.generation
            pool.abort_pending("test")
            assert pool.generation == generation + 1
            assert pool.statistics().waiting == 0
            assert not any(s.attached for s in self.unreleased())
        elif op == "scope_enter":
            scope = pool.scope(f"s{n}")
            await scope.__aenter__()
            self.scopes.append(scope)
        elif op == "scope_leave" and self.scopes:
            generation = pool.generation
            await self.scopes.pop(n % len(self.scopes)).__aexit__(None, None, None)
            if self.scopes or self.closed:
                assert pool.generation == generation, "an inner scope end aborts nothing"
            else:
                assert pool.generation == generation + 1
                assert pool.statistics().waiting == 0
        elif op == "advance":
            await self.clock.advance(ADVANCES[n % 3])
        elif op == "nowait":
            stats = pool.statistics()
            try:
                self.slots.append(pool.acquire_nowait(f"h{n % 4}"))
            except SlotsExhaustedError:
                assert stats.held == stats.size or stats.waiting > 0
            except AbortedError:
                assert self.closed
        elif op == "check_current" and self.unreleased():
            slot = self.unreleased()[n % len(self.unreleased())]
            if slot.stale:
                with pytest.raises(AbortedError):
                    slot.check_current()
                assert slot.released
            else:
                slot.check_current()
        elif op == "close":
            await pool.close()
            self.closed = True
            assert pool.statistics().held == 0
        if op == "settle":
            await self.clock.settle()
            self.check_settled()
        elif pause:
            await asyncio.sleep(0)
        self.check_always()

    # -- invariants

    def check_always(self) -> None:
        stats = self.pool.statistics()
        assert 0 <= stats.held <= stats.size
        assert stats.held == stats.acquired_total - stats.released_total == len(stats.holders)
        assert stats.open_scopes == len(self.scopes)
        assert all(count <= 1 for count in self.closers.values()), "a channel closed twice"
        if stats.waiting:
            assert stats.held == stats.size, "a slot is free while acquires wait"
        assert self.queued_grants == sorted(self.queued_grants), "FIFO order broken"

    def check_settled(self) -> None:
        """With every woken task run: each held slot belongs to a caller (none lost)."""
        self.harvest()
        stats = self.pool.statistics()
        mine = self.unreleased()
        assert stats.held == len(mine), (stats, mine)
        assert sorted(stats.holders) == sorted(s.holder for s in mine)
        if self.closed:
            assert stats.held == stats.waiting == 0
        now = self.clock.now()
        for task, abort in self.pending():
            assert not abort.is_set(), "an acquire outlived its abort signal"
            if task in self.started:
                started, timeout = self.started[task]
                assert timeout is None or now - started < timeout, "an acquire outlived its bound"

    async def finish(self) -> None:
        await self.clock.settle()
        self.check_settled()
        await self.pool.close()
        await self.clock.settle()
        self.harvest()
        assert all(task.done() for task, _ in self.tasks), "a queued acquire outlived close()"
        stats = self.pool.statistics()
        assert (stats.held, stats.waiting) == (0, 0)
        assert stats.acquired_total == stats.released_total
        assert all(s.released for s in self.slots)
        assert self.clock.live_timers == 0, self.clock.pending()
        for scope in self.scopes:
            await scope.__aexit__(None, None, None)
        watchers = [t for t in asyncio.all_tasks() if t.get_name().startswith("keeplink[prop]")]
        assert all(t.done() for t in watchers), "abort watchers left behind"


@settings(max_examples=150, deadline=None)
@given(size=st.integers(min_value=1, max_value=3), ops=OPS)
async def test_random_operation_sequences_keep_the_pool_sound(
    size: int, ops: list[tuple[str, int, bool]]
) -> None:
    driver = PoolDriver(size)
    try:
        for op, n, pause in ops:
            await driver.apply(op, n, pause)
        await driver.finish()
    finally:  # on a failure, leave nothing behind for the next example
        await driver.pool.close()
        for task, _ in driver.tasks:
            task.cancel()
        await driver.clock.settle()


# ------------------------------------------------------------------------------ registry


async def test_one_hub_one_pool_of_one_size_until_it_is_closed_or_forgotten() -> None:
    pools = SlotPools()
    pool = pools.get("hub-a", size=2)
    assert pools.get("hub-a", size=2) is pool
    assert pool.name == "hub-a" and pool.size == 2
    other = pools.get("hub-b", size=1)
    assert other is not pool
    with pytest.raises(ConfigError, match="hub-a already has a slot pool of size 2; asked for 3"):
        pools.get("hub-a", size=3)
    assert set(pools) == {pool, other}

    await pool.close()
    fresh = pools.get("hub-a", size=3)  # a closed pool is replaced, with the size asked for
    assert fresh is not pool and not fresh.closed and fresh.size == 3

    del other  # held by nothing: the registry forgets it
    gc.collect()
    assert set(pools) == {fresh}

    await pools.close()
    assert fresh.closed
    with pytest.raises(AbortedError):
        await fresh.acquire("late")
