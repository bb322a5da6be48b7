"""Submitting, waiting for and cancelling commands: a submit is stored (with what it
supersedes, in the same commit) before anything is attempted; a cancel abandons an attempt
in flight and waits until its outcome is persisted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from keeplink._core.commands import Command, CommandState
from keeplink._core.dispatch import Gate, cancelled
from keeplink._core.errors import CommandNotFoundError, ConflictError, QueueFullError
from keeplink.outbox._attempt import Sender
from keeplink.outbox._delivery import Dispatcher
from keeplink.outbox._state import PAGE, Shared
from keeplink.outbox._writes import Insert, Supersede, Update, Write, recovered

_log = logging.getLogger("keeplink.outbox")
_Q = CommandState


class Commands:
    """The command side of one outbox: submit, get, wait, cancel."""

    def __init__(
        self,
        shared: Shared,
        *,
        dispatcher: Dispatcher,
        sender: Sender,
        watch_expiry: Callable[[float], None],
    ) -> None:
        self._shared = shared
        self._dispatcher = dispatcher
        self._sender = sender
        self._watch_expiry = watch_expiry
        self._submitting: dict[str, int] = {}  # device -> submits being stored

    async def submit(self, command: Command, *, max_queued: int | None) -> Command:
        """Store ``command`` (a new one), within ``max_queued`` if given, and deliver it."""
        device = command.device
        if max_queued is not None:
            await self._reserve(device, max_queued)
        try:
            return await self._store(command)
        finally:
            if max_queued is not None:
                self._submitting[device] -= 1
                if not self._submitting[device]:
                    del self._submitting[device]

    async def _reserve(self, device: str, max_queued: int) -> None:
        """Hold one of the device's ``max_queued`` places, or raise QueueFullError."""
        self._submitting[device] = self._submitting.get(device, 0) + 1
        try:
            queued = await self._shared.store.count(device=device, states=[CommandState.QUEUED])
        except BaseException:
            self._submitting[device] -= 1
            raise
        # Submits being stored may already be in the count: counted twice, never missed.
        if queued + self._submitting[device] - 1 >= max_queued:
            self._submitting[device] -= 1
            if not self._submitting[device]:
                del self._submitting[device]
            raise QueueFullError(
                f"device {device!r} already has {queued} queued commands "
                f"(max_queued = {max_queued}); nothing was stored"
            )

    async def _store(self, command: Command) -> Command:
        shared = self._shared
        device, key, now = command.device, command.key, command.created_at
        writes: list[Write] = [Insert(command)]
        if key is not None:
            # Only older ones: two concurrent submits with one key must not supersede each
            # other, leaving nothing to deliver.
            writes.append(Supersede(device=device, key=key, by=command.id, now=now))
        results = await shared.store.apply(writes)
        stored = results[0]
        assert isinstance(stored, Command)
        shared.events.announce(stored, None)
        if key is not None:
            superseded = results[1]
            assert isinstance(superseded, list)
            for old in superseded:
                shared.events.announce(old, _Q.QUEUED)
        if stored.expires_at is not None:
            self._watch_expiry(stored.expires_at)
        state = await shared.device(device)
        if (
            state.known_empty
            and shared.fences is None
            and (state.task is None or state.handed)
            and shared.gate(state) is Gate.OPEN
            and len(state.handed or ()) < PAGE
        ):
            # The queue was empty, only this outbox writes to it, and the device takes
            # commands now: the pass about to run has the queue in hand (one store read
            # fewer between a submit and its delivery).
            state.handed = [*(state.handed or ()), stored]
            self._dispatcher.kick(device, handed=True)
        else:
            self._dispatcher.kick(device)
        return stored

    async def adopt(self, device: str) -> list[Command]:
        """Recover ``device``'s commands another node left ``sending`` (fenced writes)."""
        shared = self._shared
        cached = shared.devices.get(device)
        if cached is not None and cached.link is None:
            # Known here only from submits: forget what was read then (the last owner has
            # moved its cycle and breaker on since); attach() reads the record afresh.
            shared.devices.pop(device, None)
        sending = await shared.store.list(device=device, states=[_Q.SENDING], limit=10_000)
        if not sending:
            return []
        now = shared.clock.now()
        fence = shared.fence(device)
        changed = [recovered(command, now=now) for command in sending]
        results = await shared.store.apply([Update(new, _Q.SENDING, fence) for new in changed])
        adopted = [new for new, written in zip(changed, results, strict=True) if written]
        for command in adopted:
            _log.info(
                "outbox: command %s for %r was in flight on another node; now %s",
                command.id,
                device,
                command.state.value,
            )
            shared.events.announce(command, _Q.SENDING)
        self._dispatcher.kick(device)
        return adopted

    async def get(self, command_id: str) -> Command:
        command = await self._shared.store.get(command_id)
        if command is None:
            raise CommandNotFoundError(f"no command {command_id!r}")
        return command

    async def wait(self, command_id: str) -> Command:
        events = self._shared.events
        future = events.waiter(command_id)
        try:
            command = await self.get(command_id)
            if command.final:
                return command
            return await future
        finally:
            events.forget(command_id, future)

    async def cancel(self, command_id: str) -> Command:
        shared = self._shared
        inflight, requested = self._sender.inflight, self._sender.cancel_requested
        sending_elsewhere = 0
        abandoned = False
        try:
            while True:
                command = await self.get(command_id)
                if command.final and abandoned:
                    return command  # cancelled, or succeeded if the ack won the race
                if command.final:
                    raise ConflictError(
                        f"command {command_id} is already {command.state.value}; nothing to cancel"
                    )
                attempt = inflight.get(command_id)
                if attempt is not None:
                    # Being delivered: abandon the attempt, wait until its outcome is
                    # persisted (cancelled, or succeeded if the ack won), then look again.
                    requested.add(command_id)
                    if attempt.task is not None:
                        attempt.task.cancel()
                    await asyncio.shield(attempt.done)
                    abandoned = True
                    continue
                if command.state is _Q.SENDING:
                    # No attempt here: the read may predate the end of ours (look again), or
                    # another process is delivering it.
                    sending_elsewhere += 1
                    if sending_elsewhere > 1:
                        raise ConflictError(
                            f"command {command_id} is being delivered by another process"
                        )
                    continue
                done = cancelled(command, now=shared.clock.now())
                if await shared.store.update(done, expect=command.state):
                    shared.events.announce(done, command.state)
                    self._dispatcher.kick(command.device)  # the commands behind it may go now
                    return done
        finally:
            requested.discard(command_id)
