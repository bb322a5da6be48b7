"""mDNS presence: instance name -> device, the browser handler on a real zeroconf cache with
a virtual clock (no network), and end to end with real multicast inside a private network
namespace, where an announcement wakes a link out of a 300 s backoff at once.

The end-to-end test runs tests/mdns_netns_script.py under ``unshare -n``: the namespace has
only its own ``lo``, so no mDNS packet ever reaches a real network (the script reports the
namespace's interfaces and the test checks that ``lo`` is all there is).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from zeroconf import DNSCache, DNSRecord, ServiceStateChange  # type: ignore[attr-defined]
from zeroconf.asyncio import AsyncServiceInfo

from keeplink import Backoff, ConfigError, Link, LinkState, VirtualClock
from keeplink.presence import Presence, PresenceTracker, Source
from keeplink.presence.mdns import MdnsPresence, instance_label
from keeplink.testing import FaultProxy
from linkfixtures import LinkFactory

S = LinkState
TYPE = "_keeplink._tcp.local."
ADDED, UPDATED, REMOVED = (
    ServiceStateChange.Added,
    ServiceStateChange.Updated,
    ServiceStateChange.Removed,
)
PTR_TTL = 120  # what the fake announcements below carry
SCRIPT = Path(__file__).with_name("mdns_netns_script.py")
GATEWAY_SCRIPT = Path(__file__).with_name("gateway_mdns_netns_script.py")
ESPHOME_SCRIPT = Path(__file__).with_name("gateway_esphome_netns_script.py")
NETNS_BOUND_S = 30.0


# ---------------------------------------------------------------------- name -> device


@pytest.mark.parametrize(
    ("name", "device"),
    [
        ("hall-thermostat._keeplink._tcp.local.", "hall-thermostat"),
        ("Hall Thermostat._keeplink._tcp.local.", "Hall Thermostat"),
        ("hall.v2._keeplink._tcp.local.", "hall.v2"),  # a label may hold dots
        ("hall._KEEPLINK._tcp.LOCAL.", "hall"),  # DNS names compare case-insensitively
        ("hall._other._tcp.local.", None),
        ("_keeplink._tcp.local.", None),  # the type itself is no instance
        (".hall._keeplink._tcp.local.x", None),
    ],
)
def test_instance_label_is_the_name_without_the_service_type(name: str, device: str) -> None:
    assert instance_label(name, TYPE) == device


@pytest.mark.parametrize("bad", ["_keeplink._tcp.local", "keeplink._tcp.local.", "_x._sctp.local."])
def test_a_malformed_service_type_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="service_type"):
        MdnsPresence(service_type=bad, presence=PresenceTracker())


# ---------------------------------------------------------------------- the handler, no network


class FakeZeroconf:
    """What the handler reads from the Zeroconf it is called with: a real zeroconf cache.

    For a TXT lookup, AsyncServiceInfo.async_request waits for zeroconf to start and then
    reads the cache again; ``ready`` gates that start, so a test holds a lookup in flight.
    """

    def __init__(self) -> None:
        self.cache = DNSCache()
        self.started = True
        self.ready = asyncio.Event()

    async def async_wait_for_start(self, timeout: float = 10.0) -> None:
        await self.ready.wait()
        self.started = True

    def announce(
        self, instance: str, *, txt: dict[str, str] | None = None, full: bool = True
    ) -> None:
        """Put the records of an announcement in the cache, as zeroconf does before it calls
        the browser's handlers: PTR (``PTR_TTL``), and unless ``full=False`` SRV, TXT, A."""
        info = AsyncServiceInfo(
            TYPE,
            instance,
            port=7001,
            parsed_addresses=["127.0.0.1"],
            server="device.local.",
            properties=txt or {},
        )
        records: list[DNSRecord] = [info.dns_pointer(override_ttl=PTR_TTL)]
        if full:
            records += [info.dns_service(), info.dns_text(), *info.dns_addresses()]
        self.cache.async_add_records(records)


@pytest.fixture
async def tracker(virtual_clock: VirtualClock) -> AsyncIterator[PresenceTracker]:
    presence = PresenceTracker(clock=virtual_clock, debounce_online_s=1, debounce_offline_s=5)
    yield presence
    presence.close()


@pytest.fixture
def zc() -> FakeZeroconf:
    return FakeZeroconf()


