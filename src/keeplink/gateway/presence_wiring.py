"""Wiring each device's presence: its own debounce, and mDNS for ``presence = "mdns"``.

The links and the drivers' sources (unit probes, MQTT availability) report on their own;
what is wired here is what the config adds on top of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keeplink._core.clock import Clock
from keeplink._core.errors import KeeplinkError
from keeplink._link import Link
from keeplink.gateway.config import (
    DEFAULT_DEBOUNCE_OFFLINE_S,
    DEFAULT_DEBOUNCE_ONLINE_S,
    DeviceConfig,
    GatewayConfig,
)
from keeplink.gateway.planning import naming
from keeplink.presence import PresenceTracker

if TYPE_CHECKING:
    from keeplink.presence.mdns import MdnsPresence

__all__ = ["presence_tracker", "start_mdns"]

_log = logging.getLogger("keeplink.gateway")


def presence_tracker(config: GatewayConfig, *, clock: Clock) -> PresenceTracker:
    """A tracker with each device's own debounce set before anything reports."""
    presence = PresenceTracker(
        clock=clock,
        debounce_online_s=DEFAULT_DEBOUNCE_ONLINE_S,
        debounce_offline_s=DEFAULT_DEBOUNCE_OFFLINE_S,
    )
    for device in config.devices:
        presence.configure(
            device.id,
            debounce_online_s=device.debounce_online_s,
            debounce_offline_s=device.debounce_offline_s,
        )
    return presence


async def start_mdns(
    config: GatewayConfig, presence: PresenceTracker, links: Mapping[str, Link[Any]]
) -> list[MdnsPresence]:
    """Watch every ``presence = "mdns"`` device on its service type: an announcement
    reports it online (Source.MDNS) and wakes its link; a goodbye reports it offline.
    Returns the watchers that started.

    mDNS that cannot start (no usable interface, its sockets refused) is logged with
    code ``discovery_failed`` and the gateway goes on without it: those devices keep
    the presence their links give them.
    """
    by_type: dict[str, list[DeviceConfig]] = {}
    for device in config.devices:
        if device.presence == "mdns" and device.mdns_type is not None:
            by_type.setdefault(device.mdns_type, []).append(device)
    if not by_type:
        return []
    from keeplink.presence.mdns import MdnsPresence

    started: list[MdnsPresence] = []
    for service_type, devices in by_type.items():
        mdns = MdnsPresence(service_type=service_type, presence=presence)
        for device in devices:
            with naming(config, device, "mdns_service"):
                mdns.watch(device.id, links[device.id], instance=device.mdns_instance)
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
        started.append(mdns)
    return started
