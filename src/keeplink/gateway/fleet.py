"""A node's share of a fleet: device leases in the shared PostgreSQL store.

Every node reads the same ``[[devices]]``. Each *unit* (a device with its own link, or a
hub link with the devices behind it) belongs to one live node, chosen by rendezvous
hashing: of the live nodes, the one whose hash with the unit's key is highest. So devices
spread evenly, a node that joins takes its share (the others see it and hand its units
over), and a node that dies loses only its own (the others pick them up when the leases
expire), with no coordination beyond the lease rows.

Every ``lease_s / RENEW_RATIO`` seconds the *renewer* says this node is alive, learns the
live nodes and renews the leases it holds; a lease it could not renew is lost: the unit's
delivery and link stop at once (the new owner recovers its commands). On its own schedule
(and at once when woken), the *balancer* hands over (gracefully: the attempt in flight
settles, then the lease is released) the units that now belong to another live node, and
takes the leases of the units that are now its own and free, recovers their commands left
``sending`` by the last owner, and starts their links. The two are separate tasks so that
taking a hundred devices over never delays a renewal.

If it cannot confirm its leases for a whole ``lease_s`` (the database is unreachable, or
this process was paused), it stops every unit: another node may own them by now. The
dispatcher's writes carry the lease epoch as a fence, so even a write made before the
keeper notices is refused by the database.

New commands wake their owner through ``LISTEN/NOTIFY``; while the listening connection is
down, owned devices are looked at every ``POLL_S`` instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from keeplink._core.errors import KeeplinkError
from keeplink._link import Link
from keeplink.outbox import Fence, Outbox
from keeplink.outbox.postgres import NOTIFY_MAX, PostgresStore

__all__ = ["RENEW_RATIO", "Fleet", "Relay", "Unit", "outbox_unit", "owner_of"]

_log = logging.getLogger("keeplink.gateway.fleet")

RENEW_RATIO: Final = 3
"""Leases are renewed three times a lease period: two lost round trips are survived, a
third means the database (or this node) is in trouble and the lease may lapse."""
POLL_S: Final = 1.0
"""While no notification connection is up, owned devices are looked at this often."""
WANT_RATIO: Final = 20
"""For a lease after a node left the live set, while leases this node should take from
it are not yet free, it tries every ``lease_s / WANT_RATIO`` seconds."""
TAKE_CONCURRENCY: Final = 16
"""Units taken over at once: enough to overlap their round trips, few enough to leave the
database connections (and the loop) to the deliveries under way."""
OUTGOING_MAX: Final = 10_000
"""Events waiting to be sent to the other nodes; past this the oldest are dropped."""
NO_FENCE: Final = -1
"""The epoch of a device this node does not hold: never current, so a write is refused."""


def owner_of(key: str, nodes: Sequence[str]) -> str | None:
    """Rendezvous hashing: the node that owns ``key`` among ``nodes`` (None if empty)."""
    if not nodes:
        return None

    def score(node: str) -> bytes:
        return hashlib.blake2b(f"{node}\0{key}".encode(), digest_size=8).digest()

    return max(nodes, key=score)


@dataclass(slots=True)
class Unit:
    """What is owned as one: a link and the devices reached through it."""

    key: str
    devices: list[str]
    start: Callable[[], Coroutine[Any, Any, None]]
    """Attach the devices to the outbox and start the link."""
    stop: Callable[[bool], Coroutine[Any, Any, None]]
    """Stop the link and detach the devices (``True``: let an attempt in flight settle)."""
    running: bool = False
    epochs: dict[str, int] = field(default_factory=dict)
    changing: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while the unit starts or stops: a start waits for a stop under way (its link
    closing, its devices detaching) to end, so the two never interleave."""


def outbox_unit(outbox: Outbox, link: Link[Any], devices: list[str], *, hub: bool) -> Unit:
    """A link and its devices as one unit a node owns: started, they are attached to the
    outbox and the link starts; stopped, both end (``settle``: the attempt in flight ends
    well first, for a handoff; else the sessions close at once, for a lost lease)."""

    async def start() -> None:
        for device in devices:
            await outbox.attach(device, link, hub=hub)
        link.start()

    async def stop(settle: bool) -> None:
        if settle:  # a handoff: the attempt in flight needs the link to end well
            for device in devices:
                await outbox.detach(device, settle=True)
            await link.stop()
            return
        await link.stop()  # lost: close the sessions first, at once
        for device in devices:
            await outbox.detach(device, settle=False)

    return Unit(key=devices[0], devices=devices, start=start, stop=stop)


