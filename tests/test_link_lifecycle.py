"""Link lifecycle: stop() in every state, restart, the exact backoff schedule, the reset
rule, wake signals, and a crowd of links spread by jitter."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from typing import Any

import pytest

from helpers import Recorder, connected, eventually, until_state
from keeplink import (
    Backoff,
    ErrorCode,
    FrameChannel,
    InvalidRequestError,
    LinkClosedError,
    LinkState,
    LinkStateChanged,
    SessionInfo,
    StreamChannel,
    VirtualClock,
    WaitTimeoutError,
)
from keeplink._core.jsonline import Frame
from keeplink.drivers import JsonLineDriver
from keeplink.testing import DeviceSimulator, FaultProxy
from linkfixtures import LinkFactory

S = LinkState


# ---------------------------------------------------------------------------- stop()


async def test_stop_twice_is_clean(make_link: LinkFactory) -> None:
    link = make_link()
    rec = Recorder(link)
    link.start()
    await connected(link)
    await link.stop()
    await link.stop()
    assert link.state is S.STOPPED
    assert rec.states()[-2:] == [S.STOPPING, S.STOPPED]
    assert rec.states().count(S.STOPPED) == 1


async def test_stop_before_start_and_concurrent_stops(make_link: LinkFactory) -> None:
    link = make_link()
    await link.stop()
    assert link.state is S.STOPPED
    link.start()
    await connected(link)
    await asyncio.gather(link.stop(), link.stop(), link.stop())
    assert link.state is S.STOPPED


class _GatedDriver(JsonLineDriver):
    """open() waits on a gate: a connect that is still in progress."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = asyncio.Event()
        self.opening = asyncio.Event()
        self.handshakes = 0

    async def open(self) -> StreamChannel[Frame]:
        self.opening.set()
        await self.gate.wait()
        return await super().open()

    async def handshake(self, channel: FrameChannel[Frame]) -> SessionInfo:
        self.handshakes += 1
        return await super().handshake(channel)


async def test_stop_during_connect(proxy: FaultProxy, virtual_clock: VirtualClock) -> None:
    driver = _GatedDriver(host=proxy.host, port=proxy.port, token="s3cret")
    from keeplink import Link

    link = Link(driver, name="gated", clock=virtual_clock)
    link.start()
    await asyncio.wait_for(driver.opening.wait(), 10)
    assert link.state is S.CONNECTING
    await link.stop()
    assert link.state is S.STOPPED
    assert proxy.statistics().connections_total == 0


