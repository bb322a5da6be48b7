"""The virtual clock and the clock-driven sleep and deadline."""

from __future__ import annotations

import asyncio

import pytest

from keeplink import VirtualClock, deadline, sleep_until
from keeplink._clock import Wakeable


async def test_timers_fire_in_deadline_order_and_time_is_exact(
    virtual_clock: VirtualClock,
) -> None:
    fired: list[tuple[str, float]] = []
    virtual_clock.call_at(5, lambda: fired.append(("b", virtual_clock.now())))
    virtual_clock.call_at(2, lambda: fired.append(("a", virtual_clock.now())))
    cancelled = virtual_clock.call_at(3, lambda: fired.append(("x", virtual_clock.now())))
    cancelled.cancel()
    await virtual_clock.advance(4)
    assert fired == [("a", 2)]
    assert virtual_clock.now() == 4
    await virtual_clock.advance(10)
    assert fired == [("a", 2), ("b", 5)]
    assert virtual_clock.now() == 14


async def test_a_woken_sleeper_can_schedule_the_next_timer_before_it_is_due(
    virtual_clock: VirtualClock,
) -> None:
    ticks: list[float] = []

    async def ticker() -> None:
        for _ in range(3):
            await sleep_until(virtual_clock, virtual_clock.now() + 1)
            ticks.append(virtual_clock.now())

    task = asyncio.create_task(ticker())
    await virtual_clock.advance(10)
    await task
    assert ticks == [1, 2, 3]


async def test_deadline_raises_timeout_at_the_virtual_time(virtual_clock: VirtualClock) -> None:
    async def slow() -> None:
        async with deadline(virtual_clock, 3):
            await asyncio.Event().wait()

    task = asyncio.create_task(slow())
    await virtual_clock.advance(2.9)
    assert not task.done()
    await virtual_clock.advance(0.1)
    with pytest.raises(TimeoutError):
        await task


async def test_deadline_lets_an_outside_cancel_through(virtual_clock: VirtualClock) -> None:
    async def body() -> None:
        async with deadline(virtual_clock, 1):
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await virtual_clock.settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert virtual_clock.live_timers == 0


async def test_deadline_already_past_expires_at_the_first_await(
    virtual_clock: VirtualClock,
) -> None:
    await virtual_clock.advance(10)
    with pytest.raises(TimeoutError):
        async with deadline(virtual_clock, 5):
            await asyncio.sleep(0)


async def test_advance_to_next_jumps_to_the_soonest_deadline(virtual_clock: VirtualClock) -> None:
    with pytest.raises(LookupError):
        await virtual_clock.advance_to_next()
    virtual_clock.call_at(7.5, lambda: None)
    assert await virtual_clock.advance_to_next() == 7.5


async def test_time_never_goes_backwards(virtual_clock: VirtualClock) -> None:
    with pytest.raises(ValueError, match="backwards"):
        await virtual_clock.advance(-1)


async def test_a_wake_cuts_a_wakeable_wait_short(virtual_clock: VirtualClock) -> None:
    wait = Wakeable()
    assert not wait.wake()  # nothing waits: nothing to cut, and nothing remembered
    task = asyncio.create_task(wait.sleep_until(virtual_clock, 10))
    await virtual_clock.advance(3)
    assert wait.waiting and not task.done()
    assert wait.wake()
    await task
    assert virtual_clock.now() == 3
    assert not wait.waiting and virtual_clock.live_timers == 0
    task = asyncio.create_task(wait.sleep_until(virtual_clock, 5))
    await virtual_clock.advance(2)  # the earlier wake did not carry over
    await task
    assert virtual_clock.now() == 5


async def test_a_cancelled_wakeable_wait_leaves_no_timer(virtual_clock: VirtualClock) -> None:
    wait = Wakeable()
    task = asyncio.create_task(wait.sleep_until(virtual_clock, 10))
    await virtual_clock.settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not wait.waiting and not wait.wake()
    assert virtual_clock.live_timers == 0
