"""A thermostat client library built on keeplink: the part an integration imports.

    async with Thermostat(
        host="192.0.2.10", port=7001, token="s3cret",
        device_id="hall-thermostat", store="thermostat.db",
    ) as thermostat:
        thermostat.add_listener(lambda: print(thermostat.available, thermostat.state))
        result = await thermostat.set_target(21.5)
        print("applied" if result.applied else "queued", "rssi", result.rssi)

The thermostat speaks keeplink's jsonline protocol (docs/protocol.md); ``keeplink sim`` is
one. What keeplink does here, so that this module does not have to:

- **The connection** (:class:`keeplink.Link` with a
  :class:`~keeplink.drivers.JsonLineDriver`): connect, the token handshake, heartbeats and a
  liveness limit (a thermostat that lost power is noticed within 3 heartbeats), and
  reconnecting with backoff after the thermostat restarts. Nothing in this module ever
  reconnects.
- **Commands** (:class:`keeplink.outbox.Outbox` on a
  :class:`~keeplink.outbox.SqliteStore`): :meth:`Thermostat.set_target` stores the command
  before anything is sent; it is delivered at once when the thermostat is there, or when it
  comes back (also after this program restarted), with an idempotency key so that a
  re-delivery is not applied twice.
- **Availability** (the outbox's presence tracker, fed by the link): debounced, so a
  thermostat whose Wi-Fi drops for a second does not flap between available and not.

What this module adds is the device's meaning: a typed target, a cached
:class:`ThermostatState` kept up to date from state pushes and acks, and an
:attr:`~Thermostat.available` flag, with listeners to call when either changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from keeplink import (
    Acknowledged,
    Backoff,
    Clock,
    FrameReceived,
    Link,
    LinkEvent,
    LinkState,
    LinkStateChanged,
    Outcome,
    SessionInfo,
    StatePush,
    deadline,
    enum_or_none,
)
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import (
    Command,
    CommandState,
    CommandStateChanged,
    DeliveryContext,
    Outbox,
    OutboxEvent,
    SqliteStore,
)
from keeplink.presence import Presence, PresenceChanged

__all__ = [
    "MAX_TARGET_C",
    "MIN_TARGET_C",
    "Mode",
    "TargetResult",
    "Thermostat",
    "ThermostatError",
    "ThermostatState",
]

_log = logging.getLogger(__name__)

MIN_TARGET_C: Final = 5.0
MAX_TARGET_C: Final = 30.0
REFRESH_TIMEOUT_S: Final = 5.0
"""How long a state read (``get``) after each (re)connect may take."""
SIDE: Final = "side"
"""Where :func:`deliver_keeping_side_data` keeps an ack's side data in a command's result."""


class Mode(enum.StrEnum):
    OFF = "off"
    HEAT = "heat"
    COOL = "cool"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class ThermostatState:
    """What the thermostat last said. ``None``: it has not said yet, or it said something this
    version does not understand (a mode newer firmware added), never a raw value."""

    temperature: float | None = None
    target: float | None = None
    mode: Mode | None = None

    def merged(self, values: Mapping[str, Any]) -> ThermostatState:
        """This state updated with the ``values`` a thermostat sent (only the keys it sent)."""
        changes: dict[str, Any] = {}
        if "temp" in values:
            changes["temperature"] = _number(values["temp"])
        if "target" in values:
            changes["target"] = _number(values["target"])
        if "mode" in values:
            # keeplink's enum_or_none: an unknown mode is None ("unknown"), never a string
            # that could be fed back into a setter.
            changes["mode"] = enum_or_none(Mode, values["mode"])
        return dataclasses.replace(self, **changes)


def _number(raw: object) -> float | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float):  # JSON true is no number
        return None
    return float(raw)


@dataclass(frozen=True, slots=True)
class TargetResult:
    """What became of a :meth:`Thermostat.set_target`."""

    target: float
    state: CommandState
    """``succeeded``: applied. ``queued`` (or ``sending``): not yet, the thermostat is away
    or slow; it is delivered when it is back. ``superseded``: a newer target replaced it
    before it was sent."""
    command_id: str
    rssi: int | None = None
    """The signal strength the thermostat reported in its ack (side data), when applied."""

    @property
    def applied(self) -> bool:
        return self.state is CommandState.SUCCEEDED


class ThermostatError(Exception):
    """The thermostat refused a command, or it could not be delivered (its time to live ran
    out, its attempts were used up). ``code`` is keeplink's stable error code, or the
    thermostat's own code for a refusal (``rejected``, ``out_of_range``…)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


