"""The gateway's per-device history (keeplink.gateway.history) and its read endpoint.

The unit tests give every time explicitly (epoch seconds from T0): no clock, no sleeping.
The last tests run a real gateway with a DeviceSimulator behind a FaultProxy and read
``GET /api/devices/{id}/history`` over HTTP.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import IO_BOUND_S
from keeplink.gateway import history as history_module
from keeplink.gateway import models
from keeplink.gateway.config import parse_config
from keeplink.gateway.history import (
    BUCKET_S,
    HOURS_KEPT,
    MAX_BUCKETS,
    MAX_CHANGES,
    MAX_ERRORS,
    MESSAGE_CHARS,
    History,
)
from keeplink.gateway.server import Server
from keeplink.testing import DeviceSimulator, FaultProxy

T0 = 1_800_000_000.0  # a minute boundary: 30,000,000 minutes after the epoch
TOKEN = "history-test-token-0123"
READ_TOKEN = "history-read-token-4567"


def fresh(**bounds: Any) -> History:
    history = History(now=lambda: T0 + 3600, **bounds)
    history.track("hall", presence="unknown", link="idle", at=T0)
    return history


def spans(view: dict[str, Any], kind: str) -> list[tuple[str, float, float]]:
    return [(s["state"], s["start"] - T0, s["end"] - T0) for s in view[kind]]


def connect(history: History, at: float, device: str = "hall") -> None:
    for offset, state in enumerate(("connecting", "handshaking", "connected")):
        history.link_changed(device, state, at=at + offset * 0.1)


LOST = ("connection_failed", "the peer closed the connection")
REFUSED = ("connection_failed", "cannot connect: Connection refused")


def drop(history: History, at: float, *, retries: int = 0) -> None:
    history.link_changed("hall", "lost", error=LOST, at=at)
    history.link_changed("hall", "backoff", error=LOST, at=at + 0.01)
    for n in range(retries):
        history.link_changed("hall", "connecting", at=at + 1 + n)
        history.link_changed("hall", "backoff", error=REFUSED, at=at + 1.01 + n)


# ---------------------------------------------------------------------------- spans


def test_spans_show_a_drop_and_the_recovery_with_unknown_before_the_start() -> None:
    history = fresh()
    connect(history, T0 + 10)
    history.presence_changed("hall", "online", at=T0 + 11)
    drop(history, T0 + 100, retries=3)
    history.presence_changed("hall", "offline", at=T0 + 104)
    connect(history, T0 + 110)
    history.presence_changed("hall", "online", at=T0 + 111)

    view = history.view("hall", hours=1, until=T0 + 1800)
    assert view["since"] == T0 + 1800 - 3600
    assert view["known_since"] == T0
    # before the history started, and the device's own unknown: one span
    assert spans(view, "presence") == [
        ("unknown", -1800, 11),
        ("online", 11, 104),
        ("offline", 104, 111),
        ("online", 111, 1800),
    ]
    link = spans(view, "link")
    # the retries (connecting, refused, backoff again) are folded into one backoff span
    assert [s for s, *_ in link] == [
        "unknown",
        "idle",
        "connecting",
        "handshaking",
        "connected",
        "lost",
        "backoff",
        "handshaking",  # the retry that got through: its connecting folded into backoff
        "connected",
    ]
    backoff = view["link"][6]
    assert (backoff["start"] - T0, backoff["end"] - T0) == pytest.approx((100.01, 110.1))
    assert backoff["error"] == {"code": LOST[0], "message": LOST[1]}
    assert view["outages"] == [
        {
            "start": T0 + 100,
            "end": T0 + 110.2,
            "duration_s": 10.2,
            "state": "lost",
            "error": {"code": LOST[0], "message": LOST[1]},
        }
    ]
    models.DeviceHistory.model_validate({"device": "hall", "node": "n", "relayed": False, **view})


def test_an_outage_still_going_has_no_end_and_counts_up_to_now() -> None:
    history = fresh()
    connect(history, T0)
    drop(history, T0 + 60)
    view = history.view("hall", hours=1, until=T0 + 90)
    assert view["outages"][0]["end"] is None
    assert view["outages"][0]["duration_s"] == 30
    assert spans(view, "link")[-1] == ("backoff", pytest.approx(60.01), 90)


def test_the_window_starts_in_the_state_held_then() -> None:
    history = fresh()
    connect(history, T0)
    drop(history, T0 + 600)
    connect(history, T0 + 700)
    view = history.view("hall", hours=1, until=T0 + 4000)  # since = T0 + 400
    assert view["known_since"] == T0 + 400
    assert [s for s, *_ in spans(view, "link")] == [
        "connected",
        "lost",
        "backoff",
        "handshaking",
        "connected",
    ]
    assert spans(view, "link")[0][1] == 400
    assert len(view["outages"]) == 1
    # an outage that ended before the window is not in it
    assert history.view("hall", hours=1, until=T0 + 700 + 3700)["outages"] == []


def test_the_ring_of_changes_is_bounded_and_says_from_when_it_knows() -> None:
    history = fresh(max_changes=10)
    for n in range(20):  # 40 changes: connected, lost, connected, ...
        history.link_changed("hall", "connected", at=T0 + 10 * n)
        history.link_changed("hall", "lost", error=LOST, at=T0 + 10 * n + 5)
    record = history._devices["hall"]
    assert len(record.changes) == 10
    view = history.view("hall", hours=1, until=T0 + 200)
    # kept: the changes at 150 … 195; the last one dropped was at 145, and from then on the
    # state is known (lost: what the change at 150 left)
    assert view["known_since"] == T0 + 145
    link = spans(view, "link")
    assert link[:3] == [("unknown", -3400, 145), ("lost", 145, 150), ("connected", 150, 155)]
    assert len(view["outages"]) == 5  # the lost at 155, 165, … 195 (the one at 145 is gone)
    assert view["outages"][-1]["end"] is None


def test_changes_older_than_the_hours_kept_are_dropped() -> None:
    history = fresh(hours=1)
    connect(history, T0)
    drop(history, T0 + 10)
    connect(history, T0 + 3 * 3600)
    record = history._devices["hall"]
    assert all(c.at >= T0 + 2 * 3600 for c in record.changes)
    view = history.view("hall", hours=1, until=T0 + 3 * 3600 + 60)
    assert view["known_since"] == T0 + 3 * 3600 - 3600 + 60  # the window's start
    assert spans(view, "link")[0][0] == "backoff"  # known: the state the next change left


def test_times_never_go_backwards_and_repeats_record_nothing() -> None:
    history = fresh()
    history.presence_changed("hall", "online", at=T0 + 50)
    history.presence_changed("hall", "offline", at=T0 + 40)  # a relayed, skewed clock
    history.presence_changed("hall", "offline", at=T0 + 60)  # no change
    changes = list(history._devices["hall"].changes)
    assert [(c.new, c.at) for c in changes] == [("online", T0 + 50), ("offline", T0 + 50)]


# ---------------------------------------------------------------------------- buckets


def test_buckets_are_per_minute_and_only_where_something_happened() -> None:
    history = fresh()
    connect(history, T0 + 5)  # minute 0
    for n in range(3):  # minute 2: three commands queued, one goes out and succeeds
        history.command_changed("hall", old=None, new="queued", command=f"c{n}", at=T0 + 130 + n)
    history.command_changed("hall", old="queued", new="sending", at=T0 + 140)
    history.command_changed("hall", old="sending", new="succeeded", at=T0 + 141)
    drop(history, T0 + 300)  # minute 5
    history.protocol_error("hall", "not JSON", sample="b'x'", at=T0 + 301)
    history.command_changed(
        "hall",
        old="queued",
        new="expired",
        command="c1",
        error=("expired", "not delivered within 60 s"),
        at=T0 + 302,
    )
    connect(history, T0 + 306)
    view = history.view("hall", hours=1, until=T0 + 400)
    buckets = {int(b["start"] - T0): b for b in view["buckets"]}
    assert sorted(buckets) == [0, 120, 300]
    assert buckets[0] | {"start": 0} == {
        "start": 0,
        "queued": 0,
        "queued_max": 0,
        "connects": 1,
        "drops": 0,
        "protocol_errors": 0,
        "delivered": 0,
        "failed": 0,
    }
    minute2 = buckets[120]
    assert (minute2["queued"], minute2["queued_max"], minute2["delivered"]) == (2, 3, 1)
    minute5 = buckets[300]
    assert (minute5["queued"], minute5["queued_max"]) == (1, 2)
    assert (minute5["connects"], minute5["drops"], minute5["protocol_errors"]) == (1, 1, 1)
    assert minute5["failed"] == 1
    assert view["queued_at_start"] == 0


def test_queued_at_start_is_the_depth_before_the_window() -> None:
    history = fresh()
    for n in range(4):
        history.command_changed("hall", old=None, new="queued", at=T0 + n)
    history.command_changed("hall", old="queued", new="cancelled", at=T0 + 7200)
    view = history.view("hall", hours=1, until=T0 + 7300)
    assert view["queued_at_start"] == 4
    assert [(b["queued"], b["queued_max"]) for b in view["buckets"]] == [(3, 4)]


def test_buckets_are_bounded_by_count_and_age() -> None:
    assert MAX_BUCKETS == HOURS_KEPT * 60 + 1
    history = fresh(hours=1)
    for minute in range(200):  # something every minute for 200 minutes
        history.command_changed("hall", old=None, new="queued", at=T0 + minute * BUCKET_S)
    record = history._devices["hall"]
    assert len(record.buckets) == 61
    assert record.buckets[0].start == T0 + 139 * BUCKET_S
    assert record.queued_before == 139  # the last dropped bucket's depth
    view = history.view("hall", hours=1, until=T0 + 199 * BUCKET_S + 1)
    assert view["queued_at_start"] == 139
    assert len(view["buckets"]) == 61


def test_a_sample_corrects_the_depth_and_stores_nothing_when_it_agrees() -> None:
    history = fresh()
    history.command_changed("hall", old=None, new="queued", at=T0 + 1)
    history.sample("hall", 1, at=T0 + 500)  # agrees: no new bucket
    assert len(history._devices["hall"].buckets) == 1
    history.sample("hall", 5, at=T0 + 600)  # the store knows better (a relay was missed)
    view = history.view("hall", hours=1, until=T0 + 700)
    assert [(b["start"] - T0, b["queued"]) for b in view["buckets"]] == [(0, 1), (600, 5)]
    # a command leaving queued never makes the depth negative
    for _ in range(9):
        history.command_changed("hall", old="queued", new="cancelled", at=T0 + 650)
    assert history.view("hall", hours=1, until=T0 + 700)["buckets"][-1]["queued"] == 0
    seen = history.command_events("hall")
    history.command_changed("hall", old=None, new="queued", at=T0 + 660)
    assert history.command_events("hall") == seen + 1


# ---------------------------------------------------------------------------- errors


def test_errors_newest_first_repeats_counted_drop_errors_kept_once() -> None:
    history = fresh()
    connect(history, T0)
    drop(history, T0 + 10, retries=5)
    for n in range(3):
        history.protocol_error("hall", "not JSON", sample=f"b'junk{n}'", at=T0 + 20 + n)
    errors = history.view("hall", hours=1, until=T0 + 100)["errors"]
    assert [(e["source"], e["code"], e["count"]) for e in errors] == [
        ("protocol", "protocol_error", 3),
        ("link", "connection_failed", 5),  # the refused retries
        ("link", "connection_failed", 1),  # the drop: once, not again for its backoff
    ]
    assert errors[0]["message"] == "not JSON (starts b'junk2')"
    assert (errors[0]["first_at"], errors[0]["last_at"]) == (T0 + 20, T0 + 22)
    assert errors[2]["message"] == LOST[1]


def test_errors_are_bounded_and_messages_cut() -> None:
    history = fresh()
    for n in range(MAX_ERRORS + 20):
        history.link_changed("hall", "backoff", error=("e", f"{n} " + "x" * 1000), at=T0 + n)
    errors = history._devices["hall"].errors
    assert len(errors) == MAX_ERRORS
    assert errors[0].message.startswith("20 ")
    assert len(errors[-1].message) == MESSAGE_CHARS
    # a window that ends before an error leaves it out
    assert history.view("hall", hours=1, until=T0 + 30)["errors"][0]["message"].startswith("30 ")


def test_command_errors_name_the_command() -> None:
    history = fresh()
    history.command_changed(
        "hall", old="sending", new="rejected", command="abc", error=("bad_op", "no"), at=T0
    )
    history.command_changed("hall", old="sending", new="failed", command="def", at=T0 + 1)
    (error,) = history.view("hall", hours=1, until=T0 + 5)["errors"]
    assert (error["source"], error["code"], error["command"]) == ("command", "bad_op", "abc")


# ---------------------------------------------------------------------------- the stream


def test_feed_reads_the_gateways_events_and_maps_a_hub_link_to_its_devices() -> None:
    history = History(now=lambda: T0 + 100)
    for device in ("hall", "unit1", "unit2"):
        history.track(device, link="idle", at=T0)
    history.link_devices = {"hall": ["hall"], "mqtt:broker:1883": ["unit1", "unit2"]}
    events: list[dict[str, Any]] = [
        {"type": "link", "device": "mqtt:broker:1883", "old": "idle", "new": "connecting"},
        {"type": "link", "device": "hall", "old": "idle", "new": "connecting", "at": T0 + 1},
        {"type": "presence", "device": "unit1", "old": "unknown", "new": "online", "at": T0 + 2},
        {
            "type": "command",
            "old": None,
            "command": {"id": "c1", "device": "hall", "state": "queued", "last_error": None},
            "at": T0 + 3,
        },
        {"type": "firmware_progress", "device": "hall", "percent": 5},
        {"type": "presence", "device": "nobody", "new": "online"},  # not a tracked device
    ]
    for event in events:
        history.feed(event)
    assert [c.new for c in history._devices["unit2"].changes] == ["connecting"]
    assert history._devices["unit2"].changes[0].at == T0 + 100  # no "at": now
    assert history._devices["hall"].queued == 1
    assert history._devices["unit1"].presence == "online"
    assert "nobody" not in history


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=100, database=None)
@given(
    event=st.fixed_dictionaries(
        {"type": st.sampled_from(["link", "presence", "command", "parked", 5])},
        optional={
            "device": st.sampled_from(["hall", "x"]) | JSONISH,
            "new": JSONISH,
            "old": JSONISH,
            "error": JSONISH,
            "at": JSONISH,
            "command": st.fixed_dictionaries(
                {}, optional={"device": st.just("hall") | JSONISH, "state": JSONISH}
            )
            | JSONISH,
        },
    )
)
def test_feed_survives_any_relayed_event(event: dict[str, Any]) -> None:
    """A relayed event comes from another process: whatever it holds, the history stays a
    valid answer."""
    history = fresh()
    history.feed(event)
    view = history.view("hall", hours=1, until=T0 + 3600)
    models.DeviceHistory.model_validate({"device": "hall", "node": "n", "relayed": True, **view})


def test_an_unknown_device_is_all_unknown() -> None:
    view = History(now=lambda: T0).view("ghost", hours=2)
    assert spans(view, "link") == [("unknown", -7200, 0)]
    assert view["buckets"] == view["errors"] == view["outages"] == []


def test_the_documented_bounds_are_the_real_ones() -> None:
    """The model's description and the module's docstring state the bounds in words."""
    description = " ".join((models.DeviceHistory.__doc__ or "").split())
    doc = " ".join((history_module.__doc__ or "").split())
    assert f"{MAX_CHANGES:,} state changes" in description
    assert f"{HOURS_KEPT} hours of minute buckets" in description
    assert f"last {MAX_ERRORS} distinct errors" in description
    assert f"({MAX_CHANGES:,} changes, {MAX_BUCKETS:,} buckets, {MAX_ERRORS} errors)" in doc
    with pytest.raises(ValueError, match="at least 1"):
        History(max_changes=0)


def test_a_full_device_costs_what_the_docstring_says() -> None:
    """Every ring full, with the longest messages: well under the 0.4 MB stated."""
    history = History(now=lambda: T0)
    history.track("hall", at=T0)
    for n in range(MAX_CHANGES):
        state = "connected" if n % 2 else "lost"
        history.link_changed("hall", state, error=("e" * 64, f"{n}" * 300), at=T0 + n)
    for minute in range(MAX_BUCKETS):
        history.command_changed("hall", old=None, new="queued", at=T0 + minute * BUCKET_S)
    record = history._devices["hall"]
    size = sum(sys.getsizeof(c) + 64 for c in record.changes)  # + a shared error tuple
    size += sum(sys.getsizeof(b) for b in record.buckets)
    size += sum(sys.getsizeof(e) + sys.getsizeof(e.message) * 2 for e in record.errors)
    assert len(record.changes) == MAX_CHANGES
    assert len(record.buckets) == MAX_BUCKETS
    assert size < 400_000, size


# ---------------------------------------------------------------------------- over HTTP


async def eventually_async(predicate: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(IO_BOUND_S):
        while not await predicate():  # noqa: ASYNC110 - polls the live gateway
            await asyncio.sleep(0.02)


@dataclass
class Rig:
    server: Server
    sim: DeviceSimulator
    proxy: FaultProxy
    http: aiohttp.ClientSession

    async def history(self, device: str, query: str = "", token: str = TOKEN) -> Any:
        async with self.http.get(
            f"{self.server.url}/api/devices/{device}/history{query}",
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            return response.status, await response.json()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    sim = DeviceSimulator(device_id="hall")
    await sim.start()
    proxy = FaultProxy("127.0.0.1", sim.port)
    await proxy.start()
    config = parse_config(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "store": "memory:",
                "token": TOKEN,
                "read_token": READ_TOKEN,
            },
            "devices": [
                {
                    "id": "hall",
                    "driver": "jsonline",
                    "port": proxy.port,
                    "backoff": {"initial_s": 0.05, "cap_s": 0.2},
                }
            ],
        },
        source="test_history",
    )
    server = Server(config, token=TOKEN)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            yield Rig(server=server, sim=sim, proxy=proxy, http=http)
    finally:
        await server.stop()
        await proxy.stop()
        await sim.stop()


async def test_the_history_route_shows_a_cut_and_the_reconnect(rig: Rig) -> None:
    link = rig.server.gateway.links["hall"]

    async def state_is(state: str) -> bool:
        return link.state.value == state

    await eventually_async(lambda: state_is("connected"))
    rig.proxy.set_down()
    await eventually_async(lambda: state_is("backoff"))
    await rig.sim.send_raw(b"")  # nothing connected: nobody gets it
    rig.proxy.set_down(False)
    await eventually_async(lambda: state_is("connected"))
    assert await rig.sim.send_raw(b"\x00 not a frame\n") == 1

    async def protocol_error_seen() -> bool:
        _, view = await rig.history("hall")
        return bool(view["errors"]) and view["errors"][0]["source"] == "protocol"

    await eventually_async(protocol_error_seen)
    status, view = await rig.history("hall", "?hours=2", token=READ_TOKEN)
    assert status == 200, view
    models.DeviceHistory.model_validate(view)
    assert (view["device"], view["relayed"], view["bucket_s"]) == ("hall", False, BUCKET_S)
    assert view["until"] - view["since"] == 2 * 3600
    states = [s["state"] for s in view["link"]]
    assert states[0] == "unknown"  # before the gateway started
    assert states[-1] == "connected"
    assert "lost" in states
    assert states.count("connected") == 2
    (outage,) = view["outages"]
    assert outage["end"] is not None
    assert outage["error"]["code"] == "connection_failed"
    assert sum(b["connects"] for b in view["buckets"]) == 2
    assert sum(b["drops"] for b in view["buckets"]) == 1
    assert sum(b["protocol_errors"] for b in view["buckets"]) == 1
    assert view["errors"][0]["code"] == "protocol_error"
    assert "\\x00 not a frame" in view["errors"][0]["message"]


async def test_the_history_route_errors(rig: Rig) -> None:
    status, body = await rig.history("nope")
    assert (status, body["code"]) == (404, "device_not_found")
    for query in ("?hours=0", f"?hours={HOURS_KEPT + 1}", "?hours=x", "?minutes=5"):
        status, body = await rig.history("hall", query)
        assert (status, body["code"]) == (422, "invalid_request"), query
    status, body = await rig.history("hall", token="wrong-token-wrong-token")
    assert (status, body["code"]) == (401, "auth_failed")
    async with rig.http.get(f"{rig.server.url}/api/devices/hall/history") as response:
        assert response.status == 401  # this gateway has a read_token
    async with rig.http.get(f"{rig.server.url}/api/openapi.json") as response:
        document = await response.json()
    route = document["paths"]["/api/devices/{device}/history"]["get"]
    assert [p["name"] for p in route["parameters"]] == ["hours"]
    assert set(route["responses"]) == {"200", "401", "404", "422"}
    assert "relayed" in document["components"]["schemas"]["DeviceHistory"]["description"]


async def test_the_depth_is_anchored_on_the_store_at_start(tmp_path: Path) -> None:
    """Commands a store holds from before this start are counted in the history at once."""
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))  # bound, never listening: every connect refused
    data = {
        "gateway": {"listen": "127.0.0.1:0", "store": f"sqlite:///{tmp_path}/k.db", "token": TOKEN},
        "devices": [{"id": "away", "driver": "jsonline", "port": dead.getsockname()[1]}],
    }
    try:
        first = Server(parse_config(data, source="test_history"), token=TOKEN)
        await first.start()
        for n in range(3):
            await first.gateway.outbox.submit("away", "set", {"n": n})
        assert first.gateway.history.view("away", hours=1)["buckets"][-1]["queued"] == 3
        await first.stop()

        second = Server(parse_config(data, source="test_history"), token=TOKEN)
        await second.start()
        try:
            history = second.gateway.history

            async def anchored() -> bool:
                buckets = history.view("away", hours=1)["buckets"]
                return bool(buckets) and buckets[-1]["queued"] == 3

            await eventually_async(anchored)
        finally:
            await second.stop()
    finally:
        dead.close()
