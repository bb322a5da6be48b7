"""The outbox: durable commands and the dispatcher that delivers them.

``submit()`` stores a command before anything is attempted. The dispatcher delivers a
device's queued commands when the device is present (debounced presence, announced online)
and its link is up, in order (priority, then FIFO), through the link's request API, with
the command's idempotency key. Every transition is persisted first (a compare-and-set on
the stored state) and only then announced. A command is delivered at most once per
presence cycle, attempts are bounded, and a per-device breaker parks delivery, with a
reason, after repeated failed cycles. After a crash, ``sending`` commands return to
``queued`` with their attempt counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from keeplink._clock import WallClock
from keeplink._core.clock import Clock, Timer
from keeplink._core.commands import (
    Command,
    CommandState,
    DeviceRecord,
    new_command,
    transition,
)
from keeplink._core.errors import (
    CommandNotFoundError,
    ConfigError,
    ConflictError,
    ErrorCode,
    ErrorInfo,
    InvalidRequestError,
    LinkClosedError,
)
from keeplink._core.outcomes import Acknowledged, Cancelled, Outcome, Rejected
from keeplink._core.presence import Presence, Source
from keeplink._core.states import LinkState
from keeplink._events import EventHub, LinkEvent, LinkStateChanged
from keeplink._link import Link
from keeplink.outbox.store import CommandStore
from keeplink.presence import PresenceChanged, PresenceTracker

__all__ = [
    "CommandStateChanged",
    "DeliveryContext",
    "DeliveryParked",
    "Executor",
    "Outbox",
    "OutboxEvent",
    "Precondition",
    "PreconditionResult",
    "min_online",
]

_log = logging.getLogger("keeplink.outbox")
_Q = CommandState

# Device codes that say "not now" rather than "no": a retry may succeed.
_RETRYABLE_REJECTIONS: Final = frozenset(
    {
        ErrorCode.OUT_OF_CONNECTION_SLOTS.value,
        ErrorCode.DEVICE_UNAVAILABLE.value,
        ErrorCode.TIMEOUT.value,
        ErrorCode.CONNECTION_FAILED.value,
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandStateChanged:
    """A command's new state, announced after it was persisted."""

    command: Command
    old: CommandState | None
    """None for a newly submitted command."""
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryParked:
    """The breaker parked (or resumed: ``reason`` None) delivery to a device."""

    device: str
    reason: str | None
    until: float | None
    at: float


OutboxEvent = object
"""CommandStateChanged, DeliveryParked, or an executor's own event (FirmwareProgress)."""


