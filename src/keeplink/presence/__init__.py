"""Presence: whether a device is there, from the claims of its sources.

The rule (who wins, when a change is announced) lives in :mod:`keeplink._core.presence`;
:class:`PresenceTracker` runs it on a clock. The sources that feed it live beside it, one
module each, and all report through one :class:`PresenceSink`:

- the device's own link (the gateway and the outbox report its connects and drops);
- :mod:`keeplink.presence.mdns`: DNS-SD announcements (extra ``mdns``), which also wake a
  link out of a backoff wait;
- :mod:`keeplink.presence.modbus`: a cheap read per unit behind a Modbus gateway
  (:class:`~keeplink.presence.modbus.UnitProbe`);
- :mod:`keeplink.presence.mqtt`: the availability messages (and last wills) the MQTT
  driver receives for its devices (extra ``mqtt``);

Drivers only speak their protocol; a source that uses one (a probe read, a broker's
availability topic) sits here, above the drivers, and never inside them.
"""

from __future__ import annotations

from typing import Protocol

from keeplink._core.presence import Claim, Presence, PresenceChanged, Source
from keeplink.presence.tracker import PresenceTracker

__all__ = [
    "Claim",
    "Presence",
    "PresenceChanged",
    "PresenceSink",
    "PresenceTracker",
    "Source",
]


class PresenceSink(Protocol):
    """Where a presence source sends its claims; a :class:`PresenceTracker` is one.

    ``report`` says ``device`` is online (or offline) now, for ``ttl_s`` seconds (``None``:
    until the source says otherwise); ``forget`` drops the source's claim about ``device``.
    """

    def report(
        self, device: str, source: Source, online: bool, *, ttl_s: float | None = None
    ) -> None: ...

    def forget(self, device: str, source: Source) -> None: ...
