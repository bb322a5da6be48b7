"""The MQTT session on keeplink's stream channel: CONNECT, acknowledgements, keepalive.

:class:`MqttChannel` takes every packet from a :class:`~keeplink.StreamChannel` as it is
decoded (one synchronous callback, no task of its own) and turns publishes on the driver's
topics into frames for the link. Keepalive runs on a timer of the injected clock, so a
:class:`~keeplink.testing.VirtualClock` drives it in tests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mqtt5

from keeplink._channel import StreamChannel
from keeplink._core.clock import Clock, Timer
from keeplink._core.errors import InvalidRequestError, LinkBrokenError
from keeplink._core.jsonline import Malformed
from keeplink.drivers.mqtt._frames import (
    Availability,
    BrokerSessionEnded,
    Delivered,
    MqttFrame,
    Publish,
    Subscribe,
)
from keeplink.drivers.mqtt._protocol import (
    Keepalive,
    KeepaliveAction,
    PacketIds,
    PublishWindow,
    connack_error,
    connect_packet,
    puback_refusal,
    publish_packet,
    session_error,
    suback_failure,
    subscribe_packet,
)

if TYPE_CHECKING:
    from keeplink.drivers.mqtt._driver import MqttDriver

__all__ = ["MqttChannel"]

_log = logging.getLogger("keeplink.mqtt")


class MqttChannel:
    """A :class:`~keeplink.Channel` carrying one MQTT session with the broker.

    Made by :meth:`MqttDriver.open`, which awaits :meth:`connect`. Items go to the link's
    sink after :meth:`deliver_to` (until then they are held for :meth:`receive`);
    :meth:`receive` then only returns by raising :class:`LinkBrokenError` when the session
    ends: the broker closed it or said DISCONNECT, the keepalive gave up on a silent broker,
    or :meth:`close` was called.
    """

    def __init__(
        self,
        driver: MqttDriver,
        stream: StreamChannel[mqtt5.Packet],
        *,
        clock: Clock,
        announce: Callable[[Availability | BrokerSessionEnded], None],
    ) -> None:
        self._driver = driver
        self._announce = announce
        self._stream = stream
        self._clock = clock
        self.peer = f"{driver.host}:{driver.port}"
        self._sink: Callable[[MqttFrame | Malformed], None] | None = None
        self._held: collections.deque[MqttFrame | Malformed] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended: LinkBrokenError | None = None
        self._connected = False
        self._connack: asyncio.Future[None] | None = None
        self._subacks: dict[int, tuple[tuple[str, ...], asyncio.Future[None]]] = {}
        self._ids = PacketIds()
        self._window = PublishWindow(self._ids)
        self._keepalive = _KeepaliveTimer(
            Keepalive(driver.keepalive_s, clock.now()), clock, ping=self._ping, dead=self._dead
        )
        stream.deliver_to(self._on_packet)
        stream.when_ended(self._on_stream_end)

    # ------------------------------------------------------------------ connect

    async def connect(self) -> None:
        """Send CONNECT and wait for the CONNACK. Raises what :func:`connack_error` says for
        a refusal, or LinkBrokenError if the connection ends first. Closes the channel when
        it raises or is cancelled (no CONNACK in the link's connect deadline)."""
        driver = self._driver
        self._connack = asyncio.get_running_loop().create_future()
        try:
            self._write(
                connect_packet(
                    driver.client_id, driver.username, driver.password, driver.keepalive_s
                )
            )
            await self._connack
        except BaseException:
            self._stream.close()
            raise
        self._connected = True
        self._keepalive.start()

    # ------------------------------------------------------------------ Channel

    @property
    def closed(self) -> bool:
        return self._ended is not None

    async def receive(self) -> MqttFrame | Malformed:
        """The next item, or, with a sink, wait for the end of the session (raises)."""
        while True:
            if self._held and self._sink is None:
                return self._held.popleft()
            if self._ended is not None:
                raise self._ended
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def deliver_to(self, sink: Callable[[MqttFrame | Malformed], None]) -> None:
        """From now on, hand every item to ``sink`` as it arrives (held ones first)."""
        self._sink = sink
        while self._held:
            sink(self._held.popleft())

    def send_nowait(self, frame: MqttFrame) -> bool:
        """Send a publish now (or queue it behind the broker's receive maximum). False,
        with nothing sent, for a subscribe or while the socket is flow-controlled: then
        :meth:`send` does it."""
        if isinstance(frame, Subscribe):
            return False
        packet = self._prepare(frame)
        if packet is None:
            return True  # waits for room in the window
        if self._stream.send_nowait(packet):
            self._keepalive.sent()
            return True
        if packet.packet_id is not None:
            self._window.withdraw(packet.packet_id)
        return False

    async def send(self, frame: MqttFrame) -> None:
        """Send a publish, or subscribe and wait for the SUBACK.

        A publish returns once it is written (or queued behind the broker's receive
        maximum): the broker's PUBACK is not awaited, so a slow PUBACK never counts against
        the link's send deadline (which would close the session of every device behind the
        broker). A publish with an ``ack_seq`` puts a :class:`Delivered` into the incoming
        stream when its PUBACK arrives.

        Raises LinkBrokenError if the session has ended or ends first; AuthError or
        ProtocolError if the broker refuses a subscription; InvalidRequestError (nothing
        sent) for a frame that cannot be sent.
        """
        if not isinstance(frame, Subscribe):
            packet = self._prepare(frame)
            if packet is not None:
                self._keepalive.sent()
                await self._stream.send(packet)  # waits while the socket is flow-controlled
            return
        if self._ended is not None:
            raise self._ended
        packet_id = self._ids.take()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subacks[packet_id] = (frame.topics, done)
        try:
            self._write(subscribe_packet(packet_id, frame))
            await done
        finally:
            if self._subacks.pop(packet_id, None) is not None:
                self._ids.release(packet_id)

    def close(self) -> None:
        """End the session now: a DISCONNECT if the broker can take it at once (so it does
        not publish our will or wait out the keepalive), then the connection closes.
        Idempotent; never waits for the broker."""
        goodbye = mqtt5.DisconnectPacket().write() if self._connected and not self.closed else b""
        self._end(LinkBrokenError(f"channel to MQTT broker {self.peer} is closed"))
        self._stream.close(last=goodbye)

    async def wait_closed(self) -> None:
        await self._stream.wait_closed()

    # ------------------------------------------------------------------ sending

    def _prepare(self, frame: MqttFrame) -> mqtt5.PublishPacket | None:
        """The packet to write for ``frame`` now, or None: it waits in the window for a
        PUBACK to free room. Raises (nothing taken) for a frame that cannot be sent."""
        if self._ended is not None:
            raise self._ended
        if not isinstance(frame, Publish):
            raise InvalidRequestError(f"mqtt: cannot send a {type(frame).__name__} frame")
        if frame.qos not in (0, 1):
            raise InvalidRequestError(f"mqtt: cannot publish with QoS {frame.qos!r}")
        if frame.qos == 0:
            return publish_packet(frame, None)
        if len(self._window) >= self._window.receive_max:
            publish_packet(frame, 1)  # raises now for a publish that could never go out later
        packet_id = self._window.offer(frame)
        if packet_id is None:
            return None
        try:
            return publish_packet(frame, packet_id)
        except BaseException:
            self._window.withdraw(packet_id)
            raise

    def _write(self, packet: Any) -> None:
        """Write now, even while flow-controlled (the transport buffers it): what the
        session itself sends (CONNECT, acknowledgements, pings) cannot wait."""
        self._stream.write(packet)
        self._keepalive.sent()

    # ------------------------------------------------------------------ receiving

    def _on_packet(self, packet: mqtt5.Packet | Malformed) -> None:
        if self._ended is not None:
            return
        self._keepalive.received()
        if isinstance(packet, Malformed):
            self._fail(LinkBrokenError(f"MQTT broker {self.peer}: bad packet: {packet.reason}"))
        elif isinstance(packet, mqtt5.PublishPacket):
            self._on_publish(packet)
        elif isinstance(packet, mqtt5.PubAckPacket):
            self._on_puback(packet)
        elif isinstance(packet, mqtt5.PubRelPacket):
            self._write(mqtt5.PubCompPacket(packet.packet_id))
        elif isinstance(packet, mqtt5.SubAckPacket):
            self._on_suback(packet)
        elif isinstance(packet, mqtt5.ConnAckPacket):
            self._on_connack(packet)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            self._fail(session_error(self.peer, reason=packet.reason_code))
        elif not isinstance(packet, mqtt5.PingRespPacket | mqtt5.UnsubAckPacket):
            kind = type(packet).__name__
            self._fail(LinkBrokenError(f"MQTT broker {self.peer} sent a client a {kind}"))

    def _on_connack(self, packet: mqtt5.ConnAckPacket) -> None:
        connack = self._connack
        if connack is None or connack.done():
            self._fail(LinkBrokenError(f"MQTT broker {self.peer} sent a second CONNACK"))
            return
        if packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            connack.set_exception(connack_error(packet.reason_code, f"MQTT broker {self.peer}"))
            connack.exception()  # retrieved: connect() raises it, unless it gave up already
            return
        self._window.receive_max = max(packet.receive_max, 1)
        if packet.server_keep_alive is not None and packet.server_keep_alive > 0:
            self._keepalive.rule.period_s = packet.server_keep_alive  # the broker's word wins
        connack.set_result(None)

    def _on_publish(self, packet: mqtt5.PublishPacket) -> None:
        item = self._driver.decode(packet.topic, packet.payload, packet.retain, int(packet.qos))
        if packet.packet_id is not None:
            if packet.qos == mqtt5.QoS.EXACTLY_ONCE:
                self._write(mqtt5.PubRecPacket(packet.packet_id))
            else:
                self._write(mqtt5.PubAckPacket(packet.packet_id))
        if isinstance(item, Availability):
            self._announce(item)
        self._put(item)

    def _on_puback(self, packet: mqtt5.PubAckPacket) -> None:
        frame, now = self._window.acked(packet.packet_id)
        if frame is None:
            _log.debug("mqtt %s: PUBACK for unknown packet %d", self.peer, packet.packet_id)
            return
        refused = puback_refusal(packet.reason_code)
        if refused is not None:
            # Rare and never noise: the broker's ACL or quota refuses our commands. With a
            # response topic no reply will come, so this line is all that says why.
            _log.warning(
                "mqtt %s: the broker refused the publish to %r: %s", self.peer, frame.topic, refused
            )
        if frame.ack_seq is not None:
            self._put(Delivered(seq=frame.ack_seq, topic=frame.topic, refused=refused))
        for packet_id, waiting in now:
            # Checked when it was offered: a publish mqtt5 refuses raised then.
            self._write(publish_packet(waiting, packet_id))

    def _on_suback(self, packet: mqtt5.SubAckPacket) -> None:
        entry = self._subacks.get(packet.packet_id)
        if entry is None:
            _log.debug("mqtt %s: SUBACK for unknown packet %d", self.peer, packet.packet_id)
            return
        topics, done = entry
        error = suback_failure(topics, packet.reason_codes, self.peer)
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def _put(self, item: MqttFrame | Malformed) -> None:
        if self._sink is not None:
            self._sink(item)
            return
        self._held.append(item)
        self._wake()

    # ------------------------------------------------------------------ keepalive

    def _ping(self) -> None:
        try:
            self._stream.write(mqtt5.PingReqPacket())
        except LinkBrokenError as exc:  # the socket is going: its end is on its way too
            self._end(exc)

    def _dead(self) -> None:
        reason = mqtt5.DisconnectReasonCode.KEEP_ALIVE_TIMEOUT
        self._fail(session_error(self.peer, reason=reason, what="no PINGRESP"))

    # ------------------------------------------------------------------ ending

    def _on_stream_end(self, reason: LinkBrokenError) -> None:
        cause = reason.__cause__
        self._end(session_error(self.peer, cause=cause) if cause is not None else reason)

    def _fail(self, reason: LinkBrokenError) -> None:
        """End the session for a reason of the broker's, and drop the connection."""
        self._end(reason)
        self._stream.close()

    def _end(self, reason: LinkBrokenError) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        self._keepalive.stop()
        for future in [self._connack, *(done for _, done in self._subacks.values())]:
            if future is not None and not future.done():
                future.set_exception(reason)
                future.exception()  # retrieved: whoever awaits it sees it, or nobody does
        self._window.clear()
        self._wake()
        if self._connected:
            self._announce(BrokerSessionEnded(devices=self._driver.devices))

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _KeepaliveTimer:
    """Runs a :class:`Keepalive` on a clock: one timer, armed at the rule's next due time
    (never a polling loop), calling ``ping`` or ``dead`` when the rule says so."""

    __slots__ = ("_clock", "_dead", "_ping", "_timer", "rule")

    def __init__(
        self, rule: Keepalive, clock: Clock, *, ping: Callable[[], None], dead: Callable[[], None]
    ) -> None:
        self.rule = rule
        self._clock = clock
        self._ping = ping
        self._dead = dead
        self._timer: Timer | None = None

    def start(self) -> None:
        self.stop()
        self._timer = self._clock.call_at(self.rule.due(), self._fire)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def sent(self) -> None:
        self.rule.sent(self._clock.now())

    def received(self) -> None:
        self.rule.received(self._clock.now())

    def _fire(self) -> None:
        self._timer = None
        action = self.rule.decide(self._clock.now())
        if action is KeepaliveAction.DEAD:
            self._dead()
            return
        if action is KeepaliveAction.PING:
            self._ping()
        self._timer = self._clock.call_at(self.rule.due(), self._fire)
