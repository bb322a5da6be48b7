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

The outbox is a facade over parts that each hold one responsibility: the delivery pass of
a device (``_delivery``) and the attempt it makes (``_attempt``), when a device can be
delivered to (``_arming``), submits and cancels (``_commands``), deadlines (``_expiry``)
and events (``_announce``), sharing one ``_state.Shared``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable, Collection, Mapping
from typing import Any

from keeplink._clock import WallClock
from keeplink._core.clock import Clock
from keeplink._core.commands import Command, CommandState, DeviceRecord, new_command
from keeplink._core.dispatch import Waiting, unparked, wait_of
from keeplink._core.errors import ConfigError, InvalidRequestError, LinkClosedError
from keeplink._events import LinkEvent, LinkStateChanged
from keeplink._link import Link
from keeplink.outbox._arming import Arming
from keeplink.outbox._attempt import Sender
from keeplink.outbox._commands import Commands
from keeplink.outbox._context import DeliveryContext, Executor, Precondition, min_online
from keeplink.outbox._delivery import Dispatcher
from keeplink.outbox._expiry import ExpiryWatch
from keeplink.outbox._protocol import CommandStore
from keeplink.outbox._state import Shared
from keeplink.outbox._writes import Fence, PutDevice, Update
from keeplink.outbox.events import DeliveryParked, OutboxEvent
from keeplink.presence import PresenceTracker

__all__ = [
    "DeliveryContext",
    "Executor",
    "Outbox",
    "Precondition",
    "min_online",
]

