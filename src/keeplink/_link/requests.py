"""Requests: the window, correlation, deadlines and outcomes — the link's hot path.

The waiter is registered under its sequence number before the frame is written, so a fast
device's ack can never arrive before anyone waits for it. One clock timer, lazily re-armed,
watches the earliest deadline in flight, and another the earliest of the queued requests. A
reply hands its window slot to the next queued request at once, and a request validated
while it queued is renumbered, not built again, when the driver can do that.

On the hot path (a usable session, a free window slot, a channel that takes the frame at
once) a request costs no task switch but the wait for its reply: the slot is taken without
awaiting, the frame is written without awaiting, and no timer is created or cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from keeplink._core.clock import Clock, Timer
from keeplink._core.correlation import Correlator
from keeplink._core.errors import (
    ErrorCode,
    InvalidRequestError,
    KeeplinkError,
    RequestTimeout,
)
from keeplink._core.outcomes import (
    Acknowledged,
    Cancelled,
    Outcome,
    Rejected,
    TimedOut,
    Unavailable,
)
from keeplink._driver import Driver, Reply
from keeplink._events import EventHub, LinkEvent, SideDataReceived
from keeplink._link.session import Session, Sessions
from keeplink._link.stats import OUTCOME_NAMES, Counters

__all__ = ["Requests", "check_timeout"]

F = TypeVar("F")

_log = logging.getLogger("keeplink.link")

_NUMBER: Final = (int, float)
_INF: Final = math.inf


def check_timeout(timeout: object) -> float:
    """``timeout`` as seconds; InvalidRequestError unless a positive, finite number."""
    if isinstance(timeout, bool) or not isinstance(timeout, _NUMBER):
        raise InvalidRequestError(f"timeout must be a number of seconds, got {timeout!r}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise InvalidRequestError(f"timeout must be > 0 and finite, got {timeout!r}")
    return timeout


@dataclass(slots=True)
class _Waiter:
    """What the correlator holds for one request in flight."""

    future: asyncio.Future[Outcome]
    timeout_s: float
    protocol_errors: int = 0
    """The link's counts when the request was made: what arrived since that matched
    nothing is told with its timeout."""
    late_replies: int = 0
    released: bool = False
    """Its window slot was passed on when its reply came, before its caller resumed."""


def _renumberer(driver: Driver[Any]) -> Callable[[Any, int], Any] | None:
    """The driver's ``renumber_request(frame, seq)``, when the same class defines it and
    ``build_request`` (a subclass that builds its own requests must renumber its own)."""
    renumber = getattr(driver, "renumber_request", None)
    if renumber is None:
        return None
    for klass in type(driver).__mro__:
        if "build_request" in vars(klass):
            return renumber if "renumber_request" in vars(klass) else None
    return None  # pragma: no cover - a Driver has build_request


class Requests(Generic[F]):
    """A link's requests: at most ``window`` in flight, the rest wait in order."""

    def __init__(
        self,
        *,
        name: str,
        driver: Driver[F],
        clock: Clock,
        events: EventHub[LinkEvent],
        counters: Counters,
        sessions: Sessions[F],
        unavailable: Callable[[], KeeplinkError],
        send_timeout_s: float,
    ) -> None:
        self.name = name
        self.driver = driver
        self.clock = clock
        self.events = events
        self.counters = counters
        self.sessions = sessions
        self.unavailable = unavailable
        self.send_timeout_s = send_timeout_s
        window = min(driver.max_in_flight, 1 << driver.seq_bits)
        self.correlator: Correlator[_Waiter] = Correlator(
            bits=driver.seq_bits, max_in_flight=window, name=name
        )
        # The window: requests beyond the driver's in-flight limit wait here, in order, so
        # the correlator never runs out of sequence numbers.
        self._free = window
        # (slot, expires): the slot's result is True when a window slot is handed over,
        # False when ``expires`` passed first. One lazy timer watches the queue's deadlines.
        self._queued: collections.deque[tuple[asyncio.Future[bool], float]] = collections.deque()
        self._queue_timer: Timer | None = None
        self._queue_timer_at: float | None = None
        self._expiry: Timer | None = None
        self._expiry_at: float | None = None
        self._renumber = _renumberer(driver)
        self.side_data: dict[str, Any] = {}
        sessions.on_reply = self.on_reply

    async def request(
        self,
        op: str,
        args: Mapping[str, Any] | None,
        *,
        timeout: float,
        key: str | None,
        fail_on_drop: bool,
    ) -> Outcome:
        """See :meth:`Link.request`. One coroutine, no task switch but the reply's wait."""
        kind = timeout.__class__
        if (kind is not float and kind is not int) or not 0 < timeout < _INF:
            timeout = check_timeout(timeout)  # raises, or accepts a number of another type
        call_args: Mapping[str, Any] = {} if args is None else args
        expires = self.clock.now() + timeout
        session = self.sessions.current
        built: F | None = None
        if session is None or session.broken is not None or not self._free or self._queued:
            # Off the fast path, validate first: bad arguments fail at once, whatever the
            # link is doing. On the fast path the one build below validates, before any
            # await and before anything is written. A driver that can renumber a built
            # request keeps this build and only changes its sequence number below.
            built = self.driver.build_request(0, op, call_args, key)
            if self.sessions.usable() is None:
                return self._tally(Unavailable(cause=self.unavailable()))
            if not await self._acquire(expires):
                return self._tally(TimedOut(after_s=timeout, sent=False))
            session = self.sessions.usable()
            if session is None:
                self._release()
                return self._tally(Unavailable(cause=self.unavailable()))
        else:
            self._free -= 1  # a free slot, taken without suspending
        counters = self.counters
        outcome: Outcome
        waiter: _Waiter | None = None
        try:
            future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            waiter = _Waiter(future, timeout, counters.protocol_errors, counters.late_replies)
            seq = self.correlator.allocate_nowait(waiter, deadline=expires)
            try:
                if built is not None and self._renumber is not None:
                    frame = self._renumber(built, seq)
                else:
                    frame = self.driver.build_request(seq, op, call_args, key)
            except BaseException:
                self.correlator.cancel(seq)
                raise
            if self._expiry_at is None or self._expiry_at > expires:
                self._arm_expiry(expires)
            try:
                try:
                    if not session.send_nowait(frame):
                        limit = min(self.send_timeout_s, max(expires - self.clock.now(), 0.0))
                        await session.send(frame, limit)
                except RequestTimeout:
                    outcome = self._withdraw(seq, future, TimedOut(after_s=timeout, seq=seq))
                except InvalidRequestError:
                    self._withdraw(seq, future, None)
                    raise
                except KeeplinkError as exc:
                    outcome = self._withdraw(seq, future, Unavailable(cause=exc, seq=seq))
                else:
                    counters.requests_sent += 1
                    if fail_on_drop:
                        session.fragile.add(seq)
                        try:
                            outcome = await future
                        finally:
                            session.fragile.discard(seq)
                    else:
                        outcome = await future
            except asyncio.CancelledError:
                self._withdraw(seq, future, None)
                raise
        finally:
            if waiter is None or not waiter.released:
                self._release()
        counters.outcomes[OUTCOME_NAMES[type(outcome)]] += 1
        return outcome

    # ------------------------------------------------------------------ the window

    async def _acquire(self, expires: float) -> bool:
        """Wait for a window slot until ``expires``; False if the time ran out first."""
        if self._free and not self._queued:
            self._free -= 1
            return True
        if expires <= self.clock.now():
            return False
        slot: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queued.append((slot, expires))
        if self._queue_timer_at is None or self._queue_timer_at > expires:
            self._arm_queue_timer(expires)
        try:
            return await slot
        except BaseException:
            if not slot.done():
                slot.cancel()
            elif not slot.cancelled() and slot.result():
                self._release()  # handed a slot as the wait ended anyway: pass it on
            raise

    def _release(self) -> None:
        queued = self._queued
        while queued:
            slot = queued.popleft()[0]
            if not slot.done():
                slot.set_result(True)  # handed over: the free count stays as it is
                return
        self._free += 1
        if self._queue_timer is not None:
            self._queue_timer.cancel()
            self._queue_timer = None
            self._queue_timer_at = None

    def _arm_queue_timer(self, due: float) -> None:
        """One lazy timer at or before the earliest deadline of a queued request, as for
        the requests in flight (see :meth:`_arm_expiry`); it goes when the queue empties."""
        if self._queue_timer is not None:
            self._queue_timer.cancel()
        self._queue_timer_at = due
        self._queue_timer = self.clock.call_at(due, self._expire_queued)

    def _expire_queued(self) -> None:
        self._queue_timer = None
        self._queue_timer_at = None
        now = self.clock.now()
        due: float | None = None
        waiting: collections.deque[tuple[asyncio.Future[bool], float]] = collections.deque()
        for slot, expires in self._queued:
            if slot.done():
                continue
            if expires <= now:
                slot.set_result(False)
                continue
            waiting.append((slot, expires))
            if due is None or expires < due:
                due = expires
        self._queued = waiting
        if due is not None:
            self._arm_queue_timer(due)

    # ------------------------------------------------------------------ outcomes

    def _withdraw(
        self, seq: int, future: asyncio.Future[Outcome], outcome: Outcome | None
    ) -> Outcome:
        """Remove a request's waiter. If a reply won the race, its outcome stands."""
        removed = self.correlator.cancel(seq)
        if removed is None and future.done() and not future.cancelled():
            return future.result()
        if outcome is None:
            return Cancelled(reason="withdrawn", seq=seq)
        return outcome

    def _tally(self, outcome: Outcome) -> Outcome:
        self.counters.outcomes[OUTCOME_NAMES[type(outcome)]] += 1
        return outcome

    def on_reply(self, session: Session[F], reply: Reply) -> None:
        if reply.side:
            self.side_data.update(reply.side)
            if self.events:
                self.events.emit(
                    SideDataReceived(
                        link=self.name,
                        at=session.last_rx,
                        device_id=session.info.device_id,
                        values=dict(reply.side),
                    )
                )
        pending = self.correlator.resolve(reply.seq)
        if pending is None:
            self.counters.late_replies += 1
            self.counters.last_late_reply = (reply.seq, session.last_rx)
            _log.debug(
                "link %r: reply for seq %d matches no request in flight (late or unknown); dropped",
                self.name,
                reply.seq,
            )
            return
        waiter = pending.token
        future = waiter.future
        if future.done():
            return
        if reply.ok:
            future.set_result(Acknowledged(seq=pending.seq, result=reply.result, side=reply.side))
        else:
            future.set_result(
                Rejected(
                    seq=pending.seq,
                    code=reply.code or ErrorCode.REJECTED.value,
                    message=reply.message or "rejected by the device",
                )
            )
        # The request is no longer in flight: its slot goes to the next queued request now,
        # which then resumes in the same loop iteration as this one's caller.
        waiter.released = True
        self._release()

    def fail_fragile(self, session: Session[F], reason: KeeplinkError) -> None:
        """The session ended: its ``fail_on_drop`` requests end ``Unavailable`` with it."""
        for seq in list(session.fragile):
            pending = self.correlator.cancel(seq)
            if pending is not None and not pending.token.future.done():
                pending.token.future.set_result(Unavailable(cause=reason, seq=seq))

    def cancel_all(self, reason: str) -> None:
        for pending in self.correlator.drain():
            if not pending.token.future.done():
                pending.token.future.set_result(Cancelled(reason=reason, seq=pending.seq))
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = None
        self._expiry_at = None
        if self._queue_timer is not None and not self._queued:
            self._queue_timer.cancel()
            self._queue_timer = None
            self._queue_timer_at = None

    # ------------------------------------------------------------------ deadlines

    def _arm_expiry(self, due: float) -> None:
        """Keep one clock timer at or before the earliest deadline in flight.

        Lazy on purpose: a timer that fires early (its request already resolved) finds
        nothing due and re-arms, which is far cheaper than cancelling and re-creating a
        timer for every request. A new request only re-arms it when it is due sooner than
        the timer fires. Stopping the link cancels it.
        """
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = due
        self._expiry = self.clock.call_at(due, self._expire_requests)

    def _expire_requests(self) -> None:
        self._expiry = None
        self._expiry_at = None
        for pending in self.correlator.expire(self.clock.now()):
            waiter = pending.token
            if not waiter.future.done():
                waiter.future.set_result(
                    TimedOut(
                        after_s=waiter.timeout_s, seq=pending.seq, meanwhile=self._meanwhile(waiter)
                    )
                )
        due = self.correlator.next_deadline()
        if due is not None:
            self._arm_expiry(due)

    def _meanwhile(self, waiter: _Waiter) -> str | None:
        """What the peer sent since ``waiter``'s request was made that matched nothing."""
        counters = self.counters
        parts = []
        malformed = counters.protocol_errors - waiter.protocol_errors
        if malformed and counters.last_malformed is not None:
            plural = "s" if malformed > 1 else ""
            reason = counters.last_malformed[0].reason
            parts.append(f"{malformed} malformed frame{plural} (last: {reason})")
        late = counters.late_replies - waiter.late_replies
        if late and counters.last_late_reply is not None:
            plural = "replies" if late > 1 else "reply"
            last_seq = counters.last_late_reply[0]
            parts.append(f"{late} {plural} for no request in flight (last: seq {last_seq})")
        return "meanwhile the device sent " + " and ".join(parts) if parts else None
