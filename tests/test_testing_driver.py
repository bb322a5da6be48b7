"""keeplink.testing's scripted driver: a Link over an in-memory peer, in virtual time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from helpers import Recorder, connected, until_state
from keeplink import (
    Acknowledged,
    Backoff,
    FrameReceived,
    Link,
    LinkBrokenError,
    LinkState,
    Rejected,
    StatePush,
    TimedOut,
    VirtualClock,
)
from keeplink.testing import MemoryChannel, ScriptedDriver, ScriptedPeer


def make_link(
    peer: ScriptedPeer, clock: VirtualClock, driver: ScriptedDriver | None = None, **options: Any
) -> Link[Any]:
    return Link(
        driver or ScriptedDriver(peer),
        name=peer.device_id,
        clock=clock,
        rng=lambda: 1.0,  # every backoff delay is its ceiling
        backoff=Backoff(initial_s=1, cap_s=4),
        **options,
    )


async def test_a_link_connects_to_a_scripted_peer(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer(device_id="hall", fw="2.1.0")
    async with make_link(peer, virtual_clock) as link:
        info = await connected(link)
        assert (info.device_id, info.firmware) == ("hall", "2.1.0")
        assert link.state is LinkState.CONNECTED
        assert (peer.connections, peer.sessions, peer.connected) == (1, 1, True)
    assert not peer.connected  # the link closed its end when it stopped
    assert virtual_clock.now() == 0


async def test_a_request_is_acknowledged_rejected_or_ignored(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer(device_id="hall")
    async with make_link(peer, virtual_clock) as link:
        await connected(link)
        pending = asyncio.ensure_future(link.request("set", {"on": True}, timeout=5, key="k-1"))
        request = await peer.next_request()
        assert (request.op, request.args, request.key, request.connection) == (
            "set",
            {"on": True},
            "k-1",
            1,
        )
        assert peer.ack(request, {"on": True}, side={"rssi": -40}) is True
        outcome = await pending
        assert isinstance(outcome, Acknowledged)
        assert (outcome.result, outcome.side) == ({"on": True}, {"rssi": -40})

        pending = asyncio.ensure_future(link.request("reboot", {}, timeout=5))
        peer.reject(await peer.next_request(), "busy", "updating")
        refused = await pending
        assert isinstance(refused, Rejected)
        assert (refused.code, refused.message) == ("busy", "updating")

        pending = asyncio.ensure_future(link.request("get", {}, timeout=5))
        await peer.next_request()  # and never answered
        await virtual_clock.advance(5)
        timed_out = await pending
        assert isinstance(timed_out, TimedOut)
        assert timed_out.after_s == 5
        assert [r.op for r in peer.requests] == ["set", "reboot", "get"]


async def test_auto_ack_answers_every_request(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer(auto_ack=True)
    async with make_link(peer, virtual_clock) as link:
        await connected(link)
        outcomes = await asyncio.gather(*(link.request("n", {"i": i}, timeout=1) for i in range(3)))
        assert all(isinstance(o, Acknowledged) for o in outcomes)
        assert [r.args for r in peer.requests] == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_a_refused_handshake_ends_auth_failed(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer(device_id="hall", token="s3cret")
    link = make_link(peer, virtual_clock, driver=ScriptedDriver(peer, token="wrong"))
    async with link:
        assert await until_state(link, LinkState.FAILED) is LinkState.FAILED
        assert link.last_error is not None
        assert link.last_error.code == "auth_failed"
        assert (peer.connections, peer.sessions) == (1, 0)


async def test_a_peer_that_names_another_id_ends_device_mismatch(
    virtual_clock: VirtualClock,
) -> None:
    """The scripted driver is the jsonline driver: its identity check holds too."""
    peer = ScriptedPeer(device_id="intruder")
    link = make_link(peer, virtual_clock, driver=ScriptedDriver(peer, device_id="hall"))
    async with link:
        assert await until_state(link, LinkState.FAILED) is LinkState.FAILED
        assert link.last_error is not None
        assert link.last_error.code == "device_mismatch"
        assert "scripted peer 'intruder' says it is 'intruder'" in link.last_error.message
        assert peer.requests == []


async def test_refuse_hello_sends_the_scripted_error(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer(refuse_hello=("out_of_connection_slots", "hub full"))
    async with make_link(peer, virtual_clock) as link:
        await until_state(link, LinkState.BACKOFF)
        assert link.last_error is not None
        assert link.last_error.code == "out_of_connection_slots"
        peer.refuse_hello = None
        await virtual_clock.advance(30)  # a full hub is retried after the busy backoff
        await connected(link)
        assert (peer.connections, peer.sessions) == (2, 1)


async def test_a_drop_is_followed_by_a_reconnect(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer(device_id="hall")
    link = make_link(peer, virtual_clock)
    recorder = Recorder(link)
    async with link:
        await connected(link)
        assert peer.drop() is True
        await until_state(link, LinkState.BACKOFF)
        assert isinstance(link.last_error, LinkBrokenError)
        assert "hall closed the connection" in str(link.last_error)
        await virtual_clock.advance(1)  # the first backoff delay
        await connected(link)
        assert link.statistics().connects == 2
        assert (peer.connections, peer.sessions) == (2, 2)
    assert recorder.states()[:6] == [
        LinkState.CONNECTING,
        LinkState.HANDSHAKING,
        LinkState.CONNECTED,
        LinkState.LOST,
        LinkState.BACKOFF,
        LinkState.CONNECTING,
    ]


async def test_an_ack_for_a_dropped_connection_is_lost(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer()
    async with make_link(peer, virtual_clock) as link:
        await connected(link)
        pending = asyncio.ensure_future(link.request("set", {}, timeout=5))
        request = await peer.next_request()
        peer.drop()
        assert peer.ack(request) is False
        await virtual_clock.advance(5)  # reconnected at t=1; nothing answers on the new one
        assert isinstance(await pending, TimedOut)
        assert peer.connections == 2


async def test_refused_connections_back_off_until_allowed(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer(refuse_connections=True)
    async with make_link(peer, virtual_clock) as link:
        await until_state(link, LinkState.BACKOFF)
        assert peer.connections == 0
        peer.refuse_connections = False
        await virtual_clock.advance(1)
        await connected(link)
        assert virtual_clock.now() == 1


async def test_a_silent_peer_is_found_by_the_liveness_check(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer()
    async with make_link(peer, virtual_clock, heartbeat_s=10, liveness_s=30) as link:
        await connected(link)
        await virtual_clock.advance(10)  # a ping, answered: this peer answers pings
        peer.silent = True  # hung: the connection stays open, nothing comes back
        await virtual_clock.advance(30)
        await until_state(link, LinkState.BACKOFF)
        assert link.last_error is not None
        assert link.last_error.code == "timeout"
        assert "liveness" in link.last_error.message
        assert peer.connected is False  # the link closed it


async def test_pushed_frames_reach_subscribers(virtual_clock: VirtualClock) -> None:
    peer = ScriptedPeer()
    link = make_link(peer, virtual_clock)
    recorder = Recorder(link)
    async with link:
        await connected(link)
        assert peer.push({"temp": 21.5}) is True
        await asyncio.sleep(0)
    frames = [e.frame for e in recorder.events if isinstance(e, FrameReceived)]
    assert frames == [StatePush(values={"temp": 21.5})]


async def test_a_memory_channel_delivers_in_order_then_ends() -> None:
    sent: list[str] = []
    closed: list[bool] = []
    channel: MemoryChannel[str] = MemoryChannel(sent.append, on_close=lambda: closed.append(True))
    await channel.send("hello")
    assert channel.feed("a") and channel.feed("b")
    channel.end("gone")
    assert [await channel.receive(), await channel.receive()] == ["a", "b"]
    with pytest.raises(LinkBrokenError, match="gone"):
        await channel.receive()
    with pytest.raises(LinkBrokenError, match="gone"):
        await channel.send("late")
    assert channel.feed("c") is False
    channel.close()
    channel.close()
    await channel.wait_closed()
    assert (sent, closed) == (["hello"], [True])
