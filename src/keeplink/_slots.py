"""Connection slots: a FIFO pool of the few connections a hub (a BLE proxy, a Modbus gateway)
can hold at once.

A :class:`SlotPool` is sized like the hub (``size=N``). :meth:`SlotPool.acquire` waits in
strict arrival order; the :class:`Slot` it returns is held for the channel's whole lifetime
and released exactly once (``release()`` is idempotent, also on cancellation). A queued
acquire ends with a typed error: :class:`~keeplink.AbortedError` when the pool closes, when
the caller's abort event is set or when :meth:`SlotPool.abort_pending` runs, and
:class:`~keeplink.SlotsExhaustedError` (who holds the slots, what to do) when its bounded wait
runs out.

:meth:`SlotPool.abort_pending` also tears down *orphans*: channels that were handed out
(:meth:`Slot.attach`) to an attempt that has since been abandoned. It bumps a generation
counter, so a connect that was in flight at that moment and completes later is torn down
when it attaches its channel. :meth:`SlotPool.scope` reference-counts scopes such as
"commissioning in progress": only the end of the last open scope aborts anything.

The design is "decide, then act": every state change is a small synchronous method, and a
freed slot is handed to the head waiter at once (its future gets the :class:`Slot`), so a
slot is never unowned; a waiter that is cancelled in the same instant gives it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from keeplink._clock import SystemClock
from keeplink._core.clock import Clock, Timer
from keeplink._core.errors import (
    AbortedError,
    ConfigError,
    InvalidRequestError,
    SlotsExhaustedError,
)

__all__ = ["HUB_SLOTS", "Slot", "SlotPool", "SlotPoolStatistics", "SlotPools"]

DEFAULT_ACQUIRE_TIMEOUT_S: Final = 20.0
"""How long a queued acquire waits for a slot by default (the field-tested bound)."""

_log = logging.getLogger("keeplink.slots")


class _Default(enum.Enum):
    """Sentinel type for "use the pool's default" (typed, unlike a bare ``object()``)."""

    TOKEN = enum.auto()


_POOL_DEFAULT: Final = _Default.TOKEN


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotPoolStatistics:
    """A snapshot of a pool's state and counters. Frozen: take another to see changes."""

    name: str
    size: int
    held: int
    """Slots currently held (granted and not yet released)."""
    holders: tuple[str, ...]
    """Holder names of the held slots, oldest grant first."""
    waiting: int
    """Acquires queued for a slot."""
    generation: int
    """Bumped by every :meth:`SlotPool.abort_pending` and by :meth:`SlotPool.close`."""
    acquired_total: int
    """Slots granted (``held == acquired_total - released_total``)."""
    released_total: int
    timeouts: int
    """Queued acquires whose bounded wait ran out (SlotsExhaustedError)."""
    aborted_total: int
    """Acquires that ended with AbortedError (pool closed, abort event, ``abort_pending``).

    A connect torn down at :meth:`Slot.attach` is counted in ``orphans_torn_down`` instead.
    """
    orphans_torn_down: int
    """Channels the pool closed: attached at an abort or close, or attached after one."""
    open_scopes: int


class _Waiter:
    __slots__ = ("future", "holder", "since")

    def __init__(self, holder: str, future: asyncio.Future[Slot], since: float) -> None:
        self.holder = holder
        self.future = future
        self.since = since


