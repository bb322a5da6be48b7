"""Requests: correlation by sequence number, typed outcomes, deadlines in virtual time."""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import Recorder, connected, eventually, until_state
from keeplink import (
    Acknowledged,
    Cancelled,
    InvalidRequestError,
    Link,
    LinkState,
    Rejected,
    RejectedError,
    SideDataReceived,
    TimedOut,
    Unavailable,
    VirtualClock,
    enum_or_none,
    sleep_until,
)
from keeplink._core.jsonline import MAX_LINE, Ack, Req, Welcome, encode_frame
from keeplink.drivers import JsonLineDriver
from keeplink.testing import DeviceSimulator, FaultProxy, ScriptedDriver, ScriptedPeer
from linkfixtures import TOKEN, LinkFactory

S = LinkState


async def test_a_request_is_acknowledged_with_its_payload_and_side_data(
    make_link: LinkFactory, sim: DeviceSimulator
) -> None:
    link = make_link()
    rec = Recorder(link)
    async with link:
        await connected(link)
        outcome = await link.request("set", {"target": 21.5}, timeout=5, key="cmd-1")
    assert isinstance(outcome, Acknowledged)
    assert outcome.result == {"state": {"target": 21.5}}
    assert outcome.side == {"rssi": -61}
    assert link.side_data == {"rssi": -61}
    side = rec.of(SideDataReceived)
    assert len(side) == 1
    assert side[0].device_id == "hall"  # type: ignore[union-attr]
    assert side[0].values == {"rssi": -61}  # type: ignore[union-attr]
    assert sim.applied[0].key == "cmd-1"


async def test_a_refusal_is_rejected_with_the_devices_code_kept_verbatim(
    make_link: LinkFactory,
) -> None:
    link = make_link()
    async with link:
        await connected(link)
        outcome = await link.request("fail", {"code": "valve_stuck", "msg": "valve 2"}, timeout=5)
        assert isinstance(outcome, Rejected)
        assert (outcome.code, outcome.message) == ("valve_stuck", "valve 2")
        with pytest.raises(RejectedError) as info:
            await link.call("fail", {"code": "valve_stuck"}, timeout=5)
        assert info.value.wire_code == "valve_stuck"
        assert info.value.code == "rejected"
        assert await link.call("echo", {"a": 1}, timeout=5) == {"a": 1}
        assert link.statistics().outcomes == {"rejected": 2, "acknowledged": 1}


@pytest.mark.parametrize(
    ("op", "args", "key", "timeout"),
    [
        ("", {}, None, 5),
        (None, {}, None, 5),
        ("set", ["not", "a", "mapping"], None, 5),
        ("set", {1: "non-string key"}, None, 5),
        ("set", {"x": object()}, None, 5),
        ("set", {"x": float("nan")}, None, 5),
        ("set", {"blob": "a" * 70_000}, None, 5),
        ("set", {}, "", 5),
        ("set", {}, 42, 5),
        ("set", {}, None, 0),
        ("set", {}, None, -1),
        ("set", {}, None, float("inf")),
        ("set", {}, None, "5"),
        ("set", {}, None, True),
    ],
)
async def test_invalid_arguments_fail_before_anything_is_sent(
    make_link: LinkFactory, sim: DeviceSimulator, op: Any, args: Any, key: Any, timeout: Any
) -> None:
    link = make_link()
    async with link:
        await connected(link)
        with pytest.raises(InvalidRequestError) as info:
            await link.request(op, args, timeout=timeout, key=key)
        assert info.value.code == "invalid_request"
        stats = link.statistics()
        assert (stats.requests_sent, stats.requests_in_flight, stats.frames_out) == (0, 0, 1)
    assert sim.statistics().requests == 0


