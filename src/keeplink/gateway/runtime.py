"""The gateway runtime: one supervised link per device, presence, and the outbox on a store.

:class:`Gateway` holds the parts and runs their lifecycle; the links are planned from the
driver registry (:mod:`~keeplink.gateway.planning`), presence is wired in
:mod:`~keeplink.gateway.presence_wiring`, every typed event becomes one numbered JSON
stream (:mod:`~keeplink.gateway.events`), and what the API shows and does lives in
:mod:`~keeplink.gateway.views` and :mod:`~keeplink.gateway.control`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keeplink._clock import WallClock
from keeplink._core.commands import Command, CommandState
from keeplink._core.errors import ConfigError, DeviceNotFoundError
from keeplink._core.presence import Presence
from keeplink._events import LinkEvent, LinkStateChanged, ProtocolErrorSeen
from keeplink._link import Link
from keeplink._slots import SlotPool, SlotPools
from keeplink.gateway import control, views
from keeplink.gateway.config import DeviceConfig, GatewayConfig
from keeplink.gateway.drivers import REGISTRY, PresenceSource
from keeplink.gateway.events import (
    EventStream,
    link_event_json,
    outbox_event_json,
    presence_event_json,
)
from keeplink.gateway.executors import device_executors
from keeplink.gateway.fleet import Fleet, Unit, outbox_unit
from keeplink.gateway.history import History, sample_queues
from keeplink.gateway.planning import Plan, plan_links
from keeplink.gateway.presence_wiring import presence_tracker, start_mdns
from keeplink.outbox import (
    CommandStateChanged,
    CommandStore,
    Executor,
    Fence,
    MemoryStore,
    Outbox,
    OutboxEvent,
    SqliteStore,
    image_matches,
)
from keeplink.presence import PresenceChanged

if TYPE_CHECKING:
    from keeplink.presence.mdns import MdnsPresence

__all__ = ["Gateway", "open_store"]

_log = logging.getLogger("keeplink.gateway")


def open_store(url: str, *, base: Path | None = None) -> CommandStore:
    """A store from a config URL: ``sqlite:///relative.db`` (relative to ``base``, the config
    file's folder), ``sqlite:////abs.db``, ``…?synchronous=NORMAL``, ``memory:``, or
    ``postgresql://user@host:port/db`` (``?schema=NAME``, default ``keeplink``)."""
    if url == "memory:":
        return MemoryStore()
    if base is not None and url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        relative = url.removeprefix("sqlite:///")
        if not relative.startswith(":memory:"):
            url = "sqlite:///" + str(base / relative)
    if url.startswith("sqlite:"):
        return SqliteStore.from_url(url)
    if url.startswith(("postgresql://", "postgres://")):
        from keeplink.outbox.postgres import PostgresStore

        return PostgresStore.from_url(url)
    raise ConfigError(f"store {url!r}: use sqlite:///path, postgresql://user@host/db or memory:")


