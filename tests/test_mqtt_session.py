"""The MQTT session itself: keepalive on the link's clock (a VirtualClock, with a real
Mosquitto behind a fault proxy), and what a broker says that Mosquitto never does on
demand (a small receive maximum, a refusing PUBACK, a DISCONNECT with a reason), from a
scripted broker on a loopback socket that reads and writes packets with the real codec.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import mqtt5
import pytest

from helpers import IO_BOUND_S, eventually, io_settle, until_state
from keeplink import Backoff, Link, LinkState
from keeplink._core.errors import ErrorCode
from keeplink._core.outcomes import Acknowledged, Rejected
from keeplink.drivers.mqtt import Availability, BrokerSessionEnded, MqttDriver
from keeplink.drivers.mqtt._protocol import MqttCodec
from keeplink.presence import Presence, PresenceTracker, Source
from keeplink.presence.mqtt import MqttAvailability
from keeplink.testing import FaultProxy, VirtualClock
from keeplink.testing.mqtt import MqttTestClient
from mosquitto import Mosquitto

Q1 = mqtt5.QoS.AT_LEAST_ONCE


async def within(awaitable: Any, bound: float = IO_BOUND_S) -> Any:
    async with asyncio.timeout(bound):
        return await awaitable


@contextlib.asynccontextmanager
async def running(link: Link[Any]) -> AsyncIterator[Link[Any]]:
    link.start()
    try:
        yield link
    finally:
        await link.stop()


# ---------------------------------------------------------------------------- keepalive


async def test_keepalive_pings_and_gives_up_on_the_links_clock(broker: Mosquitto) -> None:
    assert broker.port is not None
    clock = VirtualClock()
    async with FaultProxy(broker.host, broker.port, name="broker") as proxy:
        driver = MqttDriver(
            proxy.host, proxy.port, client_id="gw", keepalive_s=60, devices=["plug"], clock=clock
        )
        link = Link(driver, name="broker", heartbeat_s=None, clock=clock)
        async with running(link):
            await within(link.wait_connected())  # at t = 0: CONNECT, SUBSCRIBE and their acks
            before = proxy.statistics()
            await clock.advance(59.5)
            await asyncio.sleep(0.05)  # real time for a ping to travel, if one were sent
            assert proxy.statistics().bytes_up == before.bytes_up  # quiet for less than 60 s

            await clock.advance(0.5)  # t = 60: PINGREQ (2 bytes), answered by PINGRESP
            await eventually(lambda: proxy.statistics().bytes_down == before.bytes_down + 2)
            assert proxy.statistics().bytes_up == before.bytes_up + 2
            await io_settle()  # the PINGRESP, in our socket's buffer now, is read

            proxy.set_black_hole()  # from now on the broker hears nothing and says nothing
            await clock.advance(60)  # t = 120: the next ping, swallowed
            await clock.advance(59.5)
            await io_settle()
            assert link.state is LinkState.CONNECTED  # one period after the ping: not yet
            await clock.advance(0.5)  # t = 180
            await within(until_state(link, LinkState.LOST, LinkState.BACKOFF))
            assert link.last_error is not None
            assert link.last_error.code is ErrorCode.TIMEOUT
            assert "keepalive" in link.last_error.message
            assert clock.now() == 180.0


# ---------------------------------------------------------------------------- scripted


class Peer:
    """One client connection to the scripted broker: packets in and out, real codec."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = MqttCodec()
        self.pending: collections.deque[Any] = collections.deque()

    async def read(self) -> Any:
        while not self.pending:
            data = await within(self.reader.read(65536))
            assert data, "the client closed the connection"
            self.pending.extend(self.codec.feed(data))
        return self.pending.popleft()

    def send(self, packet: Any) -> None:
        self.writer.write(packet.write())

    async def handshake(self, connack: mqtt5.ConnAckPacket) -> mqtt5.SubscribePacket:
        assert isinstance(await self.read(), mqtt5.ConnectPacket)
        self.send(connack)
        subscribe = await self.read()
        assert isinstance(subscribe, mqtt5.SubscribePacket)
        granted = [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE] * len(subscribe.topic_filters)
        self.send(mqtt5.SubAckPacket(subscribe.packet_id, granted))
        return subscribe


