"""An ESPHome firmware update end to end over real mDNS, run by tests/test_mdns.py inside a
private network namespace.

Run it only as ``unshare -n python tests/gateway_esphome_netns_script.py`` (the namespace
has nothing but its own ``lo``, so every multicast packet stays in it). It prints one JSON
object a line (``{"event": ...}``) and exits 0 only if it got to the end.

The scenario: a gateway has one ESPHome device, ``porch-light``, with ``presence = "mdns"``
(its instance on ``_esphomelib._tcp``), asleep: its link waits out a 300 s backoff. A
firmware command is queued for it. The device wakes and announces itself over mDNS from a
second zeroconf instance, as ESPHome does; the announcement must wake the link at once and
the image must be flashed once. The device then reboots into the new build and sleeps and
wakes a few times (a goodbye, then an announcement when it is back): it must not be flashed
again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from gateway_mdns_netns_script import in_long_backoff
from keeplink import Link, LinkState
from keeplink.gateway.config import parse_config
from keeplink.gateway.runtime import Gateway
from keeplink.outbox import CommandStateChanged, FirmwareProgress, OutboxEvent
from keeplink.testing import free_port
from keeplink.testing.esphome import EsphomeSimulator
from mdns_netns_script import bring_up_loopback, emit

SERVICE_TYPE = "_esphomelib._tcp.local."
BACKOFF_S = 300.0
STEP_BOUND_S = 5.0  # a safety bound on each wait on real I/O; never a timing rule
SCRIPT_BOUND_S = 25.0
PSK = base64.b64encode(bytes(range(32))).decode()
IMAGE = os.urandom(256 * 1024)
FLAPS = 3
"""Sleep cycles after the flash (ten in-process: tests/test_gateway_esphome.py)."""
ASLEEP_S = 0.5
"""How long it sleeps. Its goodbye must have reached the gateway before it announces itself
again: an announcement of a record the gateway still holds is a refresh (it extends the
device's presence but wakes no link), not a new arrival."""


def announcement(sim: EsphomeSimulator) -> AsyncServiceInfo:
    """What an ESPHome device announces: its node name as the instance, a TXT of its own."""
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{sim.name}.{SERVICE_TYPE}",
        port=sim.port,
        parsed_addresses=["127.0.0.1"],
        server=f"{sim.name}.local.",
        properties={
            "version": sim.esphome_version,
            "mac": sim.mac.replace(":", "").lower(),
            "platform": "ESP32",
            "network": "wifi",
            "api_encryption": "Noise_NNpsk0_25519_ChaChaPoly_SHA256",
        },
    )


async def until_down(link: Link[Any]) -> None:
    """Until the link waits out its backoff (the device is gone: a wake-up is needed)."""
    while link.state is not LinkState.BACKOFF:
        await link.wait_for_state(LinkState.BACKOFF)


async def scenario(folder: Path) -> None:
    loop = asyncio.get_running_loop()
    emit(
        "netns",
        netns=os.readlink("/proc/self/ns/net"),
        interfaces=sorted(name for _, name in socket.if_nameindex()),
    )
    sim = EsphomeSimulator(
        name="porch-light", port=free_port(), noise_psk=PSK, ota_port=free_port()
    )
    assert sim.ota is not None
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0", "store": f"sqlite:///{folder / 'gw.db'}"},
            "devices": [
                {
                    "id": "porch-light", "driver": "esphome", "host": "127.0.0.1",
                    "port": sim.port, "noise_psk": PSK, "ota_port": sim.ota.port,
                    "presence": "mdns", "heartbeat_s": 30, "debounce_online_s": 0,
                    "backoff": {"initial_s": BACKOFF_S, "cap_s": BACKOFF_S},
                }
            ],
        }
    )  # fmt: skip
    path = folder / "porch-light.bin"
    path.write_bytes(IMAGE)
    args = {"path": str(path), "sha256": hashlib.sha256(IMAGE).hexdigest(), "size": len(IMAGE)}
    gateway = Gateway(config)
    device_zc = AsyncZeroconf(interfaces=["127.0.0.1"])
    marks: dict[str, float] = {}

    def on_outbox(event: OutboxEvent) -> None:
        if isinstance(event, FirmwareProgress):
            marks.setdefault("first_block", loop.time())
        elif isinstance(event, CommandStateChanged) and event.command.state.value == "succeeded":
            marks.setdefault("done", loop.time())

    try:
        await gateway.start()
        gateway.outbox.subscribe(on_outbox)
        async with asyncio.timeout(STEP_BOUND_S * 4):
            retry_in = await in_long_backoff(gateway, "porch-light")
        command = await gateway.outbox.submit("porch-light", "firmware", args)
        emit(
            "asleep",
            retry_in_s=round(retry_in, 3),
            state=command.state.value,
            watched=sorted(d for m in gateway.mdns for d in m.watched()),
        )

        await sim.start()  # it wakes, and says so
        started = loop.time()
        info = announcement(sim)
        broadcast = await device_zc.async_register_service(info, cooperating_responders=True)
        link = gateway.links["porch-light"]
        async with asyncio.timeout(STEP_BOUND_S):
            await link.wait_for_state(LinkState.CONNECTED)
        woke = loop.time()
        async with asyncio.timeout(STEP_BOUND_S * 2):
            done = await gateway.outbox.wait(command.id)
            await broadcast
        emit(
            "flashed",
            woke_in_s=round(woke - started, 4),
            first_block_in_s=round(marks["first_block"] - started, 4),
            done_in_s=round(marks["done"] - started, 4),
            state=done.state.value,
            result=dict(done.result or {}),
            flashes=len(sim.ota.flashes),
            sessions=sim.ota.sessions,
            image_ok=sim.ota.flashes[0].sha256 == args["sha256"] if sim.ota.flashes else False,
        )

        async with asyncio.timeout(STEP_BOUND_S):
            while not sim.builds:  # noqa: ASYNC110 - the reboot after the flash
                await asyncio.sleep(0.01)
        # Each time it goes away (the reboot into the new build, then ten flaps) it says
        # goodbye over mDNS as ESPHome does on shutdown, and announces itself when back.
        for flap in range(FLAPS + 1):
            await device_zc.async_unregister_service(info)
            if flap:
                await sim.kill()
            async with asyncio.timeout(STEP_BOUND_S):
                await until_down(link)
            await asyncio.sleep(ASLEEP_S)
            if flap:
                await sim.start()
            info = announcement(sim)
            broadcast = await device_zc.async_register_service(info, cooperating_responders=True)
            async with asyncio.timeout(STEP_BOUND_S):
                await link.wait_for_state(LinkState.CONNECTED)
                await broadcast
        emit(
            "flapped",
            connects=link.statistics().connects,
            flashes=len(sim.ota.flashes),
            sessions=sim.ota.sessions,
            build=link.session.extra["compilation_time"] if link.session else None,
            new_build=sim.builds[0]["compilation_time"],
        )
    finally:
        await gateway.stop()
        await device_zc.async_close()
        await sim.stop()

    me = asyncio.current_task()
    left = [t.get_name() for t in asyncio.all_tasks() if t is not me and not t.done()]
    emit("closed", tasks_left=left)


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        async with asyncio.timeout(SCRIPT_BOUND_S):
            await scenario(Path(folder))


if __name__ == "__main__":
    bring_up_loopback()
    asyncio.run(main())
    sys.exit(0)