async def in_backoff(make_link: LinkFactory, proxy: FaultProxy) -> Link[Any]:
    """A started link whose connect was refused and which now waits out 300 s."""
    proxy.set_down(True)
    link = make_link(backoff=Backoff(initial_s=300, cap_s=300))
    link.start()
    async with asyncio.timeout(10):
        await link.wait_for_state(S.BACKOFF)
    assert link.statistics().retry_at == 300
    return link


def feed(mdns: MdnsPresence, zc: FakeZeroconf, name: str, change: ServiceStateChange) -> None:
    """What AsyncServiceBrowser does: call the handler with these keyword arguments."""
    mdns.on_service_state_change(zeroconf=zc, service_type=TYPE, name=name, state_change=change)  # type: ignore[arg-type]


async def test_an_announcement_reports_online_for_the_ptr_ttl_and_wakes_the_link(
    make_link: LinkFactory,
    proxy: FaultProxy,
    tracker: PresenceTracker,
    zc: FakeZeroconf,
    virtual_clock: VirtualClock,
) -> None:
    link = await in_backoff(make_link, proxy)
    mdns = MdnsPresence(presence=tracker, links={"hall": link})
    async with link:
        proxy.set_down(False)
        zc.announce("hall._keeplink._tcp.local.")
        feed(mdns, zc, "hall._keeplink._tcp.local.", ADDED)
        async with asyncio.timeout(10):
            await link.wait_connected()
        assert virtual_clock.now() == 0  # the 300 s wait was skipped, not waited out
        assert link.statistics().failed_attempts == 1

        claim = tracker.claims("hall")[Source.MDNS]
        assert claim.online
        assert claim.at == 0
        assert claim.ttl_s is not None
        assert PTR_TTL - 1 < claim.ttl_s <= PTR_TTL  # the record's remaining TTL
        assert tracker.presence("hall") is Presence.UNKNOWN  # debounced: online after 1 s
        await virtual_clock.advance(1)
        assert tracker.presence("hall") is Presence.ONLINE
        # Nothing renews the claim: when the record's TTL is over, so is the claim.
        await virtual_clock.advance(PTR_TTL + 5)
        assert tracker.presence("hall") is Presence.OFFLINE
    await mdns.close()


async def test_a_goodbye_reports_offline(
    make_link: LinkFactory, proxy: FaultProxy, tracker: PresenceTracker, zc: FakeZeroconf,
    virtual_clock: VirtualClock,
) -> None:  # fmt: skip
    link = make_link()
    mdns = MdnsPresence(presence=tracker, links={"hall": link})
    zc.announce("hall._keeplink._tcp.local.")
    feed(mdns, zc, "hall._keeplink._tcp.local.", ADDED)
    await virtual_clock.advance(10)
    assert tracker.presence("hall") is Presence.ONLINE

    zc.cache.async_remove_records(list(zc.cache.async_entries_with_name(TYPE)))
    feed(mdns, zc, "hall._keeplink._tcp.local.", REMOVED)
    claim = tracker.claims("hall")[Source.MDNS]
    assert (claim.online, claim.at, claim.ttl_s) == (False, 10, None)
    await virtual_clock.advance_to(14.999)
    assert tracker.presence("hall") is Presence.ONLINE
    await virtual_clock.advance_to(15)  # exactly the offline debounce after the goodbye
    assert tracker.presence("hall") is Presence.OFFLINE
    await mdns.close()


async def test_the_txt_id_names_the_device_and_the_goodbye_follows_it(
    tracker: PresenceTracker, zc: FakeZeroconf, make_link: LinkFactory
) -> None:
    link = make_link()
    mdns = MdnsPresence(presence=tracker, links={"hall-thermostat": link})
    name = "Hall Thermostat._keeplink._tcp.local."
    zc.announce(name, txt={"id": "hall-thermostat", "fw": "1.2.0"})
    feed(mdns, zc, name, ADDED)
    assert tracker.claims("hall-thermostat")[Source.MDNS].online
    assert tracker.devices() == ["hall-thermostat"]
    # The goodbye carries no TXT record: the instance is remembered with its device.
    feed(mdns, zc, name, REMOVED)
    assert not tracker.claims("hall-thermostat")[Source.MDNS].online
    await mdns.close()


async def test_without_a_txt_id_the_label_names_the_device(
    tracker: PresenceTracker, zc: FakeZeroconf, make_link: LinkFactory
) -> None:
    mdns = MdnsPresence(presence=tracker, links={"hall": make_link()})
    zc.announce("hall._keeplink._tcp.local.", txt={"fw": "1.2.0"})
    feed(mdns, zc, "hall._keeplink._tcp.local.", UPDATED)
    assert tracker.claims("hall")[Source.MDNS].online
    await mdns.close()


