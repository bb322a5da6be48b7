"""Links sharing a hub's connection slots (a BLE proxy, a one-client Modbus gateway)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from helpers import eventually, until_state
from keeplink import (
    Backoff,
    Link,
    LinkState,
    StreamChannel,
    VirtualClock,
)
from keeplink._core.jsonline import Frame
from keeplink._slots import SlotPool
from keeplink.drivers import JsonLineDriver
from keeplink.testing import DeviceSimulator

S = LinkState


def hub_link(sim: DeviceSimulator, pool: SlotPool, name: str, **kwargs: Any) -> Link[Any]:
    kwargs.setdefault("heartbeat_s", None)
    return Link(JsonLineDriver(host=sim.host, port=sim.port), name=name, slots=pool, **kwargs)


@pytest.mark.slow
async def test_two_links_to_a_one_slot_hub_never_hold_two_sessions_at_once() -> None:
    rng = random.Random(704)
    async with DeviceSimulator(device_id="ble-proxy") as hub:
        pool = SlotPool(size=1, name="ble-proxy", acquire_timeout_s=20)
        fast = Backoff(initial_s=0.005, cap_s=0.02, exhausted_s=0.02)
        links = [hub_link(hub, pool, f"node{i}", backoff=fast) for i in (1, 2)]
        try:
            for link in links:
                link.start()

            def connects() -> int:
                return sum(link.statistics().connects for link in links)

            for _ in range(200):
                action = rng.choice(["drop", "drop", "abort", "stop-start"])
                before = connects()
                await eventually(lambda: any(link.state is S.CONNECTED for link in links))
                if action == "drop":
                    hub.drop_connections()
                elif action == "abort":
                    pool.abort_pending("commissioning ended")
                elif action == "stop-start":
                    # The holder: restarting a link that waits for the slot changes nothing.
                    victim = next(link for link in links if link.state is S.CONNECTED)
                    await victim.stop()
                    victim.start()
                await eventually(
                    lambda b=before: connects() > b,  # type: ignore[misc]
                    what="a fresh session after the disruption",
                )
                stats = pool.statistics()
                assert stats.held <= 1
                assert hub.statistics().max_sessions <= 1
        finally:
            await asyncio.gather(*(link.stop() for link in links))
            await pool.close()
        assert pool.statistics().held == 0
    assert hub.statistics().max_sessions == 1  # never two at once
    assert hub.statistics().connections_total >= 200  # and it really cycled


async def test_the_slot_is_held_for_the_session_and_released_when_the_channel_closes() -> None:
    async with DeviceSimulator(device_id="gw") as hub:
        pool = SlotPool(size=1, name="modbus-gw")
        link = hub_link(hub, pool, "meter")
        async with link:
            await asyncio.wait_for(link.wait_connected(), 10)
            assert pool.statistics().holders == ("meter",)
            hub.drop_connections()
            await until_state(link, S.BACKOFF)
            assert pool.statistics().held == 0
        assert pool.statistics().held == 0
        await pool.close()


async def test_an_exhausted_pool_is_a_clear_error_and_a_fixed_longer_wait(
    virtual_clock: VirtualClock,
) -> None:
    async with DeviceSimulator(device_id="ble", clock=virtual_clock) as hub:
        pool = SlotPool(size=1, name="ble-proxy", clock=virtual_clock, acquire_timeout_s=20)
        tool = pool.acquire_nowait("commissioning-tool")  # someone else holds the only slot
        link = hub_link(hub, pool, "lock", clock=virtual_clock, backoff=Backoff(exhausted_s=45))
        async with link:
            await until_state(link, S.CONNECTING)
            await virtual_clock.advance(19.9)
            assert link.state is S.CONNECTING  # still queued for the slot
            await virtual_clock.advance(0.1)
            await until_state(link, S.BACKOFF)
            stats = link.statistics()
            assert stats.last_error is not None
            assert stats.last_error.code == "out_of_connection_slots"
            message = stats.last_error.message
            for needle in ("ble-proxy", "1", "commissioning-tool"):
                assert needle in message
            assert stats.retry_at == 20 + 45
            tool.release()
            await virtual_clock.advance(45)
            await asyncio.wait_for(link.wait_connected(), 10)
        await pool.close()


class _SlowOpenDriver(JsonLineDriver):
    """open() waits on a gate, so a test can abort the pool mid-connect."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = asyncio.Event()
        self.opening = asyncio.Event()
        self.channels: list[StreamChannel[Frame]] = []

    async def open(self) -> StreamChannel[Frame]:
        self.opening.set()
        await self.gate.wait()
        channel = await super().open()
        self.channels.append(channel)
        return channel


async def test_a_connect_completing_after_an_abort_is_torn_down_and_its_slot_freed(
    virtual_clock: VirtualClock,
) -> None:
    async with DeviceSimulator(device_id="ble", clock=virtual_clock) as hub:
        pool = SlotPool(size=1, name="ble-proxy", clock=virtual_clock)
        driver = _SlowOpenDriver(host=hub.host, port=hub.port)
        link = Link(driver, name="lock", clock=virtual_clock, slots=pool, heartbeat_s=None)
        async with link:
            await asyncio.wait_for(driver.opening.wait(), 10)
            assert pool.statistics().held == 1
            pool.abort_pending("commissioning abandoned")  # the caller gave up mid-connect
            driver.gate.set()  # ... and the connect completes afterwards
            await until_state(link, S.BACKOFF)
            assert driver.channels[0].closed  # torn down by the generation check
            stats = link.statistics()
            assert stats.last_error is not None
            assert stats.last_error.code == "connection_aborted"
            assert pool.statistics().held == 0
            assert hub.statistics().sessions_active == 0
        await pool.close()


async def test_abort_pending_tears_down_an_orphan_session() -> None:
    async with DeviceSimulator(device_id="ble") as hub:
        pool = SlotPool(size=1, name="ble-proxy")
        link = hub_link(hub, pool, "lock", backoff=Backoff(initial_s=60, cap_s=60))
        async with link:
            await asyncio.wait_for(link.wait_connected(), 10)
            assert pool.abort_pending("scope ended") == 1
            await until_state(link, S.BACKOFF)
            assert pool.statistics().held == 0
            assert pool.statistics().orphans_torn_down == 1
            await eventually(lambda: hub.statistics().sessions_active == 0)
        await pool.close()


async def test_stop_while_queued_for_a_slot_loses_nothing(virtual_clock: VirtualClock) -> None:
    async with DeviceSimulator(device_id="gw", clock=virtual_clock) as hub:
        pool = SlotPool(size=1, name="gw", clock=virtual_clock)
        holder = pool.acquire_nowait("other")
        link = hub_link(hub, pool, "meter", clock=virtual_clock)
        link.start()
        await eventually(lambda: pool.statistics().waiting == 1)
        await link.stop()
        assert link.state is S.STOPPED
        assert pool.statistics().waiting == 0
        holder.release()
        assert pool.statistics().held == 0
        await pool.close()