class Fleet:
    """Keeps this node's leases; see the module's docstring. Keyword-only config."""

    def __init__(
        self,
        *,
        store: PostgresStore,
        outbox: Outbox,
        node: str,
        lease_s: float,
        units: Sequence[Unit],
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.node = node
        self.lease_s = lease_s
        self.units = list(units)
        self._by_device = {device: unit for unit in self.units for device in unit.devices}
        self.live: list[str] = [node]
        self.owners: dict[str, str] = {}
        """Device → owning node, as last read (for the device view)."""
        self.healthy = False
        self.problem: str | None = "not started"
        self._confirmed_at: float | None = None
        self._departed_at = -math.inf
        """When a node last left the live set (its units are for the taking soon)."""
        self._task: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._listener: Any = None
        self._closing = False
        self._wake = asyncio.Event()
        self._stopping: set[asyncio.Task[None]] = set()
        self.relay = Relay(store=store, node=node, on_event=on_event)
        """This node's events and device statuses to the other nodes, and theirs to it."""

    # ------------------------------------------------------------------ for the outbox

    def fence(self, device: str) -> Fence:
        """The fence this node's writes for ``device`` carry (a refused one if not held)."""
        unit = self._by_device.get(device)
        epoch = unit.epochs.get(device) if unit is not None else None
        return Fence(self.node, epoch if epoch is not None else NO_FENCE)

    def fenced(self, device: str) -> None:
        """The store refused a write for ``device``: stop its unit now, the next tick
        sorts out who owns it."""
        unit = self._by_device.get(device)
        if unit is not None and unit.running:
            _log.warning("fleet: %s lost device %r to another node", self.node, device)
            unit.epochs.clear()
            unit.running = False
            self._stop_now(unit)
        self._wake.set()

    def _stop_now(self, unit: Unit) -> None:
        """Stop a lost unit (not running any more) in a task of its own: the renewer never
        waits for a link to close, nor for a take of the unit under way to end first."""
        task = asyncio.get_running_loop().create_task(
            self._stop(unit, False), name=f"keeplink.fleet[{unit.key}].stop"
        )
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def owns(self, device: str) -> bool:
        """This node delivers to ``device`` now: it runs its unit, and has confirmed the
        lease within the last ``lease_s`` (a node just back from a pause claims nothing)."""
        unit = self._by_device.get(device)
        return unit is not None and unit.running and self._confirmed()

    def _confirmed(self) -> bool:
        return (
            self._confirmed_at is not None and time.monotonic() - self._confirmed_at < self.lease_s
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._renewer = loop.create_task(
            self._renew_loop(), name=f"keeplink.fleet[{self.node}].renew"
        )
        self._task = loop.create_task(self._run(), name=f"keeplink.fleet[{self.node}]")
        self.relay.start()

    def report(self, device: str, status: Mapping[str, Any]) -> None:
        """Record what this node, the owner, says of ``device`` (its presence and link),
        for the other nodes' device views: written with the next batch of events."""
        if self.owns(device):
            self.relay.record(device, status)

    async def close(self) -> None:
        """SIGTERM: leave the fleet gracefully. Attempts in flight settle, then the leases
        are released, so the next owners start at once instead of waiting for expiry."""
        self._closing = True
        for task in (self._task, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._stopping:
            await asyncio.wait(self._stopping)
        await self.relay.close()
        with contextlib.suppress(KeeplinkError, OSError):
            await self.store.leave(self.node)
        for unit in self.units:
            if unit.running or unit.epochs:
                await self._hand_over(unit)
        await self._close_listener()

    # ------------------------------------------------------------------ the keeper

    async def _run(self) -> None:
        """The balancer: hand units over and take them, as the live nodes change."""
        interval = self.lease_s / RENEW_RATIO
        while True:
            # Cleared before the round, not after it: a change the renewer reports while
            # the round runs (a node gone) starts the next round at once.
            self._wake.clear()
            wanting = False
            try:
                if self._confirmed():
                    wanting = await self._balance()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the keeper must not die; see _failed
                self._failed(exc)
            wait = interval
            if wanting and time.monotonic() - self._departed_at < self.lease_s:
                # A node left and leases this node should now hold are still its: a dead
                # node's run out a moment after its heartbeat does. Look again soon rather
                # than a whole interval later.
                wait = min(interval, self.lease_s / WANT_RATIO)
            if self._listener is None or self._listener.is_closed():
                self._poll()  # no notifications: look at every owned device instead
                wait = min(wait, POLL_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _renew_loop(self) -> None:
        """The renewer, on its own so that taking many devices over never delays it: a
        lease renewed late is a lease lost."""
        interval = self.lease_s / RENEW_RATIO
        while True:
            self._expire_if_unconfirmed()  # first: after a pause, before anything else
            try:
                await self._renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the keeper must not die; see _failed
                self._failed(exc)
            self._expire_if_unconfirmed()
            await asyncio.sleep(interval)

    def _failed(self, exc: BaseException) -> None:
        # A database that is down is expected and said once; anything else is a bug,
        # logged with its traceback. Either way the next round tries again.
        if self.healthy or self.problem is None:
            log = _log.warning if isinstance(exc, KeeplinkError) else _log.exception
            log("fleet: %s cannot keep its leases: %s", self.node, exc)
        self.healthy = False
        self.problem = f"the store is unreachable: {exc}"

    def _expire_if_unconfirmed(self) -> None:
        """Not confirmed for a whole lease: stop everything (another node may own it)."""
        if self._confirmed_at is None or self._confirmed():
            return
        for unit in self.units:
            if unit.running:
                _log.warning(
                    "fleet: %s could not renew its leases for %gs: stopping %s",
                    self.node,
                    self.lease_s,
                    unit.key,
                )
                unit.running = False
                unit.epochs.clear()
                self._stop_now(unit)

    async def _renew(self) -> None:
        asked = time.monotonic()
        live = await self.store.heartbeat(self.node, lease_s=self.lease_s)
        held = {d: e for unit in self.units for d, e in unit.epochs.items()}
        kept = await self.store.renew(self.node, held, lease_s=self.lease_s) if held else set()
        if set(self.live) - set(live):
            self._departed_at = time.monotonic()
        if live != self.live or self._confirmed_at is None:
            self._wake.set()  # nodes came or went (or this is the first round): rebalance
        self.live = live
        self._confirmed_at = asked
        for unit in self.units:
            # Only what was asked about and is still held at that epoch counts as lost (the
            # balancer may have handed a unit over, or taken a new one, meanwhile).
            lost = [d for d, e in held.items() if unit.epochs.get(d) == e and d not in kept]
            if lost:
                _log.warning("fleet: %s lost %s (its lease lapsed)", self.node, unit.key)
                unit.epochs.clear()
                if unit.running:
                    unit.running = False
                    self._stop_now(unit)
        self.healthy = True
        self.problem = None

    async def _balance(self) -> bool:
        """One round; whether some unit this node should own is not all its yet."""
        wanted: list[Unit] = []
        for unit in self.units:
            mine = owner_of(unit.key, self.live) == self.node
            if not mine and (unit.running or unit.epochs):
                await self._hand_over(unit)
            elif mine and not unit.running:
                wanted.append(unit)
        missing = [d for unit in wanted for d in unit.devices if d not in unit.epochs]
        if missing:  # one round trip for every lease this node should take now
            taken = await self.store.acquire(self.node, missing, lease_s=self.lease_s)
            for unit in wanted:
                unit.epochs.update({d: taken[d] for d in unit.devices if d in taken})
        # Take them side by side (each is a few round trips: recover its commands, read its
        # record, start its link): a dead node's hundred devices move in one go.
        slots = asyncio.Semaphore(TAKE_CONCURRENCY)

        async def take(unit: Unit) -> None:
            async with slots:
                await self._take(unit)

        results = await asyncio.gather(*(take(unit) for unit in wanted), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed  # every take has ended; the round reports it and tries again
        self.owners = await self.store.owners()
        await self._keep_listener()
        return any(len(unit.epochs) < len(unit.devices) for unit in wanted)

    async def _take(self, unit: Unit) -> None:
        async with unit.changing:  # after a stop under way has ended
            if unit.running or len(unit.epochs) < len(unit.devices):
                return  # another node still holds some: its lease runs out, or it hands over
            _log.info("fleet: %s takes %s (epochs %s)", self.node, unit.key, unit.epochs)
            for device in unit.devices:
                await self.outbox.adopt(device)
            unit.running = True
            await unit.start()

    @staticmethod
    async def _stop(unit: Unit, settle: bool) -> None:
        async with unit.changing:
            await unit.stop(settle)

    async def _hand_over(self, unit: Unit) -> None:
        _log.info("fleet: %s hands %s over", self.node, unit.key)
        if unit.running:
            unit.running = False
            await self._stop(unit, True)
        epochs, unit.epochs = dict(unit.epochs), {}
        with contextlib.suppress(KeeplinkError, OSError):
            await self.store.release(self.node, epochs)

    # ------------------------------------------------------------------ notifications

    def _on_submit(self, device: str) -> None:
        if self.owns(device):
            self.outbox.wake(device)

    async def _keep_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = None
        try:
            self._listener = await self.store.listen(self._on_submit, self.relay.received)
        except KeeplinkError as exc:
            _log.debug("fleet: no notification connection (%s); polling every %gs", exc, POLL_S)

    def _poll(self) -> None:
        """The fallback while notifications are down: look at every owned device."""
        for unit in self.units:
            if unit.running:
                for device in unit.devices:
                    self.outbox.wake(device)

    async def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):  # closing a connection that may be broken
                await listener.close(timeout=2)


class Relay:
    """A node's events to the other nodes of its fleet, and theirs to it, through the
    shared store's notifications (best effort: events describe the store, which has the
    truth); and what the node says of the devices it owns, recorded for the others."""

    def __init__(
        self,
        *,
        store: PostgresStore,
        node: str,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.on_event = on_event
        """Called with each event another node published (its ``node`` names it)."""
        self._outgoing: collections.deque[str] = collections.deque(maxlen=OUTGOING_MAX)
        self._statuses: dict[str, str] = {}  # device → JSON, to record with the next send
        self._send_wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sender = asyncio.get_running_loop().create_task(
            self._send(), name=f"keeplink.fleet[{self.node}].events"
        )

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender

    def publish(self, event: Mapping[str, Any]) -> None:
        """Send one of this node's API events to the other nodes. One too large for a
        notification goes without its command's args and result."""
        text = json.dumps({**event, "node": self.node}, separators=(",", ":"))
        if len(text.encode()) > NOTIFY_MAX and isinstance(event.get("command"), dict):
            command = {k: v for k, v in event["command"].items() if k not in ("args", "result")}
            text = json.dumps({**event, "command": command, "node": self.node})
        if len(text.encode()) > NOTIFY_MAX:
            _log.debug("fleet: an event of %d bytes is not sent to other nodes", len(text))
            return
        self._outgoing.append(text)
        self._send_wake.set()

    def record(self, device: str, status: Mapping[str, Any]) -> None:
        """Record ``status`` for ``device`` with the next batch of events."""
        self._statuses[device] = json.dumps(dict(status), separators=(",", ":"))
        self._send_wake.set()

    async def _send(self) -> None:
        while True:
            await self._send_wake.wait()
            self._send_wake.clear()
            if self._statuses:
                statuses, self._statuses = self._statuses, {}
                try:
                    await self.store.put_statuses(self.node, statuses)
                except KeeplinkError as exc:
                    _log.debug("fleet: %d statuses not recorded: %s", len(statuses), exc)
                    for device, text in statuses.items():  # the next send tries again
                        self._statuses.setdefault(device, text)
            while self._outgoing:
                batch = [self._outgoing.popleft() for _ in range(min(100, len(self._outgoing)))]
                try:
                    await self.store.publish(batch)
                except KeeplinkError as exc:
                    _log.debug("fleet: %d events not sent: %s", len(batch), exc)

    def received(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            return
        if isinstance(event, dict) and event.get("node") != self.node and self.on_event:
            self.on_event(event)
