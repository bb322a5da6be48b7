"""The gateway runtime: one supervised link per device, presence, and the outbox on a store.

It turns every typed event (link state, command state, presence, firmware progress, the
breaker) into one JSON stream with a sequence number, for the API's WebSocket and metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from keeplink._clock import WallClock
from keeplink._core.commands import Command, CommandState, DeviceRecord
from keeplink._core.errors import (
    ConfigError,
    ConflictError,
    DeviceNotFoundError,
    ErrorClass,
    KeeplinkError,
    error_class_of,
)
from keeplink._core.presence import Presence
from keeplink._core.states import LinkState
from keeplink._events import LinkEvent, LinkStateChanged, ProtocolErrorSeen
from keeplink._link import Link, LinkStatistics
from keeplink._slots import SlotPool, SlotPools
from keeplink.drivers.jsonline import JsonLineDriver
from keeplink.gateway.config import (
    DEFAULT_DEBOUNCE_OFFLINE_S,
    DEFAULT_DEBOUNCE_ONLINE_S,
    DeviceConfig,
    GatewayConfig,
)
from keeplink.gateway.fleet import Fleet, Unit
from keeplink.gateway.history import BUCKET_S, History
from keeplink.outbox import (
    CommandStateChanged,
    CommandStore,
    CommandWaiting,
    DeliveryParked,
    Fence,
    FirmwareProgress,
    FirmwareTransfer,
    MemoryStore,
    Outbox,
    OutboxEvent,
    SqliteStore,
    Waiting,
    image_matches,
)
from keeplink.presence import PresenceChanged, PresenceTracker

__all__ = ["Gateway", "command_json", "open_store"]

_log = logging.getLogger("keeplink.gateway")

EVENT_BACKLOG = 1000
"""Events kept for a WebSocket client that connects late (``?since=SEQ``)."""
NOTE_MESSAGE_CHARS = 200
"""Of a peer's error message quoted in a note: enough to act on, never a wall of text."""


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


def _driver(device: DeviceConfig) -> Any:
    """The driver for a device with its own link (jsonline)."""
    if device.driver == "jsonline":
        return JsonLineDriver(
            host=device.host,
            port=device.port,
            token=device.token,
            seq_bits=device.seq_bits,
            max_in_flight=device.max_in_flight or 64,
            device_id=device.device_id or device.id,
        )
    raise ConfigError(f"devices[{device.id}]: driver {device.driver!r} has no own link")


def _epoch(link: Link[Any], at: float) -> float:
    """A time on the link's clock as epoch seconds, the API's time."""
    return time.time() - max(0.0, link.clock.now() - at)


def _protocol_errors_json(link: Link[Any] | None, stats: LinkStatistics | None) -> dict[str, Any]:
    """Malformed input the device sent (each dropped, the link unharmed): how many, and the
    last one's ``{code, message, at}``."""
    last = None
    if link is not None and stats is not None and stats.last_protocol_error is not None:
        assert stats.last_protocol_error_at is not None
        last = {
            "code": stats.last_protocol_error.code,
            "message": stats.last_protocol_error.message,
            "at": _epoch(link, stats.last_protocol_error_at),
        }
    return {"count": stats.protocol_errors if stats else 0, "last": last}


def _late_replies_json(link: Link[Any] | None, stats: LinkStatistics | None) -> dict[str, Any]:
    """Replies that matched no request in flight (after its deadline, or a seq never sent):
    how many, and the last one's ``{seq, message, at}``."""
    last = None
    if link is not None and stats is not None and stats.last_late_reply_seq is not None:
        assert stats.last_late_reply_at is not None
        last = {
            "seq": stats.last_late_reply_seq,
            "message": (
                f"a reply for seq {stats.last_late_reply_seq} matched no request in flight "
                "(it came after its deadline, or names a seq that was never sent); dropped"
            ),
            "at": _epoch(link, stats.last_late_reply_at),
        }
    return {"count": stats.late_replies if stats else 0, "last": last}


