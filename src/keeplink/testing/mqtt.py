"""A fake MQTT device for tests: what the MQTT driver talks to, on a real broker.

    async with mqtt_device_on("plug", broker_host, broker_port, respond=True) as plug:
        await plug.wait_online()
        ...                                  # commands sent by MqttDriver links
        assert plug.applied == [key]         # each idempotency key applied once

It needs aiomqtt (keeplink's ``mqtt`` extra) and a broker to connect to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Final

try:
    import aiomqtt
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("keeplink.testing.mqtt needs aiomqtt: pip install 'keeplink[mqtt]'") from exc

__all__ = ["FakeMqttDevice", "mqtt_device_on"]

DEVICE_RETRY_S: Final = 0.05
"""How long a device waits before it reconnects to the broker."""
DEVICE_SESSIONS: Final = 200
"""Bounds a fake device's reconnect loop: 200 tries, DEVICE_RETRY_S apart at least."""
ONLINE_BOUND_S: Final = 10.0
"""How long :meth:`FakeMqttDevice.wait_online` waits by default."""


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
        will = aiomqtt.Will(self.availability, "offline", qos=1, retain=True)
        for _ in range(DEVICE_SESSIONS):
            self._online.clear()
            try:
                async with aiomqtt.Client(
                    self.host, self.port, identifier=self.name, will=will, keepalive=5
                ) as client:
                    await client.subscribe(f"{self.name}/cmd", qos=1)
                    await client.publish(self.availability, "online", qos=1, retain=True)
                    self.sessions += 1
                    self._online.set()
                    async for message in client.messages:
                        await self._handle(client, message)
            except aiomqtt.MqttError:
                pass  # the broker went away: come back like firmware does
            await asyncio.sleep(DEVICE_RETRY_S)

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        assert isinstance(message.payload, bytes)
        command = json.loads(message.payload)
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
        await client.publish(f"{self.name}/resp", json.dumps(reply), qos=1)


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
