"""A fake MQTT device for tests, and the small client it is made of, on a real broker.

    async with mqtt_device_on("plug", broker_host, broker_port, respond=True) as plug:
        await plug.wait_online()
        ...                                  # commands sent by MqttDriver links
        assert plug.applied == [key]         # each idempotency key applied once

    async with MqttTestClient(host, port, client_id="spy") as spy:
        await spy.subscribe("#")
        message = await spy.next_message()   # an mqtt5.PublishPacket

It needs mqtt5 (keeplink's ``mqtt`` extra) and a broker to connect to.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Final

try:
    import mqtt5
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("keeplink.testing.mqtt needs mqtt5: pip install 'keeplink[mqtt]'") from exc

from keeplink._channel import StreamChannel, open_stream_channel
from keeplink._core.errors import KeeplinkError, LinkBrokenError, ProtocolError
from keeplink._core.jsonline import Malformed
from keeplink.drivers.mqtt._protocol import MqttCodec, PacketIds

__all__ = ["FakeMqttDevice", "MqttTestClient", "mqtt_device_on"]

DEVICE_RETRY_S: Final = 0.05
"""How long a device waits before it reconnects to the broker."""
DEVICE_SESSIONS: Final = 200
"""Bounds a fake device's reconnect loop: 200 tries, DEVICE_RETRY_S apart at least."""
ONLINE_BOUND_S: Final = 10.0
"""How long :meth:`FakeMqttDevice.wait_online` waits by default."""