async def test_stop_during_handshake(
    make_link: LinkFactory, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    proxy.set_black_hole(True)  # TCP connects, the hello is swallowed: handshake hangs
    link = make_link()
    link.start()
    await until_state(link, S.HANDSHAKING)
    await link.stop()
    assert link.state is S.STOPPED
    proxy.set_black_hole(False)  # the hole held our FIN back; lifted, it shows we closed
    await eventually(lambda: proxy.statistics().connections_active == 0, what="channel closed")


async def test_stop_during_backoff_cancels_the_wait(
    make_link: LinkFactory, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    proxy.set_down(True)
    link = make_link()
    link.start()
    await until_state(link, S.BACKOFF)
    assert virtual_clock.pending() == [1.0]  # the backoff timer
    await link.stop()
    assert link.state is S.STOPPED
    assert virtual_clock.pending() == []


async def test_stop_from_inside_an_event_callback(make_link: LinkFactory) -> None:
    link = make_link()
    rec = Recorder(link)

    def on_event(event: object) -> None:
        if isinstance(event, LinkStateChanged) and event.new is S.CONNECTED:
            link.stop_soon()

    link.subscribe(on_event)
    link.start()
    await until_state(link, S.STOPPED)
    await link.stop()  # and the awaited stop after it is a no-op
    assert rec.states() == [S.CONNECTING, S.HANDSHAKING, S.CONNECTED, S.STOPPING, S.STOPPED]


async def test_stop_from_a_connected_callback_leaves_no_session_behind(
    make_link: LinkFactory,
) -> None:
    link = make_link()

    def on_event(event: object) -> None:
        if isinstance(event, LinkStateChanged) and event.new is S.CONNECTED:
            link.stop_soon()

    link.subscribe(on_event)
    link.start()
    await until_state(link, S.STOPPED)
    assert link.session is None
    assert link.statistics().connected_since is None
    outcome = await link.request("set", {}, timeout=1)
    assert outcome.error is not None
    assert outcome.error.code == "link_closed"  # not a write to a dead channel


async def test_stop_from_a_callback_while_entering_backoff(
    make_link: LinkFactory, proxy: FaultProxy
) -> None:
    proxy.set_down(True)
    link = make_link()

    def on_event(event: object) -> None:
        if isinstance(event, LinkStateChanged) and event.new is S.BACKOFF:
            link.stop_soon()

    link.subscribe(on_event)
    link.start()
    await until_state(link, S.STOPPED)
    assert link.statistics().internal_errors == 0


async def test_stop_resolves_waiters_with_link_closed(make_link: LinkFactory) -> None:
    link = make_link()
    link.start()
    await connected(link)
    await link.stop()
    with pytest.raises(LinkClosedError):
        await link.wait_connected()


async def test_wait_connected_times_out_on_the_links_clock_and_leaves_the_link_alone(
    make_link: LinkFactory, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    proxy.set_down(True)
    link = make_link(backoff=Backoff(initial_s=10, cap_s=10))
    async with link:
        await until_state(link, S.BACKOFF)
        before = link.statistics()
        assert virtual_clock.pending() == [10.0]  # the backoff timer

        waiter = asyncio.create_task(link.wait_connected(timeout=2.5))
        await virtual_clock.advance(2.4)
        assert not waiter.done()
        await virtual_clock.advance(0.1)
        assert waiter.done()
        with pytest.raises(WaitTimeoutError) as info:
            await waiter
        err = info.value
        assert isinstance(err, TimeoutError)  # builtin: `except TimeoutError` catches it
        assert err.code is ErrorCode.TIMEOUT
        assert "did not connect within 2.5s (it is backoff)" in str(err)

        # Only the wait ended: same state, same schedule, nothing of the wait left behind.
        after = link.statistics()
        assert (after.state, after.attempt, after.retry_at) == (S.BACKOFF, 1, 10.0)
        assert (after.connects, after.failed_attempts) == (0, before.failed_attempts)
        assert virtual_clock.pending() == [10.0]

        proxy.set_down(False)
        waiter = asyncio.create_task(link.wait_connected(timeout=60))
        await virtual_clock.advance(7.5)  # the backoff ends at t=10
        await connected(link)
        session = await waiter
        assert session.device_id == "hall"
        assert virtual_clock.now() == 10
        assert await link.wait_connected(timeout=0.001) == session  # connected: at once


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "5"])
async def test_wait_connected_refuses_a_bad_timeout(make_link: LinkFactory, bad: Any) -> None:
    link = make_link()
    with pytest.raises(InvalidRequestError, match="timeout"):
        await link.wait_connected(timeout=bad)
    assert link.state is S.IDLE


async def test_start_after_stop_reconnects_and_reconnect_is_enabled_again(
    make_link: LinkFactory, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    link = make_link()
    link.start()
    await connected(link)
    await link.stop()
    link.start()
    await connected(link)
    sim.drop_connections()
    await until_state(link, S.BACKOFF)
    await virtual_clock.advance(1)
    await connected(link)
    assert link.statistics().connects == 3
    await link.stop()


async def test_start_while_stopping_is_refused_clearly(make_link: LinkFactory) -> None:
    link = make_link()
    link.start()
    await connected(link)
    link.stop_soon()
    with pytest.raises(LinkClosedError, match="await stop"):
        link.start()
    await link.stop()


def test_start_outside_an_event_loop_changes_nothing(make_link: LinkFactory) -> None:
    link = make_link()
    with pytest.raises(RuntimeError):
        link.start()
    assert link.state is S.IDLE


# ---------------------------------------------------------------------------- backoff


async def test_backoff_schedule_is_exact_and_reaches_the_cap(
    make_link: LinkFactory, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    proxy.set_down(True)
    link = make_link(heartbeat_s=None)
    rec = Recorder(link)
    async with link:
        for _ in range(9):
            await until_state(link, S.BACKOFF)
            await virtual_clock.advance_to_next()
        await until_state(link, S.BACKOFF)
    starts = [e.at for e in rec.transitions() if e.new is S.CONNECTING]
    waits = [round(b - a, 9) for a, b in itertools.pairwise(starts)]
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]


async def test_attempts_reset_after_a_handshake_but_not_after_a_bare_tcp_connect(
    make_link: LinkFactory, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    proxy.set_black_hole(True)  # every TCP connect succeeds; no handshake ever completes
    link = make_link(heartbeat_s=None, handshake_timeout_s=5)
    rec = Recorder(link)
    async with link:
        for _ in range(4):
            await until_state(link, S.HANDSHAKING)
            await virtual_clock.advance(5)  # handshake deadline
            await until_state(link, S.BACKOFF)
            await virtual_clock.advance_to_next()
        await until_state(link, S.HANDSHAKING)  # a fifth attempt, its hello swallowed too
        proxy.set_black_hole(False)
        await virtual_clock.advance(5)
        await until_state(link, S.BACKOFF)
        retries = [e.retry_at - e.at for e in rec.transitions() if e.new is S.BACKOFF]  # type: ignore[operator]
        assert retries == [1, 2, 4, 8, 16]  # kept growing across bare connects
        await virtual_clock.advance_to_next()
        await connected(link)
        assert link.statistics().attempt == 0
        proxy.reset_all()
        await until_state(link, S.BACKOFF)
        assert link.statistics().retry_at == virtual_clock.now() + 1  # back to the start


async def test_wake_skips_the_backoff_wait(
    make_link: LinkFactory, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    proxy.set_down(True)
    link = make_link(backoff=Backoff(initial_s=300, cap_s=300))
    async with link:
        await until_state(link, S.BACKOFF)
        proxy.set_down(False)
        assert link.wake("mdns") is True
        await connected(link)
        assert virtual_clock.now() == 0  # no virtual time passed: the wait was skipped


async def test_wake_never_cancels_a_handshake_in_progress(
    make_link: LinkFactory, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    proxy.set_latency(0.2)  # the welcome takes a while to arrive
    link = make_link()
    rec = Recorder(link)
    async with link:
        await until_state(link, S.HANDSHAKING)
        assert link.wake("mdns") is False
        link.connect_soon()  # a manual connect is a wake signal too
        await connected(link)
    assert rec.states()[:3] == [S.CONNECTING, S.HANDSHAKING, S.CONNECTED]
    assert link.statistics().failed_attempts == 0


async def test_resource_exhausted_waits_the_fixed_delay(
    make_link: LinkFactory, sim: DeviceSimulator
) -> None:
    sim.refuse_hello = ("out_of_connection_slots", "3 of 3 slots in use")
    link = make_link(backoff=Backoff(exhausted_s=45))
    async with link:
        await until_state(link, S.BACKOFF)
        stats = link.statistics()
        assert stats.last_error is not None
        assert stats.last_error.code == "out_of_connection_slots"
        assert stats.retry_at == 45


# ---------------------------------------------------------------------------- a crowd


@pytest.mark.slow
async def test_full_jitter_spreads_a_thousand_links_reconnecting_to_a_restarted_server(
    virtual_clock: VirtualClock,
) -> None:
    from keeplink import Link

    n = 1000
    rng = random.Random(1234)
    async with DeviceSimulator(device_id="hub", clock=virtual_clock) as server:
        links = [
            Link(
                JsonLineDriver(host=server.host, port=server.port),
                name=f"dev{i}",
                clock=virtual_clock,
                heartbeat_s=None,
                backoff=Backoff(initial_s=10, cap_s=60),
                rng=rng.random,
            )
            for i in range(n)
        ]
        try:
            for link in links:
                link.start()
            await eventually(lambda: server.statistics().connections_active == n, what="all up")

            await server.restart()  # every session drops at the same moment
            await eventually(
                lambda: all(link.state is S.BACKOFF for link in links), what="all backing off"
            )
            delays = [link.statistics().retry_at - virtual_clock.now() for link in links]  # type: ignore[operator]
            per_second = Counter(int(d) for d in delays)
            before = server.statistics().connections_total
            for second in range(1, 11):
                await virtual_clock.advance(1)
                due = sum(1 for d in delays if d <= second)
                await eventually(
                    lambda due=due: server.statistics().connections_total - before >= due,  # type: ignore[misc]
                    what=f"the {due} reconnects due by t+{second}s",
                )
            await eventually(lambda: server.statistics().connections_active == n, what="all back")
        finally:
            await asyncio.gather(*(link.stop() for link in links))
    # Without jitter all 1000 would hit the server in the same instant. With full jitter over
    # a 10 s ceiling each second gets about 100; none gets more than twice that.
    assert all(0 <= d <= 10 for d in delays)
    assert sum(per_second.values()) == n
    assert max(per_second.values()) <= 200, per_second
    assert min(per_second.values()) >= 50, per_second