async def test_name_to_device_decides_and_strangers_and_unwatched_devices_are_ignored(
    tracker: PresenceTracker, zc: FakeZeroconf, make_link: LinkFactory
) -> None:
    names = {"Hall._keeplink._tcp.local.": "hall", "Porch._keeplink._tcp.local.": "porch"}
    mdns = MdnsPresence(presence=tracker, links={"hall": make_link()}, name_to_device=names.get)
    for name in [*names, "Printer._keeplink._tcp.local."]:
        zc.announce(name, txt={"id": "not-used-with-a-custom-mapping"})
        feed(mdns, zc, name, ADDED)
    assert tracker.devices() == ["hall"]  # porch is not watched; the printer names nobody
    await mdns.close()


async def test_a_device_watched_by_instance_name_is_that_instance_whatever_its_txt_says(
    tracker: PresenceTracker, zc: FakeZeroconf, make_link: LinkFactory
) -> None:
    mdns = MdnsPresence(presence=tracker)
    porch = "Porch Light._keeplink._tcp.local."
    mdns.watch("porch", make_link(), instance=porch)
    mdns.watch("hall", make_link())  # by the usual rule
    zc.announce(porch, txt={"id": "AA:BB:CC:DD:EE:01"})  # not the gateway's name for it
    feed(mdns, zc, "PORCH LIGHT._keeplink._tcp.local.", ADDED)  # DNS names ignore case
    zc.announce("Hall._keeplink._tcp.local.", txt={"id": "hall"})
    feed(mdns, zc, "Hall._keeplink._tcp.local.", ADDED)
    assert tracker.devices() == ["porch", "hall"]
    assert tracker.claims("porch")[Source.MDNS].online
    feed(mdns, zc, porch, REMOVED)
    assert not tracker.claims("porch")[Source.MDNS].online
    with pytest.raises(ConfigError, match="not an instance of"):
        mdns.watch("garage", make_link(), instance="garage._other._tcp.local.")
    assert mdns.watched() == ["porch", "hall"]
    await mdns.close()


async def test_watch_catches_up_with_an_instance_announced_before(
    make_link: LinkFactory, proxy: FaultProxy, tracker: PresenceTracker, zc: FakeZeroconf,
    virtual_clock: VirtualClock,
) -> None:  # fmt: skip
    mdns = MdnsPresence(presence=tracker)
    zc.announce("hall._keeplink._tcp.local.")
    feed(mdns, zc, "hall._keeplink._tcp.local.", ADDED)
    assert tracker.devices() == []
    link = await in_backoff(make_link, proxy)
    async with link:
        proxy.set_down(False)
        mdns.watch("hall", link)
        async with asyncio.timeout(10):
            await link.wait_connected()
        assert virtual_clock.now() == 0
    claim = tracker.claims("hall")[Source.MDNS]
    assert claim.online
    assert claim.ttl_s is not None
    assert PTR_TTL - 1 < claim.ttl_s <= PTR_TTL
    assert mdns.watched() == ["hall"]
    await mdns.close()


async def test_an_announcement_never_cancels_a_handshake_in_progress(
    make_link: LinkFactory, proxy: FaultProxy, tracker: PresenceTracker, zc: FakeZeroconf
) -> None:
    proxy.set_latency(0.2)  # the welcome takes a while to arrive
    link = make_link()
    mdns = MdnsPresence(presence=tracker, links={"hall": link})
    async with link:
        async with asyncio.timeout(10):
            await link.wait_for_state(S.HANDSHAKING)
        zc.announce("hall._keeplink._tcp.local.")
        feed(mdns, zc, "hall._keeplink._tcp.local.", ADDED)
        async with asyncio.timeout(10):
            await link.wait_connected()
        assert link.statistics().failed_attempts == 0
    assert tracker.claims("hall")[Source.MDNS].online
    await mdns.close()


async def test_a_missing_txt_record_is_resolved_in_a_named_task_first(
    tracker: PresenceTracker, zc: FakeZeroconf, make_link: LinkFactory
) -> None:
    mdns = MdnsPresence(presence=tracker, links={"hall-thermostat": make_link()})
    name = "Hall Thermostat._keeplink._tcp.local."
    zc.started = False
    zc.announce(name, full=False)  # only the PTR so far
    feed(mdns, zc, name, ADDED)
    feed(mdns, zc, name, UPDATED)  # one lookup per instance, however many updates
    lookups = [t for t in asyncio.all_tasks() if t.get_name() == f"keeplink.mdns[{name}].resolve"]
    assert len(lookups) == 1
    assert tracker.devices() == []  # not yet: the TXT record may name another device

    zc.announce(name, txt={"id": "hall-thermostat"})  # the answer arrives
    zc.ready.set()
    async with asyncio.timeout(10):
        await asyncio.wait(lookups)
    assert tracker.claims("hall-thermostat")[Source.MDNS].online
    await mdns.close()