class MqttTestClient:
    """A minimal MQTT 5 client for tests: connect (with a will), subscribe, publish at QoS 1
    (waiting for the PUBACK), and read the messages that arrive, each acknowledged.

    No keepalive (the broker never drops it for silence); the session ends when the broker
    goes away, and every wait then raises :class:`LinkBrokenError`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.will = will
        self._stream: StreamChannel[mqtt5.Packet] | None = None
        self._ids = PacketIds()
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._connack: asyncio.Future[None] | None = None
        self._messages: collections.deque[mqtt5.PublishPacket] = collections.deque()
        self._arrived: asyncio.Event = asyncio.Event()
        self._ended: LinkBrokenError | None = None

    async def connect(self) -> None:
        """Connect and wait for the CONNACK. Raises LinkBrokenError if the broker cannot be
        reached or refuses."""
        self._stream = await open_stream_channel(self.host, self.port, MqttCodec())
        self._connack = asyncio.get_running_loop().create_future()
        self._stream.deliver_to(self._on_packet)
        self._stream.when_ended(self._on_end)
        will = None
        if self.will is not None:
            topic, payload = self.will
            will = mqtt5.Will(topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True)
        self._stream.write(mqtt5.ConnectPacket(self.client_id, clean_start=True, will=will))
        try:
            await self._connack
        except BaseException:
            self.close()
            raise

    async def subscribe(self, topic: str) -> None:
        """Subscribe to ``topic`` at QoS 1; waits for the SUBACK."""
        packet_id = self._ids.take()
        filters = [mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS.AT_LEAST_ONCE)]
        await self._request(packet_id, mqtt5.SubscribePacket(packet_id, filters))

    async def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        """Publish at QoS 1; waits for the PUBACK."""
        data = payload.encode() if isinstance(payload, str) else payload
        packet_id = self._ids.take()
        packet = mqtt5.PublishPacket(
            topic, data, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=retain, packet_id=packet_id
        )
        await self._request(packet_id, packet)

    async def next_message(self) -> mqtt5.PublishPacket:
        """The next message on a subscribed topic. Raises LinkBrokenError once the session
        is over and every message that came has been read."""
        while not self._messages:
            if self._ended is not None:
                raise self._ended
            self._arrived.clear()
            await self._arrived.wait()
        return self._messages.popleft()

    def close(self) -> None:
        """Disconnect politely (no will is published) and close. Idempotent."""
        if self._stream is not None:
            self._stream.close(last=mqtt5.DisconnectPacket().write())

    async def wait_closed(self) -> None:
        if self._stream is not None:
            await self._stream.wait_closed()

    async def __aenter__(self) -> MqttTestClient:
        await self.connect()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        await self.wait_closed()

    async def _request(self, packet_id: int, packet: Any) -> None:
        if self._ended is not None or self._stream is None:
            raise self._ended or LinkBrokenError("mqtt test client: not connected")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = done
        try:
            self._stream.write(packet)
            await done
        finally:
            self._acks.pop(packet_id, None)
            self._ids.release(packet_id)

    def _on_packet(self, packet: mqtt5.Packet | Malformed) -> None:
        if isinstance(packet, mqtt5.ConnAckPacket) and self._connack is not None:
            if packet.reason_code == mqtt5.ConnAckReasonCode.SUCCESS:
                self._connack.set_result(None)
            else:
                self._connack.set_exception(LinkBrokenError(f"refused: {packet.reason_code}"))
        elif isinstance(packet, mqtt5.PubAckPacket | mqtt5.SubAckPacket):
            done = self._acks.get(packet.packet_id)
            if done is not None and not done.done():
                done.set_result(packet)
        elif isinstance(packet, mqtt5.PublishPacket):
            if packet.packet_id is not None and self._stream is not None:
                self._stream.write(mqtt5.PubAckPacket(packet.packet_id))
            self._messages.append(packet)
            self._arrived.set()
        elif isinstance(packet, Malformed) and self._stream is not None:
            self._on_end(LinkBrokenError(f"mqtt test client: {packet.reason}"))
            self._stream.close()

    def _on_end(self, reason: LinkBrokenError) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        self._arrived.set()
        for future in [self._connack, *self._acks.values()]:
            if future is not None and not future.done():
                future.set_exception(reason)
                future.exception()  # retrieved: the waiter sees it, or nobody waits


class FakeMqttDevice:
    """A device on the broker at ``host:port``, speaking the MQTT driver's topics.

    It subscribes to ``{name}/cmd``, says ``online`` on ``{name}/availability`` (retained,
    with an ``offline`` will) and, after a lost broker, comes back as firmware does.
    ``respond``: reply on ``{name}/resp``; op ``refuse`` is rejected with code
    ``out_of_range``; op ``ignore`` gets no reply at all. ``start()`` runs it in a task,
    ``stop()`` ends it; :func:`mqtt_device_on` does both around a block.
    """

    def __init__(self, name: str, host: str, port: int, *, respond: bool = False) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.respond = respond
        self.received: Counter[str] = Counter()
        """Every command copy that arrived, by idempotency key."""
        self.applied: list[str] = []
        """Keys applied, each once, in order."""
        self.commands: list[dict[str, Any]] = []
        self.sessions = 0
        self._online = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def availability(self) -> str:
        return f"{self.name}/availability"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"fake-device[{self.name}]"
        )

    async def wait_online(self, timeout: float = ONLINE_BOUND_S) -> None:
        """Until the device has said "online" in its current session (at most ``timeout``
        seconds: ``TimeoutError`` after that)."""
        async with asyncio.timeout(timeout):
            await self._online.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None

    async def _run(self) -> None:
        for _ in range(DEVICE_SESSIONS):
            self._online.clear()
            client = MqttTestClient(
                self.host, self.port, client_id=self.name, will=(self.availability, b"offline")
            )
            try:
                await client.connect()
                await client.subscribe(f"{self.name}/cmd")
                await client.publish(self.availability, "online", retain=True)
                self.sessions += 1
                self._online.set()
                while True:
                    await self._handle(client, await client.next_message())
            except KeeplinkError:
                pass  # the broker went away: come back like firmware does
            finally:
                client.close()
                await client.wait_closed()
            await asyncio.sleep(DEVICE_RETRY_S)

    async def _handle(self, client: MqttTestClient, message: mqtt5.PublishPacket) -> None:
        try:
            command = json.loads(message.payload)
        except ValueError as exc:
            raise ProtocolError(f"fake device {self.name}: not a command: {exc}") from exc
        self.commands.append(command)
        key = command["key"]
        self.received[key] += 1
        if key not in self.applied:
            self.applied.append(key)
        if not self.respond or command["op"] == "ignore":
            return
        reply: dict[str, Any] = {"cid": command["cid"], "ok": True, "result": {"applied": key}}
        if command["op"] == "refuse":
            reply = {"cid": command["cid"], "ok": False, "code": "out_of_range", "msg": "too hot"}
        await client.publish(f"{self.name}/resp", json.dumps(reply))


@contextlib.asynccontextmanager
async def mqtt_device_on(
    name: str, host: str, port: int, **kwargs: Any
) -> AsyncIterator[FakeMqttDevice]:
    """A started :class:`FakeMqttDevice`, stopped when the block ends."""
    device = FakeMqttDevice(name, host, port, **kwargs)
    device.start()
    try:
        yield device
    finally:
        await device.stop()