class Gateway:
    """Everything ``keeplink serve`` runs, minus HTTP. Start it, use it, stop it."""

    def __init__(self, config: GatewayConfig, *, base_dir: Path | None = None) -> None:
        self.config = config
        self.base_dir = base_dir
        try:
            self.store = open_store(config.store, base=base_dir)
        except ConfigError as exc:
            raise ConfigError(f"{config.source}: gateway.store: {exc.message}") from exc
        clock = WallClock()  # one clock: the outbox compares presence's times with its own
        self.presence = presence_tracker(config, clock=clock)
        self.fleet: Fleet | None = None
        """In a fleet (a PostgreSQL store): this node's leases; None on a single node."""
        self.remote: dict[str, dict[str, Any]] = {}
        """What other nodes said of the devices they own (presence, link state)."""
        self.executors = device_executors(config)  # op -> each device's own executor
        self.outbox = Outbox(
            self.store,
            clock=clock,
            presence=self.presence,
            executors=dict(self.executors),
            preconditions={"image_matches": image_matches},
            fences=self._fence if config.fleet else None,
            on_fenced=self._fenced if config.fleet else None,
        )
        self.devices: dict[str, DeviceConfig] = {d.id: d for d in config.devices}
        self.links: dict[str, Link[Any]] = {}
        """Device id → the link it is reached through (shared by a hub's devices)."""
        self.pools = SlotPools()
        """The slot pools of the hubs that devices name (``hub``), one per hub."""
        self.probes: list[PresenceSource] = []
        """The presence sources the drivers made besides their links (unit probes)."""
        self.mdns: list[MdnsPresence] = []
        """One watcher per service type that devices with ``presence = "mdns"`` are
        watched on."""
        self.events = EventStream()
        """This node's numbered JSON events (the API's WebSocket, the history)."""
        self._unsubscribers: list[Callable[[], None]] = []
        self.started_at: float | None = None
        self.delivery_latencies: collections.deque[float] = collections.deque(maxlen=10_000)
        self.on_delivered: Callable[[float], None] | None = None
        self.history = History()
        """Each device's last hours, in memory (``GET /api/devices/{id}/history``)."""
        self._sampler: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the store (recovering from a crash), then start every link.

        Each driver's registry entry builds its links: a device of its own (jsonline), or
        one link shared by the devices of a hub (a Modbus gateway, an MQTT broker), whose
        presence then comes from the driver's sources (a unit probe, MQTT availability),
        not from the shared link. Devices with ``presence = "mdns"`` are watched over mDNS
        too (see :func:`~keeplink.gateway.presence_wiring.start_mdns`). Each device's
        presence is debounced by its own ``debounce_online_s`` / ``debounce_offline_s``.
        """
        plans = self._plan()  # fail on a bad driver before touching anything
        try:
            await self.outbox.start(recover=not self.config.fleet)
        except ConfigError as exc:  # the store's file or URL: name the key it came from
            raise ConfigError(f"{self.config.source}: gateway.store: {exc.message}") from exc
        self._unsubscribers.append(self.outbox.subscribe(self._on_outbox))
        self._unsubscribers.append(self.presence.subscribe(self._on_presence))
        self._unsubscribers.append(self.listen(self.history.feed))
        units: list[Unit] = []
        for plan in plans:
            link, devices = plan.link, [d.id for d in plan.devices]
            self._unsubscribers.append(link.subscribe(self._on_link))
            self.history.link_devices[link.name] = devices
            for device in devices:
                self.links[device] = link
                self.history.track(
                    device,
                    presence=self.presence.presence(device).value,
                    link="unknown" if self.config.fleet else link.state.value,
                )
            if self.config.fleet:
                units.append(outbox_unit(self.outbox, link, devices, hub=plan.hub))
                continue
            for device in devices:
                await self.outbox.attach(device, link, hub=plan.hub)
            link.start()
        if self.config.fleet:
            from keeplink.outbox.postgres import PostgresStore

            assert isinstance(self.store, PostgresStore)
            self.fleet = Fleet(
                store=self.store,
                outbox=self.outbox,
                node=self.config.node,
                lease_s=self.config.lease_s,
                units=units,
                on_event=self._remote_event,
            )
            self.fleet.start()
        for probe in self.probes:
            probe.start()
        self.mdns.extend(await start_mdns(self.config, self.presence, self.links))
        self._sampler = asyncio.get_running_loop().create_task(
            sample_queues(self.history, self.store, list(self.devices)),
            name="keeplink.gateway.history",
        )
        self.started_at = time.time()
        _log.info("gateway: %d device(s), store %s", len(self.links), self.config.store)

    def _fence(self, device: str) -> Fence | None:
        return self.fleet.fence(device) if self.fleet is not None else None

    def _fenced(self, device: str) -> None:
        if self.fleet is not None:
            self.fleet.fenced(device)

    def _pool(self, device: DeviceConfig) -> SlotPool | None:
        if device.hub is None:
            return None
        return self.pools.get(device.hub, size=device.hub_slots)

    def _plan(self) -> list[Plan]:
        """Every link to start, as the driver registry builds them; a driver's ConfigError
        names the file and the device's key."""
        plans = plan_links(self.config, presence=self.presence, pool=self._pool)
        for plan in plans:
            self.probes.extend(plan.sources)
        return plans

    def executor(self, device_id: str, op: str) -> Executor | None:
        """What delivers ``op`` to the device other than as a request on its link, or None."""
        routed = self.executors.get(op)
        return None if routed is None else routed.by_device.get(device_id)

    def command_args(self, device_id: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """A command's args as the device's driver needs them (a Modbus unit id, the MQTT
        device name), filled in from the config when the caller left them out."""
        config = self.device(device_id)
        out = dict(args)
        for key, value in REGISTRY[config.driver].command_defaults(config).items():
            out.setdefault(key, value)
        return out

    async def stop(self) -> None:
        """Graceful: stop the links, then close the outbox and store. A command that was
        being delivered stays ``sending`` on disk and is re-queued (attempt counted) at the
        next start — the same recovery a crash gets, so both leave a consistent store."""
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        if self.fleet is not None:
            await self.fleet.close()  # hand every unit over gracefully, release the leases
        for mdns in self.mdns:
            await mdns.close()
        self.mdns.clear()
        for probe in self.probes:
            await probe.close()
        await asyncio.gather(*(link.stop() for link in set(self.links.values())))
        await self.outbox.close()
        await self.pools.close()
        for unsubscribe in self._unsubscribers:
            unsubscribe()
        self._unsubscribers.clear()
        self.presence.close()

    # ------------------------------------------------------------------ events

    def listen(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback`` with every event of the stream; returns the unsubscriber."""
        return self.events.listen(callback)

    def backlog(self, since: int = 0) -> list[dict[str, Any]]:
        """The kept events numbered after ``since``."""
        return self.events.backlog(since)

    def _publish(self, event: dict[str, Any], *, relay: bool = True) -> None:
        """Into this node's stream: one of its own events (``relay``: named after this node,
        and sent to the other nodes of a fleet), or one another node relayed (named)."""
        if relay:
            event = {**event, "node": self.config.node}
            if self.fleet is not None:
                self.fleet.relay.publish({"at": time.time(), **event})
        self.events.publish(event)

    def _remote_event(self, event: dict[str, Any]) -> None:
        """An event another node published: into this node's stream, and what it says of
        a device that node owns into the device view."""
        device = event.get("device")
        if isinstance(device, str) and device in self.devices:
            status = self.remote.setdefault(device, {})
            if event.get("type") == "presence":
                status["presence"] = event.get("new")
            elif event.get("type") == "link":
                status["link"] = {"state": event.get("new"), "last_error": event.get("error")}
        self._publish(event, relay=False)

    def _link_named(self, name: str) -> Link[Any] | None:
        return next((link for link in self.links.values() if link.name == name), None)

    def _on_link(self, event: LinkEvent) -> None:
        if isinstance(event, ProtocolErrorSeen):
            link = self._link_named(event.link)
            if link is not None:
                at = views.epoch(link, event.at)
                for device in self.history.link_devices.get(event.link, ()):
                    self.history.protocol_error(
                        device, event.reason, sample=repr(event.sample[:40]), at=at
                    )
            return
        if not isinstance(event, LinkStateChanged):
            return
        for device, each in self.links.items():
            if each.name == event.link:
                self._report(device)
        retry_in = None
        link = self._link_named(event.link)
        if event.retry_at is not None and link is not None:
            retry_in = max(0.0, event.retry_at - link.clock.now())
        self._publish(link_event_json(event, retry_in=retry_in))

    def _on_outbox(self, event: OutboxEvent) -> None:
        if isinstance(event, CommandStateChanged) and event.command.state is CommandState.SUCCEEDED:
            latency = event.command.updated_at - event.command.created_at
            self.delivery_latencies.append(latency)
            if self.on_delivered is not None:
                self.on_delivered(latency)
        shown = outbox_event_json(event, command_json=self.command_json)
        if shown is not None:
            self._publish(shown)

    def _report(self, device: str) -> None:
        """In a fleet: what this node says of a device it owns, for the others' views."""
        if self.fleet is None or not self.fleet.owns(device):
            return
        link = self.links.get(device)
        stats = link.statistics() if link is not None else None
        last = stats.last_error if stats is not None else None
        self.fleet.report(
            device,
            {
                "presence": self.presence.presence(device).value,
                "link": {
                    "state": stats.state.value if stats else "idle",
                    "last_error": last.to_wire() if last else None,
                },
            },
        )

    def _on_presence(self, change: PresenceChanged) -> None:
        self._report(change.device)
        self._publish(presence_event_json(change))

    # ------------------------------------------------------------------ views and control

    def device(self, device_id: str) -> DeviceConfig:
        """The device's config. Raises DeviceNotFoundError for an unknown id."""
        try:
            return self.devices[device_id]
        except KeyError:
            raise DeviceNotFoundError(f"no device {device_id!r}") from None

    def command_json(self, command: Command) -> dict[str, Any]:
        """A command as the API shows it, with why it waits if it is queued."""
        return views.command_json(command, waiting=self.outbox.waiting(command))

    async def device_view(self, device_id: str) -> dict[str, Any]:
        """The device as the API shows it (see :func:`~keeplink.gateway.views.device_view`)."""
        return await views.device_view(self, device_id)

    async def devices_view(self) -> list[dict[str, Any]]:
        """Every device's view, from a few reads for all of them."""
        return await views.devices_view(self)

    def history_view(self, device_id: str, *, hours: int) -> dict[str, Any]:
        """The device's last ``hours`` as this node remembers them."""
        return views.history_view(self, device_id, hours=hours)

    def refusal_note(self, device_id: str) -> str | None:
        """Why a refused link holds the device's commands (see :mod:`.control`)."""
        return control.refusal_note(self, device_id)

    async def reconnect(self, device_id: str) -> dict[str, Any]:
        """Make the device's link try again now (see :func:`.control.reconnect`)."""
        return await control.reconnect(self, device_id)

    async def resume(self, device_id: str) -> dict[str, Any]:
        """Deliver to a parked device now (see :func:`.control.resume`)."""
        return await control.resume(self, device_id)

    def presence_of(self, device_id: str) -> Presence:
        return self.presence.presence(device_id)

    def link_counts(self) -> Mapping[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        for link in set(self.links.values()):
            counts[link.state.value] += 1
        return counts