async def test_close_cancels_a_lookup_in_flight_and_leaves_nothing_behind(
    tracker: PresenceTracker, zc: FakeZeroconf, make_link: LinkFactory
) -> None:
    mdns = MdnsPresence(presence=tracker, links={"hall": make_link()})
    zc.started = False
    zc.announce("hall._keeplink._tcp.local.", full=False)
    feed(mdns, zc, "hall._keeplink._tcp.local.", ADDED)
    (lookup,) = [t for t in asyncio.all_tasks() if t.get_name().startswith("keeplink.mdns[")]
    await mdns.close()
    assert lookup.cancelled()
    await mdns.close()  # idempotent
    # Closed: later callbacks (a browser that was slow to stop) change nothing.
    zc.announce("hall._keeplink._tcp.local.")
    feed(mdns, zc, "hall._keeplink._tcp.local.", ADDED)
    assert tracker.devices() == []
    # The plugin's leak check fails this test if a task or a timer is left.


async def test_a_goodbye_during_a_lookup_cancels_it_and_reports_offline(
    tracker: PresenceTracker, zc: FakeZeroconf, make_link: LinkFactory
) -> None:
    mdns = MdnsPresence(presence=tracker, links={"hall": make_link()})
    zc.started = False
    zc.announce("hall._keeplink._tcp.local.", full=False)
    feed(mdns, zc, "hall._keeplink._tcp.local.", ADDED)
    (lookup,) = [t for t in asyncio.all_tasks() if t.get_name().startswith("keeplink.mdns[")]
    feed(mdns, zc, "hall._keeplink._tcp.local.", REMOVED)
    async with asyncio.timeout(10):
        await asyncio.wait([lookup])
    assert lookup.cancelled()
    assert not tracker.claims("hall")[Source.MDNS].online
    await mdns.close()