async def deliver_keeping_side_data(
    link: Link[Any], command: Command, ctx: DeliveryContext
) -> Outcome:
    """An outbox executor: deliver ``command`` as the outbox itself would (same timeout,
    same idempotency key), and keep the ack's side data in the stored result.

    The outbox stores an ack's ``result`` but not its side data (``Acknowledged.side``: the
    rssi). Installed for the ``set`` op, this folds the side data into the result under
    ``"side"``, so that :meth:`Thermostat.set_target` can return the rssi of its own ack,
    also for a command that was delivered long after it was submitted.
    """
    outcome = await link.request(
        command.op,
        command.args,
        timeout=ctx.outbox.request_timeout_s,
        key=command.idempotency_key,
    )
    if isinstance(outcome, Acknowledged) and outcome.side:
        return dataclasses.replace(outcome, result={**outcome.result, SIDE: dict(outcome.side)})
    return outcome


class Thermostat:
    """One thermostat: its link, its durable commands, its cached state and availability.

    Configuration is keyword-only. ``store`` is the SQLite file where commands wait while the
    thermostat is away (``":memory:"`` keeps nothing across restarts). ``debounce_online_s``
    and ``debounce_offline_s`` are how long the thermostat must be back, or gone, before
    :attr:`available` says so. ``clock`` is for tests (a :class:`keeplink.VirtualClock`
    started at an epoch time, shared by the link and the outbox); by default the link runs on
    the event loop's clock and the outbox on wall-clock time, as keeplink wants them.

    Use it once: :meth:`start` (or ``async with``), then :meth:`close`.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        device_id: str,
        token: str | None = None,
        store: str | os.PathLike[str] = "thermostat.db",
        heartbeat_s: float = 30.0,
        backoff: Backoff | None = None,
        debounce_online_s: float = 1.0,
        debounce_offline_s: float = 5.0,
        command_ttl_s: float = 3600.0,
        clock: Clock | None = None,
    ) -> None:
        self.device_id = device_id
        self.command_ttl_s = command_ttl_s
        # device_id: a welcome that names another device (a reused address) is refused
        # before any command is sent to it.
        driver = JsonLineDriver(host=host, port=port, token=token, device_id=device_id)
        self._link: Link[Any] = Link(
            driver, name=device_id, heartbeat_s=heartbeat_s, backoff=backoff, clock=clock
        )
        self._outbox = Outbox(
            SqliteStore(store),
            clock=clock,
            executors={"set": deliver_keeping_side_data},
        )
        self._debounce = (debounce_online_s, debounce_offline_s)
        self._state = ThermostatState()
        self._available = False
        self._listeners: list[Callable[[], object]] = []
        self._unsubscribe: list[Callable[[], None]] = []
        self._refresh_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the command store and start connecting (returns at once; the link connects
        and reconnects in the background). Commands a crash left in flight are queued again."""
        await self._outbox.start()
        try:
            presence = self._outbox.presence
            online_s, offline_s = self._debounce
            presence.configure(
                self.device_id, debounce_online_s=online_s, debounce_offline_s=offline_s
            )
            self._unsubscribe += [
                presence.subscribe(self._on_presence),
                self._outbox.subscribe(self._on_outbox_event),
                self._link.subscribe(self._on_link_event),
            ]
            # The link's own state is the thermostat's presence: connected is online.
            await self._outbox.attach(self.device_id, self._link)
            self._link.start()
        except BaseException:
            await self.close()  # a half-started thermostat leaves nothing running either
            raise

    async def close(self) -> None:
        """Stop everything this thermostat started and wait until it has stopped: no task,
        no timer, no open file is left behind. Queued commands stay in the store."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        await self._link.stop()  # first: nothing new goes out
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        await self._outbox.close()  # and the presence tracker it made
        self._available = False

    async def __aenter__(self) -> Thermostat:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ what it knows

    @property
    def available(self) -> bool:
        """The thermostat is there (debounced): connected, or gone for less than
        ``debounce_offline_s``."""
        return self._available

    @property
    def state(self) -> ThermostatState:
        return self._state

    @property
    def rssi(self) -> int | None:
        """The newest signal strength any ack reported."""
        rssi = self._link.side_data.get("rssi")
        return rssi if isinstance(rssi, int) and not isinstance(rssi, bool) else None

    @property
    def session(self) -> SessionInfo | None:
        """What the handshake learned (device id, firmware), while connected."""
        return self._link.session

    @property
    def link(self) -> Link[Any]:
        """The underlying link, for its state and statistics (diagnostics)."""
        return self._link

    def add_listener(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback()`` whenever :attr:`state` or :attr:`available` changes (where a
        Home Assistant entity would write its state). Returns a function that removes it."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    async def wait_connected(self, *, timeout: float) -> SessionInfo:
        """Wait until the link is connected. Raises :class:`keeplink.AuthError` (code
        ``auth_failed``, or ``device_mismatch`` for another device at the address) if the
        thermostat refuses us, :class:`keeplink.WaitTimeoutError` (a TimeoutError) if it is
        not reachable within ``timeout``; the link goes on trying after a timeout."""
        return await self._link.wait_connected(timeout=timeout)

    async def wait_available(self, *, timeout: float) -> None:
        """Wait until :attr:`available` is true. Raises TimeoutError after ``timeout``."""
        clock = self._link.clock
        async with deadline(clock, clock.now() + timeout):
            await self._outbox.presence.wait_for(self.device_id, Presence.ONLINE)

    # ------------------------------------------------------------------ commands

    async def set_target(self, celsius: float, *, wait_s: float = 10.0) -> TargetResult:
        """Set the target temperature.

        The command is stored first, then delivered: at once when the thermostat is there,
        else when it is back, within ``command_ttl_s``. A newer target supersedes one that
        is still queued (its supersede key is ``"target"``): only the last one is sent.

        Waits up to ``wait_s`` for the thermostat's ack, and returns ``applied`` with the
        ack's ``rssi``; or, when it is away or slow, returns with ``state`` ``queued`` and
        the command carries on without the caller. Raises ValueError for a target out of
        range (nothing stored), :class:`ThermostatError` when the thermostat refused it or
        it could not be delivered.
        """
        if (
            isinstance(celsius, bool)
            or not isinstance(celsius, int | float)
            or not MIN_TARGET_C <= celsius <= MAX_TARGET_C
        ):
            raise ValueError(
                f"target must be a number in {MIN_TARGET_C:g}..{MAX_TARGET_C:g} °C, got {celsius!r}"
            )
        target = float(celsius)
        command = await self._outbox.submit(
            self.device_id, "set", {"target": target}, key="target", ttl_s=self.command_ttl_s
        )
        if wait_s > 0:
            clock = self._link.clock
            try:
                async with deadline(clock, clock.now() + wait_s):
                    command = await self._outbox.wait(command.id)
            except TimeoutError:
                command = await self._outbox.get(command.id)  # still queued, or being sent
        return _target_result(target, command)

    async def refresh(self) -> ThermostatState:
        """Read the whole state from the thermostat now (op ``get``), bypassing the outbox:
        a read is only worth something while the thermostat is there. Raises
        :class:`ThermostatError` if it is not answered."""
        outcome = await self._link.request("get", timeout=REFRESH_TIMEOUT_S)
        match outcome:
            case Acknowledged(result=result):
                self._update(result.get("state"))
                return self._state
            case _:  # Rejected, TimedOut, Unavailable, Cancelled: each carries its error
                raise ThermostatError(outcome.error.wire_code, outcome.error.message)

    # ------------------------------------------------------------------ events

    def _on_link_event(self, event: LinkEvent) -> None:
        match event:
            case FrameReceived(frame=StatePush(values=values)):
                self._update(values)
            case LinkStateChanged(new=LinkState.CONNECTED):
                # A thermostat that rebooted may have changed while we were away: read it
                # again after every (re)connect, without holding up the link's callback.
                self._refresh_soon()
            case _:
                # Everything else the link says (its other states, side data, malformed
                # input it dropped) is the link's business: it logs what matters itself.
                pass

    def _on_presence(self, change: PresenceChanged) -> None:
        if change.device == self.device_id:
            self._set_available(change.new is Presence.ONLINE)

    def _on_outbox_event(self, event: OutboxEvent) -> None:
        # A command delivered while nobody was waiting for it (queued while the thermostat
        # was away) still updates the cached state: the ack says what the device holds.
        if (
            isinstance(event, CommandStateChanged)
            and event.command.device == self.device_id
            and event.command.state is CommandState.SUCCEEDED
            and event.command.result is not None
        ):
            self._update(event.command.result.get("state"))

    def _refresh_soon(self) -> None:
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        self._refresh_task = asyncio.get_running_loop().create_task(
            self._refresh_quietly(), name=f"thermostat[{self.device_id}].refresh"
        )

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except ThermostatError as exc:
            _log.info("%s: could not read the state after connecting: %s", self.device_id, exc)

    def _update(self, values: object) -> None:
        if not isinstance(values, Mapping):
            return
        new = self._state.merged(values)
        if new != self._state:
            self._state = new
            self._notify()

    def _set_available(self, available: bool) -> None:
        if available != self._available:
            self._available = available
            self._notify()

    def _notify(self) -> None:
        for callback in tuple(self._listeners):
            try:
                callback()
            except Exception:  # noqa: BLE001 - see below
                # Deliberately broad: a listener's bug must not break the thermostat (the
                # rule keeplink follows for its own subscribers).
                _log.exception("%s: a listener raised", self.device_id)


def _target_result(target: float, command: Command) -> TargetResult:
    match command.state:
        case CommandState.SUCCEEDED:
            side = (command.result or {}).get(SIDE)
            rssi = side.get("rssi") if isinstance(side, Mapping) else None
            if isinstance(rssi, bool) or not isinstance(rssi, int):
                rssi = None
            return TargetResult(target, command.state, command.id, rssi=rssi)
        case CommandState.QUEUED | CommandState.SENDING | CommandState.SUPERSEDED:
            return TargetResult(target, command.state, command.id)
        case _:  # rejected, failed, expired, cancelled: each with its last error
            error = command.last_error
            if error is None:
                raise ThermostatError(command.state.value, f"the command was {command.state}")
            raise ThermostatError(error.code, error.message)
