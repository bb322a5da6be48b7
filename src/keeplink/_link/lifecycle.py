"""A link's lifecycle: the link machine, the waiters for its changes, its events.

Every change of a link's state goes through :meth:`Lifecycle.fire`, which asks the machine
(:mod:`keeplink._core.linkmachine`, the one table) and then tells the world: wakes the
waiters and emits one frozen ``LinkStateChanged``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from keeplink._core.backoff import Backoff
from keeplink._core.clock import Clock
from keeplink._core.errors import DeviceUnavailableError, KeeplinkError, LinkClosedError
from keeplink._core.linkmachine import Action, LinkMachine, LinkState, Transition, Trigger
from keeplink._events import ErrorInfo, EventHub, LinkEvent, LinkStateChanged

__all__ = ["Lifecycle", "StopRequested"]

_STOPPING: Final = frozenset({LinkState.STOPPING, LinkState.STOPPED})


class StopRequested(Exception):
    """Internal: the owner asked the link to stop while the supervisor was mid-step."""


class Lifecycle:
    """The machine plus what hangs off a change: waiters, events, the errors to report."""

    __slots__ = ("_waiters", "clock", "events", "last_error", "machine", "name", "rng",
                 "terminal_error")  # fmt: skip

    def __init__(
        self,
        *,
        name: str,
        clock: Clock,
        backoff: Backoff,
        events: EventHub[LinkEvent],
        rng: Callable[[], float],
    ) -> None:
        self.name = name
        self.clock = clock
        self.events = events
        self.rng = rng
        self.machine = LinkMachine(backoff)
        self.last_error: KeeplinkError | None = None
        self.terminal_error: KeeplinkError | None = None
        """Why the link is ``failed``: what ``wait_connected()`` raises."""
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def state(self) -> LinkState:
        return self.machine.state

    @property
    def stop_requested(self) -> bool:
        """A stop was asked for and no start since (the state is stopping or stopped)."""
        return self.machine.state in _STOPPING

    def unavailable(self) -> KeeplinkError:
        """Why there is no session to use: the error a request's Unavailable carries."""
        state = self.machine.state
        if state in _STOPPING or state is LinkState.IDLE:
            return LinkClosedError(f"link {self.name!r} is {state.value}")
        if state is LinkState.FAILED and self.terminal_error is not None:
            return self.terminal_error
        return DeviceUnavailableError(f"link {self.name!r} is not connected (state {state.value})")

    def fire(self, trigger: Trigger, *, error: KeeplinkError | None = None) -> Transition:
        """Apply ``trigger`` (``error``: why an attempt or a session ended); announce it.

        Raises IllegalTransitionError (a bug) if the table refuses it; nothing changes then.
        """
        now = self.clock.now()
        draw = self.rng() if trigger is Trigger.ATTEMPT_ENDED else 0.0
        code = error.code if error is not None else None
        transition = self.machine.handle(trigger, now=now, code=code, draw=draw)
        if error is not None:
            self.last_error = error
        if trigger is Trigger.START:
            self.terminal_error = None
        elif Action.GIVE_UP in transition.actions:
            self.terminal_error = error  # before anyone hears of the failure
        if not transition.changed:
            return transition
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.events.emit(
            LinkStateChanged(
                link=self.name,
                old=transition.old,
                new=transition.new,
                at=now,
                attempt=transition.attempt,
                error=ErrorInfo.of(error) if error is not None else None,
                retry_at=transition.retry_at,
            )
        )
        return transition

    def advance(self, trigger: Trigger, *, error: KeeplinkError | None = None) -> Transition:
        """A supervisor step. If a stop was requested (maybe by a callback), stop here."""
        if self.stop_requested:
            raise StopRequested
        transition = self.fire(trigger, error=error)
        if self.stop_requested:
            raise StopRequested
        return transition

    async def next_change(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
