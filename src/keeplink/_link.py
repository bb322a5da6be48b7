"""The Link: one supervised connection to one endpoint.

It connects, runs the driver's handshake, keeps itself alive, reconnects with backoff, and
has exactly one disconnect path: whatever goes wrong (a failed send, a send timeout, a
heartbeat error, the liveness limit, EOF) closes the *channel* only; the reader then ends,
and the supervisor notices and cleans up once. Nothing in a send path ever stops the link.

The supervisor cannot die: whatever a child task or a user callback raises is logged once
with its traceback and the link reconnects. Only :meth:`Link.stop` or a terminal error (auth,
configuration) ends it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from keeplink._channel import CLOSING_ERRORS, PushChannel
from keeplink._clock import SystemClock, Wakeable, deadline, sleep_until
from keeplink._core.backoff import Backoff
from keeplink._core.classify import broken_from
from keeplink._core.clock import Clock, Timer
from keeplink._core.correlation import Correlator
from keeplink._core.errors import (
    ConfigError,
    DeviceUnavailableError,
    ErrorCode,
    InvalidRequestError,
    KeeplinkError,
    LinkBrokenError,
    LinkClosedError,
    RequestTimeout,
    WaitTimeoutError,
    error_class_of,
)
from keeplink._core.jsonline import Malformed
from keeplink._core.outcomes import (
    Acknowledged,
    Cancelled,
    Outcome,
    Rejected,
    TimedOut,
    Unavailable,
)
from keeplink._core.states import LinkState, check_link_transition
from keeplink._driver import Channel, Driver, HeartbeatReply, Reply, SessionInfo
from keeplink._events import (
    ErrorInfo,
    EventHub,
    FrameReceived,
    LinkEvent,
    LinkStateChanged,
    ProtocolErrorSeen,
    SideDataReceived,
)
from keeplink._logs import Repeats
from keeplink._slots import Slot, SlotPool

__all__ = ["Link", "LinkStatistics"]

F = TypeVar("F")

LIVENESS_RATIO: Final = 3
"""Silence limit in heartbeat intervals: two lost pings are noise, three are a dead peer."""

DEFAULT_HEARTBEAT_S: Final = 30.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 10.0
DEFAULT_SEND_TIMEOUT_S: Final = 10.0

_log = logging.getLogger("keeplink.link")

_S = LinkState
_RUNNING: Final = frozenset({_S.CONNECTING, _S.HANDSHAKING, _S.CONNECTED, _S.LOST, _S.BACKOFF})


class _StopRequested(Exception):
    """Internal: the owner asked the link to stop while the supervisor was mid-step."""


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


class _Session(Generic[F]):
    """One connected session. ``broken`` is the first reason it was closed for."""

    __slots__ = ("broken", "channel", "fragile", "info", "last_rx", "push", "started")

    def __init__(self, channel: Channel[F], info: SessionInfo, now: float) -> None:
        self.channel = channel
        # Decided once: isinstance() against a runtime-checkable Protocol is slow.
        self.push: PushChannel | None = channel if isinstance(channel, PushChannel) else None
        self.info = info
        self.started = now
        self.last_rx = now
        self.broken: KeeplinkError | None = None
        self.fragile: set[int] = set()
        """Requests sent on this session with fail_on_drop: they end with it."""

    def break_(self, reason: KeeplinkError) -> None:
        """Close the channel (only the channel) and remember why. The reader ends next."""
        if self.broken is None:
            self.broken = reason
        self.channel.close()


@dataclass(slots=True)
class _Waiter:
    """What the correlator holds for one request in flight."""

    future: asyncio.Future[Outcome]
    timeout_s: float
    protocol_errors: int = 0
    """The link's counts when the request was made: what arrived since that matched
    nothing is told with its timeout."""
    late_replies: int = 0


_OUTCOME_NAMES: Final[dict[type, str]] = {
    Acknowledged: "acknowledged",
    Rejected: "rejected",
    TimedOut: "timed_out",
    Cancelled: "cancelled",
    Unavailable: "unavailable",
}


class _HandshakeChannel(Generic[F]):
    """The channel as a driver's handshake sees it: malformed input is the link's business."""

    def __init__(self, link: Link[F], channel: Channel[F]) -> None:
        self._link = link
        self._channel = channel

    async def receive(self) -> F:
        while True:
            item = await self._channel.receive()
            if isinstance(item, Malformed):
                self._link._on_malformed(item)
                continue
            self._link._frames_in += 1
            return item

    async def send(self, frame: F) -> None:
        await self._channel.send(frame)
        self._link._frames_out += 1


class Link(Generic[F]):
    """One supervised connection to one endpoint, speaking one driver's protocol.

    Configuration is keyword-only. ``heartbeat_s=None`` sends no heartbeat. ``liveness_s``
    is the silence after which the peer is declared dead; by default it is
    ``LIVENESS_RATIO × heartbeat_s`` and applies when the driver's heartbeat is answered
    (for :attr:`HeartbeatReply.MAYBE`, once this peer has answered one); an explicit number
    always applies; ``None`` turns it off.

    Start it with :meth:`start` (or ``async with``), stop it with :meth:`stop`. Events go to
    :meth:`subscribe` callbacks; :meth:`statistics` gives a frozen snapshot.
    """

    _UNSET: Final = object()

    def __init__(
        self,
        driver: Driver[F],
        *,
        name: str,
        clock: Clock | None = None,
        backoff: Backoff | None = None,
        heartbeat_s: float | None = DEFAULT_HEARTBEAT_S,
        liveness_s: float | object | None = _UNSET,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        rng: Callable[[], float] = random.random,
        slots: SlotPool | None = None,
    ) -> None:
        if not name:
            raise ConfigError("a link needs a non-empty name")
        for key, value in (
            ("connect_timeout_s", connect_timeout_s),
            ("handshake_timeout_s", handshake_timeout_s),
            ("send_timeout_s", send_timeout_s),
        ):
            if not value > 0:
                raise ConfigError(f"link {name!r}: {key} must be > 0, got {value!r}")
        if heartbeat_s is not None and not heartbeat_s > 0:
            raise ConfigError(
                f"link {name!r}: heartbeat_s must be > 0 or None, got {heartbeat_s!r}"
            )
        self._liveness_explicit = liveness_s is not Link._UNSET
        if self._liveness_explicit:
            if liveness_s is not None and not (
                isinstance(liveness_s, int | float) and liveness_s > 0
            ):
                raise ConfigError(
                    f"link {name!r}: liveness_s must be > 0 or None, got {liveness_s!r}"
                )
            self._liveness_s: float | None = liveness_s
        else:
            self._liveness_s = None if heartbeat_s is None else LIVENESS_RATIO * heartbeat_s

        self.name = name
        self.driver = driver
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.backoff = backoff if backoff is not None else Backoff()
        self.heartbeat_s = heartbeat_s
        self.connect_timeout_s = connect_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.send_timeout_s = send_timeout_s
        self.slots = slots
        self._rng = rng

        self._events: EventHub[LinkEvent] = EventHub(f"link {name!r}")
        self._state = _S.IDLE
        self._state_waiters: list[asyncio.Future[None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._stop_requested = False
        self._session: _Session[F] | None = None
        self._backoff_wait = Wakeable()
        self._attempt = 0
        self._retry_at: float | None = None
        self._last_error: KeeplinkError | None = None
        self._terminal_error: KeeplinkError | None = None
        self._peer_answers_heartbeat = driver.heartbeat_reply is HeartbeatReply.EXPECTED
        # The first failure of a kind at WARNING (ERROR for our own bugs), repeats at DEBUG.
        self._failures_logged: Repeats[str] = Repeats(latest_only=True)  # by wire code
        self._internal_logged: Repeats[type[BaseException]] = Repeats()
        self._malformed_logged: Repeats[ErrorCode] = Repeats()

        bits = driver.seq_bits
        window = min(driver.max_in_flight, 1 << bits)
        self._correlator: Correlator[_Waiter] = Correlator(
            bits=bits, max_in_flight=window, name=name
        )
        # The window: requests beyond the driver's in-flight limit wait here, in order, so the
        # correlator never runs out of sequence numbers.
        self._window = asyncio.Semaphore(window)
        self._expiry: Timer | None = None
        self._expiry_at: float | None = None
        self.side_data: dict[str, Any] = {}
        """Side data the device sent with its acks (e.g. ``rssi``), newest value per key."""
        self._requests_sent = 0
        self._late_replies = 0
        self._outcomes: collections.Counter[str] = collections.Counter()

        self._connects = 0
        self._disconnects = 0
        self._failed_attempts = 0
        self._frames_in = 0
        self._frames_out = 0
        self._heartbeats_sent = 0
        self._protocol_errors = 0
        self._last_malformed: tuple[Malformed, float] | None = None
        self._last_late_reply: tuple[int, float] | None = None
        self._internal_errors = 0

    # ------------------------------------------------------------------ public surface

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def session(self) -> SessionInfo | None:
        """What the current session's handshake learned, or None when not connected."""
        return self._session.info if self._session is not None else None

    @property
    def last_error(self) -> KeeplinkError | None:
        return self._last_error

    def subscribe(self, callback: Callable[[LinkEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` synchronously for every event; returns an unsubscribe.

        A callback that raises is logged and otherwise ignored: it cannot affect the link.
        To stop the link from inside a callback, call :meth:`stop_soon`.
        """
        return self._events.subscribe(callback)

    def start(self) -> None:
        """Start supervising (non-blocking). Idempotent while running.

        Works again after :meth:`stop` has finished, and after a terminal failure; both
        re-enable reconnecting. Raises LinkClosedError while a stop is still in progress.
        """
        if self._supervisor is not None and not self._supervisor.done():
            # (A supervisor that has just ended, e.g. on a terminal error, counts as gone
            # even before its done-callback has run.)
            if self._stop_requested:
                raise LinkClosedError(
                    f"link {self.name!r} is stopping; await stop() before starting it again"
                )
            return
        self._stop_requested = False
        self._attempt = 0
        self._terminal_error = None
        self._retry_at = None
        loop = asyncio.get_running_loop()  # before any change: outside a loop, nothing moves
        self._supervisor = loop.create_task(
            self._supervise(), name=f"keeplink[{self.name}].supervisor"
        )
        self._supervisor.add_done_callback(self._on_supervisor_done)
        self._set_state(_S.CONNECTING)  # observable at once; the supervisor carries on from here

    def connect(self) -> None:
        """A manual connect: start the link if it is not running, else skip the backoff wait.

        Never cancels a connect or handshake in progress.
        """
        if self._supervisor is None or self._supervisor.done() or self._stop_requested:
            self.start()
        else:
            self.wake("connect")

    def wake(self, reason: str = "wake") -> bool:
        """A wake signal (mDNS announcement, presence online): skip the rest of a backoff wait.

        Returns True if a wait was cut short. Does nothing in any other state: in particular it
        never cancels a connect or a handshake in progress.
        """
        if self._state is _S.BACKOFF and self._backoff_wait.waiting:
            _log.debug("link %r: %s skips the backoff wait", self.name, reason)
            return self._backoff_wait.wake()
        return False

    def stop_soon(self) -> None:
        """Begin stopping without waiting (safe inside an event callback). Idempotent."""
        self._stop_requested = True
        if self._state in (_S.STOPPING, _S.STOPPED):
            return
        self._set_state(_S.STOPPING)
        task = self._supervisor
        if task is not None and not task.done():
            task.cancel()
        else:
            self._finish_stop()

    async def stop(self) -> None:
        """Stop the link and wait until it is stopped. Idempotent; never raises link errors.

        Closes the channel (swallowing what a closing socket raises), disables reconnect,
        cancels a backoff wait and resolves every pending request as cancelled. Afterwards
        the state is ``stopped`` and :meth:`start` may be called again.
        """
        self.stop_soon()
        task = self._supervisor
        if task is not None and task is not asyncio.current_task():
            await asyncio.wait([task])

    async def __aenter__(self) -> Link[F]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_connected(self, *, timeout: float | None = None) -> SessionInfo:
        """Wait until the link is connected; return the session's info.

        Raises the terminal error (e.g. AuthError) if the link fails, and LinkClosedError if
        it is stopped or was never started. ``timeout`` (seconds on the link's clock; None:
        wait as long as it takes) bounds the wait: when it runs out, WaitTimeoutError (code
        ``timeout``, also a builtin TimeoutError) is raised and only the wait ends; the link
        carries on connecting as before. A timeout that is not a positive, finite number is
        an InvalidRequestError.
        """
        if timeout is None:
            return await self._wait_connected()
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise InvalidRequestError(f"timeout must be a number of seconds, got {timeout!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise InvalidRequestError(f"timeout must be > 0 and finite, got {timeout!r}")
        limit = deadline(self.clock, self.clock.now() + timeout)
        try:
            async with limit:
                return await self._wait_connected()
        except TimeoutError:
            if not limit.expired:
                raise
            raise WaitTimeoutError(
                f"link {self.name!r} did not connect within {timeout:g}s"
                f" (it is {self._state.value})"
            ) from None

    async def _wait_connected(self) -> SessionInfo:
        while True:
            session = self._session
            if self._state is _S.CONNECTED and session is not None:
                return session.info
            if self._state is _S.FAILED and self._terminal_error is not None:
                raise self._terminal_error
            if self._state in (_S.STOPPING, _S.STOPPED, _S.IDLE) and (
                self._supervisor is None or self._stop_requested
            ):
                raise LinkClosedError(f"link {self.name!r} is {self._state.value}")
            await self._next_state_change()

    async def wait_for_state(self, *states: LinkState) -> LinkState:
        """Wait until the link is in one of ``states`` (returns at once if it is)."""
        if not states:
            raise ValueError("wait_for_state needs at least one state")
        while self._state not in states:
            await self._next_state_change()
        return self._state

    def statistics(self) -> LinkStatistics:
        session = self._session
        last = self._last_error
        malformed: ErrorInfo | None = None
        malformed_at: float | None = None
        if self._last_malformed is not None:
            item, malformed_at = self._last_malformed
            malformed = ErrorInfo(
                code=ErrorCode.PROTOCOL_ERROR.value,
                message=f"dropped malformed input: {item.reason} (it began {item.sample!r})",
            )
        late_seq, late_at = self._last_late_reply or (None, None)
        return LinkStatistics(
            name=self.name,
            state=self._state,
            attempt=self._attempt,
            connects=self._connects,
            disconnects=self._disconnects,
            failed_attempts=self._failed_attempts,
            frames_in=self._frames_in,
            frames_out=self._frames_out,
            heartbeats_sent=self._heartbeats_sent,
            protocol_errors=self._protocol_errors,
            subscriber_errors=self._events.subscriber_errors,
            internal_errors=self._internal_errors,
            last_error=ErrorInfo.of(last) if last is not None else None,
            retry_at=self._retry_at if self._state is _S.BACKOFF else None,
            connected_since=session.started if session is not None else None,
            session=session.info if session is not None else None,
            requests_sent=self._requests_sent,
            requests_in_flight=len(self._correlator),
            late_replies=self._late_replies,
            outcomes=dict(self._outcomes),
            last_protocol_error=malformed,
            last_protocol_error_at=malformed_at,
            last_late_reply_seq=late_seq,
            last_late_reply_at=late_at,
        )

    async def send(self, frame: F, *, timeout: float | None = None) -> None:
        """Write one frame on the current session.

        Raises LinkClosedError if the link is stopped, DeviceUnavailableError if it is not
        connected, InvalidRequestError if the frame cannot be encoded (nothing is written, the
        session is untouched), RequestTimeout if the write does not complete in ``timeout``
        (default ``send_timeout_s``) and LinkBrokenError if the channel breaks. On a timeout or
        a broken channel the channel is closed — only the channel: the link reconnects.
        """
        await self._send_on(self._require_session(), frame, timeout)

    async def request(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float,
        key: str | None = None,
        fail_on_drop: bool = False,
    ) -> Outcome:
        """Send a request and wait for its outcome; never raises for link or device trouble.

        Returns exactly one of :class:`Acknowledged` (with the reply's payload and side
        data), :class:`Rejected` (the device's code and message), :class:`TimedOut`,
        :class:`Cancelled` (``stop()``) or :class:`Unavailable` (not connected, or the write
        failed). ``timeout`` bounds the whole request: waiting for a window slot, the write,
        and the reply. ``key`` is an idempotency key the device uses to drop a duplicate.

        Raises InvalidRequestError (code ``invalid_request``) before anything is sent if
        ``op``, ``args``, ``key`` or ``timeout`` are invalid. If the calling task is
        cancelled, the request's waiter is removed and CancelledError propagates.

        The waiter is registered before the frame is written. If the link drops after the
        write, the request stays pending until its own deadline: an ack arriving on the next
        session still resolves it. With ``fail_on_drop=True`` it resolves as
        :class:`Unavailable` as soon as its session ends instead (for replies that can only
        come on the session that carried the request, like a firmware chunk's).
        """
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise InvalidRequestError(f"timeout must be a number of seconds, got {timeout!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise InvalidRequestError(f"timeout must be > 0 and finite, got {timeout!r}")
        call_args: Mapping[str, Any] = {} if args is None else args
        expires = self.clock.now() + timeout
        if self._usable_session() is None or self._window.locked():
            # Off the fast path, validate first: bad arguments fail at once, whatever the
            # link is doing. On the fast path the one build in the window validates, before
            # any await and before anything is written.
            self.driver.build_request(0, op, call_args, key)
            if self._usable_session() is None:
                return self._tally(Unavailable(cause=self._unavailable()))
            try:
                async with deadline(self.clock, expires):
                    await self._window.acquire()
            except TimeoutError:
                return self._tally(TimedOut(after_s=timeout, sent=False))
        else:
            await self._window.acquire()  # a free slot: returns without suspending
        try:
            return self._tally(
                await self._request_in_window(op, call_args, key, timeout, expires, fail_on_drop)
            )
        finally:
            self._window.release()

    async def call(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float,
        key: str | None = None,
        fail_on_drop: bool = False,
    ) -> Mapping[str, Any]:
        """Like :meth:`request`, but returns the acknowledged result or raises its error:
        RejectedError (``wire_code`` is the device's code), RequestTimeout,
        RequestCancelledError, DeviceUnavailableError/LinkClosedError/LinkBrokenError."""
        outcome = await self.request(op, args, timeout=timeout, key=key, fail_on_drop=fail_on_drop)
        return outcome.unwrap()

    async def _request_in_window(
        self,
        op: str,
        args: Mapping[str, Any],
        key: str | None,
        timeout: float,
        expires: float,
        fail_on_drop: bool,
    ) -> Outcome:
        session = self._usable_session()
        if session is None:
            return Unavailable(cause=self._unavailable())
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(future, timeout, self._protocol_errors, self._late_replies)
        seq = self._correlator.allocate_nowait(waiter, deadline=expires)
        try:
            frame = self.driver.build_request(seq, op, args, key)
        except BaseException:
            self._correlator.cancel(seq)
            raise
        self._arm_expiry()
        try:
            write_limit = min(self.send_timeout_s, max(expires - self.clock.now(), 0.0))
            try:
                await self._send_on(session, frame, write_limit)
            except RequestTimeout:
                return self._withdraw(seq, future, TimedOut(after_s=timeout, seq=seq))
            except InvalidRequestError:
                self._withdraw(seq, future, None)
                raise
            except KeeplinkError as exc:
                return self._withdraw(seq, future, Unavailable(cause=exc, seq=seq))
            self._requests_sent += 1
            if fail_on_drop:
                session.fragile.add(seq)
                try:
                    return await future
                finally:
                    session.fragile.discard(seq)
            return await future
        except asyncio.CancelledError:
            self._withdraw(seq, future, None)
            raise

    def _withdraw(
        self, seq: int, future: asyncio.Future[Outcome], outcome: Outcome | None
    ) -> Outcome:
        """Remove a request's waiter. If a reply won the race, its outcome stands."""
        removed = self._correlator.cancel(seq)
        if removed is None and future.done() and not future.cancelled():
            return future.result()
        if outcome is None:
            return Cancelled(reason="withdrawn", seq=seq)
        return outcome

    def _tally(self, outcome: Outcome) -> Outcome:
        self._outcomes[_OUTCOME_NAMES[type(outcome)]] += 1
        return outcome

    def _usable_session(self) -> _Session[F] | None:
        session = self._session
        return session if session is not None and session.broken is None else None

    def _unavailable(self) -> KeeplinkError:
        if self._stop_requested or self._state in (_S.STOPPING, _S.STOPPED, _S.IDLE):
            return LinkClosedError(f"link {self.name!r} is {self._state.value}")
        if self._state is _S.FAILED and self._terminal_error is not None:
            return self._terminal_error
        return DeviceUnavailableError(
            f"link {self.name!r} is not connected (state {self._state.value})"
        )

    def _arm_expiry(self) -> None:
        """Keep one clock timer at or before the earliest deadline in flight.

        Lazy on purpose: a timer that fires early (its request already resolved) finds
        nothing due and re-arms, which is far cheaper than cancelling and re-creating a
        timer for every request. Stopping the link cancels it.
        """
        due = self._correlator.next_deadline()
        if due is None:
            return
        if self._expiry is not None and self._expiry_at is not None and self._expiry_at <= due:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = due
        self._expiry = self.clock.call_at(due, self._expire_requests)

    def _disarm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = None
        self._expiry_at = None

    def _expire_requests(self) -> None:
        self._expiry = None
        self._expiry_at = None
        for pending in self._correlator.expire(self.clock.now()):
            waiter = pending.token
            if not waiter.future.done():
                waiter.future.set_result(
                    TimedOut(
                        after_s=waiter.timeout_s, seq=pending.seq, meanwhile=self._meanwhile(waiter)
                    )
                )
        self._arm_expiry()

    def _meanwhile(self, waiter: _Waiter) -> str | None:
        """What the peer sent since ``waiter``'s request was made that matched nothing."""
        parts = []
        malformed = self._protocol_errors - waiter.protocol_errors
        if malformed and self._last_malformed is not None:
            plural = "s" if malformed > 1 else ""
            reason = self._last_malformed[0].reason
            parts.append(f"{malformed} malformed frame{plural} (last: {reason})")
        late = self._late_replies - waiter.late_replies
        if late and self._last_late_reply is not None:
            plural = "replies" if late > 1 else "reply"
            parts.append(
                f"{late} {plural} for no request in flight (last: seq {self._last_late_reply[0]})"
            )
        return "meanwhile the device sent " + " and ".join(parts) if parts else None

    def _on_reply(self, session: _Session[F], reply: Reply) -> None:
        if reply.side:
            self.side_data.update(reply.side)
        if reply.side and self._events:
            self._events.emit(
                SideDataReceived(
                    link=self.name,
                    at=session.last_rx,
                    device_id=session.info.device_id,
                    values=dict(reply.side),
                )
            )
        pending = self._correlator.resolve(reply.seq)
        if pending is None:
            self._late_replies += 1
            self._last_late_reply = (reply.seq, session.last_rx)
            _log.debug(
                "link %r: reply for seq %d matches no request in flight (late or unknown); dropped",
                self.name,
                reply.seq,
            )
            return
        outcome: Outcome
        if reply.ok:
            outcome = Acknowledged(seq=pending.seq, result=reply.result, side=reply.side)
        else:
            outcome = Rejected(
                seq=pending.seq,
                code=reply.code or ErrorCode.REJECTED.value,
                message=reply.message or "rejected by the device",
            )
        if not pending.token.future.done():
            pending.token.future.set_result(outcome)

    def _cancel_requests(self, reason: str) -> None:
        for pending in self._correlator.drain():
            if not pending.token.future.done():
                pending.token.future.set_result(Cancelled(reason=reason, seq=pending.seq))
        self._disarm_expiry()

    # ------------------------------------------------------------------ state

    def _set_state(
        self,
        new: LinkState,
        *,
        error: KeeplinkError | None = None,
        retry_at: float | None = None,
    ) -> None:
        old = self._state
        if old is new:
            return
        self._state = check_link_transition(old, new)
        if error is not None:
            self._last_error = error
        waiters, self._state_waiters = self._state_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._events.emit(
            LinkStateChanged(
                link=self.name,
                old=old,
                new=new,
                at=self.clock.now(),
                attempt=self._attempt,
                error=ErrorInfo.of(error) if error is not None else None,
                retry_at=retry_at,
            )
        )

    def _advance(
        self,
        new: LinkState,
        *,
        error: KeeplinkError | None = None,
        retry_at: float | None = None,
    ) -> None:
        """A supervisor step. If a stop was requested (maybe by a callback), stop here."""
        if self._stop_requested:
            raise _StopRequested
        self._set_state(new, error=error, retry_at=retry_at)
        if self._stop_requested:
            raise _StopRequested

    async def _next_state_change(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._state_waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._state_waiters:
                self._state_waiters.remove(fut)

    def _require_session(self) -> _Session[F]:
        session = self._session
        if session is not None and session.broken is None:
            return session
        if self._stop_requested or self._state in (_S.STOPPING, _S.STOPPED, _S.IDLE):
            raise LinkClosedError(f"link {self.name!r} is {self._state.value}")
        raise DeviceUnavailableError(
            f"link {self.name!r} is not connected (state {self._state.value})"
        )

    # ------------------------------------------------------------------ supervisor

    async def _supervise(self) -> None:
        try:
            while True:
                error = await self._attempt_once()
                delay = self._delay_after(error)
                if delay is None:
                    self._terminal_error = error
                    _log.warning(
                        "link %r: %s [%s]; not retrying (terminal). Fix it and call connect().",
                        self.name,
                        error.message,
                        error.wire_code,
                    )
                    self._advance(_S.FAILED, error=error)
                    return
                self._retry_at = self.clock.now() + delay
                self._advance(_S.BACKOFF, error=error, retry_at=self._retry_at)
                await self._wait_backoff(self._retry_at)
        except (_StopRequested, asyncio.CancelledError):
            if not self._stop_requested:
                raise  # cancelled by someone else (the loop shutting down): let it through
        finally:
            self._retry_at = None
            if self._stop_requested:
                self._finish_stop()

    def _on_supervisor_done(self, task: asyncio.Task[None]) -> None:
        if self._supervisor is task:
            self._supervisor = None
            if self._stop_requested:
                # A supervisor cancelled before its first step never ran its finally.
                self._finish_stop()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Unreachable by design; if it ever happens, say so loudly rather than silently.
            _log.error("link %r: supervisor ended with an error", self.name, exc_info=exc)

    def _finish_stop(self) -> None:
        self._cancel_requests(f"link {self.name!r} stopped")
        if self._state is _S.STOPPED:
            return
        if self._state is not _S.STOPPING:
            self._set_state(_S.STOPPING)
        self._set_state(_S.STOPPED)

    def _delay_after(self, error: KeeplinkError) -> float | None:
        klass = error_class_of(error.code)
        delay = self.backoff.delay(self._attempt, klass, self._rng())
        self._attempt += 1
        return delay

    async def _wait_backoff(self, until: float) -> None:
        await self._backoff_wait.sleep_until(self.clock, until)

    async def _attempt_once(self) -> KeeplinkError:
        """One connect + handshake + session. Returns why it ended; raises only to stop."""
        self._advance(_S.CONNECTING)
        channel: Channel[F] | None = None
        slot: Slot | None = None
        connected = False
        try:
            if self.slots is not None:
                # Held for the channel's whole life; the pool bounds the wait itself.
                slot = await self.slots.acquire(self.name)
            try:
                async with deadline(self.clock, self.clock.now() + self.connect_timeout_s):
                    channel = await self.driver.open()
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"connect did not complete within {self.connect_timeout_s:g}s"
                ) from exc
            if slot is not None:
                # The generation check: if the pool aborted while we were connecting, this
                # closes the channel at once and raises AbortedError.
                slot.attach(channel.close)
            self._advance(_S.HANDSHAKING)
            try:
                async with deadline(self.clock, self.clock.now() + self.handshake_timeout_s):
                    info = await self.driver.handshake(_HandshakeChannel(self, channel))
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"handshake did not complete within {self.handshake_timeout_s:g}s"
                ) from exc
            connected = True
            return await self._run_session(channel, info)
        except (asyncio.CancelledError, _StopRequested):
            raise
        except KeeplinkError as exc:
            return self._attempt_failed(exc, connected)
        except Exception as exc:  # noqa: BLE001 - see below
            # Deliberately broad: the supervisor cannot die. A foreign exception from a
            # driver is classified; one we did not expect is logged once with a traceback.
            if not isinstance(exc, CLOSING_ERRORS):
                self._note_internal(exc, "connect/handshake")
            err = broken_from(exc, "connect")
            err.__cause__ = exc
            return self._attempt_failed(err, connected)
        finally:
            try:
                if channel is not None:
                    channel.close()
                    with contextlib.suppress(*CLOSING_ERRORS):
                        await channel.wait_closed()  # fully closed before the slot is free
            finally:
                if slot is not None:
                    slot.release()  # exactly once (idempotent), even if cancelled above

    def _attempt_failed(self, error: KeeplinkError, connected: bool) -> KeeplinkError:
        if not connected:
            self._failed_attempts += 1
        self._last_error = error
        if self._failures_logged.first(error.wire_code):
            _log.warning("link %r: %s [%s]", self.name, error.message, error.wire_code)
        else:
            _log.debug("link %r: again: %s [%s]", self.name, error.message, error.wire_code)
        return error

    def _note_internal(self, exc: BaseException, where: str) -> None:
        self._internal_errors += 1
        if not self._internal_logged.first(type(exc)):
            _log.debug("link %r: unexpected error in %s again: %r", self.name, where, exc)
        else:
            _log.error(
                "link %r: unexpected error in %s; reconnecting", self.name, where, exc_info=exc
            )

    # ------------------------------------------------------------------ session

    async def _run_session(self, channel: Channel[F], info: SessionInfo) -> KeeplinkError:
        now = self.clock.now()
        session = _Session(channel, info, now)
        self._session = session
        recovered = self._failures_logged.recovered()
        self._attempt = 0  # reset only here: after a completed handshake, never a bare connect
        self._connects += 1
        if recovered:
            _log.info("link %r: connected again (%s)", self.name, info.device_id or "?")
        else:
            _log.debug("link %r: connected (%s)", self.name, info.device_id or "?")
        try:
            self._advance(_S.CONNECTED)  # may raise _StopRequested (a callback stopped us)
        except BaseException:
            self._session = None
            raise

        tasks = [self._child(self._read_loop(session), "reader")]
        if self.heartbeat_s is not None and self.driver.heartbeat_frame() is not None:
            tasks.append(self._child(self._heartbeat_loop(session, self.heartbeat_s), "heartbeat"))
        if self._liveness_s is not None:
            tasks.append(self._child(self._watchdog(session, self._liveness_s), "liveness"))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._session = None
            reason = session.broken
            session.channel.close()
            results = await _reap(tasks)
        for task, result in zip(tasks, results, strict=True):
            if result is None:
                continue
            if isinstance(result, KeeplinkError) and task is tasks[0]:
                # The reader's end (EOF, reset): the reason unless something closed it first.
                reason = reason or result
                continue
            self._note_internal(result, task.get_name())
            if reason is None:
                reason = LinkBrokenError(f"internal error in {task.get_name()}: {result!r}")
                reason.__cause__ = result
        if reason is None:
            reason = LinkBrokenError("session ended")
        if session.broken is None:
            session.broken = reason
        for seq in list(session.fragile):
            pending = self._correlator.cancel(seq)
            if pending is not None and not pending.token.future.done():
                pending.token.future.set_result(Unavailable(cause=reason, seq=seq))
        self._disconnects += 1
        self._last_error = reason
        _log.warning("link %r: lost: %s [%s]", self.name, reason.message, reason.wire_code)
        self._failures_logged.note(reason.wire_code)
        self._advance(_S.LOST, error=reason)
        return reason

    def _child(self, coro: object, role: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(
            coro,  # type: ignore[arg-type]
            name=f"keeplink[{self.name}].{role}",
        )

    async def _read_loop(self, session: _Session[F]) -> None:
        """Reads until the channel ends; ending is this task's only way out (it raises)."""
        channel = session.channel
        if session.push is not None:
            # Frames now go straight from the transport to _on_item; this task only waits
            # for the end, which is still the one disconnect path.
            session.push.deliver_to(lambda item: self._on_item(session, item))
        while True:
            self._on_item(session, await channel.receive())

    def _on_item(self, session: _Session[F], item: F | Malformed) -> None:
        session.last_rx = self.clock.now()
        if isinstance(item, Malformed):
            self._on_malformed(item)
            return
        self._frames_in += 1
        try:
            self._dispatch(session, item)
        except Exception as exc:  # noqa: BLE001 - a driver's match_reply bug: see below
            # Called from the transport's callback: raising here would kill the transport
            # in asyncio's hands. Route it to the supervisor's log and end the session.
            self._note_internal(exc, "frame dispatch")
            err = LinkBrokenError(f"internal error while handling a frame: {exc!r}")
            err.__cause__ = exc
            session.break_(err)

    def _dispatch(self, session: _Session[F], frame: F) -> None:
        reply = self.driver.match_reply(frame)
        if reply is not None:
            self._on_reply(session, reply)
            return
        if self.driver.is_heartbeat_reply(frame):
            if not self._peer_answers_heartbeat:
                _log.debug("link %r: peer answers heartbeats; liveness applies", self.name)
            self._peer_answers_heartbeat = True
            return
        self._events.emit(FrameReceived(link=self.name, at=session.last_rx, frame=frame))

    def _on_malformed(self, item: Malformed) -> None:
        self._protocol_errors += 1
        self._last_malformed = (item, self.clock.now())
        if self._malformed_logged.first(ErrorCode.PROTOCOL_ERROR):
            _log.warning(
                "link %r: dropped malformed input from the peer: %s (sample %r) [%s]",
                self.name,
                item.reason,
                item.sample,
                ErrorCode.PROTOCOL_ERROR.value,
            )
        else:
            _log.debug("link %r: dropped malformed input: %s", self.name, item.reason)
        self._events.emit(
            ProtocolErrorSeen(
                link=self.name,
                at=self.clock.now(),
                reason=item.reason,
                sample=item.sample,
                count=self._protocol_errors,
            )
        )

    async def _send_on(self, session: _Session[F], frame: F, timeout: float | None) -> None:
        if session.broken is not None:
            raise LinkBrokenError(f"link {self.name!r}: session closed: {session.broken.message}")
        channel = session.channel
        try:
            if session.push is not None and session.push.send_nowait(frame):
                self._frames_out += 1  # queued without waiting: no deadline needed
                return
        except LinkBrokenError as exc:
            session.break_(exc)
            raise
        limit = self.send_timeout_s if timeout is None else timeout
        try:
            async with deadline(self.clock, self.clock.now() + limit):
                await channel.send(frame)
        except TimeoutError as exc:
            err = RequestTimeout(f"send did not complete within {limit:g}s; channel closed")
            session.break_(err)
            raise err from exc
        except LinkBrokenError as exc:
            session.break_(exc)
            raise
        self._frames_out += 1

    async def _heartbeat_loop(self, session: _Session[F], interval: float) -> None:
        """Fire-and-forget heartbeats. A failed send ends this loop quietly: the send path
        has already closed the channel and the reader will end the session."""
        frame = self.driver.heartbeat_frame()
        assert frame is not None
        while True:
            await sleep_until(self.clock, self.clock.now() + interval)
            try:
                await self._send_on(session, frame, None)
            except KeeplinkError as exc:
                _log.debug("link %r: heartbeat send failed: %s", self.name, exc)
                return
            self._heartbeats_sent += 1

    async def _watchdog(self, session: _Session[F], limit: float) -> None:
        recheck = self.heartbeat_s if self.heartbeat_s is not None else limit
        while True:
            applies = self._liveness_explicit or self._peer_answers_heartbeat
            now = self.clock.now()
            if not applies:
                await sleep_until(self.clock, now + recheck)
                continue
            due = session.last_rx + limit
            if now >= due:
                session.break_(
                    LinkBrokenError(
                        f"no frame from the peer for {limit:g}s (liveness limit)",
                        code=ErrorCode.TIMEOUT,
                    )
                )
                return
            await sleep_until(self.clock, due)


async def _reap(tasks: Iterable[asyncio.Task[None]]) -> list[BaseException | None]:
    """Cancel and await child tasks; return their outcomes, never raising theirs.

    If our own task is cancelled while reaping, the reaping still completes (the children
    are already cancelled, so it is quick) and the cancellation is re-raised afterwards.
    """
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    cancelled = False
    pending = {t for t in tasks if not t.done()}
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
    out: list[BaseException | None] = []
    for task in tasks:
        if task.cancelled():
            out.append(None)
        else:
            out.append(task.exception())
    if cancelled:
        raise asyncio.CancelledError
    return out
