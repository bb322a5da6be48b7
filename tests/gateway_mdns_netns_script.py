"""The gateway's mDNS presence end to end, run by tests/test_mdns.py inside a private
network namespace.

Run it only as ``unshare -n python tests/gateway_mdns_netns_script.py``: the namespace has
nothing but its own ``lo``, so every multicast packet stays in it. It prints one JSON object
a line (``{"event": ...}``) and exits 0 only if it got to the end.

The scenario: a gateway is configured with three jsonline devices that are down, each link
waiting out a 300 s backoff. ``hall`` has ``presence = "mdns"`` and is found by its TXT id
under the default service type; ``porch`` has ``presence = "mdns"`` and ``mdns_service``
naming its instance exactly (its TXT id is a MAC address); ``garage`` keeps the default
``presence = "link"``. The devices come up and announce themselves over mDNS from a second
zeroconf instance, with a stranger among them. The gateway's mDNS presence must report
``hall`` and ``porch`` online and wake their links at once, and leave ``garage`` (and the
stranger) alone. Then ``hall`` says goodbye.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from keeplink import LinkState
from keeplink.gateway.config import parse_config
from keeplink.gateway.runtime import Gateway
from keeplink.presence import Source
from keeplink.testing import DeviceSimulator, free_port
from mdns_netns_script import bring_up_loopback, emit

SERVICE_TYPE = "_keeplink._tcp.local."
BACKOFF_S = 300.0
LONG_ENOUGH_S = 10.0
"""A backoff wait drawn shorter than this (full jitter) is drawn again: a reconnect within
the test's bound must be the mDNS wake-up, never the end of the wait."""
STEP_BOUND_S = 5.0  # a safety bound on each wait on real I/O; never a timing rule
SCRIPT_BOUND_S = 25.0

# device id -> (instance name it announces, its TXT id)
ANNOUNCED = {
    "hall": (f"Hall Thermostat.{SERVICE_TYPE}", "hall"),
    "porch": (f"Porch Light.{SERVICE_TYPE}", "AA:BB:CC:DD:EE:01"),
    "garage": (f"garage.{SERVICE_TYPE}", "garage"),
}
STRANGER = f"Somebody Else.{SERVICE_TYPE}"


def service(instance: str, txt_id: str, port: int) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        instance,
        port=port,
        parsed_addresses=["127.0.0.1"],
        server=f"{txt_id.replace(':', '')}.local.",
        properties={"id": txt_id},
    )


async def in_long_backoff(gateway: Gateway, device: str) -> float:
    """Wait until the device's link waits out a backoff of LONG_ENOUGH_S or more."""
    link = gateway.links[device]
    while True:
        await link.wait_for_state(LinkState.BACKOFF)
        stats = link.statistics()
        assert stats.retry_at is not None
        retry_in = stats.retry_at - link.clock.now()
        if retry_in >= LONG_ENOUGH_S:
            return retry_in
        await link.wait_for_state(LinkState.CONNECTING)


async def scenario() -> None:
    loop = asyncio.get_running_loop()
    emit(
        "netns",
        netns=os.readlink("/proc/self/ns/net"),
        interfaces=sorted(name for _, name in socket.if_nameindex()),
    )
    ports = {device: free_port() for device in ANNOUNCED}
    backoff = {"initial_s": BACKOFF_S, "cap_s": BACKOFF_S}
    base = {"driver": "jsonline", "heartbeat_s": 30, "backoff": backoff, "debounce_online_s": 0}
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0", "store": "memory:"},
            "devices": [
                {**base, "id": "hall", "port": ports["hall"], "presence": "mdns"},
                {**base, "id": "porch", "port": ports["porch"], "presence": "mdns",
                 "mdns_service": "Porch Light._keeplink._tcp"},
                {**base, "id": "garage", "port": ports["garage"]},
            ],
        }
    )  # fmt: skip
    gateway = Gateway(config)
    sims = [DeviceSimulator(device_id=device, port=port) for device, port in ports.items()]
    device_zc = AsyncZeroconf(interfaces=["127.0.0.1"])
    infos = [service(instance, txt, ports[d]) for d, (instance, txt) in ANNOUNCED.items()]
    infos.append(service(STRANGER, "stranger", free_port()))
    watchers: list[Any] = []
    try:
        await gateway.start()
        watchers = list(getattr(gateway, "mdns", []))
        async with asyncio.timeout(STEP_BOUND_S * 4):
            waits = {d: round(await in_long_backoff(gateway, d), 3) for d in ANNOUNCED}
        emit(
            "backoff",
            retry_in_s=waits,
            mdns=[repr(m) for m in watchers],
            watched=sorted(d for m in watchers for d in m.watched()),
        )

        for sim in sims:
            await sim.start()
        started = loop.time()
        broadcasts = [
            await device_zc.async_register_service(info, cooperating_responders=True)
            for info in infos
        ]
        async with asyncio.timeout(STEP_BOUND_S):
            for device in ("hall", "porch"):
                await gateway.links[device].wait_for_state(LinkState.CONNECTED)
        woke_in_s = loop.time() - started
        async with asyncio.timeout(STEP_BOUND_S):
            await asyncio.gather(*broadcasts)  # every announcement went out, garage's too
        claims = {
            device: {
                source.name: [claim.online, claim.ttl_s]
                for source, claim in gateway.presence.claims(device).items()
            }
            for device in ANNOUNCED
        }
        emit(
            "announced",
            woke_in_s=round(woke_in_s, 4),
            links={d: gateway.links[d].state.value for d in ANNOUNCED},
            connects={d: gateway.links[d].statistics().connects for d in ANNOUNCED},
            presence={d: gateway.presence.presence(d).value for d in ANNOUNCED},
            claims=claims,
            stranger=gateway.presence.devices(),
        )

        goodbye = await device_zc.async_unregister_service(infos[0])
        async with asyncio.timeout(STEP_BOUND_S):
            while gateway.presence.claims("hall")[Source.MDNS].online:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            await goodbye
        emit(
            "goodbye",
            mdns_claim_online=gateway.presence.claims("hall")[Source.MDNS].online,
            presence=gateway.presence.presence("hall").value,  # the link's word outranks
            link=gateway.links["hall"].state.value,
        )
    finally:
        await gateway.stop()
        await device_zc.async_close()
        for sim in sims:
            await sim.stop()

    me = asyncio.current_task()
    left = [t.get_name() for t in asyncio.all_tasks() if t is not me and not t.done()]
    emit("closed", tasks_left=left, mdns_running=[m.running for m in watchers])


async def main() -> None:
    async with asyncio.timeout(SCRIPT_BOUND_S):
        await scenario()


if __name__ == "__main__":
    bring_up_loopback()
    asyncio.run(main())
    sys.exit(0)
