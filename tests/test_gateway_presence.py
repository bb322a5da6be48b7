"""Presence in the gateway: each device's debounce comes from its config, and the runtime
applies it (an in-process gateway, jsonline simulators on loopback, the memory store)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from helpers import IO_BOUND_S
from keeplink.gateway.config import (
    DEFAULT_DEBOUNCE_OFFLINE_S,
    DEFAULT_DEBOUNCE_ONLINE_S,
    parse_config,
)
from keeplink.gateway.runtime import Gateway
from keeplink.presence import Claim, Presence, PresenceChanged, Source
from keeplink.testing import DeviceSimulator

FAST = {"initial_s": 0.05, "cap_s": 0.2}


@contextlib.asynccontextmanager
async def running(*devices: dict[str, Any]) -> AsyncIterator[Gateway]:
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0", "store": "memory:"},
            "devices": [
                {"driver": "jsonline", "heartbeat_s": 30, "backoff": FAST, **d} for d in devices
            ],
        }
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def test_a_devices_configured_debounce_decides_when_it_is_announced_online() -> None:
    async with (
        DeviceSimulator(device_id="quick") as quick,
        DeviceSimulator(device_id="plain") as plain,
    ):
        changes: list[PresenceChanged] = []
        devices = [
            {"id": "quick", "port": quick.port, "debounce_online_s": 0.25},
            {"id": "plain", "port": plain.port},  # the defaults
        ]
        async with running(*devices) as gateway:
            gateway.presence.subscribe(changes.append)
            async with asyncio.timeout(IO_BOUND_S):
                await gateway.presence.wait_for("quick", Presence.ONLINE)
                await gateway.presence.wait_for("plain", Presence.ONLINE)
    online = {c.device: c for c in changes if c.new is Presence.ONLINE}
    # Announced exactly the device's debounce after its link made it present (clock time).
    held = {d: c.at - c.online_since for d, c in online.items() if c.online_since is not None}
    assert held == {
        "quick": pytest.approx(0.25, abs=1e-9),
        "plain": pytest.approx(DEFAULT_DEBOUNCE_ONLINE_S, abs=1e-9),
    }, held
    assert gateway.presence.debounce_of("quick") == (0.25, DEFAULT_DEBOUNCE_OFFLINE_S)


async def test_a_configured_offline_debounce_of_zero_announces_a_lost_device_at_once() -> None:
    async with DeviceSimulator(device_id="hall") as sim:
        seen: list[tuple[PresenceChanged, Claim]] = []
        device = {"id": "hall", "port": sim.port, "debounce_online_s": 0, "debounce_offline_s": 0}
        async with running(device) as gateway:
            tracker = gateway.presence

            def on_change(change: PresenceChanged) -> None:
                # Called from inside the report that caused it: that claim is the link's.
                seen.append((change, tracker.claims("hall")[Source.LINK]))

            tracker.subscribe(on_change)
            async with asyncio.timeout(IO_BOUND_S):
                await tracker.wait_for("hall", Presence.ONLINE)
                await sim.stop()
                await tracker.wait_for("hall", Presence.OFFLINE)
    ((change, claim),) = [(c, k) for c, k in seen if c.new is Presence.OFFLINE]
    assert not claim.online
    assert change.at == claim.at  # announced the instant the link said so: no debounce
    assert tracker.debounce_of("hall") == (0, 0)
