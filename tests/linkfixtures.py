"""Fixtures for link tests: a simulator, a fault proxy in front of it, a link factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from keeplink import Link, VirtualClock
from keeplink.drivers import JsonLineDriver
from keeplink.testing import DeviceSimulator, FaultProxy

TOKEN = "s3cret"
HEARTBEAT_S = 30.0


@pytest.fixture
async def sim(virtual_clock: VirtualClock) -> AsyncIterator[DeviceSimulator]:
    async with DeviceSimulator(device_id="hall", token=TOKEN, clock=virtual_clock) as device:
        yield device


@pytest.fixture
async def proxy(sim: DeviceSimulator) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sim.host, sim.port, name="hall") as faults:
        yield faults


LinkFactory = Callable[..., Link[Any]]


@pytest.fixture
def make_link(proxy: FaultProxy, virtual_clock: VirtualClock) -> LinkFactory:
    """Links to the simulator through the proxy, on virtual time, with jitter pinned to the
    ceiling (draw = 1.0) so schedules can be asserted exactly."""

    def make(*, token: str | None = TOKEN, name: str = "hall", **kwargs: Any) -> Link[Any]:
        kwargs.setdefault("heartbeat_s", HEARTBEAT_S)
        kwargs.setdefault("rng", lambda: 1.0)
        driver = JsonLineDriver(host=proxy.host, port=proxy.port, token=token)
        return Link(driver, name=name, clock=virtual_clock, **kwargs)

    return make