@dataclass(frozen=True, slots=True)
class PreconditionResult:
    """``ok``; or wait until ``retry_at`` (same cycle); or fail for good with ``reason``."""

    ok: bool
    retry_at: float | None = None
    reason: str | None = None

    @classmethod
    def passed(cls) -> PreconditionResult:
        return cls(ok=True)

    @classmethod
    def wait_until(cls, when: float) -> PreconditionResult:
        return cls(ok=False, retry_at=when)

    @classmethod
    def failed(cls, reason: str) -> PreconditionResult:
        return cls(ok=False, reason=reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryContext:
    """What a precondition or an executor may know at delivery time."""

    outbox: Outbox
    device: str
    now: float
    online_since: float | None
    cycle: int


class Precondition(Protocol):
    """Checked at delivery time, never at submit: the world may have changed meanwhile."""

    async def __call__(self, command: Command, ctx: DeliveryContext) -> PreconditionResult: ...


Executor = Callable[[Link[Any], Command, DeliveryContext], Awaitable[Outcome]]


async def min_online(command: Command, ctx: DeliveryContext) -> PreconditionResult:
    """``{"seconds": N}``: the device must have been online for N seconds (large transfers)."""
    seconds = command.precondition_args.get("seconds", 0)
    if not isinstance(seconds, int | float) or seconds < 0:
        return PreconditionResult.failed(f"min_online needs seconds >= 0, got {seconds!r}")
    if ctx.online_since is None:
        return PreconditionResult.wait_until(ctx.now + float(seconds))
    ready = ctx.online_since + float(seconds)
    return PreconditionResult.passed() if ctx.now >= ready else PreconditionResult.wait_until(ready)


@dataclass(slots=True)
class _Attempt:
    done: asyncio.Future[None]
    task: asyncio.Task[Outcome] | None = None


@dataclass(slots=True)
class _Device:
    name: str
    record: DeviceRecord
    link: Link[Any] | None = None
    task: asyncio.Task[None] | None = None
    again: bool = False
    pending_cycles: int = 0
    cycle_failed: bool = False
    wake_timer: Timer | None = None
    unsubscribe: Callable[[], None] | None = None
    hub: bool = False


class Outbox:
    """Durable commands for devices that come and go.

    Configuration is keyword-only. ``clock`` must be a wall clock (epoch seconds; the
    default) because deadlines outlive the process; tests pass a VirtualClock started at a
    realistic epoch. ``presence`` defaults to a tracker on the same clock; attach a link per
    device with :meth:`attach` (its state feeds presence as the highest-precedence source).
    """

    def __init__(
        self,
        store: CommandStore,
        *,
        clock: Clock | None = None,
        presence: PresenceTracker | None = None,
        request_timeout_s: float = 30.0,
        breaker_cycles: int = 3,
        park_s: float = 3600.0,
        preconditions: Mapping[str, Precondition] | None = None,
        executors: Mapping[str, Executor] | None = None,
    ) -> None:
        if not request_timeout_s > 0:
            raise ConfigError(f"outbox: request_timeout_s must be > 0, got {request_timeout_s!r}")
        if breaker_cycles < 1:
            raise ConfigError(f"outbox: breaker_cycles must be >= 1, got {breaker_cycles!r}")
        if not park_s > 0:
            raise ConfigError(f"outbox: park_s must be > 0, got {park_s!r}")
        self.store = store
        self.clock: Clock = clock if clock is not None else WallClock()
        self.presence = presence if presence is not None else PresenceTracker(clock=self.clock)
        self._owns_presence = presence is None
        self.request_timeout_s = request_timeout_s
        self.breaker_cycles = breaker_cycles
        self.park_s = park_s
        self.preconditions: dict[str, Precondition] = {"min_online": min_online}
        self.preconditions.update(preconditions or {})
        self.executors: dict[str, Executor] = dict(executors or {})
        self._events: EventHub[OutboxEvent] = EventHub("outbox")
        self._devices: dict[str, _Device] = {}
        self._waiters: dict[str, list[asyncio.Future[Command]]] = {}
        self._inflight: dict[str, _Attempt] = {}
        """Commands being delivered by this process: from before ``sending`` is persisted
        until its outcome is, so cancel() always finds an attempt it can wait for."""
        self._cancel_requested: set[str] = set()
        self._expiry: Timer | None = None
        self._expiry_at: float | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._unsubscribe_presence: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> list[Command]:
        """Open the store and recover from a crash: ``sending`` → ``queued`` (attempt
        counted) or ``failed`` when attempts are exhausted. Returns what was recovered."""
        await self.store.open()
        recovered = await self.store.recover(now=self.clock.now())
        for command in recovered:
            _log.warning(
                "outbox: command %s for %r was in flight at a crash; now %s (attempt %d/%d)",
                command.id,
                command.device,
                command.state.value,
                command.attempts,
                command.max_attempts,
            )
            self._announce(command, _Q.SENDING)
        self._unsubscribe_presence = self.presence.subscribe(self._on_presence)
        self._started = True
        await self._rearm_expiry()
        return recovered

    async def close(self) -> None:
        """Stop delivering and close the store. In-flight deliveries are cancelled; their
        commands stay ``sending`` in the store and return to ``queued`` on the next start —
        exactly what a crash would leave, so shutdown and crash share one recovery path."""
        self._closing = True
        for device in self._devices.values():
            if device.unsubscribe is not None:
                device.unsubscribe()
            if device.wake_timer is not None:
                device.wake_timer.cancel()
        tasks = [d.task for d in self._devices.values() if d.task is not None]
        if self._expiry_task is not None:
            tasks.append(self._expiry_task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._unsubscribe_presence is not None:
            self._unsubscribe_presence()
        if self._owns_presence:
            self.presence.close()
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(LinkClosedError("the outbox was closed"))
                    future.exception()
        self._waiters.clear()
        await self.store.close()

    async def __aenter__(self) -> Outbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def subscribe(self, callback: Callable[[OutboxEvent], object]) -> Callable[[], None]:
        """Typed events (CommandStateChanged, DeliveryParked, FirmwareProgress…), each
        announced after what it reports was persisted."""
        return self._events.subscribe(callback)

    def publish(self, event: OutboxEvent) -> None:
        """For executors: announce a typed event of their own (e.g. transfer progress)."""
        self._events.emit(event)

    # ------------------------------------------------------------------ devices

    async def attach(self, device: str, link: Link[Any], *, hub: bool = False) -> None:
        """Deliver ``device``'s commands through ``link``.

        For a device's own link, the link's state is its presence (the highest-precedence
        source). ``hub=True`` is for a link shared by many devices (a Modbus gateway, an
        MQTT broker, a cloud): a connected hub says nothing about one device behind it, so
        the link only gates delivery and presence must come from elsewhere (a probe, MQTT
        availability, mDNS).
        """
        state = await self._device(device)
        if state.unsubscribe is not None:
            state.unsubscribe()
        state.link = link
        state.hub = hub

        def on_link(event: LinkEvent) -> None:
            if isinstance(event, LinkStateChanged):
                self._on_link_state(device, event.new)

        state.unsubscribe = link.subscribe(on_link)
        self._on_link_state(device, link.state)

    async def resume(self, device: str) -> None:
        """Un-park a device the breaker parked, and deliver again."""
        state = await self._device(device)
        state.record = replace(state.record, parked_reason=None, parked_until=None, failed_cycles=0)
        await self.store.put_device(state.record)
        self._events.emit(
            DeliveryParked(device=device, reason=None, until=None, at=self.clock.now())
        )
        self._kick(device)

    async def device_record(self, device: str) -> DeviceRecord:
        return (await self._device(device)).record

    def _on_link_state(self, device: str, state: LinkState) -> None:
        hub = self._devices[device].hub if device in self._devices else False
        if state is LinkState.CONNECTED:
            if not hub:
                self.presence.report(device, Source.LINK, True)
            self._kick(device)
        elif not hub and state in (
            LinkState.LOST,
            LinkState.BACKOFF,
            LinkState.FAILED,
            LinkState.STOPPED,
        ):
            self.presence.report(device, Source.LINK, False)

    def _on_presence(self, change: PresenceChanged) -> None:
        if change.new is Presence.ONLINE and change.device in self._devices:
            self._devices[change.device].pending_cycles += 1
            self._kick(change.device)

    async def _device(self, name: str) -> _Device:
        state = self._devices.get(name)
        if state is None:
            record = await self.store.get_device(name) or DeviceRecord(device=name)
            state = self._devices.setdefault(name, _Device(name=name, record=record))
        return state

    # ------------------------------------------------------------------ commands

    async def submit(
        self,
        device: str,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        ttl_s: float | None = None,
        max_attempts: int = 3,
        priority: int = 0,
        idempotency_key: str | None = None,
        precondition: str | None = None,
        precondition_args: Mapping[str, Any] | None = None,
    ) -> Command:
        """Store a command, then deliver it if the device is present; returns it as stored.

        The state says what happened: ``queued`` when the device is away (it will be
        delivered when it comes back). A queued command with the same ``key`` for the same
        device is superseded. Raises InvalidRequestError for invalid arguments or an
        unknown precondition; nothing is stored then.
        """
        if precondition is not None and precondition not in self.preconditions:
            raise InvalidRequestError(
                f"unknown precondition {precondition!r}; known: {sorted(self.preconditions)}"
            )
        command = new_command(
            device=device,
            op=op,
            args=args,
            now=self.clock.now(),
            key=key,
            idempotency_key=idempotency_key,
            priority=priority,
            max_attempts=max_attempts,
            ttl_s=ttl_s,
            precondition=precondition,
            precondition_args=precondition_args,
        )
        stored = await self.store.insert(command)
        self._announce(stored, None)
        if key is not None:
            for old in await self.store.queued(device):
                # Only older ones: two concurrent submits with one key must not supersede
                # each other, leaving nothing to deliver.
                if old.key == key and old.seq < stored.seq:
                    await self._persist(
                        old,
                        transition(
                            old,
                            _Q.SUPERSEDED,
                            now=self.clock.now(),
                            last_error=ErrorInfo(
                                ErrorCode.CANCELLED.value, f"superseded by {stored.id}"
                            ),
                        ),
                    )
        if stored.expires_at is not None:
            await self._rearm_expiry()
        await self._device(device)
        self._kick(device)
        return stored

    async def get(self, command_id: str) -> Command:
        """The command as stored. Raises CommandNotFoundError."""
        command = await self.store.get(command_id)
        if command is None:
            raise CommandNotFoundError(f"no command {command_id!r}")
        return command

    async def list(
        self,
        *,
        device: str | None = None,
        states: Collection[CommandState] | None = None,
        limit: int = 1000,
    ) -> list[Command]:
        return await self.store.list(device=device, states=states, limit=limit)

    async def wait(self, command_id: str) -> Command:
        """Wait until the command is final (succeeded, failed, rejected, expired, cancelled,
        superseded) and return it. Raises CommandNotFoundError for an unknown id."""
        future: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(command_id, []).append(future)
        try:
            command = await self.get(command_id)
            if command.final:
                return command
            return await future
        finally:
            waiters = self._waiters.get(command_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(command_id, None)

    async def cancel(self, command_id: str) -> Command:
        """Cancel a queued or in-flight command; returns it as stored afterwards.

        Raises CommandNotFoundError for an unknown id and ConflictError (code ``conflict``)
        for a command that is already final. An in-flight request is abandoned; a device
        that already applied it keeps it applied.
        """
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
                attempt = self._inflight.get(command_id)
                if attempt is not None:
                    # Being delivered: abandon the attempt, wait until its outcome is
                    # persisted (cancelled, or succeeded if the ack won), then look again.
                    self._cancel_requested.add(command_id)
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
                cancelled = transition(
                    command,
                    _Q.CANCELLED,
                    now=self.clock.now(),
                    last_error=ErrorInfo(ErrorCode.CANCELLED.value, "cancelled by a user"),
                )
                if await self._persist(command, cancelled):
                    self._kick(command.device)  # the commands behind it may go now
                    return cancelled
        finally:
            self._cancel_requested.discard(command_id)

    # ------------------------------------------------------------------ persistence

    async def _persist(self, old: Command, new: Command) -> bool:
        """Compare-and-set, then announce. False if someone else changed it first."""
        if not await self.store.update(new, expect=old.state):
            return False
        self._announce(new, old.state)
        return True

    def _announce(self, command: Command, old: CommandState | None) -> None:
        self._events.emit(CommandStateChanged(command=command, old=old, at=self.clock.now()))
        if command.final:
            for future in self._waiters.get(command.id, []):
                if not future.done():
                    future.set_result(command)

    # ------------------------------------------------------------------ delivery

    def _kick(self, device: str) -> None:
        """Make sure a delivery pass runs for ``device`` soon (one task per device)."""
        if not self._started or self._closing:
            return
        state = self._devices.get(device)
        if state is None:
            return
        if state.task is not None:
            state.again = True
            return
        state.task = asyncio.get_running_loop().create_task(
            self._run_device(state), name=f"keeplink.outbox[{device}].deliver"
        )

    async def _run_device(self, state: _Device) -> None:
        try:
            while True:
                state.again = False
                await self._delivery_pass(state)
                if self._closing or not (state.again or state.pending_cycles):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - see below
            # Deliberately broad: a bug here must not silently stop a device's deliveries.
            # It is logged with its traceback; the next presence change or submit retries.
            _log.exception("outbox: delivery to %r failed unexpectedly", state.name)
        finally:
            state.task = None

    def _deliverable(self, state: _Device) -> bool:
        link = state.link
        return (
            link is not None
            and link.state is LinkState.CONNECTED
            and self.presence.presence(state.name) is Presence.ONLINE
        )

    async def _take_cycles(self, state: _Device) -> None:
        """Count (and persist) presence cycles announced since the last look."""
        if state.pending_cycles:
            state.record = replace(state.record, cycle=state.record.cycle + state.pending_cycles)
            state.pending_cycles = 0
            state.cycle_failed = False
            await self.store.put_device(state.record)

    async def _delivery_pass(self, state: _Device) -> None:
        now = self.clock.now()
        await self._take_cycles(state)
        if state.record.parked_reason is not None:
            until = state.record.parked_until
            if until is None or now < until:
                if until is not None:
                    self._wake_at(state, until)
                return
            await self.resume(state.name)
        while self._deliverable(state) and not self._closing:
            # One read of the queue per batch, walked in order: re-reading it for every
            # command made draining N commands cost N² row reads. Something new (a submit,
            # a presence change) ends the batch so the queue is read again, in order.
            state.again = False
            await self._take_cycles(state)  # a cycle may have begun during the last batch
            queue = await self.store.queued(state.name)
            if not queue:
                return
            for command in queue:
                if state.again or self._closing or not self._deliverable(state):
                    break
                if not await self._deliver_one(state, command):
                    return
                if state.record.parked_reason is not None:
                    return

    async def _deliver_one(self, state: _Device, command: Command) -> bool:
        """Deliver one queued command. False: stop this pass (wait for a cycle or a timer)."""
        now = self.clock.now()
        if command.expires_at is not None and now >= command.expires_at:
            await self._expire(command)
            return True
        if command.cycle >= state.record.cycle:
            return False  # already tried in this presence cycle: wait for the next one
        verdict = await self._check_precondition(state, command)
        if verdict == "wait":
            return False  # a timer wakes this device when it may be ready
        if verdict == "failed":
            return True
        sending = transition(
            command,
            _Q.SENDING,
            now=now,
            attempts=command.attempts + 1,
            cycle=state.record.cycle,
        )
        attempt = _Attempt(done=asyncio.get_running_loop().create_future())
        self._inflight[command.id] = attempt
        try:
            if not await self._persist(command, sending):
                return True  # cancelled or superseded meanwhile
            if command.id in self._cancel_requested:
                # cancel() arrived while "sending" was being committed: nothing was written.
                outcome: Outcome = Cancelled(reason="cancelled by a user")
            else:
                outcome = await self._execute(state, sending, attempt)
            await self._settle(state, sending, outcome)
        finally:
            self._inflight.pop(command.id, None)
            if not attempt.done.done():
                attempt.done.set_result(None)
        return True

    async def _check_precondition(self, state: _Device, command: Command) -> str:
        """ "ok", "wait" (a wake-up is scheduled) or "failed" (the command was failed)."""
        if command.precondition is None:
            return "ok"
        check = self.preconditions[command.precondition]
        verdict = await check(command, self._context(state))
        if verdict.ok:
            return "ok"
        if verdict.retry_at is not None:
            self._wake_at(state, verdict.retry_at)
            return "wait"
        failed = transition(
            command,
            _Q.FAILED,
            now=self.clock.now(),
            last_error=ErrorInfo(
                ErrorCode.PRECONDITION_FAILED.value,
                f"precondition {command.precondition} failed: {verdict.reason}",
            ),
        )
        await self._persist(command, failed)
        return "failed"

    def _context(self, state: _Device) -> DeliveryContext:
        return DeliveryContext(
            outbox=self,
            device=state.name,
            now=self.clock.now(),
            online_since=self.presence.online_since(state.name),
            cycle=state.record.cycle,
        )

    def _wake_at(self, state: _Device, when: float) -> None:
        if state.wake_timer is not None:
            state.wake_timer.cancel()
        state.wake_timer = self.clock.call_at(when, lambda: self._kick(state.name))

    async def _execute(self, state: _Device, command: Command, attempt: _Attempt) -> Outcome:
        link = state.link
        assert link is not None
        executor = self.executors.get(command.op)
        context = self._context(state)

        async def deliver() -> Outcome:
            # The request's coroutine is made here, inside the task, so a cancel that lands
            # before the task runs leaves no coroutine un-awaited.
            if executor is not None:
                return await executor(link, command, context)
            return await link.request(
                command.op,
                command.args,
                timeout=self.request_timeout_s,
                key=command.idempotency_key,
            )

        task: asyncio.Task[Outcome] = asyncio.get_running_loop().create_task(
            deliver(), name=f"keeplink.outbox[{state.name}].{command.id}"
        )
        attempt.task = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and command.id in self._cancel_requested:
                return Cancelled(reason="cancelled by a user")
            task.cancel()
            await asyncio.wait([task])
            raise

    async def _settle(self, state: _Device, sending: Command, outcome: Outcome) -> None:
        now = self.clock.now()
        if sending.id in self._cancel_requested:
            self._cancel_requested.discard(sending.id)
            if not isinstance(outcome, Acknowledged):
                await self._persist(
                    sending,
                    transition(
                        sending,
                        _Q.CANCELLED,
                        now=now,
                        last_error=ErrorInfo(ErrorCode.CANCELLED.value, "cancelled by a user"),
                    ),
                )
                return
        if isinstance(outcome, Acknowledged):
            done = transition(
                sending, _Q.SUCCEEDED, now=now, result=dict(outcome.result), last_error=None
            )
            await self._persist(sending, done)
            if state.record.failed_cycles:
                state.record = replace(state.record, failed_cycles=0)
                await self.store.put_device(state.record)
            return
        error = ErrorInfo.of(outcome.error)
        if isinstance(outcome, Rejected) and outcome.code not in _RETRYABLE_REJECTIONS:
            await self._persist(
                sending, transition(sending, _Q.REJECTED, now=now, last_error=error)
            )
            return
        # A retryable failure: not delivered this cycle.
        if sending.expires_at is not None and now >= sending.expires_at:
            nxt = transition(sending, _Q.EXPIRED, now=now, last_error=_expired_info(sending))
        elif sending.attempts >= sending.max_attempts:
            message = f"gave up after {sending.attempts} attempts; last: {error.message}"
            nxt = transition(sending, _Q.FAILED, now=now, last_error=ErrorInfo(error.code, message))
        else:
            nxt = transition(sending, _Q.QUEUED, now=now, last_error=error)
        await self._persist(sending, nxt)
        if nxt.state is _Q.QUEUED and nxt.expires_at is not None:
            await self._rearm_expiry()  # queued again: its deadline must be watched again
        if not state.cycle_failed:
            state.cycle_failed = True
            await self._count_failed_cycle(state, error)

    async def _count_failed_cycle(self, state: _Device, error: ErrorInfo) -> None:
        failed = state.record.failed_cycles + 1
        record = replace(state.record, failed_cycles=failed)
        if failed >= self.breaker_cycles:
            until = self.clock.now() + self.park_s
            reason = (
                f"delivery parked: {failed} presence cycles in a row failed "
                f"(last error [{error.code}] {error.message}); retrying after "
                f"{self.park_s:g}s, or call resume()"
            )
            record = replace(record, parked_reason=reason, parked_until=until)
            _log.warning("outbox: %r: %s", state.name, reason)
            await self.store.put_device(record)
            state.record = record
            self._events.emit(
                DeliveryParked(device=state.name, reason=reason, until=until, at=self.clock.now())
            )
            return
        await self.store.put_device(record)
        state.record = record

    # ------------------------------------------------------------------ expiry

    async def _expire(self, command: Command) -> None:
        expired = transition(
            command, _Q.EXPIRED, now=self.clock.now(), last_error=_expired_info(command)
        )
        if await self._persist(command, expired):
            self._kick(command.device)  # the commands behind it may go now

    async def _rearm_expiry(self) -> None:
        queued = await self.store.list(states=[_Q.QUEUED], limit=10000)
        due = min((c.expires_at for c in queued if c.expires_at is not None), default=None)
        if due == self._expiry_at and self._expiry is not None:
            return
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._expiry_at = due
        if due is not None and not self._closing:
            self._expiry = self.clock.call_at(due, self._on_expiry_timer)

    def _on_expiry_timer(self) -> None:
        self._expiry = None
        self._expiry_at = None
        if self._closing or (self._expiry_task is not None and not self._expiry_task.done()):
            return
        self._expiry_task = asyncio.get_running_loop().create_task(
            self._expire_due(), name="keeplink.outbox.expiry"
        )

    async def _expire_due(self) -> None:
        now = self.clock.now()
        for command in await self.store.list(states=[_Q.QUEUED], limit=10000):
            if command.expires_at is not None and command.expires_at <= now:
                await self._expire(command)
        await self._rearm_expiry()


def _expired_info(command: Command) -> ErrorInfo:
    return ErrorInfo(
        ErrorCode.EXPIRED.value,
        f"not delivered before its deadline ({command.attempts} attempt(s) made)",
    )
