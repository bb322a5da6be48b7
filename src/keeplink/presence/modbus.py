"""Presence of the units behind a Modbus TCP gateway, from a cheap read per unit.

    probe = UnitProbe(
        link=modbus_link("10.0.0.7", 502),
        presence=tracker,
        units=[ProbeTarget(device="boiler", unit=1), ProbeTarget(device="pump", unit=2)],
    )
    async with probe: ...

A gateway link being up says nothing about one unit behind it; a read that the unit
answers does. The probe speaks through the link's ordinary requests, so it works with any
link whose driver speaks :mod:`keeplink.drivers.modbus` ops.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keeplink._clock import Wakeable
from keeplink._core.clock import Clock
from keeplink._core.errors import ConfigError, InvalidRequestError
from keeplink._core.outcomes import Acknowledged, Rejected, TimedOut
from keeplink._core.presence import Source
from keeplink._core.states import LinkState
from keeplink._events import LinkEvent, LinkStateChanged
from keeplink._link import LIVENESS_RATIO, Link
from keeplink._logs import Repeats
from keeplink.drivers.modbus import PRESENT_EXCEPTIONS, READ_OPS, ModbusFrame, exception_of
from keeplink.presence import PresenceSink

__all__ = ["ProbeTarget", "UnitProbe"]

_log = logging.getLogger("keeplink.presence.modbus")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeTarget:
    """One unit to probe: the device name it has, its unit id, and a cheap read to try."""

    device: str
    unit: int
    op: str = "read_holding_registers"
    address: int = 0

    def args(self) -> dict[str, int]:
        return {"unit": self.unit, "address": self.address, "count": 1}


class UnitProbe:
    """Reads each unit behind a gateway link every ``interval_s`` and reports its presence.

    An acknowledged read, or an exception in :data:`PRESENT_EXCEPTIONS` (the unit answered,
    it only disliked the address, say), says online. Any other exception says offline: 4
    (server device failure: a server that could not do the read at all, which is what
    pymodbus's server answers for a unit it does not have), 0x0A/0x0B (the gateway could not
    reach the unit) or a code the spec does not define; and so does no reply within
    ``timeout_s``. Probe a register the unit can read: a unit that answers its probe read
    with exception 4 is reported offline, as it cannot serve reads. While the link itself
    is down the probe learns nothing about the units and says nothing: their last claims
    lapse after ``ttl_s`` (default ``LIVENESS_RATIO × interval_s``). Claims go to
    ``presence.report(device, Source.PROBE, online, ttl_s=ttl_s)``.

    A probe runs at once when the link (re)connects. ``timeout_s`` should exceed the
    gateway's own timeout towards its units, so that an absent unit is reported as the
    gateway's 0x0B rather than by our timeout. Probes share the link's in-flight window
    with other requests. Raises ConfigError for a bad configuration (a target whose probe
    read is invalid, a duplicate device name, non-positive times).

    ``start()`` (or ``async with``) starts it; ``await close()`` stops it and waits until
    its task is gone. Time comes from ``clock`` (default: the link's).
    """

    def __init__(
        self,
        *,
        link: Link[ModbusFrame],
        presence: PresenceSink,
        units: Sequence[ProbeTarget],
        interval_s: float = 10.0,
        timeout_s: float = 3.0,
        ttl_s: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        for key, value in (("interval_s", interval_s), ("timeout_s", timeout_s)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"unit probe: {key} must be > 0, got {value!r}")
        if ttl_s is not None and not (isinstance(ttl_s, int | float) and ttl_s > 0):
            raise ConfigError(f"unit probe: ttl_s must be > 0 or None, got {ttl_s!r}")
        targets = list(units)
        if not targets:
            raise ConfigError("unit probe: no units to probe")
        names = [t.device for t in targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"unit probe: device names must be unique, got {names}")
        for target in targets:
            if target.op not in READ_OPS:
                raise ConfigError(
                    f"unit probe: {target.device!r}: probe op must be a read, got {target.op!r}"
                )
            try:
                link.driver.build_request(0, target.op, target.args(), None)
            except InvalidRequestError as exc:
                raise ConfigError(f"unit probe: {target.device!r}: {exc.message}") from exc
        self.link = link
        self.presence = presence
        self.units: tuple[ProbeTarget, ...] = tuple(targets)
        self.interval_s = float(interval_s)
        self.timeout_s = float(timeout_s)
        self.ttl_s = float(ttl_s) if ttl_s is not None else LIVENESS_RATIO * self.interval_s
        self.clock: Clock = clock if clock is not None else link.clock
        self.rounds = 0
        """Completed probe rounds (every unit tried once)."""
        self._task: asyncio.Task[None] | None = None
        self._pause = Wakeable()
        self._again = False  # probe_now() during a round: start the next one at once
        self._unsubscribe: Callable[[], None] | None = None
        self._errors_logged: Repeats[type[BaseException]] = Repeats()

    def start(self) -> None:
        """Start probing (non-blocking). Idempotent while running."""
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"keeplink[{self.link.name}].unit-probe"
        )
        self._unsubscribe = self.link.subscribe(self._on_link_event)

    def probe_now(self) -> None:
        """Probe every unit now: cut the current wait short, or start the next round as soon
        as the current one ends."""
        self._again = True
        self._pause.wake()

    async def close(self) -> None:
        """Stop probing and wait until the probe task is gone. Idempotent. Claims already
        made stay with the presence tracker until their TTL runs out."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def __aenter__(self) -> UnitProbe:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _on_link_event(self, event: LinkEvent) -> None:
        if isinstance(event, LinkStateChanged) and event.new is LinkState.CONNECTED:
            self.probe_now()

    async def _run(self) -> None:
        while True:
            started = self.clock.now()
            for target in self.units:
                try:
                    await self._probe(target)
                except Exception as exc:  # noqa: BLE001 - see below
                    # Deliberately broad: a failing presence sink must not end probing of
                    # every unit for good. Logged with a traceback once per kind.
                    self._note_error(target, exc)
            self.rounds += 1
            await self._wait_until(started + self.interval_s)

    async def _probe(self, target: ProbeTarget) -> None:
        outcome = await self.link.request(target.op, target.args(), timeout=self.timeout_s)
        online: bool | None
        if isinstance(outcome, Acknowledged):
            online = True
        elif isinstance(outcome, Rejected):
            online = exception_of(outcome.code) in PRESENT_EXCEPTIONS
        elif isinstance(outcome, TimedOut):
            online = False
        else:  # Unavailable or Cancelled: the link is down, the unit unknown
            online = None
        _log.debug(
            "unit probe %r: %s (unit %d) -> %s",
            self.link.name,
            target.device,
            target.unit,
            {True: "online", False: "offline", None: "no opinion"}[online],
        )
        if online is not None:
            self.presence.report(target.device, Source.PROBE, online, ttl_s=self.ttl_s)

    async def _wait_until(self, when: float) -> None:
        if self._again:
            self._again = False
            return
        try:
            await self._pause.sleep_until(self.clock, when)
        finally:
            self._again = False

    def _note_error(self, target: ProbeTarget, exc: Exception) -> None:
        if not self._errors_logged.first(type(exc)):
            _log.debug("unit probe %r: %s failed again: %r", self.link.name, target.device, exc)
            return
        _log.error(
            "unit probe %r: probing %s failed unexpectedly",
            self.link.name,
            target.device,
            exc_info=exc,
        )