_log = logging.getLogger("keeplink.outbox")
_Q = CommandState


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
        shared = Shared(
            self,
            store=store,
            clock=self.clock,
            presence=self.presence,
            rng=rng,
            fences=fences,
            on_fenced=on_fenced,
        )
        self._shared = shared
        self._expiry = ExpiryWatch(shared, kick=self.wake)
        self._sender = Sender(shared, watch_expiry=self._expiry.watch)
        self._dispatcher = Dispatcher(shared, sender=self._sender)
        self._arming = Arming(shared, kick=self.wake)
        self._commands = Commands(
            shared,
            dispatcher=self._dispatcher,
            sender=self._sender,
            watch_expiry=self._expiry.watch,
        )
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
            self._shared.events.announce(command, _Q.SENDING)
        self._unsubscribe_presence = self.presence.subscribe(self._arming.on_presence)
        self._shared.started = True
        due = await self.store.next_expiry()
        if due is not None:
            self._expiry.watch(due)
        return recovered

    async def close(self) -> None:
        """Stop delivering and close the store. In-flight deliveries are cancelled; their
        commands stay ``sending`` in the store and return to ``queued`` on the next start —
        exactly what a crash would leave, so shutdown and crash share one recovery path."""
        shared = self._shared
        shared.closing = True
        for device in shared.devices.values():
            if device.unsubscribe is not None:
                device.unsubscribe()
            if device.wake_timer is not None:
                device.wake_timer.cancel()
        tasks = [d.task for d in shared.devices.values() if d.task is not None]
        if self._expiry.task is not None:
            tasks.append(self._expiry.task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._expiry.cancel()
        if self._unsubscribe_presence is not None:
            self._unsubscribe_presence()
        if self._owns_presence:
            self.presence.close()
        shared.events.fail_waiters(lambda: LinkClosedError("the outbox was closed"))
        await self.store.close()

    async def __aenter__(self) -> Outbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def subscribe(self, callback: Callable[[OutboxEvent], object]) -> Callable[[], None]:
        """Typed events (:data:`~keeplink.outbox.OutboxEvent`), each announced after what
        it reports was persisted."""
        return self._shared.events.subscribe(callback)

    def publish(self, event: OutboxEvent) -> None:
        """For executors: announce a typed event of their own (e.g. transfer progress)."""
        self._shared.events.emit(event)

    async def note(self, command: Command, progress: Mapping[str, Any]) -> Command:
        """For executors: durably record ``progress`` on a command being delivered, as its
        ``result`` until an outcome replaces it. A later attempt (after a drop, a restart
        or a crash) finds it in ``command.result``; a retryable failure keeps it. Returns
        the noted command; raises InvalidRequestError (nothing written) when the command
        is no longer ``sending`` (cancelled meanwhile), and the store's errors."""
        noted = dataclasses.replace(command, result=dict(progress))
        fence = self._shared.fence(command.device)
        (written,) = await self.store.apply([Update(noted, _Q.SENDING, fence)])
        if written is not True:
            raise InvalidRequestError(f"command {command.id} is no longer being sent")
        self._sender.noted[command.id] = noted
        return noted

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
        state = await self._shared.device(device)
        if state.unsubscribe is not None:
            state.unsubscribe()
        state.link = link
        state.hub = hub
        state.address = address

        def on_link(event: LinkEvent) -> None:
            if isinstance(event, LinkStateChanged):
                self._arming.on_link_state(device, event.new)

        state.unsubscribe = link.subscribe(on_link)
        self._arming.on_link_state(device, link.state)

    async def resume(self, device: str) -> None:
        """Un-park a device the breaker parked, and deliver again."""
        state = await self._shared.device(device)
        state.record = unparked(state.record)
        await self.store.apply([PutDevice(state.record, self._shared.fence(device))])
        self._shared.events.emit(
            DeliveryParked(device=device, reason=None, until=None, at=self.clock.now())
        )
        self.wake(device)

    async def detach(self, device: str, *, settle: bool = True) -> None:
        """Stop delivering to ``device`` and forget it (its link is no longer watched).

        ``settle``: an attempt in flight ends first (bounded by its own timeout) and its
        outcome is written: a graceful handoff. Otherwise it is cancelled at once and its
        command stays ``sending`` for the next owner to recover (:meth:`adopt`).
        """
        await self._dispatcher.detach(device, settle=settle)

    async def adopt(self, device: str) -> list[Command]:
        """Take ``device`` over from a node that stopped or died: its commands left
        ``sending`` go back to ``queued`` (the attempt counted) or to ``failed`` when their
        attempts are used up, as after a crash. Returns them. The writes are fenced."""
        return await self._commands.adopt(device)

    def wake(self, device: str) -> None:
        """Look at ``device``'s queue now (a submit on another node, a notification)."""
        self._dispatcher.kick(device)

    async def device_record(self, device: str) -> DeviceRecord:
        return (await self._shared.device(device)).record

    def waiting(self, command: Command) -> Waiting | None:
        """Why a queued command is not going out right now (parked, a precondition, a retry
        time, behind another command, the device away or its link down), or ``None``: it
        is about to go, or it is not queued. Answers from memory, at once."""
        state = self._shared.devices.get(command.device)
        return wait_of(
            command,
            record=state.record if state is not None else None,
            gate=self._shared.gate(state),
            in_flight=state.in_flight if state is not None else None,
            hold=state.hold if state is not None else None,
        )

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
        attached = self._shared.devices.get(device)
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
        return await self._commands.submit(command, max_queued=max_queued)

    async def get(self, command_id: str) -> Command:
        """The command as stored. Raises CommandNotFoundError."""
        return await self._commands.get(command_id)

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
        return await self._commands.wait(command_id)

    async def cancel(self, command_id: str) -> Command:
        """Cancel a queued or in-flight command; returns it as stored afterwards.

        Raises CommandNotFoundError for an unknown id and ConflictError (code ``conflict``)
        for a command that is already final. An in-flight request is abandoned; a device
        that already applied it keeps it applied.
        """
        return await self._commands.cancel(command_id)


def _check_address(device: str, address: Mapping[str, Any], args: Mapping[str, Any]) -> None:
    """Refuse args that address another device than the command's own."""
    for name, value in address.items():
        if name in args and args[name] != value:
            raise InvalidRequestError(
                f"args[{name!r}] is {args[name]!r}, but the command is for device {device!r}"
                f" ({name} = {value!r}); leave {name!r} out, it is filled in"
            )
