"""The outbox: durable commands and the dispatcher that delivers them.

``submit()`` stores a command before anything is attempted. The dispatcher delivers a
device's queued commands when the device is deliverable (debounced presence online and its
link up), in order (priority, then FIFO), through the link's request API, with the
command's idempotency key.

The rules live in :mod:`keeplink._core.dispatch` (what to do next for a device, how an
outcome settles a command, the breaker); this module only carries their decisions out:
it reads the head of a queue, persists, sends, waits. Every transition is persisted first
(a compare-and-set on the stored state, group-committed by the store) and only then
announced. After a crash, ``sending`` commands return to ``queued`` with their attempt
counted.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from keeplink._clock import WallClock
from keeplink._core.backoff import Backoff
from keeplink._core.clock import Clock, Timer
from keeplink._core.commands import Command, CommandState, DeviceRecord, new_command, transition
from keeplink._core.dispatch import (
    CheckPrecondition,
    Expire,
    Fail,
    Gate,
    Hold,
    Idle,
    PreconditionResult,
    Resume,
    Send,
    Settlement,
    Waiting,
    begin_cycles,
    breaker,
    cancelled,
    expired_info,
    next_step,
    settle,
    unparked,
    wait_of,
)
from keeplink._core.errors import (
    CommandNotFoundError,
    ConfigError,
    ConflictError,
    ErrorClass,
    ErrorInfo,
    FencedError,
    InvalidRequestError,
    KeeplinkError,
    LinkClosedError,
    QueueFullError,
)
from keeplink._core.outcomes import Cancelled, Outcome
from keeplink._core.presence import Presence, Source
from keeplink._core.states import LinkState
from keeplink._events import EventHub, LinkEvent, LinkStateChanged
from keeplink._link import Link
from keeplink.outbox._protocol import CommandStore
from keeplink.outbox._writes import (
    Fence,
    Insert,
    PutDevice,
    Supersede,
    Update,
    Write,
    recovered,
)
from keeplink.outbox.events import (
    CommandStateChanged,
    CommandWaiting,
    DeliveryParked,
    OutboxEvent,
)
from keeplink.presence import PresenceChanged, PresenceTracker

__all__ = [
    "DeliveryContext",
    "Executor",
    "Outbox",
    "Precondition",
    "min_online",
]

_log = logging.getLogger("keeplink.outbox")
_Q = CommandState

PAGE: Final = 64
"""Queued commands read at once for one device: the head and what follows it, so draining
N commands costs N/64 reads, and a long queue is never read whole."""
EXPIRE_BATCH: Final = 500
"""Expired commands settled in one commit when the expiry timer fires."""
STORE_RETRY: Final = Backoff(initial_s=0.25, cap_s=10.0)
"""After a delivery pass failed (the store could not be reached), the next pass runs after
a capped, fully jittered backoff (devices do not retry in lockstep against a database that
is coming back); what it had settled is kept and written then."""


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
class _Pending:
    """Writes to commit together, what to do once they are committed, and what to undo if
    they never are (the pass was cancelled)."""

    writes: list[Write] = field(default_factory=list)
    after: list[Callable[[object], None] | None] = field(default_factory=list)
    on_abort: list[Callable[[], None]] = field(default_factory=list)

    def add(self, write: Write, after: Callable[[object], None] | None = None) -> None:
        self.writes.append(write)
        self.after.append(after)


@dataclass(slots=True)
class _Device:
    name: str
    record: DeviceRecord
    link: Link[Any] | None = None
    hub: bool = False
    address: Mapping[str, Any] = field(default_factory=dict)
    """The args that address the device on its link (the driver's ``device_args``), filled
    into every command delivered through it."""
    unsubscribe: Callable[[], None] | None = None
    task: asyncio.Task[None] | None = None
    again: bool = False
    """Something changed (a submit, a cancel, the gate): read the queue again."""
    deliverable: bool = False
    episode: int = 0
    """Times this process saw the device become deliverable: an attempt whose episode is
    still current when it ends was made on a link that stayed up."""
    pending_cycles: int = 0
    """Cycles begun but not yet persisted into ``record.cycle``."""
    hold: Waiting | None = None
    in_flight: str | None = None
    wake_timer: Timer | None = None
    fenced: bool = False
    """Another node took the device over: this outbox no longer delivers to it."""
    detaching: bool = False
    """:meth:`Outbox.detach` waits for the attempt in flight, then the pass ends."""
    pending: _Pending = field(default_factory=_Pending)
    """Settled outcomes waiting to share the next commit. Kept across passes: if a commit
    fails (the store is unreachable) they are written by the next pass."""
    failing: bool = False
    failures: int = 0
    """Passes in a row that failed (the backoff's attempt number)."""
    known_empty: bool = False
    """The last pass found no queued command, and nothing but this outbox's own submits has
    happened since (a single node: no other node submits): the next pass may take those
    submits as its page instead of reading the queue."""
    handed: list[Command] | None = None
    """This outbox's submits since the queue was known empty, for the next pass."""


class Outbox:
    """Durable commands for devices that come and go.

    Configuration is keyword-only. ``clock`` must be a wall clock (epoch seconds: the
    default, :class:`keeplink.WallClock`) because deadlines outlive the process; tests pass a
    VirtualClock started at a realistic epoch. ``presence`` defaults to a tracker on the same
    clock (``outbox.presence``); a tracker of your own must run on it too, since its
    ``online_since`` is compared with the outbox's time (``min_online``). Attach a link per
    device with :meth:`attach` (its state feeds presence as the highest-precedence source).
    ``retry_after_s`` is the delay before an attempt that failed on a live link (a lost ack)
    is made again in the same cycle, jittered down to half of it; ``rng`` draws that jitter.

    In a fleet of nodes sharing one store, ``fences(device)`` gives this node's current
    :class:`~keeplink.outbox.store.Fence` for a device it owns, and every write the
    dispatcher makes for the device carries it; when the store refuses one (another node
    took the device over), delivery to the device stops at once and ``on_fenced(device)``
    is called. Start such an outbox with ``start(recover=False)`` and call
    :meth:`adopt` for each device it takes over.
    """

    def __init__(
        self,
        store: CommandStore,
        *,
        clock: Clock | None = None,
        presence: PresenceTracker | None = None,
        request_timeout_s: float = 30.0,
        retry_after_s: float = 5.0,
        breaker_cycles: int = 3,
        park_s: float = 3600.0,
        preconditions: Mapping[str, Precondition] | None = None,
        executors: Mapping[str, Executor] | None = None,
        rng: Callable[[], float] = random.random,
        fences: Callable[[str], Fence | None] | None = None,
        on_fenced: Callable[[str], object] | None = None,
    ) -> None:
        if not request_timeout_s > 0:
            raise ConfigError(f"outbox: request_timeout_s must be > 0, got {request_timeout_s!r}")
        if not retry_after_s > 0:
            raise ConfigError(f"outbox: retry_after_s must be > 0, got {retry_after_s!r}")
        if breaker_cycles < 1:
            raise ConfigError(f"outbox: breaker_cycles must be >= 1, got {breaker_cycles!r}")
        if not park_s > 0:
            raise ConfigError(f"outbox: park_s must be > 0, got {park_s!r}")
        self.store = store
        self.clock: Clock = clock if clock is not None else WallClock()
        self.presence = presence if presence is not None else PresenceTracker(clock=self.clock)
        self._owns_presence = presence is None
        self.request_timeout_s = request_timeout_s
        self.retry_after_s = retry_after_s
        self.breaker_cycles = breaker_cycles
        self.park_s = park_s
        self.preconditions: dict[str, Precondition] = {"min_online": min_online}
        self.preconditions.update(preconditions or {})
        self.executors: dict[str, Executor] = dict(executors or {})
        self._rng = rng
        self._fences = fences
        self._on_fenced = on_fenced
        self._events: EventHub[OutboxEvent] = EventHub("outbox")
        self._devices: dict[str, _Device] = {}
        self._waiters: dict[str, list[asyncio.Future[Command]]] = {}
        self._inflight: dict[str, _Attempt] = {}
        self._submitting: dict[str, int] = {}  # device -> submits being stored
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

    async def start(self, *, recover: bool = True) -> list[Command]:
        """Open the store and recover from a crash: ``sending`` → ``queued`` (attempt
        counted) or ``failed`` when attempts are exhausted. Returns what was recovered.
        ``recover=False`` (a node of a fleet) leaves that to :meth:`adopt`, per device."""
        await self.store.open()
        recovered = await self.store.recover(now=self.clock.now()) if recover else []
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
        due = await self.store.next_expiry()
        if due is not None:
            self._watch_expiry(due)
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
        """Typed events (:data:`~keeplink.outbox.OutboxEvent`), each announced after what
        it reports was persisted."""
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

        A link whose driver has ``device_args(device)`` (the MQTT driver: ``{"device":
        device}``) addresses the device by those args: every command is delivered with them
        filled in, so a command names its device once (``submit(device, op, args)``), and a
        submit whose args name another value for one of them is an InvalidRequestError.
        Raises InvalidRequestError (nothing attached) if that driver does not serve
        ``device``.
        """
        addressing = getattr(link.driver, "device_args", None)
        address = dict(addressing(device)) if callable(addressing) else {}
        state = await self._device(device)
        if state.unsubscribe is not None:
            state.unsubscribe()
        state.link = link
        state.hub = hub
        state.address = address

        def on_link(event: LinkEvent) -> None:
            if isinstance(event, LinkStateChanged):
                self._on_link_state(device, event.new)

        state.unsubscribe = link.subscribe(on_link)
        self._on_link_state(device, link.state)

    async def resume(self, device: str) -> None:
        """Un-park a device the breaker parked, and deliver again."""
        state = await self._device(device)
        state.record = unparked(state.record)
        await self.store.apply([PutDevice(state.record, self._fence(device))])
        self._events.emit(
            DeliveryParked(device=device, reason=None, until=None, at=self.clock.now())
        )
        self._kick(device)

    async def detach(self, device: str, *, settle: bool = True) -> None:
        """Stop delivering to ``device`` and forget it (its link is no longer watched).

        ``settle``: an attempt in flight ends first (bounded by its own timeout) and its
        outcome is written: a graceful handoff. Otherwise it is cancelled at once and its
        command stays ``sending`` for the next owner to recover (:meth:`adopt`).
        """
        state = self._devices.get(device)
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
        self._devices.pop(device, None)

    async def adopt(self, device: str) -> list[Command]:
        """Take ``device`` over from a node that stopped or died: its commands left
        ``sending`` go back to ``queued`` (the attempt counted) or to ``failed`` when their
        attempts are used up, as after a crash. Returns them. The writes are fenced."""
        cached = self._devices.get(device)
        if cached is not None and cached.link is None:
            # Known here only from submits: forget what was read then (the last owner has
            # moved its cycle and breaker on since); attach() reads the record afresh.
            self._devices.pop(device, None)
        sending = await self.store.list(device=device, states=[_Q.SENDING], limit=10_000)
        if not sending:
            return []
        now = self.clock.now()
        fence = self._fence(device)
        changed = [recovered(command, now=now) for command in sending]
        results = await self.store.apply([Update(new, _Q.SENDING, fence) for new in changed])
        adopted = [new for new, written in zip(changed, results, strict=True) if written]
        for command in adopted:
            _log.info(
                "outbox: command %s for %r was in flight on another node; now %s",
                command.id,
                device,
                command.state.value,
            )
            self._announce(command, _Q.SENDING)
        self._kick(device)
        return adopted

    def wake(self, device: str) -> None:
        """Look at ``device``'s queue now (a submit on another node, a notification)."""
        self._kick(device)

    async def device_record(self, device: str) -> DeviceRecord:
        return (await self._device(device)).record

    def waiting(self, command: Command) -> Waiting | None:
        """Why a queued command is not going out right now (parked, a precondition, a retry
        time, behind another command, the device away or its link down), or ``None``: it
        is about to go, or it is not queued. Answers from memory, at once."""
        state = self._devices.get(command.device)
        return wait_of(
            command,
            record=state.record if state is not None else None,
            gate=self._gate(state),
            in_flight=state.in_flight if state is not None else None,
            hold=state.hold if state is not None else None,
        )

    def _gate(self, state: _Device | None) -> Gate:
        if state is None or state.link is None:
            return Gate.NO_LINK
        if state.link.state is not LinkState.CONNECTED:
            return Gate.LINK_DOWN
        if self.presence.presence(state.name) is not Presence.ONLINE:
            return Gate.OFFLINE
        return Gate.OPEN

    def _on_link_state(self, device: str, state: LinkState) -> None:
        hub = self._devices[device].hub if device in self._devices else False
        if not hub and state is LinkState.CONNECTED:
            self.presence.report(device, Source.LINK, True)
        elif not hub and state in (
            LinkState.LOST,
            LinkState.BACKOFF,
            LinkState.FAILED,
            LinkState.STOPPED,
        ):
            self.presence.report(device, Source.LINK, False)
        self._refresh(device)

    def _on_presence(self, change: PresenceChanged) -> None:
        self._refresh(change.device)

    def _refresh(self, device: str) -> None:
        """Look at the gate again: becoming deliverable begins a new cycle."""
        state = self._devices.get(device)
        if state is None:
            return
        deliverable = self._gate(state) is Gate.OPEN
        if deliverable and not state.deliverable:
            state.episode += 1
            state.pending_cycles += 1
            state.deliverable = True
            self._kick(device)
        elif not deliverable:
            state.deliverable = False

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
        max_queued: int | None = None,
    ) -> Command:
        """Store a command, then deliver it if the device is present; returns it as stored.

        The state says what happened: ``queued`` when the device is away (it will be
        delivered when it comes back). A queued command with the same ``key`` for the same
        device is superseded, in the same commit. Raises InvalidRequestError for invalid
        arguments or an unknown precondition; nothing is stored then.

        ``max_queued`` bounds the device's queue: a submit that finds that many commands
        queued (counting submits of this outbox still being stored, so concurrent submits
        never overshoot it) raises QueueFullError and stores nothing.
        """
        if precondition is not None and precondition not in self.preconditions:
            raise InvalidRequestError(
                f"unknown precondition {precondition!r}; known: {sorted(self.preconditions)}"
            )
        attached = self._devices.get(device)
        if attached is not None and args is not None:
            _check_address(device, attached.address, args)
        now = self.clock.now()
        command = new_command(
            device=device,
            op=op,
            args=args,
            now=now,
            key=key,
            idempotency_key=idempotency_key,
            priority=priority,
            max_attempts=max_attempts,
            ttl_s=ttl_s,
            precondition=precondition,
            precondition_args=precondition_args,
        )
        if max_queued is not None:
            await self._reserve(device, max_queued)
        try:
            return await self._store_submit(command)
        finally:
            if max_queued is not None:
                self._submitting[device] -= 1
                if not self._submitting[device]:
                    del self._submitting[device]

    async def _reserve(self, device: str, max_queued: int) -> None:
        """Hold one of the device's ``max_queued`` places, or raise QueueFullError."""
        self._submitting[device] = self._submitting.get(device, 0) + 1
        try:
            queued = await self.store.count(device=device, states=[CommandState.QUEUED])
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

    async def _store_submit(self, command: Command) -> Command:
        device, key, now = command.device, command.key, command.created_at
        writes: list[Write] = [Insert(command)]
        if key is not None:
            # Only older ones: two concurrent submits with one key must not supersede each
            # other, leaving nothing to deliver.
            writes.append(Supersede(device=device, key=key, by=command.id, now=now))
        results = await self.store.apply(writes)
        stored = results[0]
        assert isinstance(stored, Command)
        self._announce(stored, None)
        if key is not None:
            superseded = results[1]
            assert isinstance(superseded, list)
            for old in superseded:
                self._announce(old, _Q.QUEUED)
        if stored.expires_at is not None:
            self._watch_expiry(stored.expires_at)
        state = await self._device(device)
        if (
            state.known_empty
            and self._fences is None
            and (state.task is None or state.handed)
            and self._gate(state) is Gate.OPEN
            and len(state.handed or ()) < PAGE
        ):
            # The queue was empty, only this outbox writes to it, and the device takes
            # commands now: the pass about to run has the queue in hand (one store read
            # fewer between a submit and its delivery).
            state.handed = [*(state.handed or ()), stored]
            self._kick(device, handed=True)
        else:
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
        newest: bool = False,
    ) -> list[Command]:
        """Commands by submission order, oldest first (``newest``: newest first)."""
        return await self.store.list(device=device, states=states, limit=limit, newest=newest)

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
                done = cancelled(command, now=self.clock.now())
                if await self.store.update(done, expect=command.state):
                    self._announce(done, command.state)
                    self._kick(command.device)  # the commands behind it may go now
                    return done
        finally:
            self._cancel_requested.discard(command_id)

    # ------------------------------------------------------------------ announcing

    def _announce(self, command: Command, old: CommandState | None) -> None:
        self._events.emit(CommandStateChanged(command=command, old=old, at=self.clock.now()))
        if command.final:
            for future in self._waiters.get(command.id, []):
                if not future.done():
                    future.set_result(command)

    def _announcer(self, command: Command, old: CommandState) -> Callable[[object], None]:
        """What to do once the compare-and-set write of ``command`` is committed."""

        def after(written: object) -> None:
            if written is True:
                self._announce(command, old)

        return after

    async def _commit(self, pending: _Pending) -> builtins.list[object]:
        """Commit ``pending`` in one store call, then run what follows each write."""
        if not pending.writes:
            return []
        writes, after = pending.writes, pending.after
        results = await self.store.apply(writes)  # on an error, pending keeps them
        if pending.writes is writes:
            pending.writes, pending.after, pending.on_abort = [], [], []
        for result, then in zip(results, after, strict=True):
            if then is not None:
                then(result)
        return builtins.list(results)

    # ------------------------------------------------------------------ delivery

    def _kick(self, device: str, *, handed: bool = False) -> None:
        """Make sure a delivery pass runs for ``device`` soon (one task per device).
        ``handed``: the only change is a submit handed to the next pass; anything else
        makes the next pass read the queue."""
        if not self._started or self._closing:
            return
        state = self._devices.get(device)
        if state is None:
            return
        if not handed:
            state.known_empty = False
            state.handed = None
        state.again = True
        if state.fenced or state.detaching:
            return
        if state.task is None and (self._gate(state) is Gate.OPEN or state.pending.writes):
            # A device that cannot be delivered to has nothing to do until it can (its
            # deadlines are watched by the expiry timer): no pass, no read of its queue.
            state.task = asyncio.get_running_loop().create_task(
                self._run_device(state), name=f"keeplink.outbox[{device}].deliver"
            )

    async def _run_device(self, state: _Device) -> None:
        try:
            while state.again and not self._closing:
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
            state.pending = _Pending()
            if self._on_fenced is not None:
                self._on_fenced(state.name)
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
            if not self._closing:
                delay = STORE_RETRY.delay(state.failures, ErrorClass.TRANSIENT, self._rng())
                state.failures += 1
                self._wake_at(state, self.clock.now() + (delay or STORE_RETRY.cap_s))
        finally:
            state.task = None
            if self._closing:
                for undo in state.pending.on_abort:
                    undo()
                state.pending = _Pending()

    def _fence(self, device: str) -> Fence | None:
        return self._fences(device) if self._fences is not None else None

    def _hold(self, state: _Device, waiting: Waiting | None) -> None:
        if waiting == state.hold:
            return
        state.hold = waiting
        self._events.emit(
            CommandWaiting(
                device=state.name,
                command_id=waiting.command if waiting is not None else None,
                waiting=waiting,
                at=self.clock.now(),
            )
        )
        if waiting is not None and waiting.until is not None:
            self._wake_at(state, waiting.until)

    async def _pass(self, state: _Device) -> None:
        """Deliver the device's queue until it is empty or its head has to wait."""
        pending = state.pending
        page: collections.deque[Command] = collections.deque()
        fresh = False  # the page was read after the last change
        verdict: tuple[str, PreconditionResult] | None = None
        while not self._closing:
            if state.detaching or state.fenced:
                await self._commit(pending)
                return
            if state.again or not (page or fresh):
                state.again = False
                await self._commit(pending)  # a read must see every settled attempt
                handed, state.handed = state.handed, None
                if handed is not None and state.known_empty:
                    # Nothing was queued, and these are all that were submitted since.
                    page = collections.deque(sorted(handed, key=lambda c: (-c.priority, c.seq)))
                    fresh = True
                else:
                    page = collections.deque(await self.store.queued(state.name, limit=PAGE))
                    fresh = len(page) < PAGE
                state.known_empty = False
            if state.pending_cycles:
                state.record = begin_cycles(state.record, state.pending_cycles)
                state.pending_cycles = 0
                pending.add(PutDevice(state.record, self._fence(state.name)))
            head = page[0] if page else None
            step = next_step(
                head,
                record=state.record,
                gate=self._gate(state),
                now=self.clock.now(),
                verdict=verdict[1] if verdict and head and verdict[0] == head.id else None,
            )
            if isinstance(step, Idle | Hold):
                await self._commit(pending)
                self._hold(state, step.waiting if isinstance(step, Hold) else None)
                # Idle: the page, read afresh, is used up: nothing is queued now.
                state.known_empty = isinstance(step, Idle) and not page and fresh
                return
            self._hold(state, None)
            if isinstance(step, Resume):
                state.record = step.record
                pending.add(PutDevice(step.record, self._fence(state.name)))
                await self._commit(pending)
                self._events.emit(
                    DeliveryParked(device=state.name, reason=None, until=None, at=self.clock.now())
                )
            elif isinstance(step, CheckPrecondition):
                await self._commit(pending)
                verdict = (step.command.id, await self._check(state, step.command))
            elif isinstance(step, Expire | Fail):
                new = step.expired if isinstance(step, Expire) else step.failed
                pending.add(
                    Update(new, _Q.QUEUED, self._fence(state.name)),
                    self._announcer(new, _Q.QUEUED),
                )
                await self._commit(pending)
                page.popleft()
            else:
                page.popleft()
                if not await self._send(state, step, pending):
                    fresh = False  # it came back to the queue: read the head again
                    page.clear()

    async def _check(self, state: _Device, command: Command) -> PreconditionResult:
        assert command.precondition is not None
        check = self.preconditions[command.precondition]
        return await check(command, self._context(state))

    async def _send(self, state: _Device, step: Send, pending: _Pending) -> bool:
        """Persist and deliver one command; its outcome joins ``pending``, to be committed
        with the next step's write. False if the command went back to the queue."""
        sending = step.sending
        attempt = _Attempt(done=asyncio.get_running_loop().create_future())
        self._inflight[sending.id] = attempt
        settled = False

        def finish(_: object = None) -> None:
            self._inflight.pop(sending.id, None)
            if state.in_flight == sending.id:
                state.in_flight = None
            if not attempt.done.done():
                attempt.done.set_result(None)

        try:
            pending.add(
                Update(sending, _Q.QUEUED, self._fence(state.name)),
                self._announcer(sending, _Q.QUEUED),
            )
            written = (await self._commit(pending))[-1]
            if written is not True:
                return True  # cancelled or superseded meanwhile
            state.in_flight = sending.id
            episode = state.episode
            refused: InvalidRequestError | None = None
            if sending.id in self._cancel_requested:
                # cancel() arrived while "sending" was being committed: nothing was written.
                outcome: Outcome = Cancelled(reason="cancelled by a user")
            else:
                try:
                    outcome = await self._execute(state, sending, attempt)
                except InvalidRequestError as exc:
                    # The link (its driver) can never carry this command as it is: a frame
                    # too long, args its protocol cannot say. Nothing went out; retrying
                    # would only block the queue behind it. (Not the device's fault: the
                    # breaker does not count it.)
                    refused, outcome = exc, Cancelled(reason="refused by the link")
            if refused is not None:
                settlement = Settlement(
                    transition(
                        sending, _Q.FAILED, now=self.clock.now(), last_error=ErrorInfo.of(refused)
                    )
                )
            else:
                settlement = settle(
                    sending,
                    outcome,
                    now=self.clock.now(),
                    live=episode == state.episode and self._gate(state) is Gate.OPEN,
                    retry_after_s=self.retry_after_s,
                    jitter=self._rng(),
                    cancel_requested=sending.id in self._cancel_requested,
                )
            settled = True
            done = settlement.command
            announce = self._announcer(done, _Q.SENDING)

            def after(written: object) -> None:
                announce(written)
                finish()

            pending.add(Update(done, _Q.SENDING, self._fence(state.name)), after)
            pending.on_abort.append(finish)
            old_record = state.record
            state.record = breaker(
                old_record,
                settlement,
                attempt_cycle=sending.cycle,
                now=self.clock.now(),
                breaker_cycles=self.breaker_cycles,
                park_s=self.park_s,
            )
            if state.record is not old_record:
                record = state.record
                pending.add(
                    PutDevice(record, self._fence(state.name)),
                    lambda _: self._parked(old_record, record),
                )
            if done.state is _Q.QUEUED:
                if done.expires_at is not None:
                    self._watch_expiry(done.expires_at)
                await self._commit(pending)  # it is the head again: commit before reading
                return False
            if sending.id in self._cancel_requested:
                await self._commit(pending)  # cancel() waits for it
            return True
        finally:
            if not settled:
                finish()

    def _parked(self, old: DeviceRecord, new: DeviceRecord) -> None:
        if new.parked_reason is not None and old.parked_reason is None:
            _log.warning("outbox: %r: %s", new.device, new.parked_reason)
            self._events.emit(
                DeliveryParked(
                    device=new.device,
                    reason=new.parked_reason,
                    until=new.parked_until,
                    at=self.clock.now(),
                )
            )

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
            args = {**command.args, **state.address} if state.address else command.args
            return await link.request(
                command.op,
                args,
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

    # ------------------------------------------------------------------ expiry

    def _watch_expiry(self, when: float) -> None:
        """Make sure the expiry timer fires by ``when`` (no store read: O(1))."""
        if self._closing or (self._expiry_at is not None and self._expiry_at <= when):
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = when
        self._expiry = self.clock.call_at(when, self._on_expiry_timer)

    def _on_expiry_timer(self) -> None:
        self._expiry = None
        self._expiry_at = None
        if self._closing or (self._expiry_task is not None and not self._expiry_task.done()):
            return
        self._expiry_task = asyncio.get_running_loop().create_task(
            self._expire_due(), name="keeplink.outbox.expiry"
        )

    async def _expire_due(self) -> None:
        """Expire what is due, a batch per commit, then watch the next deadline (indexed)."""
        while True:
            now = self.clock.now()
            due = await self.store.due(now=now, limit=EXPIRE_BATCH)
            pending = _Pending()
            for command in due:
                expired = transition(
                    command, _Q.EXPIRED, now=now, last_error=expired_info(command), retry_at=None
                )
                pending.add(Update(expired, _Q.QUEUED), self._announcer(expired, _Q.QUEUED))
            await self._commit(pending)
            for device in {command.device for command in due}:
                self._kick(device)  # the commands behind it may go now
            if len(due) < EXPIRE_BATCH:
                break
        nxt = await self.store.next_expiry()
        if nxt is not None:
            self._watch_expiry(nxt)


def _check_address(device: str, address: Mapping[str, Any], args: Mapping[str, Any]) -> None:
    """Refuse args that address another device than the command's own."""
    for name, value in address.items():
        if name in args and args[name] != value:
            raise InvalidRequestError(
                f"args[{name!r}] is {args[name]!r}, but the command is for device {device!r}"
                f" ({name} = {value!r}); leave {name!r} out, it is filled in"
            )
