"""One session: a channel past a completed handshake, and what arrives on it.

The one disconnect path lives here: whatever goes wrong (a failed or timed-out send, the
liveness limit, a bug while handling a frame) calls :meth:`Session.break_`, which closes the
*channel* and remembers the first reason; the reader then ends, and :meth:`Sessions.run`
returns that reason to the supervisor, which cleans up once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from keeplink._channel import PushChannel
from keeplink._clock import deadline
from keeplink._core.clock import Clock
from keeplink._core.errors import ErrorCode, KeeplinkError, LinkBrokenError, RequestTimeout
from keeplink._core.jsonline import Malformed
from keeplink._driver import Channel, Driver, Reply, SessionInfo
from keeplink._events import EventHub, FrameReceived, LinkEvent, ProtocolErrorSeen
from keeplink._link.heartbeat import Heartbeat
from keeplink._link.stats import Counters
from keeplink._logs import Repeats

__all__ = ["HandshakeChannel", "Session", "Sessions", "reap"]

F = TypeVar("F")

_log = logging.getLogger("keeplink.link")


class Session(Generic[F]):
    """One connected session. ``broken`` is the first reason it was closed for."""

    __slots__ = ("_clock", "_counters", "_send_timeout_s", "broken", "channel", "fragile",
                 "info", "last_ping", "last_rx", "name", "push", "started")  # fmt: skip

    def __init__(
        self,
        channel: Channel[F],
        info: SessionInfo,
        *,
        now: float,
        name: str,
        clock: Clock,
        counters: Counters,
        send_timeout_s: float,
    ) -> None:
        self.channel = channel
        # Decided once: isinstance() against a runtime-checkable Protocol is slow.
        self.push: PushChannel | None = channel if isinstance(channel, PushChannel) else None
        self.info = info
        self.name = name
        self.started = now
        self.last_rx = now
        """When the last frame (or malformed input) arrived from the peer."""
        self.last_ping = now
        """When the last heartbeat went out (the session's start before the first)."""
        self.broken: KeeplinkError | None = None
        self.fragile: set[int] = set()
        """Requests sent on this session with fail_on_drop: they end with it."""
        self._clock = clock
        self._counters = counters
        self._send_timeout_s = send_timeout_s

    def break_(self, reason: KeeplinkError) -> None:
        """Close the channel (only the channel) and remember why. The reader ends next."""
        if self.broken is None:
            self.broken = reason
        self.channel.close()

    def send_nowait(self, frame: F) -> bool:
        """Write ``frame`` without waiting if the channel takes it at once (True); False
        if the caller must await :meth:`send`. Raises like :meth:`send`."""
        if self.broken is not None:
            raise LinkBrokenError(f"link {self.name!r}: session closed: {self.broken.message}")
        push = self.push
        if push is None:
            return False
        try:
            if not push.send_nowait(frame):
                return False
        except LinkBrokenError as exc:
            self.break_(exc)
            raise
        self._counters.frames_out += 1
        return True

    async def send(self, frame: F, timeout: float | None = None) -> None:
        """Write one frame. A write that does not complete in ``timeout`` (default the
        link's ``send_timeout_s``) raises RequestTimeout and closes the channel; a broken
        channel raises LinkBrokenError (closed too). InvalidRequestError: nothing written."""
        if self.send_nowait(frame):
            return
        limit = self._send_timeout_s if timeout is None else timeout
        try:
            async with deadline(self._clock, self._clock.now() + limit):
                await self.channel.send(frame)
        except TimeoutError as exc:
            err = RequestTimeout(f"send did not complete within {limit:g}s; channel closed")
            self.break_(err)
            raise err from exc
        except LinkBrokenError as exc:
            self.break_(exc)
            raise
        self._counters.frames_out += 1


class Sessions(Generic[F]):
    """Runs sessions one at a time: the reader, the keepalive, inbound frames."""

    def __init__(
        self,
        *,
        name: str,
        driver: Driver[F],
        clock: Clock,
        events: EventHub[LinkEvent],
        counters: Counters,
        heartbeat: Heartbeat,
        send_timeout_s: float,
    ) -> None:
        self.name = name
        self.driver = driver
        self.clock = clock
        self.events = events
        self.counters = counters
        self.heartbeat = heartbeat
        self.send_timeout_s = send_timeout_s
        self.on_reply: Callable[[Session[F], Reply], None] = lambda session, reply: None
        """Where replies go (the requests room sets it)."""
        self.current: Session[F] | None = None
        self._malformed_logged: Repeats[ErrorCode] = Repeats()
        # Our own bugs: the first of a type at ERROR with its traceback, repeats at DEBUG.
        self._internal_logged: Repeats[type[BaseException]] = Repeats()

    def note_internal(self, exc: BaseException, where: str) -> None:
        """An unexpected exception was caught (a bug, ours or a driver's): count, log."""
        self.counters.internal_errors += 1
        if not self._internal_logged.first(type(exc)):
            _log.debug("link %r: unexpected error in %s again: %r", self.name, where, exc)
        else:
            _log.error(
                "link %r: unexpected error in %s; reconnecting", self.name, where, exc_info=exc
            )

    def usable(self) -> Session[F] | None:
        session = self.current
        return session if session is not None and session.broken is None else None

    def open(self, channel: Channel[F], info: SessionInfo) -> Session[F]:
        """The session a completed handshake gives; it is current until :meth:`run` ends."""
        session = Session(
            channel,
            info,
            now=self.clock.now(),
            name=self.name,
            clock=self.clock,
            counters=self.counters,
            send_timeout_s=self.send_timeout_s,
        )
        self.current = session
        return session

    async def run(self, session: Session[F]) -> KeeplinkError:
        """Carry the session until its channel ends; return why it ended."""
        tasks = [self._child(self._read_loop(session), "reader")]
        if self.heartbeat.needed:
            tasks.append(self._child(self.heartbeat.run(session), "keepalive"))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.current = None
            reason = session.broken
            session.channel.close()
            results = await reap(tasks)
        for task, result in zip(tasks, results, strict=True):
            if result is None:
                continue
            if isinstance(result, KeeplinkError) and task is tasks[0]:
                # The reader's end (EOF, reset): the reason unless something closed it first.
                reason = reason or result
                continue
            self.note_internal(result, task.get_name())
            if reason is None:
                reason = LinkBrokenError(f"internal error in {task.get_name()}: {result!r}")
                reason.__cause__ = result
        if reason is None:
            reason = LinkBrokenError("session ended")
        if session.broken is None:
            session.broken = reason
        return reason

    def _child(self, coro: object, role: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(
            coro,  # type: ignore[arg-type]
            name=f"keeplink[{self.name}].{role}",
        )

    async def _read_loop(self, session: Session[F]) -> None:
        """Reads until the channel ends; ending is this task's only way out (it raises)."""
        channel = session.channel
        if session.push is not None:
            # Frames now go straight from the transport to on_item; this task only waits
            # for the end, which is still the one disconnect path.
            session.push.deliver_to(functools.partial(self.on_item, session))
        while True:
            self.on_item(session, await channel.receive())

    def on_item(self, session: Session[F], item: F | Malformed) -> None:
        session.last_rx = self.clock.now()
        if isinstance(item, Malformed):
            self.on_malformed(item)
            return
        self.counters.frames_in += 1
        try:
            reply = self.driver.match_reply(item)
            if reply is not None:
                self.on_reply(session, reply)
            elif self.driver.is_heartbeat_reply(item):
                self.heartbeat.answered()
            else:
                self.events.emit(FrameReceived(link=self.name, at=session.last_rx, frame=item))
        except Exception as exc:  # noqa: BLE001 - a driver's match_reply bug: see below
            # Called from the transport's callback: raising here would kill the transport
            # in asyncio's hands. Route it to the supervisor's log and end the session.
            self.note_internal(exc, "frame dispatch")
            err = LinkBrokenError(f"internal error while handling a frame: {exc!r}")
            err.__cause__ = exc
            session.break_(err)

    def on_malformed(self, item: Malformed) -> None:
        counters = self.counters
        counters.protocol_errors += 1
        counters.last_malformed = (item, self.clock.now())
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
        self.events.emit(
            ProtocolErrorSeen(
                link=self.name,
                at=self.clock.now(),
                reason=item.reason,
                sample=item.sample,
                count=counters.protocol_errors,
            )
        )


class HandshakeChannel(Generic[F]):
    """The channel as a driver's handshake sees it: malformed input is the link's business."""

    def __init__(self, sessions: Sessions[F], channel: Channel[F]) -> None:
        self._sessions = sessions
        self._channel = channel

    async def receive(self) -> F:
        while True:
            item = await self._channel.receive()
            if isinstance(item, Malformed):
                self._sessions.on_malformed(item)
                continue
            self._sessions.counters.frames_in += 1
            return item

    async def send(self, frame: F) -> None:
        await self._channel.send(frame)
        self._sessions.counters.frames_out += 1


async def reap(tasks: Iterable[asyncio.Task[None]]) -> list[BaseException | None]:
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