@contextlib.asynccontextmanager
async def scripted_broker() -> AsyncIterator[tuple[asyncio.Queue[Peer], int]]:
    """A listening socket; each client connection arrives as a Peer on the queue."""
    peers: asyncio.Queue[Peer] = asyncio.Queue()
    writers: list[asyncio.StreamWriter] = []

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        peers.put_nowait(Peer(reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield peers, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


async def test_publishes_past_the_brokers_receive_maximum_wait_for_a_puback() -> None:
    async with scripted_broker() as (peers, port):
        link = Link(
            MqttDriver("127.0.0.1", port, client_id="gw", devices=["plug"]),
            name="broker",
            heartbeat_s=None,
        )
        async with running(link):
            peer = await within(peers.get())
            await peer.handshake(mqtt5.ConnAckPacket(receive_max=2))
            await within(link.wait_connected())
            requests = [
                asyncio.ensure_future(link.request("set", {"device": "plug", "n": n}, timeout=5))
                for n in range(5)
            ]
            seen: list[int] = []
            while len(seen) < 5:
                batch = [await peer.read() for _ in range(min(2, 5 - len(seen)))]
                # Room for a third to arrive, if the window let one out.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        extra = await peer.read()
                        pytest.fail(f"a publish past the receive maximum: {extra!r}")
                for publish in batch:
                    assert isinstance(publish, mqtt5.PublishPacket) and publish.qos == Q1
                    seen.append(publish.packet_id or 0)
                    peer.send(mqtt5.PubAckPacket(publish.packet_id or 0))
            outcomes = await within(asyncio.gather(*requests))
            assert all(isinstance(o, Acknowledged) for o in outcomes), outcomes
            assert len(set(seen)) == 5
            assert link.statistics().connects == 1


async def test_a_puback_that_refuses_rejects_the_request_with_the_brokers_reason() -> None:
    async with scripted_broker() as (peers, port):
        link = Link(
            MqttDriver("127.0.0.1", port, client_id="gw", devices=["plug"]),
            name="broker",
            heartbeat_s=None,
        )
        async with running(link):
            peer = await within(peers.get())
            await peer.handshake(mqtt5.ConnAckPacket())
            await within(link.wait_connected())
            request = asyncio.ensure_future(link.request("set", {"device": "plug"}, timeout=5))
            publish = await peer.read()
            assert isinstance(publish, mqtt5.PublishPacket) and publish.topic == "plug/cmd"
            peer.send(
                mqtt5.PubAckPacket(
                    publish.packet_id or 0, reason_code=mqtt5.PubAckReasonCode.NOT_AUTHORIZED
                )
            )
            outcome = await within(request)
            assert isinstance(outcome, Rejected), outcome
            assert outcome.code == "not_authorized"
            assert link.state is LinkState.CONNECTED  # one refused publish, not a dead session


async def test_a_disconnect_from_the_broker_ends_the_session_with_its_reason() -> None:
    async with scripted_broker() as (peers, port):
        driver = MqttDriver("127.0.0.1", port, client_id="gw", devices=["plug"])
        told: list[object] = []
        driver.on_availability(told.append)
        link = Link(driver, name="broker", heartbeat_s=None, backoff=Backoff(initial_s=5, cap_s=5))
        async with running(link):
            peer = await within(peers.get())
            await peer.handshake(mqtt5.ConnAckPacket())
            await within(link.wait_connected())
            peer.send(mqtt5.PublishPacket("plug/availability", b"online", qos=Q1, packet_id=9))
            assert await peer.read() == mqtt5.PubAckPacket(9)  # acknowledged, QoS 1
            assert told == [
                Availability(device="plug", online=True, payload="online", retained=False)
            ]
            peer.send(
                mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER)
            )
            await within(until_state(link, LinkState.LOST, LinkState.BACKOFF))
            assert link.last_error is not None
            assert link.last_error.code is ErrorCode.CONNECTION_FAILED
            assert "session_taken_over" in link.last_error.message
            assert told[1:] == [BrokerSessionEnded(devices=("plug",))]


async def test_a_connack_that_refuses_the_credentials_fails_the_link_for_good() -> None:
    async with scripted_broker() as (peers, port):
        driver = MqttDriver(
            "127.0.0.1", port, client_id="gw", username="gw", password="wrong", devices=["plug"]
        )
        link = Link(driver, name="broker", heartbeat_s=None)
        async with running(link):
            peer = await within(peers.get())
            connect = await peer.read()
            assert isinstance(connect, mqtt5.ConnectPacket)
            assert (connect.username, connect.password) == ("gw", b"wrong")
            assert (connect.keep_alive, connect.clean_start) == (30, True)
            peer.send(
                mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD)
            )
            await within(until_state(link, LinkState.FAILED))
            assert link.last_error is not None
            assert link.last_error.code is ErrorCode.AUTH_FAILED
            assert "bad_user_name_or_password" in link.last_error.message


async def test_a_broker_that_only_speaks_mqtt_3_1_1_is_a_config_error() -> None:
    async with scripted_broker() as (peers, port):
        link = Link(
            MqttDriver("127.0.0.1", port, client_id="gw", devices=["plug"]),
            name="broker",
            heartbeat_s=None,
        )
        async with running(link):
            peer = await within(peers.get())
            assert isinstance(await peer.read(), mqtt5.ConnectPacket)
            peer.writer.write(b"\x20\x02\x00\x01")  # 3.1.1: unacceptable protocol version
            await within(until_state(link, LinkState.FAILED))
            assert link.last_error is not None
            assert link.last_error.code is ErrorCode.CONFIG_ERROR
            assert "unsupported_protocol_version" in link.last_error.message
            assert "speaks MQTT 5" in link.last_error.message


# ---------------------------------------------------------------------------- presence


async def test_a_closed_availability_source_reports_nothing_more(broker: Mosquitto) -> None:
    assert broker.port is not None
    driver = MqttDriver(broker.host, broker.port, client_id="gw", devices=["plug"])
    kept, dropped = PresenceTracker(), PresenceTracker()
    try:
        MqttAvailability(driver, kept)
        MqttAvailability(driver, dropped).close()
        link = Link(driver, name="broker", heartbeat_s=None)
        async with running(link):
            await within(link.wait_connected())
            async with MqttTestClient(broker.host, broker.port, client_id="plug") as plug:
                await plug.publish("plug/availability", "online", retain=True)
            await within(kept.wait_for("plug", Presence.ONLINE))
            assert kept.claims("plug")[Source.MQTT].online
            assert Source.MQTT not in dropped.claims("plug")
    finally:
        kept.close()
        dropped.close()
