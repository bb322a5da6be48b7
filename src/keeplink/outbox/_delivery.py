"""The per-device delivery pass: one task a device, reading the head of its queue and
carrying out what the core's rules say (send it, let it wait, expire or fail it, resume
a parked device), until the queue is empty or its head has to wait."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Final

from keeplink._core.backoff import Backoff
from keeplink._core.commands import Command, CommandState
from keeplink._core.dispatch import (
    CheckPrecondition,
    Expire,
    Fail,
    Gate,
    Hold,
    Idle,
    PreconditionResult,
    Resume,
    Waiting,
    begin_cycles,
    next_step,
)
from keeplink._core.errors import ErrorClass, FencedError, KeeplinkError
from keeplink.outbox._attempt import Sender
from keeplink.outbox._state import PAGE, DeviceState, Pending, Shared
from keeplink.outbox._writes import PutDevice, Update
from keeplink.outbox.events import CommandWaiting, DeliveryParked

_log = logging.getLogger("keeplink.outbox")
_Q = CommandState

STORE_RETRY: Final = Backoff(initial_s=0.25, cap_s=10.0)
"""After a delivery pass failed (the store could not be reached), the next pass runs after
a capped, fully jittered backoff (devices do not retry in lockstep against a database that
is coming back); what it had settled is kept and written then."""


class Dispatcher:
    """Runs the delivery passes of every device, one task a device, through ``sender``."""

    def __init__(self, shared: Shared, *, sender: Sender) -> None:
        self._shared = shared
        self._sender = sender

    def kick(self, device: str, *, handed: bool = False) -> None:
        """Make sure a delivery pass runs for ``device`` soon (one task per device).
        ``handed``: the only change is a submit handed to the next pass; anything else
        makes the next pass read the queue."""
        shared = self._shared
        if not shared.started or shared.closing:
            return
        state = shared.devices.get(device)
        if state is None:
            return
        if not handed:
            state.known_empty = False
            state.handed = None
        state.again = True
        if state.fenced or state.detaching:
            return
        if state.task is None and (shared.gate(state) is Gate.OPEN or state.pending.writes):
            # A device that cannot be delivered to has nothing to do until it can (its
            # deadlines are watched by the expiry timer): no pass, no read of its queue.
            state.task = asyncio.get_running_loop().create_task(
                self._run_device(state), name=f"keeplink.outbox[{device}].deliver"
            )

    async def detach(self, device: str, *, settle: bool) -> None:
        """Stop delivering to ``device`` and forget it; ``settle``: the attempt in flight
        ends first (its outcome written), otherwise it is cancelled at once."""
        state = self._shared.devices.get(device)
        if state is None:
            return
        state.detaching = True
        if state.unsubscribe is not None:
            state.unsubscribe()
            state.unsubscribe = None
        if state.wake_timer is not None:
            state.wake_timer.cancel()
        task = state.task
        if task is not None:
            if not settle:
                task.cancel()
            await asyncio.wait([task])
        self._shared.devices.pop(device, None)

    def wake_at(self, state: DeviceState, when: float) -> None:
        if state.wake_timer is not None:
            state.wake_timer.cancel()
        state.wake_timer = self._shared.clock.call_at(when, lambda: self.kick(state.name))

    async def _run_device(self, state: DeviceState) -> None:
        shared = self._shared
        try:
            while state.again and not shared.closing:
                state.again = False
                await self._pass(state)
            if state.failing:
                state.failing = False
                state.failures = 0
                _log.info("outbox: delivery to %r works again", state.name)
        except asyncio.CancelledError:
            raise
        except FencedError as exc:
            # Another node owns the device now: stop here, for good (nothing is retried);
            # what this pass had settled but not written is the new owner's to recover.
            _log.info("outbox: %r: delivery stops: %s", state.name, exc.message)
            state.fenced = True
            state.pending = Pending()
            if shared.on_fenced is not None:
                shared.on_fenced(state.name)
        except Exception as exc:  # noqa: BLE001 - see below
            # Deliberately broad: a bug or a store outage must not silently stop a device's
            # deliveries. Logged once (a bug with its traceback; a typed error, such as an
            # unreachable store, in one line), then tried again soon.
            if not state.failing:
                state.failing = True
                if isinstance(exc, KeeplinkError):
                    _log.warning("outbox: delivery to %r paused, retrying: %s", state.name, exc)
                else:
                    _log.exception("outbox: delivery to %r failed; retrying", state.name)
            else:
                _log.debug("outbox: delivery to %r failed again", state.name, exc_info=True)
            if not shared.closing:
                delay = STORE_RETRY.delay(state.failures, ErrorClass.TRANSIENT, shared.rng())
                state.failures += 1
                self.wake_at(state, shared.clock.now() + (delay or STORE_RETRY.cap_s))
        finally:
            state.task = None
            if shared.closing:
                for undo in state.pending.on_abort:
                    undo()
                state.pending = Pending()

    def _hold(self, state: DeviceState, waiting: Waiting | None) -> None:
        if waiting == state.hold:
            return
        state.hold = waiting
        self._shared.events.emit(
            CommandWaiting(
                device=state.name,
                command_id=waiting.command if waiting is not None else None,
                waiting=waiting,
                at=self._shared.clock.now(),
            )
        )
        if waiting is not None and waiting.until is not None:
            self.wake_at(state, waiting.until)

    async def _pass(self, state: DeviceState) -> None:
        """Deliver the device's queue until it is empty or its head has to wait."""
        shared = self._shared
        pending = state.pending
        page: collections.deque[Command] = collections.deque()
        fresh = False  # the page was read after the last change
        verdict: tuple[str, PreconditionResult] | None = None
        while not shared.closing:
            if state.detaching or state.fenced:
                await shared.commit(pending)
                return
            if state.again or not (page or fresh):
                state.again = False
                await shared.commit(pending)  # a read must see every settled attempt
                handed, state.handed = state.handed, None
                if handed is not None and state.known_empty:
                    # Nothing was queued, and these are all that were submitted since.
                    page = collections.deque(sorted(handed, key=lambda c: (-c.priority, c.seq)))
                    fresh = True
                else:
                    page = collections.deque(await shared.store.queued(state.name, limit=PAGE))
                    fresh = len(page) < PAGE
                state.known_empty = False
            if state.pending_cycles:
                state.record = begin_cycles(state.record, state.pending_cycles)
                state.pending_cycles = 0
                pending.add(PutDevice(state.record, shared.fence(state.name)))
            head = page[0] if page else None
            step = next_step(
                head,
                record=state.record,
                gate=shared.gate(state),
                now=shared.clock.now(),
                verdict=verdict[1] if verdict and head and verdict[0] == head.id else None,
            )
            if isinstance(step, Idle | Hold):
                await shared.commit(pending)
                self._hold(state, step.waiting if isinstance(step, Hold) else None)
                # Idle: the page, read afresh, is used up: nothing is queued now.
                state.known_empty = isinstance(step, Idle) and not page and fresh
                return
            self._hold(state, None)
            if isinstance(step, Resume):
                state.record = step.record
                pending.add(PutDevice(step.record, shared.fence(state.name)))
                await shared.commit(pending)
                shared.events.emit(
                    DeliveryParked(
                        device=state.name, reason=None, until=None, at=shared.clock.now()
                    )
                )
            elif isinstance(step, CheckPrecondition):
                await shared.commit(pending)
                verdict = (step.command.id, await self._check(state, step.command))
            elif isinstance(step, Expire | Fail):
                new = step.expired if isinstance(step, Expire) else step.failed
                pending.add(
                    Update(new, _Q.QUEUED, shared.fence(state.name)),
                    shared.events.after_write(new, _Q.QUEUED),
                )
                await shared.commit(pending)
                page.popleft()
            else:
                page.popleft()
                if not await self._sender.send(state, step, pending):
                    fresh = False  # it came back to the queue: read the head again
                    page.clear()

    async def _check(self, state: DeviceState, command: Command) -> PreconditionResult:
        assert command.precondition is not None
        check = self._shared.outbox.preconditions[command.precondition]
        return await check(command, self._shared.context(state))
