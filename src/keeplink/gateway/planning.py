"""Planning the gateway's links from its config, by asking the driver registry.

A device of a driver without a hub gets a link of its own; the devices of a hub driver on
one host and port share one. Every plan is made before anything starts, so a driver that
is not installed or refuses its settings stops the gateway before it touches the store.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from keeplink._core.errors import ConfigError
from keeplink._link import Link
from keeplink._slots import SlotPool
from keeplink.gateway.config import DeviceConfig, GatewayConfig
from keeplink.gateway.drivers import REGISTRY, DriverSpec, PresenceSource
from keeplink.presence import PresenceTracker

__all__ = ["Plan", "link_groups", "naming", "plan_links"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """One link to start, the devices reached through it, and what reports their presence."""

    link: Link[Any]
    devices: list[DeviceConfig]
    hub: bool
    """The link is a hub's, shared by its devices (presence comes from ``sources``)."""
    sources: tuple[PresenceSource, ...] = ()


@contextlib.contextmanager
def naming(config: GatewayConfig, device: DeviceConfig, key: str) -> Iterator[None]:
    """A driver's ConfigError, told with the config file and the device's key."""
    try:
        yield
    except ConfigError as exc:
        where = f"devices[{config.devices.index(device)}].{key}"
        raise ConfigError(f"{config.source}: {where}: {exc.message}") from exc


def _needs(spec: DriverSpec) -> None:
    if spec.needs is not None and importlib.util.find_spec(spec.needs) is None:
        raise ConfigError(f"the {spec.name} driver needs: pip install 'keeplink[{spec.extra}]'")


def link_groups(config: GatewayConfig) -> list[list[DeviceConfig]]:
    """The devices of each link, in config order: one device each, or for a hub driver
    every device with the same driver, host and port."""
    groups: dict[tuple[str, ...], list[DeviceConfig]] = {}
    for device in config.devices:
        if REGISTRY[device.driver].hub:
            key: tuple[str, ...] = (device.driver, device.host, str(device.port))
        else:
            key = ("device", device.id)
        groups.setdefault(key, []).append(device)
    return list(groups.values())


def plan_links(
    config: GatewayConfig,
    *,
    presence: PresenceTracker,
    pool: Callable[[DeviceConfig], SlotPool | None],
) -> list[Plan]:
    """Every link to start (none started). ``pool`` gives a device's hub slot pool, if any.
    Raises ConfigError naming the file and the device's key: an extra a driver or mDNS
    presence needs is not installed, or a driver refuses what it was given."""
    for device in config.devices:
        if device.presence == "mdns" and importlib.util.find_spec("zeroconf") is None:
            raise ConfigError(
                f"{config.source}: devices[{config.devices.index(device)}]"
                ".presence: mDNS presence needs: pip install 'keeplink[mdns]'"
            )
    plans: list[Plan] = []
    for devices in link_groups(config):
        first = devices[0]
        spec = REGISTRY[first.driver]
        with naming(config, first, "driver"):
            _needs(spec)
        with naming(config, first, spec.checked_key):
            built = spec.build(devices, presence, pool(first))
        plans.append(Plan(link=built.link, devices=devices, hub=spec.hub, sources=built.sources))
    return plans