class Slot:
    """One granted connection slot. Release it exactly when its channel is gone.

    ``async with slot:`` releases it on exit (also on an exception or a cancellation).
    """

    __slots__ = ("_closer", "_pool", "_released", "acquired_at", "generation", "holder")

    def __init__(self, pool: SlotPool, holder: str, generation: int, acquired_at: float) -> None:
        self._pool = pool
        self.holder = holder
        self.generation = generation
        """The pool's generation when this slot was granted."""
        self.acquired_at = acquired_at
        """Clock time of the grant."""
        self._released = False
        self._closer: Callable[[], object] | None = None

    @property
    def released(self) -> bool:
        return self._released

    @property
    def stale(self) -> bool:
        """True once an ``abort_pending()`` or ``close()`` happened after this grant."""
        return self.generation != self._pool.generation

    @property
    def attached(self) -> bool:
        """True while a channel's closer is attached (and the slot not released)."""
        return self._closer is not None

    def attach(self, closer: Callable[[], object]) -> None:
        """Hand the slot's channel to the pool: ``closer`` is the channel's sync close.

        The pool calls it to tear the channel down as an orphan (``abort_pending()``,
        ``close()``). If the slot is already stale — the connect completed after an abort —
        or already released, ``closer`` is called at once, the slot is released and
        AbortedError is raised: the channel must not be used.
        """
        if self._closer is not None:
            raise InvalidRequestError(
                f"slot pool {self._pool.name!r}: the slot of {self.holder!r} already has a"
                " channel attached"
            )
        if self.stale or self._released:
            why = (
                f"completed after an abort ({self._pool._last_abort_reason})"
                if self.stale
                else "completed after its slot was released"
            )
            self._closer = closer
            self._pool._tear_down(self)
            raise AbortedError(
                f"slot pool {self._pool.name!r}: connect for {self.holder!r} {why};"
                " its channel was closed"
            )
        self._closer = closer

    def release(self) -> None:
        """Give the slot back (idempotent) and wake the next waiter in arrival order.

        Call it when the channel is closed, or when the connect failed. It does not call the
        attached closer: wire ``release()`` into the channel's close path instead.
        """
        self._pool._release(self)

    def check_current(self) -> None:
        """Raise AbortedError if the slot is stale, after closing its channel and releasing it."""
        if self.stale:
            self._pool._tear_down(self)
            raise AbortedError(
                f"slot pool {self._pool.name!r}: the slot of {self.holder!r} was abandoned"
                f" ({self._pool._last_abort_reason}); its channel was closed"
            )

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else ("stale" if self.stale else "held")
        return (
            f"<Slot pool={self._pool.name!r} holder={self.holder!r} gen={self.generation} {state}>"
        )


class _Scope:
    """One entry into a reference-counted scope (see :meth:`SlotPool.scope`)."""

    __slots__ = ("_entered", "_exited", "_pool", "name")

    def __init__(self, pool: SlotPool, name: str) -> None:
        self._pool = pool
        self.name = name
        self._entered = False
        self._exited = False

    async def __aenter__(self) -> None:
        if self._entered:
            raise InvalidRequestError(f"scope {self.name!r} was already entered")
        self._entered = True
        self._pool._open_scopes += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._entered or self._exited:
            return
        self._exited = True
        self._pool._leave_scope(self.name)


def _check_settings(name: str, size: int, acquire_timeout_s: float | None) -> None:
    if not name:
        raise ConfigError("a slot pool needs a non-empty name")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"slot pool {name!r}: size must be an integer >= 1, got {size!r}")
    if acquire_timeout_s is not None and not acquire_timeout_s > 0:
        raise ConfigError(
            f"slot pool {name!r}: acquire_timeout_s must be > 0 or None, got {acquire_timeout_s!r}"
        )


