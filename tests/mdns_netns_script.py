"""The mDNS end-to-end scenario, run by tests/test_mdns.py inside a private network namespace.

Run it only as ``unshare -n python tests/mdns_netns_script.py``: the namespace has nothing
but its own ``lo``, so every multicast packet stays in it and nothing reaches a real network.
It prints one JSON object a line (``{"event": ...}``) for the test to check, and exits 0 only
if it got to the end.

The scenario: a device (a jsonline simulator) is down; its link's connect is refused and the
link waits out a 300 s backoff. The device comes up and announces itself over mDNS from a
second zeroconf instance; MdnsPresence hears it, reports presence online and wakes the link.
Then the device re-announces (a refresh, which must extend the claim) and says goodbye (which
must take presence offline).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from typing import Any

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from keeplink import Backoff, Link, LinkState
from keeplink.drivers import JsonLineDriver
from keeplink.presence import Presence, PresenceTracker, Source
from keeplink.presence.mdns import MdnsPresence
from keeplink.testing import DeviceSimulator, free_port

SERVICE_TYPE = "_keeplink._tcp.local."
DEVICE = "hall-thermostat"
# A friendly instance name, as real devices use: the TXT record's id names the device.
INSTANCE = f"Hall Thermostat.{SERVICE_TYPE}"
BACKOFF_S = 300.0
STEP_BOUND_S = 5.0  # a safety bound on each wait on real I/O; never a timing rule
SCRIPT_BOUND_S = 15.0


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def bring_up_loopback() -> None:
    """A new namespace's ``lo`` is down and it has no routes at all."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # zeroconf sends with IP_MULTICAST_IF set to 127.0.0.1, which does not need a route; the
    # route is for everything else, so 224.0.0.251 never looks unreachable from in here.
    subprocess.run(["ip", "route", "add", "224.0.0.0/4", "dev", "lo"], check=True)


async def scenario() -> None:
    loop = asyncio.get_running_loop()
    emit(
        "netns",
        netns=os.readlink("/proc/self/ns/net"),
        interfaces=sorted(name for _, name in socket.if_nameindex()),
    )

    port = free_port()
    sim = DeviceSimulator(device_id=DEVICE, port=port)  # not started: nothing listens yet
    tracker = PresenceTracker(debounce_online_s=0, debounce_offline_s=0)
    link: Link[Any] = Link(
        JsonLineDriver(host="127.0.0.1", port=port),
        name=DEVICE,
        backoff=Backoff(initial_s=BACKOFF_S, cap_s=BACKOFF_S),
        rng=lambda: 1.0,  # full jitter drawn at its ceiling: the wait is exactly 300 s
        heartbeat_s=None,
    )
    mdns = MdnsPresence(service_type=SERVICE_TYPE, presence=tracker, interfaces=["127.0.0.1"])
    device_zc = AsyncZeroconf(interfaces=["127.0.0.1"])
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        INSTANCE,
        port=port,
        parsed_addresses=["127.0.0.1"],
        server="hall-thermostat.local.",
        properties={"id": DEVICE, "fw": "1.0.0"},
    )
    try:
        link.start()
        async with asyncio.timeout(STEP_BOUND_S):
            await link.wait_for_state(LinkState.BACKOFF)
        stats = link.statistics()
        assert stats.retry_at is not None
        emit(
            "backoff",
            retry_in_s=round(stats.retry_at - link.clock.now(), 3),
            error=stats.last_error.code if stats.last_error else None,
        )

        await mdns.start()
        mdns.watch(DEVICE, link)
        await sim.start()

        started = loop.time()
        # cooperating_responders: skip the probe for a name clash (nobody else is in here),
        # so the first announcement goes out at once.
        broadcast = await device_zc.async_register_service(info, cooperating_responders=True)
        async with asyncio.timeout(STEP_BOUND_S):
            await link.wait_for_state(LinkState.CONNECTED)
        woke_in_s = loop.time() - started
        async with asyncio.timeout(STEP_BOUND_S):
            await tracker.wait_for(DEVICE, Presence.ONLINE)
        claim = tracker.claims(DEVICE)[Source.MDNS]
        stats = link.statistics()
        emit(
            "announced",
            woke_in_s=round(woke_in_s, 4),
            link=link.state.value,
            presence=tracker.presence(DEVICE).value,
            source=claim.source.name,
            claim_online=claim.online,
            ttl_s=claim.ttl_s,
            failed_attempts=stats.failed_attempts,
            connects=stats.connects,
        )
        async with asyncio.timeout(STEP_BOUND_S):
            await broadcast  # the remaining announcements

        # A re-announcement refreshes the PTR record: the browser says nothing, the claim
        # must still be renewed with the fresh TTL.
        first_at = claim.at
        # A record seen again within a second is a duplicate packet, not a refresh
        # (keeplink.presence.mdns._REFRESH_SLACK_MS): let more than that pass.
        await asyncio.sleep(1.2)
        refresh = await device_zc.async_update_service(info)
        async with asyncio.timeout(STEP_BOUND_S):
            while tracker.claims(DEVICE)[Source.MDNS].at == first_at:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            await refresh
        renewed = tracker.claims(DEVICE)[Source.MDNS]
        emit("refreshed", later_by_s=round(renewed.at - first_at, 4), ttl_s=renewed.ttl_s)

        said_goodbye = loop.time()
        goodbye = await device_zc.async_unregister_service(info)
        async with asyncio.timeout(STEP_BOUND_S):
            await tracker.wait_for(DEVICE, Presence.OFFLINE)
        offline_in_s = loop.time() - said_goodbye
        claim = tracker.claims(DEVICE)[Source.MDNS]
        emit(
            "goodbye",
            offline_in_s=round(offline_in_s, 4),
            presence=tracker.presence(DEVICE).value,
            source=claim.source.name,
            claim_online=claim.online,
        )
        async with asyncio.timeout(STEP_BOUND_S):
            await goodbye

        # It comes straight back (a reboot right after its goodbye): the goodbye's records
        # are still cached for their last second, so the browser sees no new instance;
        # the announcement must still bring the device back online.
        back = loop.time()
        broadcast = await device_zc.async_register_service(info, cooperating_responders=True)
        async with asyncio.timeout(STEP_BOUND_S):
            await tracker.wait_for(DEVICE, Presence.ONLINE)
        claim = tracker.claims(DEVICE)[Source.MDNS]
        emit(
            "back",
            online_in_s=round(loop.time() - back, 4),
            claim_online=claim.online,
            ttl_s=claim.ttl_s,
        )
        async with asyncio.timeout(STEP_BOUND_S):
            await broadcast
    finally:
        await mdns.close()
        await device_zc.async_close()
        await link.stop()
        await sim.stop()
        tracker.close()

    me = asyncio.current_task()
    left = [t.get_name() for t in asyncio.all_tasks() if t is not me and not t.done()]
    emit("closed", tasks_left=left, mdns_running=mdns.running)


async def main() -> None:
    async with asyncio.timeout(SCRIPT_BOUND_S):
        await scenario()


if __name__ == "__main__":
    bring_up_loopback()
    asyncio.run(main())
    sys.exit(0)
