"""What the parts of one outbox share: the store, the clock, presence, the devices it knows
(each one's delivery state), where events go, and whether it is running."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from keeplink._core.clock import Clock, Timer
from keeplink._core.commands import Command, DeviceRecord
from keeplink._core.dispatch import Gate, Waiting
from keeplink._core.outcomes import Outcome
from keeplink._core.presence import Presence
from keeplink._core.states import LinkState
from keeplink._link import Link
from keeplink.outbox._announce import Announcer
from keeplink.outbox._context import DeliveryContext
from keeplink.outbox._protocol import CommandStore
from keeplink.outbox._writes import Fence, Write
from keeplink.presence import PresenceTracker

if TYPE_CHECKING:
    from keeplink.outbox._outbox import Outbox

PAGE: Final = 64
"""Queued commands read at once for one device: the head and what follows it, so draining
N commands costs N/64 reads, and a long queue is never read whole."""


@dataclass(slots=True)
class Attempt:
    done: asyncio.Future[None]
    task: asyncio.Task[Outcome] | None = None


@dataclass(slots=True)
class Pending:
    """Writes to commit together, what to do once they are committed, and what to undo if
    they never are (the pass was cancelled)."""

    writes: list[Write] = field(default_factory=list)
    after: list[Callable[[object], None] | None] = field(default_factory=list)
    on_abort: list[Callable[[], None]] = field(default_factory=list)

    def add(self, write: Write, after: Callable[[object], None] | None = None) -> None:
        self.writes.append(write)
        self.after.append(after)


@dataclass(slots=True)
class DeviceState:
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
    pending: Pending = field(default_factory=Pending)
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


class Shared:
    """The state of one outbox that its parts (delivery, submits, expiry, presence) share.

    ``outbox`` is the facade: its settings (``request_timeout_s``, ``preconditions``, …)
    are read from it at the moment they are used, so changing one takes effect at once.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        store: CommandStore,
        clock: Clock,
        presence: PresenceTracker,
        rng: Callable[[], float],
        fences: Callable[[str], Fence | None] | None,
        on_fenced: Callable[[str], object] | None,
    ) -> None:
        self.outbox = outbox
        self.store = store
        self.clock = clock
        self.presence = presence
        self.rng = rng
        self.fences = fences
        self.on_fenced = on_fenced
        self.events = Announcer(clock)
        self.devices: dict[str, DeviceState] = {}
        self.started = False
        self.closing = False

    def fence(self, device: str) -> Fence | None:
        return self.fences(device) if self.fences is not None else None

    def gate(self, state: DeviceState | None) -> Gate:
        if state is None or state.link is None:
            return Gate.NO_LINK
        if state.link.state is not LinkState.CONNECTED:
            return Gate.LINK_DOWN
        if self.presence.presence(state.name) is not Presence.ONLINE:
            return Gate.OFFLINE
        return Gate.OPEN

    async def device(self, name: str) -> DeviceState:
        """The device's state, its record read from the store the first time."""
        state = self.devices.get(name)
        if state is None:
            record = await self.store.get_device(name) or DeviceRecord(device=name)
            state = self.devices.setdefault(name, DeviceState(name=name, record=record))
        return state

    def context(self, state: DeviceState) -> DeliveryContext:
        return DeliveryContext(
            outbox=self.outbox,
            device=state.name,
            now=self.clock.now(),
            online_since=self.presence.online_since(state.name),
            cycle=state.record.cycle,
        )

    async def commit(self, pending: Pending) -> list[object]:
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
        return list(results)