class SlotPool:
    """A hub's connection slots, granted in strict FIFO order. See the module docstring.

    ``size`` is the number of connections the hub can hold at once. ``acquire_timeout_s`` is
    the default bound on a queued acquire (``None``: wait without bound). All timing goes
    through ``clock`` (default: the event loop's clock).
    """

    def __init__(
        self,
        *,
        size: int,
        name: str,
        clock: Clock | None = None,
        acquire_timeout_s: float | None = DEFAULT_ACQUIRE_TIMEOUT_S,
    ) -> None:
        _check_settings(name, size, acquire_timeout_s)
        self.name = name
        self.size = size
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.acquire_timeout_s = acquire_timeout_s

        self._held: dict[Slot, None] = {}  # insertion-ordered: oldest grant first
        self._waiters: deque[_Waiter] = deque()
        self._generation = 0
        self._closed = False
        self._open_scopes = 0
        self._last_abort_reason = "aborted"

        self._acquired_total = 0
        self._released_total = 0
        self._timeouts = 0
        self._aborted_total = 0
        self._orphans_torn_down = 0

    # ------------------------------------------------------------------ public surface

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def closed(self) -> bool:
        return self._closed

    async def acquire(
        self,
        holder: str,
        *,
        abort: asyncio.Event | None = None,
        timeout: float | _Default | None = _POOL_DEFAULT,
    ) -> Slot:
        """Wait for a slot in arrival order and return it.

        ``timeout`` bounds the wait (default: the pool's ``acquire_timeout_s``; ``None``
        waits without bound). Raises SlotsExhaustedError when the wait runs out, and
        AbortedError when the pool is closed, when ``abort`` is set (before a slot reached
        the caller) or when :meth:`abort_pending` runs while this acquire is queued. A
        cancelled acquire leaves the queue; a slot handed to it in the same instant is
        released.
        """
        wait_s = self.acquire_timeout_s if isinstance(timeout, _Default) else timeout
        if abort is not None and abort.is_set():
            raise self._aborted_now(holder, "the caller's abort signal was set")
        slot = self._try_grant(holder)  # raises AbortedError if closed
        if slot is not None:
            return slot
        if wait_s is not None and wait_s <= 0:
            self._timeouts += 1
            raise self._exhausted_error(holder, waited_s=0.0)

        waiter = self._enqueue(holder)
        timer: Timer | None = None
        watcher: asyncio.Task[object] | None = None
        if wait_s is not None:
            timer = self.clock.call_at(
                waiter.since + wait_s, lambda: self._on_wait_elapsed(waiter, wait_s)
            )
        if abort is not None:
            watcher = asyncio.get_running_loop().create_task(
                abort.wait(), name=f"keeplink[{self.name}].abort-watch[{holder}]"
            )
            watcher.add_done_callback(lambda task: self._on_abort_signal(waiter, task))
        try:
            slot = await waiter.future
        except asyncio.CancelledError:
            self._forget(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()
        # The slot was handed over while this task was not running yet. If an abort came in
        # the same instant, the abort wins: the caller never saw the slot.
        if slot.stale:
            slot.release()  # a no-op if close() already released it
            raise self._aborted_now(holder, self._last_abort_reason)
        if abort is not None and abort.is_set():
            slot.release()
            raise self._aborted_now(holder, "the caller's abort signal was set")
        return slot

    def acquire_nowait(self, holder: str) -> Slot:
        """Take a free slot at once, or raise SlotsExhaustedError (also if others queue)."""
        slot = self._try_grant(holder)
        if slot is None:
            raise self._exhausted_error(holder, waited_s=None)
        return slot

    def abort_pending(self, reason: str = "aborted") -> int:
        """Reject every queued acquire and tear down every attached (orphan) channel.

        Bumps the generation, so a connect in flight now is torn down when it attaches.
        Slots held without a channel attached stay held. Returns waiters + orphans affected.
        """
        self._generation += 1
        self._last_abort_reason = reason
        waiters = self._reject_all(reason)
        orphans = 0
        for slot in [s for s in self._held if s.attached]:
            self._tear_down(slot)
            orphans += 1
        if waiters or orphans:
            _log.info(
                "slot pool %r: %s: rejected %d queued acquire(s), closed %d orphan channel(s)",
                self.name,
                reason,
                waiters,
                orphans,
            )
        return waiters + orphans

    def scope(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with pool.scope("commissioning"):`` — a reference-counted scope.

        Leaving the last open scope runs ``abort_pending(f"scope {name} ended")``; leaving
        one of several concurrent scopes aborts nothing.
        """
        return _Scope(self, name)

    async def close(self) -> None:
        """Close the pool (idempotent).

        Rejects queued acquires ("pool closed"), tears down every attached channel, releases
        every held slot (a connect still in flight is torn down when it attaches) and
        refuses future acquires with AbortedError.
        """
        if self._closed:
            return
        self._closed = True
        self._generation += 1
        self._last_abort_reason = "pool closed"
        self._reject_all("pool closed")
        for slot in list(self._held):
            if slot.attached:
                self._tear_down(slot)
            else:
                self._release(slot)

    def statistics(self) -> SlotPoolStatistics:
        return SlotPoolStatistics(
            name=self.name,
            size=self.size,
            held=len(self._held),
            holders=tuple(s.holder for s in self._held),
            waiting=self._live_waiters(),
            generation=self._generation,
            acquired_total=self._acquired_total,
            released_total=self._released_total,
            timeouts=self._timeouts,
            aborted_total=self._aborted_total,
            orphans_torn_down=self._orphans_torn_down,
            open_scopes=self._open_scopes,
        )

    def __repr__(self) -> str:
        return (
            f"<SlotPool {self.name!r} size={self.size} held={len(self._held)}"
            f" waiting={self._live_waiters()} gen={self._generation}"
            f"{' closed' if self._closed else ''}>"
        )

    # ------------------------------------------------------------------ decisions (sync)

    def _prune(self) -> None:
        """Drop waiters whose future is already done (cancelled by their task)."""
        if any(w.future.done() for w in self._waiters):
            self._waiters = deque(w for w in self._waiters if not w.future.done())

    def _live_waiters(self) -> int:
        return sum(1 for w in self._waiters if not w.future.done())

    def _try_grant(self, holder: str) -> Slot | None:
        """A slot now if one is free and nobody queues ahead; None otherwise."""
        if self._closed:
            raise self._aborted_now(holder, "pool closed")
        self._prune()
        if self._waiters or len(self._held) >= self.size:
            return None
        return self._grant(holder)

    def _grant(self, holder: str) -> Slot:
        slot = Slot(self, holder, self._generation, self.clock.now())
        self._held[slot] = None
        self._acquired_total += 1
        return slot

    def _enqueue(self, holder: str) -> _Waiter:
        future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(holder, future, self.clock.now())
        self._waiters.append(waiter)
        return waiter

    def _hand_over(self) -> None:
        """Give free slots to the head waiters, in arrival order, right now."""
        while self._waiters and len(self._held) < self.size and not self._closed:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(self._grant(waiter.holder))

    def _release(self, slot: Slot) -> None:
        if slot._released:
            return
        slot._released = True
        slot._closer = None
        del self._held[slot]
        self._released_total += 1
        self._hand_over()

    def _tear_down(self, slot: Slot) -> None:
        """Close the slot's attached channel (if any), then release the slot."""
        closer, slot._closer = slot._closer, None
        try:
            if closer is not None:
                self._orphans_torn_down += 1
                try:
                    closer()
                except Exception:  # noqa: BLE001 - see below
                    # Deliberately broad: one channel's failing close must not stop the
                    # teardown of the others, nor keep its slot. Logged with a traceback.
                    _log.exception(
                        "slot pool %r: closing the channel of %r raised", self.name, slot.holder
                    )
        finally:
            self._release(slot)

    def _reject(self, waiter: _Waiter, error: BaseException) -> bool:
        """Take ``waiter`` out of the queue and fail it; False if it was already resolved."""
        if waiter.future.done():
            return False
        self._unqueue(waiter)
        waiter.future.set_exception(error)
        return True

    def _unqueue(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _reject_all(self, reason: str) -> int:
        waiters, self._waiters = self._waiters, deque()
        rejected = 0
        for waiter in waiters:
            if not waiter.future.done():
                self._aborted_total += 1
                rejected += 1
                waiter.future.set_exception(self._aborted_error(waiter.holder, reason))
        return rejected

    def _forget(self, waiter: _Waiter) -> None:
        """The waiting task was cancelled: leave the queue; give back a slot handed to it."""
        self._unqueue(waiter)
        future = waiter.future
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:  # marks errors retrieved
            future.result().release()

    def _on_wait_elapsed(self, waiter: _Waiter, waited_s: float) -> None:
        if waiter.future.done():
            return
        self._unqueue(waiter)  # before building the message: it counts the others waiting
        self._timeouts += 1
        self._reject(waiter, self._exhausted_error(waiter.holder, waited_s=waited_s))

    def _on_abort_signal(self, waiter: _Waiter, watcher: asyncio.Task[object]) -> None:
        if watcher.cancelled():
            return
        error = self._aborted_error(waiter.holder, "the caller's abort signal was set")
        if self._reject(waiter, error):
            self._aborted_total += 1

    def _leave_scope(self, name: str) -> None:
        self._open_scopes -= 1
        if self._open_scopes == 0 and not self._closed:
            self.abort_pending(f"scope {name} ended")

    # ------------------------------------------------------------------ errors

    def _aborted_error(self, holder: str, reason: str) -> AbortedError:
        return AbortedError(f"slot pool {self.name!r}: acquire for {holder!r} aborted: {reason}")

    def _aborted_now(self, holder: str, reason: str) -> AbortedError:
        self._aborted_total += 1
        return self._aborted_error(holder, reason)

    def _exhausted_error(self, holder: str, *, waited_s: float | None) -> SlotsExhaustedError:
        held, waiting = list(self._held), self._live_waiters()
        return _exhausted(self, holder, held=held, waited_s=waited_s, waiting=waiting)


def _exhausted(
    pool: SlotPool, holder: str, *, held: list[Slot], waited_s: float | None, waiting: int
) -> SlotsExhaustedError:
    """What ``holder`` is told when ``pool`` has no free slot: who holds them, and what to do."""
    now = pool.clock.now()
    if held:
        who = ", ".join(f"{s.holder!r} (for {now - s.acquired_at:.1f} s)" for s in held)
        stop = f"stop holder {held[0].holder!r}"
    else:
        who = "nobody"
        stop = "stop a holder"
    after = "" if waited_s is None else f" after waiting {waited_s:g} s"
    return SlotsExhaustedError(
        f"slot pool {pool.name!r} ({pool.size} slot{'s' if pool.size != 1 else ''}):"
        f" no free connection slot for {holder!r}{after}; held by {who};"
        f" {waiting} other acquire(s) waiting. Increase the pool size / connection_slots"
        f" on the hub, add another hub, or {stop}."
    )


class SlotPools:
    """Slot pools by hub: every link to one hub takes its slot from the same pool.

    ``get(key, size=…)`` returns the hub's pool, creating it (named ``key``) on first use,
    or afresh once the old one was closed. Pools are held weakly: an entry lives as long as
    something (a link) holds its pool, so a forgotten hub leaves nothing behind. Keys are
    compared as given (``"localhost"`` and ``"127.0.0.1"`` are different hubs).
    """

    __slots__ = ("_pools",)

    def __init__(self) -> None:
        self._pools: weakref.WeakValueDictionary[str, SlotPool] = weakref.WeakValueDictionary()

    def get(self, key: str, *, size: int) -> SlotPool:
        """The pool of hub ``key``. Raises ConfigError if it exists with another ``size``:
        one hub, one truth."""
        pool = self._pools.get(key)
        if pool is not None and not pool.closed:
            if pool.size != size:
                raise ConfigError(
                    f"{key} already has a slot pool of size {pool.size}; asked for {size}."
                    " Use the same size everywhere."
                )
            return pool
        pool = SlotPool(size=size, name=key)
        self._pools[key] = pool
        return pool

    def __iter__(self) -> Iterator[SlotPool]:
        """The pools alive now (a snapshot)."""
        return iter(list(self._pools.values()))

    async def close(self) -> None:
        """Close every pool alive now (see :meth:`SlotPool.close`)."""
        for pool in self:
            await pool.close()


HUB_SLOTS: Final = SlotPools()
"""The process-wide pools of hubs that every link in the process shares (a Modbus gateway's
one slot, see :func:`keeplink.drivers.modbus.gateway_slots`)."""
