"""Smart plugs on an MQTT broker, through keeplink's MQTT driver and its outbox.

The broker gets one supervised link (:class:`keeplink.drivers.mqtt.MqttDriver`): every plug
is a device behind it. A plug says whether it is there on its availability topic (a
retained ``online``, and ``offline`` as its last will), which the driver reports as
presence; commands go through an :class:`~keeplink.outbox.Outbox`, so a command for a plug
that is away waits, stored, and is delivered (once per idempotency key) when it says
``online`` again. Each command names its plug once: ``submit("plug-1", "switch",
{"on": True})``; the driver fills ``args["device"]`` in at delivery.

Try it with Mosquitto and its command line clients (Debian: ``mosquitto`` and
``mosquitto-clients``; and ``pip install 'keeplink[mqtt]'``)::

    mosquitto -p 1883                                     # a broker
    mosquitto_sub -p 1883 -t 'plug-1/cmd' -v              # what the plug would receive
    python -m examples.mqtt_example --port 1883 --plug plug-1 --on
    mosquitto_pub -p 1883 -t plug-1/availability -m online -r    # the plug is there

The command waits (``queued``) until the plug says ``online``, then goes out: without a
response topic it succeeds at the broker's PUBACK. With ``--response-topic '{device}/resp'``
it succeeds when the plug answers ``{"cid": …, "ok": true, "result": {…}}`` there. Publish
``offline`` and the plug is away again.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from keeplink import Backoff, Link, deadline
from keeplink.drivers.mqtt import MqttDriver, MqttFrame
from keeplink.outbox import Command, CommandStore, Outbox, SqliteStore
from keeplink.presence import Presence, PresenceChanged
from keeplink.presence.mqtt import MqttAvailability

COMMAND_TTL_S: Final = 3600.0


class Plugs:
    """Smart plugs on one broker: one link, a device per plug, durable commands.

    ``store`` keeps commands while a plug is away (a :class:`~keeplink.outbox.SqliteStore`
    keeps them across restarts). ``response_topic`` (e.g. ``"{device}/resp"``) makes a
    command succeed only when the plug itself answers; without it, at the broker's PUBACK.
    ``debounce_online_s`` / ``debounce_offline_s``: how long a plug must say ``online`` /
    ``offline`` before it counts as there / away.
    """

    def __init__(
        self,
        host: str,
        port: int,
        plugs: Sequence[str],
        *,
        store: CommandStore,
        client_id: str | None = None,
        response_topic: str | None = None,
        debounce_online_s: float = 1.0,
        debounce_offline_s: float = 5.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.plugs = tuple(plugs)
        self._debounce = (debounce_online_s, debounce_offline_s)
        self.outbox = Outbox(store, request_timeout_s=request_timeout_s)
        driver = MqttDriver(
            host,
            port,
            client_id=client_id or f"keeplink-plugs-{uuid.uuid4().hex[:8]}",
            devices=self.plugs,
            response_topic=response_topic,
        )
        # The plugs' availability messages go into the outbox's presence tracker, the one
        # that decides when a plug's commands go out.
        MqttAvailability(driver, self.outbox.presence)
        # MQTT keeps itself alive (its keepalive, run by the driver): no keeplink heartbeat.
        self.link: Link[MqttFrame] = Link(
            driver,
            name=f"mqtt:{host}:{port}",
            heartbeat_s=None,
            backoff=Backoff(initial_s=0.5, cap_s=30),
        )
        self._listeners: list[Callable[[str, bool], object]] = []
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        await self.outbox.start()
        try:
            online_s, offline_s = self._debounce
            for plug in self.plugs:
                self.outbox.presence.configure(
                    plug, debounce_online_s=online_s, debounce_offline_s=offline_s
                )
                # hub=True: the broker link being up says nothing about one plug; it only
                # gates delivery. The plug's presence is what its availability topic says.
                await self.outbox.attach(plug, self.link, hub=True)
            self._unsubscribe = self.outbox.presence.subscribe(self._on_presence)
            self.link.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.link.stop()
        await self.outbox.close()

    async def __aenter__(self) -> Plugs:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def available(self, plug: str) -> bool:
        """The plug says it is there (debounced)."""
        return self.outbox.presence.presence(plug) is Presence.ONLINE

    def add_listener(self, callback: Callable[[str, bool], object]) -> Callable[[], None]:
        """Call ``callback(plug, available)`` when a plug comes or goes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    async def switch(self, plug: str, on: bool, *, wait_s: float = 10.0) -> Command:
        """Switch ``plug`` on or off; returns the command as it stands after ``wait_s``:
        ``succeeded``, or ``queued`` while the plug is away (it goes out when it is back).
        A newer switch supersedes one still queued (supersede key ``"switch"``)."""
        command = await self.outbox.submit(
            plug, "switch", {"on": on}, key="switch", ttl_s=COMMAND_TTL_S
        )
        clock = self.link.clock
        try:
            async with deadline(clock, clock.now() + wait_s):
                return await self.outbox.wait(command.id)
        except TimeoutError:
            return await self.outbox.get(command.id)

    def _on_presence(self, change: PresenceChanged) -> None:
        if change.device not in self.plugs:
            return
        for callback in tuple(self._listeners):
            callback(change.device, change.new is Presence.ONLINE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.mqtt_example")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--plug", action="append", required=True, help="repeat for more")
    switch = parser.add_mutually_exclusive_group(required=True)
    switch.add_argument("--on", dest="on", action="store_true")
    switch.add_argument("--off", dest="on", action="store_false")
    parser.add_argument("--response-topic", default=None, metavar="TEMPLATE")
    parser.add_argument("--db", default="plugs.db", help="where queued commands wait")
    parser.add_argument("--wait", type=float, default=60.0, metavar="SECONDS")
    return parser


async def run(args: argparse.Namespace, *, store: CommandStore | None = None) -> dict[str, Any]:
    """Switch every ``--plug``; returns each one's final command state (``queued`` if it
    did not come within ``--wait``)."""
    plugs = Plugs(
        args.host,
        args.port,
        args.plug,
        store=store if store is not None else SqliteStore(args.db),
        response_topic=args.response_topic,
    )
    states: dict[str, Any] = {}
    async with plugs:
        plugs.add_listener(
            lambda plug, up: print(f"{plug}: {'there' if up else 'away'}", flush=True)
        )
        await plugs.link.wait_connected(timeout=10)
        commands = await asyncio.gather(
            *(plugs.switch(plug, args.on, wait_s=args.wait) for plug in args.plug)
        )
        for plug, command in zip(args.plug, commands, strict=True):
            states[plug] = command.state
            print(f"{plug}: switch {'on' if args.on else 'off'}: {command.state}", flush=True)
    return states


def main(argv: list[str] | None = None) -> int:
    states = asyncio.run(run(build_parser().parse_args(argv)))
    return 0 if all(state == "succeeded" for state in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
