"""The Link: one supervised connection to one endpoint.

It connects, runs the driver's handshake, keeps itself alive, reconnects with backoff, and
has exactly one disconnect path: whatever goes wrong (a failed send, a send timeout, a
heartbeat error, the liveness limit, EOF) closes the *channel* only; the reader then ends,
and the supervisor notices and cleans up once. Nothing in a send path ever stops the link.

The supervisor cannot die: whatever a child task or a user callback raises is logged once
with its traceback and the link reconnects. Only :meth:`Link.stop` or a terminal error (auth,
configuration) ends it.

This class is the facade: the rooms behind it are the lifecycle (the state machine), the
supervisor, the session, the heartbeat and the requests (see the package's docstring).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, Final, Generic, TypeVar

from keeplink._clock import SystemClock, deadline
from keeplink._core.backoff import Backoff
from keeplink._core.clock import Clock
from keeplink._core.errors import (
    ConfigError,
    DeviceUnavailableError,
    KeeplinkError,
    LinkClosedError,
    WaitTimeoutError,
)
from keeplink._core.linkmachine import Action, Trigger
from keeplink._core.outcomes import Outcome
from keeplink._core.states import LinkState
from keeplink._driver import Driver, SessionInfo
from keeplink._events import EventHub, LinkEvent
from keeplink._link.heartbeat import LIVENESS_RATIO, Heartbeat
from keeplink._link.lifecycle import Lifecycle
from keeplink._link.requests import Requests, check_timeout
from keeplink._link.session import Session, Sessions
from keeplink._link.stats import Counters, LinkStatistics, snapshot
from keeplink._link.supervisor import Supervisor
from keeplink._slots import SlotPool

__all__ = ["LIVENESS_RATIO", "Link"]

F = TypeVar("F")

DEFAULT_HEARTBEAT_S: Final = 30.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 10.0
DEFAULT_SEND_TIMEOUT_S: Final = 10.0

_log = logging.getLogger("keeplink.link")

_S = LinkState
_UNSET: Final = object()
_CLOSED: Final = frozenset({_S.STOPPING, _S.STOPPED, _S.IDLE})


class Link(Generic[F]):
    """One supervised connection to one endpoint, speaking one driver's protocol.

    Configuration is keyword-only. ``heartbeat_s=None`` sends no heartbeat. ``liveness_s``
    is the silence after which the peer is declared dead; by default it is
    ``LIVENESS_RATIO × heartbeat_s`` and applies when the driver's heartbeat is answered
    (for :attr:`HeartbeatReply.MAYBE`, once this peer has answered one); an explicit number
    always applies; ``None`` turns it off. No heartbeat is sent when a frame arrived from
    the peer in the interval: traffic is proof of life.

    Start it with :meth:`start` (or ``async with``), stop it with :meth:`stop`. Events go to
    :meth:`subscribe` callbacks; :meth:`statistics` gives a frozen snapshot.
    """

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
        explicit, limit = _check_config(
            name, heartbeat_s, liveness_s, connect_timeout_s, handshake_timeout_s, send_timeout_s
        )
        self.name = name
        self.driver = driver
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.backoff = backoff if backoff is not None else Backoff()
        self.heartbeat_s = heartbeat_s
        self.connect_timeout_s = connect_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.send_timeout_s = send_timeout_s
        self.slots = slots

        self._events: EventHub[LinkEvent] = EventHub(f"link {name!r}")
        self._counters = Counters()
        self._life = Lifecycle(
            name=name, clock=self.clock, backoff=self.backoff, events=self._events, rng=rng
        )
        heartbeat = Heartbeat(
            name=name,
            driver=driver,
            clock=self.clock,
            counters=self._counters,
            interval=heartbeat_s,
            limit=limit,
            explicit=explicit,
        )
        self._sessions: Sessions[F] = Sessions(
            name=name,
            driver=driver,
            clock=self.clock,
            events=self._events,
            counters=self._counters,
            heartbeat=heartbeat,
            send_timeout_s=send_timeout_s,
        )
        self._requests: Requests[F] = Requests(
            name=name,
            driver=driver,
            clock=self.clock,
            events=self._events,
            counters=self._counters,
            sessions=self._sessions,
            unavailable=self._life.unavailable,
            send_timeout_s=send_timeout_s,
        )
        self.side_data: dict[str, Any] = self._requests.side_data
        """Side data the device sent with its acks (e.g. ``rssi``), newest value per key."""
        self._supervisor = Supervisor(
            name=name,
            driver=driver,
            life=self._life,
            sessions=self._sessions,
            requests=self._requests,
            slots=slots,
            connect_timeout_s=connect_timeout_s,
            handshake_timeout_s=handshake_timeout_s,
            on_stopped=self._finish_stop,
        )

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> LinkState:
        return self._life.state

    @property
    def session(self) -> SessionInfo | None:
        """What the current session's handshake learned, or None when not connected."""
        session = self._sessions.current
        return session.info if session is not None else None

    @property
    def last_error(self) -> KeeplinkError | None:
        return self._life.last_error

    def subscribe(self, callback: Callable[[LinkEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` synchronously for every event; returns an unsubscribe.

        A callback that raises is logged and otherwise ignored: it cannot affect the link.
        To stop the link from inside a callback, call :meth:`stop_soon`.
        """
        return self._events.subscribe(callback)

    # ------------------------------------------------------------------ start and stop

    def start(self) -> None:
        """Start supervising (non-blocking). Idempotent while running.

        Works again after :meth:`stop` has finished, and after a terminal failure; both
        re-enable reconnecting. Raises LinkClosedError while a stop is still in progress.
        """
        if self._supervisor.running:
            # (A supervisor that has just ended, e.g. on a terminal error, counts as gone
            # even before its done-callback has run.)
            if self._life.stop_requested:
                raise LinkClosedError(
                    f"link {self.name!r} is stopping; await stop() before starting it again"
                )
            return
        asyncio.get_running_loop()  # before any change: outside a loop, nothing moves
        step = self._life.fire(Trigger.START)  # observable at once; the supervisor goes on
        if Action.SPAWN_SUPERVISOR in step.actions:
            self._supervisor.spawn()

    def connect_soon(self) -> None:
        """Connect as soon as possible: start the link if it is not running (a ``failed``
        link too), else skip the rest of its backoff wait. It does not wait for the
        connection (that is :meth:`wait_connected`), and never cancels a connect or
        handshake in progress.
        """
        if not self._supervisor.running or self._life.stop_requested:
            self.start()
        else:
            self.wake("connect")

    def wake(self, reason: str = "wake") -> bool:
        """A wake signal (mDNS announcement, presence online): skip the rest of a backoff wait.

        Returns True if a wait was cut short. Does nothing in any other state: in particular it
        never cancels a connect or a handshake in progress.
        """
        wait = self._supervisor.backoff_wait
        if self._life.state is _S.BACKOFF and wait.waiting:
            _log.debug("link %r: %s skips the backoff wait", self.name, reason)
            return wait.wake()
        return False

    def stop_soon(self) -> None:
        """Begin stopping without waiting (safe inside an event callback). Idempotent."""
        step = self._life.fire(Trigger.STOP)
        if Action.CANCEL_SUPERVISOR not in step.actions:
            return  # already stopping or stopped
        if not self._supervisor.cancel():
            self._finish_stop()  # nothing running: tear down here

    async def stop(self) -> None:
        """Stop the link and wait until it is stopped. Idempotent; never raises link errors.

        Closes the channel (swallowing what a closing socket raises), disables reconnect,
        cancels a backoff wait and resolves every pending request as cancelled. Afterwards
        the state is ``stopped`` and :meth:`start` may be called again.
        """
        self.stop_soon()
        await self._supervisor.wait_ended()

    async def __aenter__(self) -> Link[F]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _finish_stop(self) -> None:
        if self._life.state is _S.STOPPING:
            step = self._life.fire(Trigger.TORN_DOWN)
            if Action.CANCEL_REQUESTS in step.actions:
                self._requests.cancel_all(f"link {self.name!r} stopped")

    # ------------------------------------------------------------------ waits

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
        check_timeout(timeout)
        limit = deadline(self.clock, self.clock.now() + timeout)
        try:
            async with limit:
                return await self._wait_connected()
        except TimeoutError:
            if not limit.expired:
                raise
            raise WaitTimeoutError(
                f"link {self.name!r} did not connect within {timeout:g}s (it is {self.state.value})"
            ) from None

    async def _wait_connected(self) -> SessionInfo:
        life = self._life
        while True:
            session = self._sessions.current
            if life.state is _S.CONNECTED and session is not None:
                return session.info
            if life.state is _S.FAILED and life.terminal_error is not None:
                raise life.terminal_error
            if life.state in _CLOSED and (self._supervisor.task is None or life.stop_requested):
                raise LinkClosedError(f"link {self.name!r} is {life.state.value}")
            await life.next_change()

    async def wait_for_state(self, *states: LinkState) -> LinkState:
        """Wait until the link is in one of ``states`` (returns at once if it is)."""
        if not states:
            raise ValueError("wait_for_state needs at least one state")
        while self._life.state not in states:
            await self._life.next_change()
        return self._life.state

    def statistics(self) -> LinkStatistics:
        return snapshot(
            name=self.name,
            machine=self._life.machine,
            counters=self._counters,
            session=self._sessions.current,
            last_error=self._life.last_error,
            subscriber_errors=self._events.subscriber_errors,
            in_flight=len(self._requests.correlator),
        )

    # ------------------------------------------------------------------ traffic

    async def send(self, frame: F, *, timeout: float | None = None) -> None:
        """Write one frame on the current session.

        Raises LinkClosedError if the link is stopped, DeviceUnavailableError if it is not
        connected, InvalidRequestError if the frame cannot be encoded (nothing is written, the
        session is untouched), RequestTimeout if the write does not complete in ``timeout``
        (default ``send_timeout_s``) and LinkBrokenError if the channel breaks. On a timeout or
        a broken channel the channel is closed — only the channel: the link reconnects.
        """
        await self._require_session().send(frame, timeout)

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
        return await self._requests.request(
            op, args, timeout=timeout, key=key, fail_on_drop=fail_on_drop
        )

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
        outcome = await self._requests.request(
            op, args, timeout=timeout, key=key, fail_on_drop=fail_on_drop
        )
        return outcome.unwrap()

    def _require_session(self) -> Session[F]:
        session = self._sessions.usable()
        if session is not None:
            return session
        state = self._life.state
        if state in _CLOSED:
            raise LinkClosedError(f"link {self.name!r} is {state.value}")
        raise DeviceUnavailableError(f"link {self.name!r} is not connected (state {state.value})")


def _check_config(
    name: str,
    heartbeat_s: float | None,
    liveness_s: float | object | None,
    *timeouts: float,
) -> tuple[bool, float | None]:
    """Raise ConfigError for a bad number; return (liveness given, the liveness limit)."""
    if not name:
        raise ConfigError("a link needs a non-empty name")
    keys = ("connect_timeout_s", "handshake_timeout_s", "send_timeout_s")
    for key, value in zip(keys, timeouts, strict=True):
        if not value > 0:
            raise ConfigError(f"link {name!r}: {key} must be > 0, got {value!r}")
    if heartbeat_s is not None and not heartbeat_s > 0:
        raise ConfigError(f"link {name!r}: heartbeat_s must be > 0 or None, got {heartbeat_s!r}")
    if liveness_s is _UNSET:
        return False, None if heartbeat_s is None else LIVENESS_RATIO * heartbeat_s
    if liveness_s is not None and not (isinstance(liveness_s, int | float) and liveness_s > 0):
        raise ConfigError(f"link {name!r}: liveness_s must be > 0 or None, got {liveness_s!r}")
    return True, liveness_s
