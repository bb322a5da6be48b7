"""The supervisor: attempt after attempt, until a stop or a terminal error.

Decide, then act: each step tells the lifecycle what happened, and the machine's answer
says what comes next (wait this long, or give up). The supervisor cannot die: whatever a
driver or a child task raises is classified or logged once with its traceback, and the
link tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from keeplink._channel import CLOSING_ERRORS
from keeplink._clock import Wakeable, deadline
from keeplink._core.classify import broken_from
from keeplink._core.errors import KeeplinkError, RequestTimeout
from keeplink._core.linkmachine import Action, Trigger
from keeplink._driver import Channel, Driver, SessionInfo
from keeplink._link.lifecycle import Lifecycle, StopRequested
from keeplink._link.requests import Requests
from keeplink._link.session import HandshakeChannel, Sessions
from keeplink._logs import Repeats
from keeplink._slots import Slot, SlotPool

__all__ = ["Supervisor"]

F = TypeVar("F")

_log = logging.getLogger("keeplink.link")


class Supervisor(Generic[F]):
    """Runs a link's attempts. One :meth:`run` at a time (the link's supervisor task)."""

    def __init__(
        self,
        *,
        name: str,
        driver: Driver[F],
        life: Lifecycle,
        sessions: Sessions[F],
        requests: Requests[F],
        slots: SlotPool | None,
        connect_timeout_s: float,
        handshake_timeout_s: float,
        on_stopped: Callable[[], None],
    ) -> None:
        self.name = name
        self.driver = driver
        self.life = life
        self.sessions = sessions
        self.requests = requests
        self.slots = slots
        self.connect_timeout_s = connect_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.on_stopped = on_stopped
        self.backoff_wait = Wakeable()
        self.task: asyncio.Task[None] | None = None
        """The supervisor task, until it has ended (and its done-callback has run)."""
        # The first failure of a kind at WARNING, repeats at DEBUG, recovery at INFO.
        self._failures_logged: Repeats[str] = Repeats(latest_only=True)  # by wire code

    @property
    def running(self) -> bool:
        # A task that has just ended (a terminal error) counts as gone even before its
        # done-callback has run.
        return self.task is not None and not self.task.done()

    def spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(
            self.run(), name=f"keeplink[{self.name}].supervisor"
        )
        self.task = task
        task.add_done_callback(self._on_done)

    def cancel(self) -> bool:
        """Cancel the running task (its end tears the link down); False if none runs."""
        if not self.running:
            return False
        assert self.task is not None
        self.task.cancel()
        return True

    async def wait_ended(self) -> None:
        task = self.task
        if task is not None and task is not asyncio.current_task():
            await asyncio.wait([task])

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if self.task is task:
            self.task = None
            if self.life.stop_requested:
                # A supervisor cancelled before its first step never ran its finally.
                self.on_stopped()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Unreachable by design; if it ever happens, say so loudly rather than silently.
            _log.error("link %r: supervisor ended with an error", self.name, exc_info=exc)

    async def run(self) -> None:
        life = self.life
        clock = life.clock
        try:
            while True:
                error = await self._attempt_once()
                step = life.advance(Trigger.ATTEMPT_ENDED, error=error)
                if Action.GIVE_UP in step.actions:
                    _log.warning(
                        "link %r: %s [%s]; not retrying (terminal). Fix it and call connect().",
                        self.name,
                        error.message,
                        error.wire_code,
                    )
                    return
                assert step.retry_at is not None  # WAIT_BACKOFF carries its time
                await self.backoff_wait.sleep_until(clock, step.retry_at)
                life.advance(Trigger.BACKOFF_DONE)
        except (StopRequested, asyncio.CancelledError):
            if not life.stop_requested:
                raise  # cancelled by someone else (the loop shutting down): let it through
        finally:
            if life.stop_requested:
                self.on_stopped()

    async def _attempt_once(self) -> KeeplinkError:
        """One connect + handshake + session. Returns why it ended; raises only to stop."""
        clock = self.life.clock
        channel: Channel[F] | None = None
        slot: Slot | None = None
        try:
            if self.slots is not None:
                # Held for the channel's whole life; the pool bounds the wait itself.
                slot = await self.slots.acquire(self.name)
            try:
                async with deadline(clock, clock.now() + self.connect_timeout_s):
                    channel = await self.driver.open()
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"connect did not complete within {self.connect_timeout_s:g}s"
                ) from exc
            if slot is not None:
                # The generation check: if the pool aborted while we were connecting, this
                # closes the channel at once and raises AbortedError.
                slot.attach(channel.close)
            self.life.advance(Trigger.OPENED)
            try:
                async with deadline(clock, clock.now() + self.handshake_timeout_s):
                    info = await self.driver.handshake(HandshakeChannel(self.sessions, channel))
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"handshake did not complete within {self.handshake_timeout_s:g}s"
                ) from exc
            return await self._run_session(channel, info)
        except (asyncio.CancelledError, StopRequested):
            raise
        except KeeplinkError as exc:
            return self._attempt_failed(exc)
        except Exception as exc:  # noqa: BLE001 - see below
            # Deliberately broad: the supervisor cannot die. A foreign exception from a
            # driver is classified; one we did not expect is logged once with a traceback.
            if not isinstance(exc, CLOSING_ERRORS):
                self.sessions.note_internal(exc, "connect/handshake")
            err = broken_from(exc, "connect")
            err.__cause__ = exc
            return self._attempt_failed(err)
        finally:
            try:
                if channel is not None:
                    channel.close()
                    with contextlib.suppress(*CLOSING_ERRORS):
                        await channel.wait_closed()  # fully closed before the slot is free
            finally:
                if slot is not None:
                    slot.release()  # exactly once (idempotent), even if cancelled above

    async def _run_session(self, channel: Channel[F], info: SessionInfo) -> KeeplinkError:
        session = self.sessions.open(channel, info)
        recovered = self._failures_logged.recovered()
        try:
            # Resets the attempts: after a completed handshake, never a bare connect.
            self.life.advance(Trigger.HANDSHAKE_DONE)  # may raise StopRequested (a callback)
        except BaseException:
            self.sessions.current = None
            raise
        device = session.info.device_id or "?"
        if recovered:
            _log.info("link %r: connected again (%s)", self.name, device)
        else:
            _log.debug("link %r: connected (%s)", self.name, device)
        reason = await self.sessions.run(session)
        _log.warning("link %r: lost: %s [%s]", self.name, reason.message, reason.wire_code)
        self._failures_logged.note(reason.wire_code)
        step = self.life.advance(Trigger.SESSION_ENDED, error=reason)
        if Action.CLEAN_UP_SESSION in step.actions:
            self.requests.fail_fragile(session, reason)
        return reason

    def _attempt_failed(self, error: KeeplinkError) -> KeeplinkError:
        self.life.last_error = error
        if self._failures_logged.first(error.wire_code):
            _log.warning("link %r: %s [%s]", self.name, error.message, error.wire_code)
        else:
            _log.debug("link %r: again: %s [%s]", self.name, error.message, error.wire_code)
        return error
