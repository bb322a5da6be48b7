"""Presence tracking on a clock: sources report, the tracker debounces and announces.

The rule (who wins, when a change is announced) lives in :mod:`keeplink._core.presence`;
this module feeds it the injected clock's time, keeps one clock timer per device armed at
the device's next deadline (a debounce end or a claim expiry), and publishes each announced
change as a :class:`PresenceChanged` event::

    tracker = PresenceTracker(clock=clock)
    tracker.subscribe(on_presence)
    tracker.report("hall-thermostat", Source.MDNS, True, ttl_s=120)
    await tracker.wait_for("hall-thermostat", Presence.ONLINE)
    ...
    tracker.close()
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

from keeplink._clock import SystemClock
from keeplink._core.clock import Clock, Timer
from keeplink._core.errors import AbortedError
from keeplink._core.presence import (
    Claim,
    DevicePresence,
    Presence,
    PresenceChanged,
    Source,
    check_debounce,
)
from keeplink._events import EventHub

__all__ = ["PresenceTracker"]

_log = logging.getLogger("keeplink.presence")


class PresenceTracker:
    """Debounced presence for many devices, fed by sources with a precedence.

    ``report`` and ``forget`` are synchronous and stamp the clock's ``now()``; announcements
    happen on the clock's timers (one per device with something pending, never a sleep), so
    on a :class:`~keeplink.VirtualClock` their times are exact.

    ``debounce_online_s`` and ``debounce_offline_s`` are every device's debounce unless
    :meth:`configure` gives a device its own. Raises ConfigError on construction if a
    debounce is negative or not finite.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        debounce_online_s: float = 1.0,
        debounce_offline_s: float = 5.0,
    ) -> None:
        check_debounce("debounce_online_s", debounce_online_s)
        check_debounce("debounce_offline_s", debounce_offline_s)
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.debounce_online_s = debounce_online_s
        self.debounce_offline_s = debounce_offline_s
        self._devices: dict[str, DevicePresence] = {}
        self._debounce: dict[str, tuple[float, float]] = {}
        """Per-device debounce (online, offline) given by :meth:`configure`."""
        self._timers: dict[str, tuple[float, Timer]] = {}
        self._waiters: dict[str, list[tuple[Presence, asyncio.Future[None]]]] = {}
        self._events: EventHub[PresenceChanged] = EventHub("presence tracker")
        # Devices with announcements to publish. Publishing is never nested: a subscriber
        # that reports from its callback only marks a device here, and the outer loop
        # publishes, so every subscriber sees every device's changes in order.
        self._dirty: dict[str, None] = {}
        self._publishing = False
        self._last = -math.inf
        self._closed = False

    # ------------------------------------------------------------------ inputs (sync)

    def report(
        self, device: str, source: Source, online: bool, *, ttl_s: float | None = None
    ) -> None:
        """``source`` says ``device`` is online (or offline) now, for ``ttl_s`` seconds
        (``None``: until it says otherwise).

        Raises ValueError for an unknown source or a TTL that is not a positive number;
        nothing is recorded then. After :meth:`close`, reports are ignored (a source shutting
        down late is normal).
        """
        source = Source(source)
        if self._closed:
            _log.debug("presence tracker closed; ignoring %s report for %r", source.name, device)
            return
        now = self._now()
        claim = Claim(source, online, now, ttl_s)
        state = self._devices.get(device)
        if state is None:
            online_s, offline_s = self.debounce_of(device)
            state = self._devices[device] = DevicePresence(
                device, debounce_online_s=online_s, debounce_offline_s=offline_s
            )
        _log.debug(
            "device %r: %s says %s (ttl %s)",
            device,
            source.name,
            "online" if online else "offline",
            ttl_s,
        )
        state.claim(claim, now)
        self._changed(device)

    def configure(
        self,
        device: str,
        *,
        debounce_online_s: float | None = None,
        debounce_offline_s: float | None = None,
    ) -> None:
        """Give ``device`` its own debounce (``None``: keep the tracker's, or what an
        earlier call set). Best called before the device's first report; for a device
        already reported, it applies from its next raw change on (a change already waiting
        out its debounce keeps its due time).

        Raises ConfigError (nothing changed) if a debounce is negative or not finite.
        """
        online_s, offline_s = self.debounce_of(device)
        if debounce_online_s is not None:
            check_debounce("debounce_online_s", debounce_online_s)
            online_s = debounce_online_s
        if debounce_offline_s is not None:
            check_debounce("debounce_offline_s", debounce_offline_s)
            offline_s = debounce_offline_s
        self._debounce[device] = (online_s, offline_s)
        state = self._devices.get(device)
        if state is not None:
            state.debounce_online_s = online_s
            state.debounce_offline_s = offline_s

    def debounce_of(self, device: str) -> tuple[float, float]:
        """``device``'s debounce as ``(online_s, offline_s)``: its own, or the tracker's."""
        return self._debounce.get(device, (self.debounce_online_s, self.debounce_offline_s))

    def forget(self, device: str, source: Source) -> None:
        """``source`` no longer has an opinion about ``device``: its claim is dropped.

        The device does not go back to ``UNKNOWN``; with no claim left it goes ``OFFLINE``
        (after the debounce). Unknown devices and sources without a claim are a no-op.
        """
        state = self._devices.get(device)
        if self._closed or state is None:
            return
        state.forget(source, self._now())
        self._changed(device)

    # ------------------------------------------------------------------ queries

    def presence(self, device: str) -> Presence:
        """The announced (debounced) presence; ``UNKNOWN`` for a device never reported."""
        state = self._devices.get(device)
        return Presence.UNKNOWN if state is None else state.announced

    def cycle(self, device: str) -> int:
        """Announced transitions to ``ONLINE`` so far (0: never online)."""
        state = self._devices.get(device)
        return 0 if state is None else state.cycle

    def online_since(self, device: str) -> float | None:
        """Clock time at which the current online cycle's raw presence began; ``None`` unless
        the device is announced online."""
        state = self._devices.get(device)
        return None if state is None else state.online_since

    def claims(self, device: str) -> Mapping[Source, Claim]:
        """Each source's latest claim about ``device`` (expired ones included), read-only."""
        state = self._devices.get(device)
        return MappingProxyType({}) if state is None else state.claims

    def devices(self) -> list[str]:
        """Every device ever reported, in first-report order."""
        return list(self._devices)

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ outputs

    def subscribe(self, callback: Callable[[PresenceChanged], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every announced change; returns an unsubscribe
        function. A callback that raises is logged and counted, never felt by the tracker."""
        return self._events.subscribe(callback)

    @property
    def subscriber_errors(self) -> int:
        return self._events.subscriber_errors

    async def wait_for(self, device: str, presence: Presence) -> None:
        """Return once ``device``'s announced presence is ``presence`` (at once if it is).

        Raises AbortedError if the tracker is, or gets, closed first. Cancelling the wait
        leaves nothing behind.
        """
        if self.presence(device) == presence:
            return
        if self._closed:
            raise AbortedError(f"presence tracker closed while waiting for {device!r}")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(device, [])
        entry = (Presence(presence), future)
        waiters.append(entry)
        try:
            await future
        finally:
            waiters.remove(entry)
            if not waiters and self._waiters.get(device) is waiters:
                del self._waiters[device]

    def close(self) -> None:
        """Cancel every timer and fail pending :meth:`wait_for` calls with AbortedError.

        Idempotent. Presence queries keep answering the last announced state.
        """
        if self._closed:
            return
        self._closed = True
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for device, waiters in self._waiters.items():
            for _, future in waiters:
                if not future.done():
                    future.set_exception(
                        AbortedError(f"presence tracker closed while waiting for {device!r}")
                    )

    def __repr__(self) -> str:
        online = sum(1 for s in self._devices.values() if s.announced is Presence.ONLINE)
        state = " closed" if self._closed else ""
        return f"<PresenceTracker devices={len(self._devices)} online={online}{state}>"

    # ------------------------------------------------------------------ machinery

    def _now(self) -> float:
        # Never backwards: a timer may have run us at its deadline a hair before the loop's
        # clock got there (asyncio fires timers up to one clock resolution early).
        self._last = max(self._last, self.clock.now())
        return self._last

    def _fire(self, device: str, when: float) -> None:
        entry = self._timers.get(device)
        if entry is not None and entry[0] == when:
            del self._timers[device]
        self._last = max(self._last, when)
        self._changed(device)

    def _changed(self, device: str) -> None:
        """Publish what ``device`` has due now, then re-arm its timer."""
        self._dirty[device] = None
        if self._publishing:
            return
        self._publishing = True
        try:
            while self._dirty and not self._closed:
                name = next(iter(self._dirty))
                del self._dirty[name]
                state = self._devices[name]
                while not self._closed and (change := state.poll(self._now())) is not None:
                    self._publish(change)
                self._arm(state)
        finally:
            self._publishing = False
            self._dirty.clear()

    def _publish(self, change: PresenceChanged) -> None:
        _log.info(
            "device %r: %s -> %s at %.3f (source %s, cycle %d)",
            change.device,
            change.old,
            change.new,
            change.at,
            change.source.name if change.source is not None else "none",
            change.cycle,
        )
        for wanted, future in self._waiters.get(change.device, ()):
            if wanted == change.new and not future.done():
                future.set_result(None)
        self._events.emit(change)

    def _arm(self, state: DevicePresence) -> None:
        """Keep exactly one timer for ``state`` at its next deadline (or none)."""
        if self._closed:
            return  # a subscriber closed the tracker from its callback
        when = state.next_deadline(self._last)
        entry = self._timers.get(state.device)
        if entry is not None:
            if entry[0] == when:
                return
            entry[1].cancel()
            del self._timers[state.device]
        if when is not None:
            timer = self.clock.call_at(when, functools.partial(self._fire, state.device, when))
            self._timers[state.device] = (when, timer)