async def test_a_request_while_not_connected_is_unavailable_at_once(
    make_link: LinkFactory, proxy: FaultProxy
) -> None:
    link = make_link()
    outcome = await link.request("set", {}, timeout=5)
    assert isinstance(outcome, Unavailable)
    assert outcome.error.code == "link_closed"
    proxy.set_down(True)
    async with link:
        await until_state(link, S.BACKOFF)
        outcome = await link.request("set", {}, timeout=5)
        assert isinstance(outcome, Unavailable)
        assert outcome.error.code == "device_unavailable"


async def test_a_thousand_concurrent_requests_on_an_8_bit_link_all_resolve_correctly(
    proxy: FaultProxy, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    sim.seq_bits = 8
    sim.ack_delay_s = 1.0  # acks held until the virtual clock moves: 200 truly in flight
    driver = JsonLineDriver(
        host=proxy.host, port=proxy.port, token=TOKEN, seq_bits=8, max_in_flight=200
    )
    link = Link(driver, name="bits8", clock=virtual_clock, heartbeat_s=None)
    async with link:
        await connected(link)
        tasks = [
            asyncio.create_task(link.request("echo", {"id": i}, timeout=60)) for i in range(1000)
        ]
        for wave in range(1, 6):
            await eventually(lambda w=wave: sim.statistics().requests == 200 * w)  # type: ignore[misc]
            assert link.statistics().requests_in_flight == 200
            await virtual_clock.advance(1)
        outcomes = await asyncio.gather(*tasks)
    for i, outcome in enumerate(outcomes):
        assert isinstance(outcome, Acknowledged), outcome
        assert outcome.result == {"id": i}  # each ack resolved its own request
    seqs = [c.seq for c in sim.applied]
    assert len(seqs) == 1000
    assert max(seqs) == 255  # the 8-bit space wrapped around several times
    for start in range(0, 1000, 200):  # within a wave, all 200 numbers were distinct
        assert len(set(seqs[start : start + 200])) == 200
    assert sim.statistics().max_outstanding == 200
    assert link.statistics().requests_in_flight == 0


class AckOnFirstBytes:
    """A raw JSON-lines peer that answers before it has read the requests: once the first
    request's opening bytes show its seq, it acks it and the ``count - 1`` numbered after
    it (concurrent requests take consecutive numbers), then reads nothing more until
    ``release`` is set. Its receive buffer is tiny, so the client's writes back up."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.replied = asyncio.Event()
        self.release = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AckOnFirstBytes:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        listener = self._server.sockets[0]
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted ones inherit
        self.port = listener.getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self.release.set()
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await reader.readline()  # hello
            writer.write(encode_frame(Welcome(device="hall")))
            head = await reader.readuntil(b',"op":')
            match = re.search(rb'"seq":(\d+)', head)
            assert match is not None, head
            first = int(match.group(1))
            for seq in range(first, first + self.count):
                writer.write(encode_frame(Ack(seq=seq, ok=True, result={"n": seq})))
            self.replied.set()
            await self.release.wait()
            while await reader.read(1 << 16):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def test_an_ack_arriving_while_its_request_is_still_being_written_resolves_it() -> None:
    """The waiter is registered before the write: a device may answer from a request's first
    bytes while the rest of it (and of the requests around it) is still on its way."""
    count = 160
    blob = "x" * 60_000  # 9.6 MB: more than loopback socket buffers (up to 4 MB) hold
    async with AckOnFirstBytes(count) as peer:
        driver = JsonLineDriver(host="127.0.0.1", port=peer.port, max_in_flight=count)
        link = Link(driver, name="eager", heartbeat_s=None)
        async with link:
            await connected(link)
            base = link.statistics().frames_in
            tasks = [
                asyncio.create_task(link.request("put", {"blob": blob}, timeout=30))
                for _ in range(count)
            ]
            await eventually(lambda: link.statistics().frames_in == base + count, what="acks in")
            writing = sum(1 for t in tasks if not t.done())
            late = link.statistics().late_replies
            assert late == 0, (
                f"{late} of {count} acks arrived while their requests were being written "
                f"and were dropped as late ({writing} requests still writing)"
            )
            # The point of the test: some requests had their ack before their write ended.
            assert writing > 0, "every write finished before the acks came; test is moot"
            peer.release.set()
            outcomes = await asyncio.gather(*tasks)
    assert all(isinstance(o, Acknowledged) for o in outcomes), outcomes
    assert sorted(o.result["n"] for o in outcomes if isinstance(o, Acknowledged)) == sorted(
        o.seq for o in outcomes if isinstance(o, Acknowledged)
    )


async def test_an_ack_on_the_new_session_after_a_reconnect_resolves_the_request(
    make_link: LinkFactory, proxy: FaultProxy, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    sim.ack_delay_s = 5
    sim.ack_to_newest_connection = True
    link = make_link()
    async with link:
        await connected(link)
        pending = asyncio.create_task(link.request("set", {"on": True}, timeout=30))
        await eventually(lambda: sim.statistics().requests == 1)
        proxy.reset_all()  # the session drops between the send and the ack
        await until_state(link, S.BACKOFF)
        assert link.statistics().requests_in_flight == 1  # still pending: its deadline is 30
        await virtual_clock.advance(1)
        await connected(link)
        await virtual_clock.advance(4)  # the device answers, on the new session
        outcome = await asyncio.wait_for(pending, 10)
    assert isinstance(outcome, Acknowledged)
    assert link.statistics().connects == 2


async def test_an_ack_after_the_deadline_is_dropped_and_logged(
    make_link: LinkFactory, sim: DeviceSimulator, virtual_clock: VirtualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sim.ack_delay_s = 10
    link = make_link()
    with caplog.at_level(logging.DEBUG, logger="keeplink.link"):
        async with link:
            await connected(link)
            pending = asyncio.create_task(link.request("set", {"on": True}, timeout=5))
            await eventually(lambda: sim.statistics().requests == 1)
            await virtual_clock.advance(5)
            outcome = await pending
            assert isinstance(outcome, TimedOut)
            assert outcome.error.code == "timeout"
            await virtual_clock.advance(5)
            await eventually(lambda: link.statistics().late_replies == 1)
            assert link.state is S.CONNECTED  # a timeout never touches the link
    assert any("late or unknown" in r.getMessage() for r in caplog.records)


async def test_a_request_timeout_does_not_touch_the_link(
    make_link: LinkFactory, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    """The IntesisHome failure: a missing reply must not tear the connection down."""
    link = make_link()
    async with link:
        await connected(link)
        for _ in range(3):
            pending = asyncio.create_task(link.request("noreply", {}, timeout=5))
            await eventually(lambda: link.statistics().requests_sent >= 1)
            await virtual_clock.advance(5)
            assert isinstance(await pending, TimedOut)
        stats = link.statistics()
        assert (stats.state, stats.connects, stats.disconnects) == (S.CONNECTED, 1, 0)
        assert isinstance(await link.request("echo", {}, timeout=5), Acknowledged)


async def test_stop_resolves_every_pending_request_as_cancelled(
    make_link: LinkFactory, sim: DeviceSimulator
) -> None:
    link = make_link()
    link.start()
    await connected(link)
    pending = [asyncio.create_task(link.request("noreply", {"i": i}, timeout=60)) for i in range(5)]
    await eventually(lambda: sim.statistics().requests == 5)
    await link.stop()
    outcomes = await asyncio.gather(*pending)
    assert all(isinstance(o, Cancelled) for o in outcomes)
    assert link.statistics().requests_in_flight == 0


async def test_cancelling_the_callers_task_removes_its_waiter(
    make_link: LinkFactory, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    link = make_link(heartbeat_s=None)
    async with link:
        await connected(link)
        task = asyncio.create_task(link.request("noreply", {}, timeout=60))
        await eventually(lambda: link.statistics().requests_in_flight == 1)
        assert virtual_clock.pending() == [60.0]  # the request's deadline timer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert link.statistics().requests_in_flight == 0
        await virtual_clock.advance(60)  # the shared expiry timer finds nothing due
        assert virtual_clock.pending() == []  # and is not re-armed for nothing
        assert link.statistics().outcomes == {}


async def test_a_strict_device_gets_one_request_at_a_time(
    proxy: FaultProxy, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    sim.ack_delay_s = 1
    driver = JsonLineDriver(host=proxy.host, port=proxy.port, token=TOKEN, max_in_flight=1)
    link = Link(driver, name="strict", clock=virtual_clock, heartbeat_s=None)
    async with link:
        await connected(link)
        tasks = [asyncio.create_task(link.request("echo", {"i": i}, timeout=60)) for i in range(4)]
        for n in range(1, 5):
            await eventually(lambda n=n: sim.statistics().requests == n)  # type: ignore[misc]
            await virtual_clock.advance(1)
        outcomes = await asyncio.gather(*tasks)
    assert [o.result for o in outcomes] == [{"i": i} for i in range(4)]  # type: ignore[union-attr]
    assert sim.statistics().max_outstanding == 1


async def test_a_request_waiting_for_the_window_times_out_unsent(
    proxy: FaultProxy, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    driver = JsonLineDriver(host=proxy.host, port=proxy.port, token=TOKEN, max_in_flight=1)
    link = Link(driver, name="strict", clock=virtual_clock, heartbeat_s=None)
    async with link:
        await connected(link)
        first = asyncio.create_task(link.request("noreply", {}, timeout=30))
        await eventually(lambda: link.statistics().requests_sent == 1)
        second = asyncio.create_task(link.request("echo", {}, timeout=5))
        await virtual_clock.advance(5)
        outcome = await second
        assert isinstance(outcome, TimedOut)
        assert outcome.sent is False
        assert "free window" in outcome.error.message
        await virtual_clock.advance(25)
        assert isinstance(await first, TimedOut)
    assert sim.statistics().requests == 1


async def test_a_request_cancelled_while_waiting_for_the_window_leaves_its_turn_to_the_next(
    proxy: FaultProxy, sim: DeviceSimulator, virtual_clock: VirtualClock
) -> None:
    sim.ack_delay_s = 1
    driver = JsonLineDriver(host=proxy.host, port=proxy.port, token=TOKEN, max_in_flight=1)
    link = Link(driver, name="strict", clock=virtual_clock, heartbeat_s=None)
    async with link:
        await connected(link)
        first = asyncio.create_task(link.request("echo", {"i": 0}, timeout=60))
        await eventually(lambda: sim.statistics().requests == 1)
        given_up = asyncio.create_task(link.request("echo", {"i": 1}, timeout=60))
        third = asyncio.create_task(link.request("echo", {"i": 2}, timeout=60))
        await asyncio.sleep(0.01)  # both wait for the window, in this order
        given_up.cancel()
        await virtual_clock.advance(1)
        assert (await first).result == {"i": 0}  # type: ignore[union-attr]
        await eventually(lambda: sim.statistics().requests == 2)
        await virtual_clock.advance(1)
        assert (await third).result == {"i": 2}  # type: ignore[union-attr]
        with pytest.raises(asyncio.CancelledError):
            await given_up
        # The window is whole again: one more request goes straight out.
        fourth = asyncio.create_task(link.request("echo", {"i": 3}, timeout=60))
        await eventually(lambda: sim.statistics().requests == 3)
        await virtual_clock.advance(1)
        assert (await fourth).result == {"i": 3}  # type: ignore[union-attr]
    assert sim.statistics().max_outstanding == 1


class FanSpeed(enum.IntEnum):
    LOW = 1
    HIGH = 2


def test_an_unknown_enumerated_value_from_a_device_maps_to_none() -> None:
    assert enum_or_none(FanSpeed, 2) is FanSpeed.HIGH
    assert enum_or_none(FanSpeed, 7) is None
    assert enum_or_none(FanSpeed, "fast") is None
    assert enum_or_none(FanSpeed, None) is None


# ------------------------------------------------------------------ property: mixed outcomes

KIND = st.sampled_from(["ack", "reject", "noreply", "slow"])
REQUEST = st.tuples(
    KIND,
    st.integers(min_value=0, max_value=6),  # start, whole seconds
    st.integers(min_value=1, max_value=6),  # timeout, whole seconds
    st.integers(min_value=0, max_value=6),  # slow: reply after delay + 0.5 s
)


def expected_outcome(
    kind: str, start: int, timeout: int, delay: int, stop_at: float | None
) -> type:
    """The outcome the request rules prescribe, from the scenario alone."""
    if stop_at is not None and stop_at <= start:
        return Unavailable
    if kind == "ack":
        return Acknowledged
    if kind == "reject":
        return Rejected
    due = start + timeout
    outcome: type = TimedOut
    if kind == "slow" and delay + 0.5 < timeout:
        due, outcome = start + delay + 0.5, Acknowledged
    if stop_at is not None and stop_at < due:
        return Cancelled
    return outcome


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.lists(REQUEST, min_size=1, max_size=12),
    stop_at=st.none() | st.sampled_from([0.25, 1.75, 3.25, 4.75, 8.25]),
)
async def test_mixed_outcomes_each_resolve_exactly_once_to_the_right_outcome(
    requests: list[tuple[str, int, int, int]], stop_at: float | None
) -> None:
    clock = VirtualClock()
    async with DeviceSimulator(device_id="mix", clock=clock) as device:
        link = Link(
            JsonLineDriver(host=device.host, port=device.port),
            name="mix",
            clock=clock,
            heartbeat_s=None,
        )
        link.start()
        await connected(link)
        ops = {"ack": "echo", "reject": "fail", "noreply": "noreply", "slow": "slow"}

        async def one(kind: str, start: int, timeout: int, delay: int) -> object:
            await sleep_until(clock, start)
            return await link.request(ops[kind], {"delay_s": delay + 0.5}, timeout=timeout)

        tasks = [asyncio.create_task(one(*r)) for r in requests]

        async def quiet() -> None:
            # Real I/O settles: every started request reached the device, every ack the link.
            await clock.settle()
            await eventually(
                lambda: (
                    device.statistics().requests == link.statistics().requests_sent
                    and link.statistics().frames_in == 1 + device.statistics().acks_sent
                )
            )

        t = 0.0
        while t < 14:
            await quiet()
            if stop_at is not None and t == stop_at:
                await link.stop()
            t += 0.25
            await clock.advance_to(t)
        await quiet()
        outcomes = await asyncio.gather(*tasks)
        await link.stop()
    for (kind, start, timeout, delay), outcome in zip(requests, outcomes, strict=True):
        assert type(outcome) is expected_outcome(kind, start, timeout, delay, stop_at), (
            kind, start, timeout, delay, stop_at, outcome,
        )  # fmt: skip
    stats = link.statistics()
    assert sum(stats.outcomes.values()) == len(requests)  # each resolved exactly once
    assert stats.requests_in_flight == 0
    assert clock.live_timers == 0


# ------------------------------------------------------------------ requests queued for the window


def _strict_link(peer: ScriptedPeer, clock: VirtualClock, driver: Any = None) -> Link[Any]:
    driver = driver or ScriptedDriver(peer, max_in_flight=1, heartbeat=False)
    return Link(driver, name="strict", clock=clock, heartbeat_s=None)


async def test_queued_requests_time_out_each_at_its_own_deadline_the_shortest_first(
    virtual_clock: VirtualClock,
) -> None:
    peer = ScriptedPeer()
    async with _strict_link(peer, virtual_clock) as link:
        await connected(link)
        first = asyncio.create_task(link.request("hold", {}, timeout=30))
        held = await peer.next_request()
        late = asyncio.create_task(link.request("echo", {"i": 1}, timeout=10))
        soon = asyncio.create_task(link.request("echo", {"i": 2}, timeout=5))
        await asyncio.sleep(0)
        await virtual_clock.advance(5)
        outcome = await soon
        assert isinstance(outcome, TimedOut) and outcome.sent is False
        assert not late.done()
        await virtual_clock.advance(5)
        outcome = await late
        assert isinstance(outcome, TimedOut) and outcome.sent is False
        assert peer.ack(held, {"held": True})
        assert (await first).result == {"held": True}  # type: ignore[union-attr]
        # The window is whole again and no queued deadline is left to fire.
        after = asyncio.create_task(link.request("echo", {"i": 3}, timeout=5))
        peer.ack(await peer.next_request(), {"i": 3})
        assert isinstance(await after, Acknowledged)
    assert [r.op for r in peer.requests] == ["hold", "echo"]


class _OwnRequests(ScriptedDriver):
    """Builds its own requests (an extra argument): they must not be renumbered."""

    built: list[int]

    def build_request(self, seq: int, op: str, args: Any, key: str | None) -> Any:
        self.built.append(seq)
        return super().build_request(seq, op, {**args, "via": "subclass"}, key)


@pytest.mark.parametrize("own", [False, True])
async def test_a_request_queued_for_the_window_goes_out_under_its_own_number(
    virtual_clock: VirtualClock, own: bool
) -> None:
    peer = ScriptedPeer()
    driver = (_OwnRequests if own else ScriptedDriver)(peer, max_in_flight=1, heartbeat=False)
    driver.built = []
    async with _strict_link(peer, virtual_clock, driver) as link:
        await connected(link)
        first = asyncio.create_task(link.request("echo", {"i": 0}, timeout=30))
        one = await peer.next_request()
        second = asyncio.create_task(link.request("echo", {"i": 1}, timeout=30, key="k-2"))
        await asyncio.sleep(0)
        peer.ack(one, {"i": 0})
        two = await peer.next_request()
        peer.ack(two, {"i": 1})
        assert (await first).result == {"i": 0}  # type: ignore[union-attr]
        outcome = await second
    assert isinstance(outcome, Acknowledged) and outcome.seq == two.seq
    assert two.seq != one.seq
    extra = {"via": "subclass"} if own else {}
    assert (two.op, two.args, two.key) == ("echo", {"i": 1, **extra}, "k-2")
    if own:  # built to validate while it queued, then built again under its number
        assert driver.built == [one.seq, 0, two.seq]


@pytest.mark.parametrize("seq", [0, 1, 9, 10, 4095, 2**31, 2**32 - 1])
@pytest.mark.parametrize("key", [None, "k-1"])
def test_a_renumbered_jsonline_request_is_the_request_built_under_that_number(
    seq: int, key: str | None
) -> None:
    driver = JsonLineDriver(host="h", port=1)
    args = {"target": 21.5, "name": 'hall, "east"', "list": [1, {"seq": 3}]}
    built = driver.build_request(0, "set", args, key)
    renumbered = driver.renumber_request(built, seq)
    direct = driver.build_request(seq, "set", args, key)
    assert isinstance(renumbered, Req) and isinstance(direct, Req)
    assert renumbered == direct
    assert renumbered.wire == direct.wire == encode_frame(direct)


def test_a_jsonline_request_that_a_longer_number_pushes_over_the_line_limit_is_refused() -> None:
    driver = JsonLineDriver(host="h", port=1)
    head = len(driver.build_request(0, "set", {"s": ""}, None).wire or b"") - 1
    args = {"s": "x" * (MAX_LINE - head)}  # exactly the limit with seq 0
    built = driver.build_request(0, "set", args, None)
    assert built.wire is not None and len(built.wire) - 1 == MAX_LINE
    with pytest.raises(InvalidRequestError, match="line limit"):
        driver.build_request(10, "set", args, None)
    with pytest.raises(InvalidRequestError, match="line limit"):
        driver.renumber_request(built, 10)
