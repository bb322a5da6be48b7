"""One delivery attempt: ``sending`` persisted, the request made (or an executor run), the
outcome settled by the core's rules and the breaker moved on, ready for the next commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from keeplink._core.commands import Command, CommandState, DeviceRecord, transition
from keeplink._core.dispatch import Gate, Send, Settlement, breaker, settle
from keeplink._core.errors import ErrorInfo, InvalidRequestError, PreconditionFailedError
from keeplink._core.outcomes import Cancelled, Outcome
from keeplink.outbox._state import Attempt, DeviceState, Pending, Shared
from keeplink.outbox._writes import PutDevice, Update
from keeplink.outbox.events import DeliveryParked

_log = logging.getLogger("keeplink.outbox")
_Q = CommandState


class Sender:
    """Makes attempts, and knows the ones in flight (so that a cancel can abandon one).

    ``watch_expiry(when)`` makes sure the expiry timer fires by ``when`` (a command back in
    the queue keeps its deadline).
    """

    def __init__(self, shared: Shared, *, watch_expiry: Callable[[float], None]) -> None:
        self._shared = shared
        self._watch_expiry = watch_expiry
        self.inflight: dict[str, Attempt] = {}
        """Commands being delivered by this process: from before ``sending`` is persisted
        until its outcome is, so cancel() always finds an attempt it can wait for."""
        self.cancel_requested: set[str] = set()
        self.noted: dict[str, Command] = {}
        """A command in flight as its executor last noted it (:meth:`Outbox.note`): its
        outcome settles that copy, so a retry keeps the note."""

    async def send(self, state: DeviceState, step: Send, pending: Pending) -> bool:
        """Persist and deliver one command; its outcome joins ``pending``, to be committed
        with the next step's write. False if the command went back to the queue."""
        shared = self._shared
        outbox = shared.outbox
        clock = shared.clock
        sending = step.sending
        attempt = Attempt(done=asyncio.get_running_loop().create_future())
        self.inflight[sending.id] = attempt
        settled = False

        def finish(_: object = None) -> None:
            self.inflight.pop(sending.id, None)
            if state.in_flight == sending.id:
                state.in_flight = None
            if not attempt.done.done():
                attempt.done.set_result(None)

        try:
            pending.add(
                Update(sending, _Q.QUEUED, shared.fence(state.name)),
                shared.events.after_write(sending, _Q.QUEUED),
            )
            written = (await shared.commit(pending))[-1]
            if written is not True:
                return True  # cancelled or superseded meanwhile
            state.in_flight = sending.id
            episode = state.episode
            refused: InvalidRequestError | PreconditionFailedError | None = None
            if sending.id in self.cancel_requested:
                # cancel() arrived while "sending" was being committed: nothing was written.
                outcome: Outcome = Cancelled(reason="cancelled by a user")
            else:
                try:
                    outcome = await self._execute(state, sending, attempt)
                except (InvalidRequestError, PreconditionFailedError) as exc:
                    # This command can never be delivered as it is: the link (its driver)
                    # cannot carry it (a frame too long, args its protocol cannot say), or
                    # its executor found it broken here (the image file changed). Nothing
                    # went out; retrying would only block the queue behind it. It fails,
                    # with that error: the device refused nothing, and the breaker does
                    # not count it.
                    refused, outcome = exc, Cancelled(reason="refused before sending")
                finally:
                    # What the executor noted is the stored copy: settle that one.
                    sending = self.noted.pop(sending.id, sending)
            if refused is not None:
                settlement = Settlement(
                    transition(
                        sending, _Q.FAILED, now=clock.now(), last_error=ErrorInfo.of(refused)
                    )
                )
            else:
                settlement = settle(
                    sending,
                    outcome,
                    now=clock.now(),
                    live=episode == state.episode and shared.gate(state) is Gate.OPEN,
                    retry_after_s=outbox.retry_after_s,
                    jitter=shared.rng(),
                    cancel_requested=sending.id in self.cancel_requested,
                )
            settled = True
            done = settlement.command
            announce = shared.events.after_write(done, _Q.SENDING)

            def after(written: object) -> None:
                announce(written)
                finish()

            pending.add(Update(done, _Q.SENDING, shared.fence(state.name)), after)
            pending.on_abort.append(finish)
            old_record = state.record
            state.record = breaker(
                old_record,
                settlement,
                attempt_cycle=sending.cycle,
                now=clock.now(),
                breaker_cycles=outbox.breaker_cycles,
                park_s=outbox.park_s,
            )
            if state.record is not old_record:
                record = state.record
                pending.add(
                    PutDevice(record, shared.fence(state.name)),
                    lambda _: self._parked(old_record, record),
                )
            if done.state is _Q.QUEUED:
                if done.expires_at is not None:
                    self._watch_expiry(done.expires_at)
                await shared.commit(pending)  # it is the head again: commit before reading
                return False
            if sending.id in self.cancel_requested:
                await shared.commit(pending)  # cancel() waits for it
            return True
        finally:
            if not settled:
                finish()

    def _parked(self, old: DeviceRecord, new: DeviceRecord) -> None:
        if new.parked_reason is not None and old.parked_reason is None:
            _log.warning("outbox: %r: %s", new.device, new.parked_reason)
            self._shared.events.emit(
                DeliveryParked(
                    device=new.device,
                    reason=new.parked_reason,
                    until=new.parked_until,
                    at=self._shared.clock.now(),
                )
            )

    async def _execute(self, state: DeviceState, command: Command, attempt: Attempt) -> Outcome:
        link = state.link
        assert link is not None
        outbox = self._shared.outbox
        executor = outbox.executors.get(command.op)
        context = self._shared.context(state)

        async def deliver() -> Outcome:
            # The request's coroutine is made here, inside the task, so a cancel that lands
            # before the task runs leaves no coroutine un-awaited.
            if executor is not None:
                return await executor(link, command, context)
            args = {**command.args, **state.address} if state.address else command.args
            return await link.request(
                command.op,
                args,
                timeout=outbox.request_timeout_s,
                key=command.idempotency_key,
            )

        task: asyncio.Task[Outcome] = asyncio.get_running_loop().create_task(
            deliver(), name=f"keeplink.outbox[{state.name}].{command.id}"
        )
        attempt.task = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and command.id in self.cancel_requested:
                return Cancelled(reason="cancelled by a user")
            task.cancel()
            await asyncio.wait([task])
            raise
