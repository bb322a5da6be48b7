"""Property: random sequences of connect/fail/drop/stop/wake never reach an illegal state,
never kill the supervisor, and never leave a task or a timer behind.

The driver here is scripted and in memory (no sockets), so hypothesis can run hundreds of
sequences in seconds; the link, its supervisor and its timers are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keeplink import (
    AuthError,
    FrameChannel,
    HeartbeatReply,
    Link,
    LinkBrokenError,
    LinkClosedError,
    LinkState,
    LinkStateChanged,
    SessionInfo,
    VirtualClock,
)
from keeplink._core.states import check_link_transition

S = LinkState
NAME = "prop"


class MemChannel:
    """A channel that carries nothing and ends when closed (by either side)."""

    def __init__(self) -> None:
        self._ended = asyncio.Event()
        self.sent: list[str] = []

    async def receive(self) -> str:
        await self._ended.wait()
        raise LinkBrokenError("peer closed the connection")

    async def send(self, frame: str) -> None:
        if self._ended.is_set():
            raise LinkBrokenError("channel closed")
        self.sent.append(frame)

    def close(self) -> None:
        self._ended.set()

    async def wait_closed(self) -> None:
        return None


class ScriptedDriver:
    name = "scripted"
    seq_bits = 32
    max_in_flight = 1
    heartbeat_reply = HeartbeatReply.NEVER

    def __init__(self) -> None:
        self.mode = "ok"
        self.channels: list[MemChannel] = []

    async def open(self) -> MemChannel:
        if self.mode == "refuse":
            raise LinkBrokenError("connection refused")
        if self.mode == "hang":
            await asyncio.Event().wait()  # until the connect deadline or a stop
        channel = MemChannel()
        self.channels.append(channel)
        return channel

    async def handshake(self, channel: FrameChannel[str]) -> SessionInfo:
        if self.mode == "auth":
            raise AuthError("invalid token")
        if self.mode == "slow-handshake":
            await asyncio.Event().wait()
        return SessionInfo(device_id="mem")

    def heartbeat_frame(self) -> str:
        return "ping"

    def is_heartbeat_reply(self, frame: str) -> bool:
        return False

    def build_request(self, seq: int, op: str, args: object, key: str | None) -> str:
        return op

    def match_reply(self, frame: str) -> None:
        return None


# Stops are rarer than the rest, so sequences spend their time in the live states.
OPS = st.sampled_from(
    [
        *["start", "connect", "wake", "drop", "mode:ok", "advance:1", "advance:2"] * 2,
        "stop",
        "stop_soon",
        "start+stop",
        "start+stop_soon",
        "stop_soon+start",
        "wake",
        "drop",
        "mode:ok",
        "mode:refuse",
        "mode:hang",
        "mode:auth",
        "mode:slow-handshake",
        "advance:0.5",
        "advance:7",
        "advance:100",
    ]
)


def link_tasks() -> list[asyncio.Task[object]]:
    return [
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith(f"keeplink[{NAME}]") and not t.done()
    ]


async def apply(op: str, link: Link[str], driver: ScriptedDriver, clock: VirtualClock) -> None:
    if op in ("start", "connect"):
        # While a stop is still in progress both are refused with a typed LinkClosedError.
        with contextlib.suppress(LinkClosedError):
            link.start() if op == "start" else link.connect_soon()
    elif op == "stop":
        await link.stop()
        assert link.state is S.STOPPED
    elif op in ("start+stop", "start+stop_soon"):
        # In the same tick: the supervisor is stopped before its first step.
        with contextlib.suppress(LinkClosedError):
            link.start()
        if op == "start+stop":
            await link.stop()
            assert link.state is S.STOPPED
        else:
            link.stop_soon()
    elif op == "stop_soon+start":
        link.stop_soon()
        with pytest.raises(LinkClosedError) if link_tasks() else contextlib.nullcontext():
            link.start()
    elif op == "stop_soon":
        link.stop_soon()
    elif op == "wake":
        link.wake("test")
    elif op == "drop":
        if driver.channels:
            driver.channels[-1].close()
    elif op.startswith("mode:"):
        driver.mode = op.split(":", 1)[1]
    elif op.startswith("advance:"):
        await clock.advance(float(op.split(":", 1)[1]))
    await clock.settle()


def check_invariants(link: Link[str], events: list[LinkStateChanged]) -> None:
    stats = link.statistics()
    assert stats.internal_errors == 0
    assert stats.subscriber_errors == 0
    for before, after in itertools.pairwise(events):
        assert after.old is before.new  # one unbroken chain of transitions
    for event in events:
        check_link_transition(event.old, event.new)  # raises if not in the table
    running = [t for t in link_tasks() if t.get_name().endswith(".supervisor")]
    if link.state in (S.CONNECTING, S.HANDSHAKING, S.CONNECTED, S.LOST, S.BACKOFF):
        assert len(running) == 1, f"{link.state}: supervisor must be alive"
    if link.state in (S.STOPPED, S.FAILED, S.IDLE):
        assert link_tasks() == [], f"{link.state}: no task may remain"
    if link.state is S.CONNECTED:
        assert link.session is not None
    else:
        assert link.session is None
    if link.state is S.FAILED:
        assert stats.last_error is not None
        assert stats.last_error.code == "auth_failed"
    if link.state is S.BACKOFF:
        assert stats.retry_at is not None


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(OPS, min_size=1, max_size=40))
async def test_random_operation_sequences_keep_the_link_sound(ops: list[str]) -> None:
    clock = VirtualClock()
    driver = ScriptedDriver()
    link: Link[str] = Link(
        driver, name=NAME, clock=clock, heartbeat_s=5, connect_timeout_s=3, handshake_timeout_s=3
    )
    events: list[LinkStateChanged] = []
    link.subscribe(lambda e: events.append(e) if isinstance(e, LinkStateChanged) else None)
    try:
        for op in ops:
            await apply(op, link, driver, clock)
            check_invariants(link, events)
    finally:
        await link.stop()
        await clock.settle()
    assert link.state is S.STOPPED
    check_invariants(link, events)
    assert link_tasks() == []
    assert clock.live_timers == 0, clock.pending()
