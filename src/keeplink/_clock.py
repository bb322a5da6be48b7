"""Clock implementations and the clock-driven primitives every timing rule is built on.

:class:`SystemClock` reads the event loop's monotonic time. :class:`VirtualClock` only moves
when a test says so (``await clock.advance(5)``), so reconnect schedules, heartbeats and
deadlines can be asserted exactly while real sockets carry the bytes.

:func:`sleep_until` (:class:`Wakeable` when a wake may cut it short) and :func:`deadline`
are what the rest of keeplink uses instead of ``asyncio.sleep`` and ``asyncio.timeout``:
they go through whichever clock was injected.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from types import TracebackType

from keeplink._core.clock import Clock, Timer

__all__ = ["SystemClock", "VirtualClock", "Wakeable", "WallClock", "deadline", "sleep_until"]


class SystemClock:
    """The running event loop's monotonic clock."""

    __slots__ = ()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_at(when, callback)

    def __repr__(self) -> str:
        return "SystemClock()"


class WallClock:
    """Wall-clock time (seconds since the epoch), for deadlines that must survive a restart
    (a durable command's expiry). Timers still run on the loop's monotonic clock, so a
    wall-clock step (NTP) moves a pending timer's deadline with it rather than firing it."""

    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + max(0.0, when - time.time()), callback)

    def __repr__(self) -> str:
        return "WallClock()"


class _VirtualTimer:
    __slots__ = ("_clock", "callback", "cancelled", "when")

    def __init__(self, clock: VirtualClock, when: float, callback: Callable[[], object]) -> None:
        self._clock = clock
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._clock._live -= 1

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "pending"
        return f"<VirtualTimer at={self.when:g} {state} {self.callback!r}>"


class VirtualClock:
    """A clock that stands still until advanced. For tests; exact and repeatable.

    Timers fire in deadline order (ties in scheduling order); after each one the event loop
    runs until it is quiet, so the tasks it woke can react (and schedule new timers) before
    the next one fires.
    """

    # How many loop iterations count as "quiet": enough for a woken task to run, await a
    # future another callback resolves, and schedule its next timer.
    SETTLE_ROUNDS = 20

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, _VirtualTimer]] = []
        self._seq = itertools.count()
        self._live = 0

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        timer = _VirtualTimer(self, when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        self._live += 1
        return timer

    def pending(self) -> list[float]:
        """Deadlines of the timers not yet fired or cancelled, soonest first."""
        return sorted(t.when for _, _, t in self._heap if not t.cancelled)

    def next_deadline(self) -> float | None:
        self._drop_cancelled()
        return self._heap[0][0] if self._heap else None

    @property
    def live_timers(self) -> int:
        return self._live

    def _drop_cancelled(self) -> None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)

    async def settle(self) -> None:
        """Let the event loop run until the tasks woken so far have reacted."""
        for _ in range(self.SETTLE_ROUNDS):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing every timer due on the way, in order."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards ({seconds})")
        await self.advance_to(self._now + seconds)

    async def advance_to(self, when: float) -> None:
        """Move time forward to ``when``, firing every timer due on the way, in order."""
        if when < self._now:
            raise ValueError(f"cannot move a clock backwards ({self._now} -> {when})")
        await self.settle()
        while True:
            self._drop_cancelled()
            if not self._heap or self._heap[0][0] > when:
                break
            due, _, timer = heapq.heappop(self._heap)
            self._now = max(self._now, due)
            timer.cancelled = True
            self._live -= 1
            timer.callback()
            await self.settle()
        self._now = when
        await self.settle()

    async def advance_to_next(self) -> float:
        """Jump to the next pending deadline and fire what is due there; return the new time.

        Raises LookupError if nothing is scheduled.
        """
        await self.settle()
        nxt = self.next_deadline()
        if nxt is None:
            raise LookupError("no timer is pending on this virtual clock")
        await self.advance_to(max(nxt, self._now))
        return self._now

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now:g}, pending={self._live})"


async def sleep_until(clock: Clock, when: float) -> None:
    """Sleep until ``clock.now() >= when``. Cancellation removes the timer."""
    await Wakeable().sleep_until(clock, when)


class Wakeable:
    """A wait on a clock that a wake can cut short: ``await w.sleep_until(clock, when)``
    returns at ``when`` or as soon as ``w.wake()`` is called, whichever comes first.

    One wait at a time. Cancellation removes the timer. A wake while nothing waits does
    nothing (it is not remembered for the next wait).
    """

    __slots__ = ("_fut",)

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] | None = None

    @property
    def waiting(self) -> bool:
        """True while a wait is in progress and not yet woken."""
        return self._fut is not None and not self._fut.done()

    def wake(self) -> bool:
        """Cut the current wait short. Returns True if there was one to cut."""
        fut = self._fut
        if fut is None or fut.done():
            return False
        fut.set_result(None)
        return True

    async def sleep_until(self, clock: Clock, when: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fut = fut

        def expire() -> None:
            if not fut.done():
                fut.set_result(None)

        timer = clock.call_at(when, expire)
        try:
            await fut
        finally:
            timer.cancel()
            self._fut = None


class deadline:
    """``async with deadline(clock, when):`` — raise TimeoutError if the body runs past ``when``.

    Like :func:`asyncio.timeout_at`, but on an injected clock. ``when=None`` never expires.
    If the task is also cancelled from outside, the CancelledError wins.
    """

    __slots__ = ("_clock", "_expired", "_task", "_timer", "when")

    def __init__(self, clock: Clock, when: float | None) -> None:
        self._clock = clock
        self.when = when
        self._task: asyncio.Task[object] | None = None
        self._timer: Timer | None = None
        self._expired = False

    @property
    def expired(self) -> bool:
        return self._expired

    async def __aenter__(self) -> deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("deadline() must be used inside a task")
        self._task = task
        if self.when is not None:
            if self._clock.now() >= self.when:
                self._expire()
            else:
                self._timer = self._clock.call_at(self.when, self._expire)
        return self

    def _expire(self) -> None:
        if self._task is not None and not self._task.done() and not self._expired:
            self._expired = True
            self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._expired and exc_type is asyncio.CancelledError:
            assert self._task is not None
            # Only ours: convert. If someone else cancelled too, let CancelledError through.
            if self._task.uncancel() == 0:
                raise TimeoutError from exc