@contextlib.contextmanager
def _naming(config: GatewayConfig, device: DeviceConfig, key: str) -> Iterator[None]:
    """A driver's ConfigError, told with the config file and the device's key."""
    try:
        yield
    except ConfigError as exc:
        where = f"devices[{config.devices.index(device)}].{key}"
        raise ConfigError(f"{config.source}: {where}: {exc.message}") from exc


def _needs(extra: str, module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"the {extra} driver needs: pip install 'keeplink[{extra}]'")


def waiting_json(waiting: Waiting | None) -> dict[str, Any] | None:
    """Why a queued command is not going out now, as the API shows it."""
    if waiting is None:
        return None
    return {
        "reason": waiting.reason.value,
        "message": waiting.message,
        "until": waiting.until,
        "command": waiting.command,
    }


def command_json(command: Command, *, waiting: Waiting | None = None) -> dict[str, Any]:
    """The API's JSON shape of a command (``waiting``: why it is not going out now)."""
    return {
        "id": command.id,
        "device": command.device,
        "op": command.op,
        "args": dict(command.args),
        "state": command.state.value,
        "key": command.key,
        "idempotency_key": command.idempotency_key,
        "priority": command.priority,
        "attempts": command.attempts,
        "max_attempts": command.max_attempts,
        "created_at": command.created_at,
        "updated_at": command.updated_at,
        "expires_at": command.expires_at,
        "last_error": (command.last_error.to_wire() if command.last_error is not None else None),
        "result": dict(command.result) if command.result is not None else None,
        "waiting": waiting_json(waiting),
    }


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
        self.presence = PresenceTracker(
            clock=clock,
            debounce_online_s=DEFAULT_DEBOUNCE_ONLINE_S,
            debounce_offline_s=DEFAULT_DEBOUNCE_OFFLINE_S,
        )
        for device in config.devices:  # each device's own debounce, before any report
            self.presence.configure(
                device.id,
                debounce_online_s=device.debounce_online_s,
                debounce_offline_s=device.debounce_offline_s,
            )
        self.fleet: Fleet | None = None
        """In a fleet (a PostgreSQL store): this node's leases; None on a single node."""
        self.remote: dict[str, dict[str, Any]] = {}
        """What other nodes said of the devices they own (presence, link state)."""
        self.outbox = Outbox(
            self.store,
            clock=clock,
            presence=self.presence,
            executors={"firmware": FirmwareTransfer()},
            preconditions={"image_matches": image_matches},
            fences=self._fence if config.fleet else None,
            on_fenced=self._fenced if config.fleet else None,
        )
        self.devices: dict[str, DeviceConfig] = {d.id: d for d in config.devices}
        self.links: dict[str, Link[Any]] = {}
        """Device id → the link it is reached through (shared by a hub's devices)."""
        self.pools = SlotPools()
        """The slot pools of the hubs that devices name (``hub``), one per hub."""
        self.probes: list[Any] = []
        self.mdns: list[Any] = []
        """One :class:`~keeplink.presence.mdns.MdnsPresence` per service type that devices with
        ``presence = "mdns"`` are watched on."""
        self._seq = 0
        self._backlog: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_BACKLOG)
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._unsubscribers: list[Callable[[], None]] = []
        self.started_at: float | None = None
        self.delivery_latencies: collections.deque[float] = collections.deque(maxlen=10_000)
        self.on_delivered: Callable[[float], None] | None = None
        self.history = History()
        """Each device's last hours, in memory (``GET /api/devices/{id}/history``)."""
        self._sampler: asyncio.Task[None] | None = None
        self._sampler_failed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the store (recovering from a crash), then start every link.

        A jsonline device has its own link. Devices behind one Modbus gateway, or on one
        MQTT broker, share that hub's link; their presence comes from a unit probe or from
        MQTT availability, not from the shared link. Devices with ``presence = "mdns"`` are
        watched over mDNS too (see :meth:`_start_mdns`). Each device's presence is
        debounced by its own ``debounce_online_s`` / ``debounce_offline_s``.
        """
        plans = self._plan()  # fail on a bad driver before touching anything
        try:
            await self.outbox.start(recover=not self.config.fleet)
        except ConfigError as exc:  # the store's file or URL: name the key it came from
            raise ConfigError(f"{self.config.source}: gateway.store: {exc.message}") from exc
        self._unsubscribers.append(self.outbox.subscribe(self._on_outbox))
        self._unsubscribers.append(self.presence.subscribe(self._on_presence))
        self._unsubscribers.append(self.listen(self.history.feed))
        units = []
        for link, devices, hub in plans:
            self._unsubscribers.append(link.subscribe(self._on_link))
            self.history.link_devices[link.name] = [d.id for d in devices]
            for device in devices:
                self.links[device.id] = link
                self.history.track(
                    device.id,
                    presence=self.presence.presence(device.id).value,
                    link="unknown" if self.config.fleet else link.state.value,
                )
            if self.config.fleet:
                units.append(self._unit(link, [d.id for d in devices], hub))
                continue
            for device in devices:
                await self.outbox.attach(device.id, link, hub=hub)
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
        await self._start_mdns()
        self._sampler = asyncio.get_running_loop().create_task(
            self._sample_history(), name="keeplink.gateway.history"
        )
        self.started_at = time.time()
        _log.info("gateway: %d device(s), store %s", len(self.links), self.config.store)

    async def _start_mdns(self) -> None:
        """Watch every ``presence = "mdns"`` device on its service type: an announcement
        reports it online (Source.MDNS) and wakes its link; a goodbye reports it offline.

        mDNS that cannot start (no usable interface, its sockets refused) is logged with
        code ``discovery_failed`` and the gateway goes on without it: those devices keep
        the presence their links give them.
        """
        by_type: dict[str, list[DeviceConfig]] = {}
        for device in self.config.devices:
            if device.presence == "mdns" and device.mdns_type is not None:
                by_type.setdefault(device.mdns_type, []).append(device)
        if not by_type:
            return
        from keeplink.presence.mdns import MdnsPresence

        for service_type, devices in by_type.items():
            mdns = MdnsPresence(service_type=service_type, presence=self.presence)
            for device in devices:
                with _naming(self.config, device, "mdns_service"):
                    mdns.watch(device.id, self.links[device.id], instance=device.mdns_instance)
            try:
                await mdns.start()
            except KeeplinkError as exc:
                _log.error(
                    "gateway: mDNS for %s cannot start, %s go on without it: %s [%s]",
                    service_type,
                    ", ".join(d.id for d in devices),
                    exc.message,
                    exc.wire_code,
                )
                continue
            self.mdns.append(mdns)

    def _unit(self, link: Link[Any], devices: list[str], hub: bool) -> Unit:
        """A link and its devices as one thing a fleet node owns."""

        async def start() -> None:
            for device in devices:
                await self.outbox.attach(device, link, hub=hub)
            link.start()

        async def stop(settle: bool) -> None:
            if settle:  # a handoff: the attempt in flight needs the link to end well
                for device in devices:
                    await self.outbox.detach(device, settle=True)
                await link.stop()
                return
            await link.stop()  # lost: close the sessions first, at once
            for device in devices:
                await self.outbox.detach(device, settle=False)

        return Unit(key=devices[0], devices=devices, start=start, stop=stop)

    def _fence(self, device: str) -> Fence | None:
        return self.fleet.fence(device) if self.fleet is not None else None

    def _fenced(self, device: str) -> None:
        if self.fleet is not None:
            self.fleet.fenced(device)

    def _pool(self, device: DeviceConfig) -> SlotPool | None:
        if device.hub is None:
            return None
        return self.pools.get(device.hub, size=device.hub_slots)

    def _plan(self) -> list[tuple[Link[Any], list[DeviceConfig], bool]]:
        """Every link to start; a driver's ConfigError names the file and the device's key."""
        plans: list[tuple[Link[Any], list[DeviceConfig], bool]] = []
        hubs: dict[tuple[str, str, int], list[DeviceConfig]] = {}
        for device in self.config.devices:
            if device.presence == "mdns" and importlib.util.find_spec("zeroconf") is None:
                raise ConfigError(
                    f"{self.config.source}: devices[{self.config.devices.index(device)}]"
                    ".presence: mDNS presence needs: pip install 'keeplink[mdns]'"
                )
            if device.driver == "jsonline":
                with _naming(self.config, device, "driver"):
                    driver = _driver(device)
                link: Link[Any] = Link(
                    driver,
                    name=device.id,
                    heartbeat_s=device.heartbeat_s,
                    backoff=device.backoff,
                    slots=self._pool(device),
                )
                plans.append((link, [device], False))
            else:
                hubs.setdefault((device.driver, device.host, device.port), []).append(device)
        for (driver, host, port), devices in hubs.items():
            first = devices[0]
            if driver == "modbus":
                from keeplink.drivers.modbus import modbus_link
                from keeplink.presence.modbus import ProbeTarget, UnitProbe

                link = modbus_link(
                    host,
                    port,
                    max_in_flight=first.max_in_flight or 1,
                    backoff=first.backoff,
                    slots=self._pool(first),
                )
                interval = float(first.options.get("probe_interval_s", 10.0))
                self.probes.append(
                    UnitProbe(
                        link=link,
                        presence=self.presence,
                        units=[ProbeTarget(device=d.id, unit=d.unit or 0) for d in devices],
                        interval_s=interval,
                    )
                )
            else:
                with _naming(self.config, first, "driver"):
                    _needs("mqtt", "aiomqtt")
                from keeplink.drivers.mqtt import MqttDriver

                options = dict(first.options)
                with _naming(self.config, first, "options"):
                    mqtt = MqttDriver(
                        host,
                        port,
                        client_id=str(options.pop("client_id", f"keeplink-{uuid.uuid4().hex[:8]}")),
                        devices=[d.id for d in devices],
                        presence=self.presence,
                        **options,
                    )
                link = Link(
                    mqtt,
                    name=f"mqtt:{host}:{port}",
                    heartbeat_s=None,
                    backoff=first.backoff,
                )
            plans.append((link, devices, True))
        return plans

    def command_args(self, device_id: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """A command's args as the device's driver needs them: a Modbus unit id, or the
        MQTT device name, filled in from the config when the caller left them out."""
        config = self.device(device_id)
        out = dict(args)
        if config.driver == "modbus":
            out.setdefault("unit", config.unit)
        elif config.driver == "mqtt":
            out.setdefault("device", device_id)
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
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def backlog(self, since: int = 0) -> list[dict[str, Any]]:
        return [event for event in self._backlog if event["seq"] > since]

    def _publish(self, event: dict[str, Any], *, relay: bool = True) -> None:
        """Into this node's stream: one of its own events (``relay``: named after this node,
        and sent to the other nodes of a fleet), or one another node relayed (named)."""
        if relay:
            event = {**event, "node": self.config.node}
            if self.fleet is not None:
                self.fleet.publish({"at": time.time(), **event})
        self._seq += 1
        event = {"at": time.time(), **event, "seq": self._seq}
        self._backlog.append(event)
        for listener in tuple(self._listeners):
            with contextlib.suppress(Exception):  # a slow or gone client never hurts delivery
                listener(event)

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

    async def _sample_history(self) -> None:
        """The queue depths as the store counts them (every device in one read): at once,
        then once a bucket. A device whose commands moved during the read keeps what the
        events made of it."""
        while True:
            seen = {device: self.history.command_events(device) for device in self.devices}
            try:
                depths = await self.store.depths(list(self.devices))
            except KeeplinkError:
                depths = {}  # the store is away: the events' counts stand until it is back
            except Exception:  # noqa: BLE001 - see below
                # Deliberately broad: the history's correction must never end, nor reach
                # delivery. Logged once, with its traceback.
                depths = {}
                if not self._sampler_failed:
                    self._sampler_failed = True
                    _log.exception("gateway: the history's queue sample failed")
            for device, (queued, _) in depths.items():
                if self.history.command_events(device) == seen.get(device):
                    self.history.sample(device, queued)
            await asyncio.sleep(BUCKET_S)

    def _on_link(self, event: LinkEvent) -> None:
        if isinstance(event, ProtocolErrorSeen):
            link = next((lk for lk in self.links.values() if lk.name == event.link), None)
            if link is not None:
                at = _epoch(link, event.at)
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
        link = next((lk for lk in self.links.values() if lk.name == event.link), None)
        if event.retry_at is not None and link is not None:
            retry_in = max(0.0, event.retry_at - link.clock.now())
        self._publish(
            {
                "type": "link",
                "device": event.link,
                "old": event.old.value,
                "new": event.new.value,
                "error": (event.error.to_wire() if event.error is not None else None),
                "retry_in_s": retry_in,
            }
        )

    def _on_outbox(self, event: OutboxEvent) -> None:
        if isinstance(event, CommandStateChanged):
            command = event.command
            if command.state is CommandState.SUCCEEDED:
                latency = command.updated_at - command.created_at
                self.delivery_latencies.append(latency)
                if self.on_delivered is not None:
                    self.on_delivered(latency)
            self._publish(
                {
                    "type": "command",
                    "old": event.old.value if event.old is not None else None,
                    "command": self.command_json(command),
                }
            )
        elif isinstance(event, FirmwareProgress):
            self._publish(
                {
                    "type": "firmware_progress",
                    "command_id": event.command_id,
                    "device": event.device,
                    "offset": event.offset,
                    "size": event.size,
                    "percent": round(event.percent, 2),
                    "rate_bps": round(event.rate_bps, 1),
                    "resumes": event.resumes,
                }
            )
        elif isinstance(event, CommandWaiting):
            self._publish(
                {
                    "type": "waiting",
                    "device": event.device,
                    "command_id": event.command_id,
                    "waiting": waiting_json(event.waiting),
                }
            )
        elif isinstance(event, DeliveryParked):
            self._publish(
                {
                    "type": "parked",
                    "device": event.device,
                    "reason": event.reason,
                    "until": event.until,
                }
            )

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
        self._publish(
            {
                "type": "presence",
                "device": change.device,
                "old": change.old.value,
                "new": change.new.value,
                "cycle": change.cycle,
            }
        )

    # ------------------------------------------------------------------ views

    def command_json(self, command: Command) -> dict[str, Any]:
        """A command as the API shows it, with why it waits if it is queued."""
        return command_json(command, waiting=self.outbox.waiting(command))

    def device(self, device_id: str) -> DeviceConfig:
        try:
            return self.devices[device_id]
        except KeyError:
            raise DeviceNotFoundError(f"no device {device_id!r}") from None

    async def device_view(
        self,
        device_id: str,
        *,
        owners: Mapping[str, str] | None = None,
        statuses: Mapping[str, tuple[str, str]] | None = None,
        depths: Mapping[str, tuple[int, int]] | None = None,
        records: Mapping[str, DeviceRecord] | None = None,
    ) -> dict[str, Any]:
        """The device as the API shows it. ``owners``, ``statuses``, ``depths`` and
        ``records`` are what a list of every device read once for all of them."""
        config = self.device(device_id)
        link = self.links.get(device_id)
        stats = link.statistics() if link is not None else None
        elsewhere = self.fleet is not None and not self.fleet.owns(device_id)
        if elsewhere:
            # Another node (or none yet) delivers to it: the shared store has its record,
            # and that node's events what its link and presence are.
            if records is None:
                records = await self.store.get_devices([device_id])
            record = records.get(device_id) or DeviceRecord(device=device_id)
        else:
            record = await self.outbox.device_record(device_id)
        if depths is None:
            depths = await self.store.depths([device_id])
        queued, sending = depths[device_id]
        last = stats.last_error if stats is not None else None
        retry_in = None
        if stats is not None and stats.retry_at is not None and link is not None:
            retry_in = max(0.0, stats.retry_at - link.clock.now())
        view: dict[str, Any] = {
            "id": device_id,
            "node": await self.owner_of(device_id, owners=owners),
            "driver": config.driver,
            "presence": self.presence.presence(device_id).value,
            "link": {
                "state": stats.state.value if stats else "idle",
                "attempt": stats.attempt if stats else 0,
                "connects": stats.connects if stats else 0,
                "disconnects": stats.disconnects if stats else 0,
                "retry_in_s": retry_in,
                "last_error": last.to_wire() if last else None,
                "firmware": stats.session.firmware if stats and stats.session else None,
                "protocol_errors": _protocol_errors_json(link, stats),
                "late_replies": _late_replies_json(link, stats),
            },
            "queued": queued,
            "sending": sending,
            "parked": (
                {"reason": record.parked_reason, "until": record.parked_until}
                if record.parked_reason is not None
                else None
            ),
        }
        if elsewhere:
            remote = await self._remote_status(device_id, view["node"], statuses)
            view["presence"] = remote.get("presence", "unknown")
            link_view = remote.get("link", {})
            view["link"] = {
                "state": link_view.get("state", "unknown"),
                "last_error": link_view.get("last_error"),
            }
        return view

    async def owner_of(
        self, device_id: str, *, owners: Mapping[str, str] | None = None
    ) -> str | None:
        """The node delivering to the device: this one on a single node; in a fleet, the
        lease holder as the shared store has it now (``None`` while unowned), so every
        node answers the same."""
        if self.fleet is None:
            return self.config.node
        if owners is None:
            owners = await self.owners()
        return owners.get(device_id)

    async def _remote_status(
        self,
        device_id: str,
        owner: str | None,
        statuses: Mapping[str, tuple[str, str]] | None,
    ) -> dict[str, Any]:
        """What the device's owner last recorded of it (from the store), or, while the
        store cannot be reached, what its relayed events said."""
        assert self.fleet is not None
        if statuses is None:
            try:
                statuses = await self.fleet.store.statuses()
            except KeeplinkError:
                return self.remote.get(device_id, {})
        node, text = statuses.get(device_id, (None, "{}"))
        if owner is None or node != owner:
            return {}  # unowned, or its owner has not said anything yet
        try:
            status = json.loads(text)
        except ValueError:
            return {}
        return status if isinstance(status, dict) else {}

    async def owners(self) -> Mapping[str, str]:
        """Device → owning node, read from the shared store (the keeper's last reading
        while the store cannot be reached)."""
        assert self.fleet is not None
        try:
            return await self.fleet.store.owners()
        except KeeplinkError:
            return self.fleet.owners

    async def devices_view(self) -> list[dict[str, Any]]:
        """Every device's view, from a few reads for all of them (not a few each)."""
        owners = statuses = records = None
        if self.fleet is not None:
            owners = await self.owners()
            with contextlib.suppress(KeeplinkError):
                statuses = await self.fleet.store.statuses()
            records = await self.store.get_devices(
                [d for d in self.devices if not self.fleet.owns(d)]
            )
        depths = await self.store.depths(list(self.devices))
        return [
            await self.device_view(
                device_id, owners=owners, statuses=statuses, depths=depths, records=records
            )
            for device_id in self.devices
        ]

    def refusal_note(self, device_id: str) -> str | None:
        """Why the device's commands cannot go out until something changes, when its link
        was refused (``auth_failed``, ``device_mismatch``, a config error): the note a
        submit answers with. ``None`` when the link was not refused, or another node owns
        the device. Refusal notes start with ``queued: the link``."""
        if self.fleet is not None and not self.fleet.owns(device_id):
            return None
        link = self.links.get(device_id)
        error = link.last_error if link is not None else None
        if link is None or error is None or error_class_of(error.code) is not ErrorClass.TERMINAL:
            return None
        message = error.message
        if len(message) > NOTE_MESSAGE_CHARS:
            message = message[:NOTE_MESSAGE_CHARS] + "…"
        why = f"{error.wire_code}: {message}"
        action = f"POST /api/devices/{device_id}/reconnect"
        if link.state is LinkState.FAILED:
            return f"queued: the link failed ({why}); {action} or fix the device config"
        retry_s = link.backoff.terminal_retry_s
        if link.state is LinkState.BACKOFF and retry_s is not None:
            return (
                f"queued: the link was refused ({why}); retrying every {retry_s:g} s, "
                f"or {action} to retry now"
            )
        return None

    async def _delivered_here(self, device_id: str, what: str) -> None:
        """Raise DeviceNotFoundError for an unknown device, and ConflictError in a fleet
        when another node delivers to it (``what`` must be sent there)."""
        self.device(device_id)
        if self.fleet is not None and not self.fleet.owns(device_id):
            owner = await self.owner_of(device_id)
            where = f"node {owner!r}" if owner is not None else "no node yet"
            raise ConflictError(
                f"device {device_id!r} is delivered to by {where}, not this one "
                f"({self.config.node!r}); send the {what} there"
            )

    async def reconnect(self, device_id: str) -> dict[str, Any]:
        """Make the device's link try again now: a failed link starts again (for a device
        whose credentials or identity were fixed), a link waiting out a backoff skips the
        rest of the wait. A link that is connected or connecting is left alone; nothing
        ever cancels a handshake in progress.

        Returns ``{"reconnect": "started" | "woken" | "none", "note", "device"}`` (the
        device view afterwards). Raises DeviceNotFoundError, and ConflictError in a fleet
        when another node owns the device (its link runs there).
        """
        await self._delivered_here(device_id, "reconnect")
        link = self.links[device_id]
        error = link.last_error
        state = link.state
        if state is LinkState.FAILED:
            link.connect()
            action = "started"
            why = f" ({error.wire_code}: {error.message[:NOTE_MESSAGE_CHARS]})" if error else ""
            note = f"the failed link{why} tries again now"
        elif state is LinkState.BACKOFF and link.wake("reconnect request"):
            action, note = "woken", "the link skips the rest of its backoff wait"
        else:
            action, note = "none", f"nothing to do: the link is {state.value}"
        _log.info("gateway: reconnect of %r requested: %s", device_id, action)
        return {"reconnect": action, "note": note, "device": await self.device_view(device_id)}

    async def resume(self, device_id: str) -> dict[str, Any]:
        """Deliver to a device the breaker parked (after repeated failed delivery cycles)
        now, instead of at the end of its park. A device that is not parked is left alone.

        Returns ``{"resumed": bool, "note", "device"}`` (the device view afterwards).
        Raises DeviceNotFoundError, and ConflictError in a fleet when another node owns
        the device (its deliveries run there).
        """
        await self._delivered_here(device_id, "resume")
        record = await self.outbox.device_record(device_id)
        if record.parked_reason is None:
            note = "nothing to do: delivery to the device is not parked"
            resumed = False
        else:
            await self.outbox.resume(device_id)
            note = "delivery resumes now; the failed-cycle count starts again from 0"
            resumed = True
        _log.info("gateway: resume of %r requested: %s", device_id, note)
        return {"resumed": resumed, "note": note, "device": await self.device_view(device_id)}

    def history_view(self, device_id: str, *, hours: int) -> dict[str, Any]:
        """The device's last ``hours`` as this node remembers them (the API's
        DeviceHistory)."""
        self.device(device_id)
        relayed = self.fleet is not None and not self.fleet.owns(device_id)
        view = self.history.view(device_id, hours=hours)
        return {"device": device_id, "node": self.config.node, "relayed": relayed, **view}

    def presence_of(self, device_id: str) -> Presence:
        return self.presence.presence(device_id)

    def link_counts(self) -> Mapping[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        for link in set(self.links.values()):
            counts[link.state.value] += 1
        return counts
