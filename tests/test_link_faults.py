"""The field failures keeplink exists for, reproduced against the simulator behind the fault proxy.

In each, the link recovers on its own with no user action. Timing rules run on the virtual
clock; bytes travel over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from helpers import Recorder, connected, eventually, until_state
from keeplink import (
    AuthError,
    Backoff,
    DeviceUnavailableError,
    ErrorCode,
    Link,
    LinkClosedError,
    LinkState,
    RequestTimeout,
    StreamChannel,
    VirtualClock,
)
from keeplink._core.jsonline import Frame, Ping, Req, StatePush
from keeplink.drivers import JsonLineDriver
from keeplink.testing import DeviceSimulator, FaultProxy
from linkfixtures import HEARTBEAT_S, LinkFactory

S = LinkState


async def test_send_timeout_closes_only_the_channel_and_the_link_reconnects(
    make_link: LinkFactory, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    link = make_link(send_timeout_s=5, heartbeat_s=None)
    async with link:
        await connected(link)
        proxy.set_bandwidth(0)  # the peer stops reading: our writes pile up, drain() blocks
        blob = StatePush(values={"blob": "x" * 60_000})

        async def flood() -> None:
            for _ in range(5_000):
                await link.send(blob)

        sender = asyncio.create_task(flood())
        done, _ = await asyncio.wait({sender}, timeout=1.0)
        assert not done, "the writes should be blocked on a peer that does not read"
        await virtual_clock.advance(5)
        with pytest.raises(RequestTimeout) as info:
            await sender
        assert "send did not complete within 5s" in info.value.message
        await until_state(link, S.BACKOFF)
        assert link.statistics().last_error is not None
        assert link.statistics().last_error.code == "timeout"

        proxy.clear()
        await virtual_clock.advance(1)  # attempt 0 after a session: ceiling 1 s
        await connected(link)
        stats = link.statistics()
        assert (stats.connects, stats.disconnects, stats.internal_errors) == (2, 1, 0)


async def test_peer_reset_mid_request_is_a_lost_session_then_a_reconnect(
    make_link: LinkFactory, proxy: FaultProxy, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    sim.ack_delay_s = 100  # the request stays in flight while the peer resets
    link = make_link()
    rec = Recorder(link)
    async with link:
        await connected(link)
        await link.send(Req(seq=1, op="set", args={"target": 21}))
        await eventually(lambda: sim.statistics().requests == 1)
        proxy.reset_all()
        await until_state(link, S.BACKOFF)
        lost = [e for e in rec.transitions() if e.new is S.LOST]
        assert len(lost) == 1
        assert lost[0].error is not None and lost[0].error.code == "connection_failed"
        await virtual_clock.advance(1)
        await connected(link)
    session = [S.CONNECTING, S.HANDSHAKING, S.CONNECTED]
    assert rec.states() == [*session, S.LOST, S.BACKOFF, *session, S.STOPPING, S.STOPPED]


class _RacyHeartbeatDriver(JsonLineDriver):
    """Closes the transport just before a heartbeat is written: the exact race of a peer
    closing between the "connected?" check and the write. ``raw`` bypasses the channel's
    own guard, so the write raises the bare ConnectionResetError asyncio raises."""

    def __init__(self, *, raw: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.raw = raw
        self.races = 0

    async def open(self) -> StreamChannel[Frame]:
        channel = await super().open()
        driver = self

        class Racy(StreamChannel[Frame]):
            def _write(self, data: bytes) -> None:
                if data == b'{"t":"ping"}\n' and driver.races == 0:
                    driver.races += 1
                    assert self._transport is not None
                    self._transport.abort()  # the peer's close lands just before our write
                    if driver.raw:
                        raise ConnectionResetError("Connection lost")  # what asyncio raises
                super()._write(data)

        channel.__class__ = Racy
        return channel


@pytest.mark.parametrize("raw", [False, True], ids=["mapped-error", "raw-connection-reset"])
async def test_heartbeat_write_after_the_transport_closed_does_not_end_the_reconnect_loop(
    raw: bool, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    driver = _RacyHeartbeatDriver(raw=raw, host=proxy.host, port=proxy.port, token="s3cret")
    link = Link(driver, name="racy", clock=virtual_clock, heartbeat_s=HEARTBEAT_S, rng=lambda: 1.0)
    async with link:
        await connected(link)
        await virtual_clock.advance(HEARTBEAT_S)  # the heartbeat fires into the closed transport
        assert driver.races == 1
        await until_state(link, S.BACKOFF)
        assert link.statistics().last_error is not None
        assert link.statistics().last_error.code == "connection_failed"
        await virtual_clock.advance(1)
        await connected(link)
        stats = link.statistics()
        assert stats.connects == 2
        # A raw, unmapped error from a channel is a driver bug: counted, logged, survived.
        assert stats.internal_errors == (1 if raw else 0)
        await virtual_clock.advance(HEARTBEAT_S)  # heartbeats run again on the new session
        await eventually(lambda: link.statistics().heartbeats_sent >= 1)


async def test_half_open_socket_is_found_by_the_liveness_limit(
    make_link: LinkFactory, proxy: FaultProxy, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    link = make_link()
    async with link:
        await connected(link)
        await virtual_clock.advance(HEARTBEAT_S)
        await eventually(lambda: link.statistics().frames_in >= 2, what="pong")  # welcome+pong
        last_rx = virtual_clock.now()
        proxy.set_black_hole(True)  # accepts, swallows, never closes: a half-open socket
        await virtual_clock.advance(3 * HEARTBEAT_S - 0.001)
        assert link.state is S.CONNECTED
        await virtual_clock.advance(0.001)
        await until_state(link, S.BACKOFF)
        error = link.statistics().last_error
        assert error is not None and error.code == "timeout"
        assert "no frame from the peer for 90s" in error.message
        assert virtual_clock.now() == last_rx + 3 * HEARTBEAT_S
        proxy.set_black_hole(False)
        await virtual_clock.advance(1)
        await connected(link)


async def test_no_heartbeat_goes_out_while_the_peer_is_talking(
    make_link: LinkFactory, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    """Traffic is proof of life: a frame from the peer in the interval makes the ping
    unnecessary, and the next one is due an interval after the last frame."""
    link = make_link()
    async with link:
        await connected(link)
        start = virtual_clock.now()
        for n in range(1, 5):  # a state push every 20 s, inside every 30 s interval
            await virtual_clock.advance(20)
            assert await sim.push_state({"n": n}) == 1
            await eventually(lambda n=n: link.statistics().frames_in == 1 + n, what=f"push {n}")  # type: ignore[misc]
        assert virtual_clock.now() == start + 80
        assert (sim.statistics().pings, link.statistics().heartbeats_sent) == (0, 0)
        await virtual_clock.advance(HEARTBEAT_S - 0.001)
        await asyncio.sleep(0.05)  # room for a ping that should not be there to arrive
        assert sim.statistics().pings == 0
        await virtual_clock.advance(0.001)  # 30 s after the last push
        await eventually(lambda: sim.statistics().pings == 1, what="the first ping")
        assert link.statistics().heartbeats_sent == 1
        assert link.state is S.CONNECTED


async def test_peer_that_never_answers_pings_is_not_declared_dead(
    make_link: LinkFactory, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    sim.answer_pings = False
    link = make_link()
    async with link:
        await connected(link)
        for n in range(1, 11):
            await virtual_clock.advance(HEARTBEAT_S)
            await eventually(lambda n=n: sim.statistics().pings == n, what=f"ping {n}")  # type: ignore[misc]
        stats = link.statistics()
        assert stats.state is S.CONNECTED
        assert (stats.connects, stats.disconnects, stats.heartbeats_sent) == (1, 0, 10)


async def test_auth_refused_is_terminal_and_reported(
    make_link: LinkFactory, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    link = make_link(token="wrong")
    rec = Recorder(link)
    async with link:
        with pytest.raises(AuthError) as info:
            await connected(link)
        assert info.value.code is ErrorCode.AUTH_FAILED
        assert link.state is S.FAILED
        await virtual_clock.advance(3600)  # an hour: nobody retries a refused token
        assert sim.statistics().auth_failures == 1
        assert link.state is S.FAILED
        failed = [e for e in rec.transitions() if e.new is S.FAILED]
        assert failed[0].error is not None and failed[0].error.code == "auth_failed"

        # Fixing the credentials and connecting again works.
        sim.token = "wrong"
        link.connect_soon()
        await connected(link)


async def test_auth_refused_with_slow_retry_configured_retries_slowly(
    make_link: LinkFactory, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    link = make_link(backoff=Backoff(terminal_retry_s=300))
    sim.token = "rotated"
    async with link:
        await until_state(link, S.BACKOFF)
        assert link.statistics().retry_at == 300
        assert link.statistics().last_error.code == "auth_failed"  # type: ignore[union-attr]
        sim.token = "s3cret"
        await virtual_clock.advance(299)
        assert sim.statistics().auth_failures == 1
        await virtual_clock.advance(1)
        await connected(link)


async def test_server_down_for_a_while_then_back(
    make_link: LinkFactory, proxy: FaultProxy, virtual_clock: VirtualClock
) -> None:
    link = make_link(heartbeat_s=None)
    async with link:
        await connected(link)
        proxy.set_down(True)  # refuse new connections and drop the open one
        await until_state(link, S.BACKOFF)
        for _ in range(6):  # retries at +1, +2, +4, +8, +16, +32: all refused
            await virtual_clock.advance_to_next()
            await until_state(link, S.BACKOFF)
        assert link.statistics().failed_attempts == 6
        assert link.statistics().last_error.code == "connection_failed"  # type: ignore[union-attr]
        proxy.set_down(False)
        await virtual_clock.advance_to_next()
        await connected(link)
        assert link.statistics().attempt == 0


async def test_a_raising_subscriber_does_not_affect_the_link(
    make_link: LinkFactory, sim: DeviceSimulator, virtual_clock: VirtualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    link = make_link()
    seen: list[object] = []

    def broken(event: object) -> None:
        raise RuntimeError("a user's callback bug")

    link.subscribe(broken)
    link.subscribe(seen.append)  # subscribed after the broken one: still gets everything
    with caplog.at_level(logging.DEBUG, logger="keeplink"):
        async with link:
            await connected(link)
            assert await sim.push_state({"temp": 20}) == 1
            await eventually(lambda: any(type(e).__name__ == "FrameReceived" for e in seen))
            sim.drop_connections()
            await until_state(link, S.BACKOFF)
            await virtual_clock.advance(1)
            await connected(link)
    stats = link.statistics()
    assert stats.internal_errors == 0
    assert stats.subscriber_errors == len(seen) > 8
    tracebacks = [r for r in caplog.records if r.exc_info and "subscriber" in r.getMessage()]
    assert len(tracebacks) == 1  # logged once with its traceback, then quietly


async def test_not_connected_send_is_a_typed_error(make_link: LinkFactory) -> None:
    link = make_link()
    with pytest.raises(LinkClosedError) as info:
        await link.send(Ping())
    assert info.value.code == "link_closed"
    async with link:
        await connected(link)
    link2 = make_link(name="other")
    link2.start()
    try:
        with pytest.raises(DeviceUnavailableError):
            await link2.send(Ping())  # still connecting
    finally:
        await link2.stop()
