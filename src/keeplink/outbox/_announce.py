"""Announcing what was persisted: the outbox's typed events, and the callers waiting for a
command to become final. Nothing is announced before the write it reports is committed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from keeplink._core.clock import Clock
from keeplink._core.commands import Command, CommandState
from keeplink._events import EventHub
from keeplink.outbox.events import CommandStateChanged, OutboxEvent


class Announcer:
    """The outbox's event hub and the futures of :meth:`~keeplink.outbox.Outbox.wait`."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._events: EventHub[OutboxEvent] = EventHub("outbox")
        self._waiters: dict[str, list[asyncio.Future[Command]]] = {}

    def subscribe(self, callback: Callable[[OutboxEvent], object]) -> Callable[[], None]:
        return self._events.subscribe(callback)

    def emit(self, event: OutboxEvent) -> None:
        self._events.emit(event)

    def announce(self, command: Command, old: CommandState | None) -> None:
        """``command`` was persisted, coming from state ``old``: say so, and answer the
        waiters of a final command."""
        self._events.emit(CommandStateChanged(command=command, old=old, at=self._clock.now()))
        if command.final:
            for future in self._waiters.get(command.id, []):
                if not future.done():
                    future.set_result(command)

    def after_write(self, command: Command, old: CommandState) -> Callable[[object], None]:
        """What to do once the compare-and-set write of ``command`` is committed."""

        def after(written: object) -> None:
            if written is True:
                self.announce(command, old)

        return after

    def waiter(self, command_id: str) -> asyncio.Future[Command]:
        """A future answered with the command once it is final (or failed at close)."""
        future: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(command_id, []).append(future)
        return future

    def forget(self, command_id: str, future: asyncio.Future[Command]) -> None:
        waiters = self._waiters.get(command_id, [])
        if future in waiters:
            waiters.remove(future)
        if not waiters:
            self._waiters.pop(command_id, None)

    def fail_waiters(self, error: Callable[[], BaseException]) -> None:
        """Answer every waiter with an ``error()`` of its own (the outbox is closing)."""
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error())
                    future.exception()
        self._waiters.clear()