async def test_the_handler_never_raises_into_zeroconf(
    tracker: PresenceTracker, zc: FakeZeroconf, make_link: LinkFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    def broken(name: str) -> str | None:
        raise RuntimeError("a bug in the mapping")

    mdns = MdnsPresence(presence=tracker, links={"hall": make_link()}, name_to_device=broken)
    zc.announce("hall._keeplink._tcp.local.")
    with caplog.at_level(logging.ERROR, logger="keeplink.presence.mdns"):
        feed(mdns, zc, "hall._keeplink._tcp.local.", ADDED)  # must not raise
    (record,) = caplog.records
    assert "Added" in record.getMessage()
    assert record.exc_info is not None
    assert "a bug in the mapping" in str(record.exc_info[1])
    await mdns.close()


# ---------------------------------------------------------------------- end to end, private netns


async def run_in_private_netns(script: Path = SCRIPT) -> dict[str, dict[str, Any]]:
    """Run a scenario script under ``unshare -n``; its JSON lines by event name."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not available to make a private network namespace")
    if shutil.which("ip") is None:
        pytest.skip("ip(8) (iproute2) is not available to bring up lo in a private namespace")
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-n", sys.executable, str(script),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(NETNS_BOUND_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0 and err.startswith(b"unshare:"):
        # e.g. "unshare: unshare failed: Operation not permitted" (no CAP_SYS_ADMIN)
        pytest.skip(f"cannot make a network namespace here: {err.decode().strip()}")
    lines = [json.loads(line) for line in out.decode().splitlines()]
    events = {line["event"]: line for line in lines}
    assert proc.returncode == 0, f"script failed after {list(events)}:\n{err.decode()}"
    return events


async def test_an_announcement_wakes_a_link_out_of_a_300s_backoff_over_real_mdns() -> None:
    events = await run_in_private_netns()

    # A private namespace with nothing but its own loopback: no packet can leave it.
    assert events["netns"]["interfaces"] == ["lo"]
    assert events["netns"]["netns"] != os.readlink("/proc/self/ns/net")

    assert events["backoff"]["error"] == "connection_failed"
    assert 299 < events["backoff"]["retry_in_s"] <= 300

    announced = events["announced"]
    assert announced["woke_in_s"] < 1.0  # not the 300 s backoff
    assert announced["link"] == "connected"
    assert (announced["failed_attempts"], announced["connects"]) == (1, 1)
    assert announced["presence"] == "online"
    assert (announced["source"], announced["claim_online"]) == ("MDNS", True)
    assert 4400 < announced["ttl_s"] <= 4500  # zeroconf's PTR TTL, as the record said

    # A re-announcement renews the claim though the browser reports no change.
    assert events["refreshed"]["later_by_s"] > 1.0
    assert 4400 < events["refreshed"]["ttl_s"] <= 4500

    goodbye = events["goodbye"]
    assert goodbye["presence"] == "offline"
    assert (goodbye["source"], goodbye["claim_online"]) == ("MDNS", False)
    assert goodbye["offline_in_s"] < 1.0

    back = events["back"]  # an announcement right after a goodbye
    assert back["online_in_s"] < 1.0
    assert back["claim_online"] is True
    assert 4400 < back["ttl_s"] <= 4500

    assert events["closed"] == {"event": "closed", "tasks_left": [], "mdns_running": False}


async def test_the_gateway_takes_presence_from_mdns_for_devices_configured_so() -> None:
    events = await run_in_private_netns(GATEWAY_SCRIPT)
    assert events["netns"]["interfaces"] == ["lo"]
    assert events["netns"]["netns"] != os.readlink("/proc/self/ns/net")

    # One mDNS watcher for the one service type, watching the two mDNS devices only.
    backoff = events["backoff"]
    assert backoff["watched"] == ["hall", "porch"]
    assert len(backoff["mdns"]) == 1 and "_keeplink._tcp.local. running" in backoff["mdns"][0]
    assert all(10 <= wait <= 300 for wait in backoff["retry_in_s"].values()), backoff

    announced = events["announced"]
    # hall by its TXT id, porch by the instance name its mdns_service gives: both woken out
    # of their backoff at once; garage (presence = "link") waits its backoff out.
    assert announced["woke_in_s"] < 1.0
    assert announced["links"] == {"hall": "connected", "porch": "connected", "garage": "backoff"}
    assert announced["connects"] == {"hall": 1, "porch": 1, "garage": 0}
    claims = announced["claims"]
    for device in ("hall", "porch"):
        online, ttl_s = claims[device]["MDNS"]
        assert online is True and 4400 < ttl_s <= 4500, claims  # the PTR record's TTL
    assert "MDNS" not in claims["garage"], claims
    assert announced["presence"]["hall"] == announced["presence"]["porch"] == "online"
    assert announced["stranger"] == ["hall", "porch", "garage"]  # nobody else reported

    # The goodbye is an mDNS "offline"; the connected link's own word still outranks it.
    assert events["goodbye"] == {
        "event": "goodbye", "mdns_claim_online": False, "presence": "online", "link": "connected"
    }  # fmt: skip
    assert events["closed"] == {"event": "closed", "tasks_left": [], "mdns_running": [False]}


async def test_a_firmware_queued_for_an_asleep_esphome_device_is_flashed_once_it_announces() -> (
    None
):
    """Over real mDNS: the device's announcement on _esphomelib._tcp wakes its link out of
    a 300 s backoff, the queued image goes out once, and the sleep cycles that follow the
    reboot into the new build (goodbye, announcement) flash nothing again."""
    events = await run_in_private_netns(ESPHOME_SCRIPT)
    assert events["netns"]["interfaces"] == ["lo"]
    assert events["netns"]["netns"] != os.readlink("/proc/self/ns/net")

    asleep = events["asleep"]
    assert asleep["retry_in_s"] > 10  # the link waits out a long backoff
    assert (asleep["state"], asleep["watched"]) == ("queued", ["porch-light"])

    flashed = events["flashed"]
    assert flashed["woke_in_s"] < 1.0  # the announcement, not the backoff
    assert flashed["woke_in_s"] <= flashed["first_block_in_s"] <= flashed["done_in_s"] < 5.0
    assert (flashed["state"], flashed["flashes"], flashed["sessions"]) == ("succeeded", 1, 1)
    assert flashed["result"]["installed"] is True
    assert flashed["image_ok"] is True

    flapped = events["flapped"]
    assert (flapped["flashes"], flapped["sessions"]) == (1, 1)
    assert flapped["connects"] >= 5  # the wake, the reboot and three sleep cycles
    assert flapped["build"] == flapped["new_build"]

    assert events["closed"] == {"event": "closed", "tasks_left": []}
