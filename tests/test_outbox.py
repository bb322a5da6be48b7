"""The outbox: durable commands delivered when the device is present, in virtual time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import IO_BOUND_S, connected, eventually, io_settle
from keeplink import Backoff, Link, LinkState, VirtualClock
from keeplink._core.commands import Command, CommandState
from keeplink._core.errors import ConflictError, ErrorCode, InvalidRequestError
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import (
    CommandStateChanged,
    DeliveryParked,
    MemoryStore,
    Outbox,
    PreconditionResult,
    SqliteStore,
    WaitReason,
)
from keeplink.outbox.store import Update, Write, WriteResult, command_from_row
from keeplink.presence import Presence, PresenceTracker
from keeplink.testing import DeviceSimulator, FaultProxy

Q = CommandState
EPOCH = 1_800_000_000.0  # virtual wall-clock start: deadlines are epoch seconds
RETRY_AFTER_S = 3.0


class RecordingStore(MemoryStore):
    """A MemoryStore that logs each committed update, to check commit-then-announce."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []
        self.calls: list[list[Write]] = []

    async def apply(self, writes: Sequence[Write]) -> list[WriteResult]:
        results = await super().apply(writes)
        self.calls.append(list(writes))
        for write, result in zip(writes, results, strict=True):
            if isinstance(write, Update) and result is True:
                self.log.append(f"commit {write.command.id} {write.command.state.value}")
        return results


class Peeking(RecordingStore):
    def peek(self, command_id: str) -> Command:
        """The stored command, read without yielding (for eventually() conditions)."""
        return command_from_row(self._rows[command_id])


class StaleReads(Peeking):
    """A store whose get() answers late, with what it read before (as a busy thread can)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None

    async def get(self, command_id: str) -> Command | None:
        got = await super().get(command_id)
        if self.gate is not None:
            await self.gate.wait()
        return got


@dataclass
class Rig:
    clock: VirtualClock
    sim: DeviceSimulator
    proxy: FaultProxy
    link: Link[Any]
    outbox: Outbox
    store: StaleReads
    events: list[object]

    def states(self, command_id: str) -> list[str]:
        return [
            e.command.state.value
            for e in self.events
            if isinstance(e, CommandStateChanged) and e.command.id == command_id
        ]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    clock = VirtualClock(start=EPOCH)
    async with DeviceSimulator(device_id="valve", clock=clock) as sim:
        async with FaultProxy(sim.host, sim.port, name="valve") as proxy:
            presence = PresenceTracker(clock=clock, debounce_online_s=1, debounce_offline_s=2)
            store = StaleReads()
            outbox = Outbox(
                store,
                clock=clock,
                presence=presence,
                request_timeout_s=5,
                retry_after_s=RETRY_AFTER_S,
                rng=lambda: 1.0,  # no jitter: the retry comes exactly RETRY_AFTER_S later
            )
            link = Link(
                JsonLineDriver(host=proxy.host, port=proxy.port),
                name="valve",
                clock=clock,
                heartbeat_s=None,
                backoff=Backoff(initial_s=1, cap_s=1),
                rng=lambda: 1.0,
            )
            events: list[object] = []
            outbox.subscribe(events.append)
            await outbox.start()
            await outbox.attach("valve", link)
            try:
                yield Rig(clock, sim, proxy, link, outbox, store, events)
            finally:
                await link.stop()
                await outbox.close()
                presence.close()
            # Every error a command carries has a code from the one enum.
            codes = {code.value for code in ErrorCode}
            for event in events:
                if isinstance(event, CommandStateChanged) and event.command.last_error:
                    assert event.command.last_error.code in codes, event.command.last_error


async def connect(rig: Rig) -> None:
    """Wait for the link to connect. Connecting is real I/O, but a retry waits on the
    virtual clock: when the link is in backoff, step the clock to its next timer (the
    retry) instead of waiting in real time for a timer no one will fire."""
    async with asyncio.timeout(IO_BOUND_S):
        while rig.link.state is not LinkState.CONNECTED:
            if rig.link.state is LinkState.BACKOFF and rig.clock.next_deadline() is not None:
                await rig.clock.advance_to_next()
            else:
                await asyncio.sleep(0.001)  # real I/O: the connect and the handshake


async def online(rig: Rig) -> None:
    """Bring the link up and let presence announce it (1 s debounce)."""
    if rig.link.state is LinkState.IDLE:
        rig.link.start()
    await connect(rig)
    await rig.clock.advance(1)
    presence = rig.outbox.presence
    assert presence.presence("valve") is Presence.ONLINE, presence.claims("valve")


async def dropped(rig: Rig, drop: Callable[[], object]) -> None:
    """Drop the connection with ``drop()`` and wait (real I/O, the virtual clock still)
    until the link has seen it: only then may virtual time move on, or the drop would land
    after the debounce the test meant to run."""
    before = rig.link.statistics().disconnects
    drop()
    await eventually(lambda: rig.link.statistics().disconnects > before, what="the link saw it")


async def final(rig: Rig, command_id: str) -> Command:
    async with asyncio.timeout(10):
        return await rig.outbox.wait(command_id)


async def test_a_command_for_an_absent_device_is_queued_then_delivered_when_it_comes(
    rig: Rig,
) -> None:
    command = await rig.outbox.submit("valve", "set", {"open": True})
    assert command.state is Q.QUEUED  # said explicitly: the device is away
    assert rig.sim.applied == []
    await online(rig)
    done = await final(rig, command.id)
    assert done.state is Q.SUCCEEDED
    assert done.result == {"state": {"open": True}}
    assert [c.key for c in rig.sim.applied] == [command.idempotency_key]
    assert rig.states(command.id) == ["queued", "sending", "succeeded"]


async def test_every_transition_is_committed_before_it_is_announced(rig: Rig) -> None:
    order: list[str] = []

    early: list[str] = []

    def on_event(event: object) -> None:
        if isinstance(event, CommandStateChanged) and event.old is not None:
            order.append(f"commit {event.command.id} {event.command.state.value}")
            if order[-1] not in rig.store.log:
                early.append(order[-1])  # announced before it was committed

    rig.outbox.subscribe(on_event)
    command = await rig.outbox.submit("valve", "set", {"x": 1})
    await online(rig)
    await final(rig, command.id)
    assert order == [f"commit {command.id} sending", f"commit {command.id} succeeded"]
    assert early == []


async def test_delivery_is_in_priority_then_submission_order(rig: Rig) -> None:
    ids = [
        (await rig.outbox.submit("valve", "echo", {"n": n}, priority=p)).id
        for n, p in enumerate([0, 0, 5, 0, 5])
    ]
    await online(rig)
    for command_id in ids:
        await final(rig, command_id)
    assert [c.args["n"] for c in rig.sim.applied] == [2, 4, 0, 1, 3]


async def test_a_newer_command_with_the_same_key_supersedes_a_queued_one(rig: Rig) -> None:
    old = await rig.outbox.submit("valve", "set", {"target": 20}, key="target")
    other = await rig.outbox.submit("valve", "set", {"mode": "eco"}, key="mode")
    new = await rig.outbox.submit("valve", "set", {"target": 22}, key="target")
    superseded = await rig.outbox.get(old.id)
    assert superseded.state is Q.SUPERSEDED
    assert superseded.last_error is not None
    assert new.id in superseded.last_error.message
    assert rig.states(old.id) == ["queued", "superseded"]
    await online(rig)
    assert (await final(rig, new.id)).state is Q.SUCCEEDED
    assert (await final(rig, other.id)).state is Q.SUCCEEDED
    assert [c.args for c in rig.sim.applied] == [{"mode": "eco"}, {"target": 22}]


async def test_a_command_past_its_deadline_expires_without_the_device(rig: Rig) -> None:
    command = await rig.outbox.submit("valve", "set", {"open": True}, ttl_s=60)
    await rig.clock.advance(59.9)
    assert (await rig.outbox.get(command.id)).state is Q.QUEUED
    await rig.clock.advance(0.1)
    done = await final(rig, command.id)
    assert done.state is Q.EXPIRED
    assert done.updated_at == EPOCH + 60
    assert done.last_error is not None
    assert done.last_error.code == "expired"
    await online(rig)
    assert rig.sim.applied == []


async def test_cancel_a_queued_command(rig: Rig) -> None:
    command = await rig.outbox.submit("valve", "set", {"open": True})
    cancelled = await rig.outbox.cancel(command.id)
    assert cancelled.state is Q.CANCELLED
    assert rig.states(command.id) == ["queued", "cancelled"]
    with pytest.raises(ConflictError) as info:
        await rig.outbox.cancel(command.id)
    assert info.value.code == "conflict"
    await online(rig)
    assert rig.sim.applied == []


async def test_cancel_a_command_in_flight(rig: Rig) -> None:
    rig.sim.ack_delay_s = 3  # the device takes its time
    command = await rig.outbox.submit("valve", "set", {"open": True})
    await online(rig)
    await eventually(lambda: rig.sim.statistics().requests == 1)
    assert (await rig.outbox.get(command.id)).state is Q.SENDING
    cancelled = await rig.outbox.cancel(command.id)
    assert cancelled.state is Q.CANCELLED
    assert rig.states(command.id) == ["queued", "sending", "cancelled"]
    assert rig.link.statistics().requests_in_flight == 0


async def test_a_rejected_command_is_never_retried(rig: Rig) -> None:
    rig.sim.reject_ops.add("open-vent")
    command = await rig.outbox.submit("valve", "open-vent", {}, max_attempts=5)
    await online(rig)
    done = await final(rig, command.id)
    assert done.state is Q.REJECTED
    assert (done.attempts, done.last_error.code if done.last_error else None) == (1, "rejected")
    await dropped(rig, rig.sim.drop_connections)  # a new presence cycle: still not retried
    await rig.clock.advance(5)
    await online(rig)
    assert rig.sim.statistics().requests == 1


async def test_a_failed_precondition_fails_the_command_at_delivery_time(rig: Rig) -> None:
    config = {"built_from": "v1"}

    async def same_config(command: Command, ctx: Any) -> PreconditionResult:
        if command.precondition_args["config"] == config["built_from"]:
            return PreconditionResult.passed()
        return PreconditionResult.failed(f"configuration is now {config['built_from']}")

    rig.outbox.preconditions["same_config"] = same_config
    command = await rig.outbox.submit(
        "valve", "set", {"x": 1}, precondition="same_config", precondition_args={"config": "v1"}
    )
    config["built_from"] = "v2"  # changed while the device was away
    await online(rig)
    done = await final(rig, command.id)
    assert done.state is Q.FAILED
    assert done.last_error is not None
    assert done.last_error.code == "precondition_failed"
    assert "configuration is now v2" in done.last_error.message
    assert rig.sim.applied == []


async def test_a_minimum_time_online_is_waited_for(rig: Rig) -> None:
    command = await rig.outbox.submit(
        "valve", "set", {"big": True}, precondition="min_online", precondition_args={"seconds": 30}
    )
    await online(rig)  # online since EPOCH (raw), announced at EPOCH + 1
    await rig.clock.advance(28)
    assert (await rig.outbox.get(command.id)).state is Q.QUEUED
    await rig.clock.advance(1)
    done = await final(rig, command.id)
    assert done.state is Q.SUCCEEDED
    assert done.updated_at == pytest.approx(EPOCH + 30, abs=0.01)


async def test_bad_submissions_are_refused_and_store_nothing(rig: Rig) -> None:
    for kwargs in (
        {"op": ""},
        {"op": "set", "max_attempts": 0},
        {"op": "set", "ttl_s": -1},
        {"op": "set", "precondition": "nonexistent"},
        {"op": "set", "key": ""},
    ):
        with pytest.raises(InvalidRequestError):
            await rig.outbox.submit("valve", **kwargs)  # type: ignore[arg-type]
    assert await rig.outbox.list() == []


# ---------------------------------------------------------------------------- lost acks


async def test_a_lost_ack_on_a_healthy_link_is_retried_in_the_same_cycle(rig: Rig) -> None:
    """The device applies the first command but its ack never comes; the link stays up (it
    answers pings). The command is retried after retry_after_s with the same idempotency
    key (the device drops the duplicate), and the commands behind it follow in order."""
    await online(rig)
    cycle = (await rig.outbox.device_record("valve")).cycle
    connects = rig.link.statistics().connects
    rig.sim.drop_next_acks = 1
    ids = [(await rig.outbox.submit("valve", "set", {"n": n})).id for n in range(5)]
    await eventually(lambda: rig.sim.statistics().requests == 1)
    await rig.clock.advance(5)  # the first attempt times out; the link is fine
    await eventually(lambda: rig.outbox.waiting(rig.store.peek(ids[0])) is not None)
    head = rig.outbox.waiting(rig.store.peek(ids[0]))
    assert head is not None and head.reason is WaitReason.RETRY
    assert head.until == rig.clock.now() + RETRY_AFTER_S
    behind = rig.outbox.waiting(rig.store.peek(ids[1]))
    assert behind is not None and behind.reason is WaitReason.BEHIND
    assert behind.command == ids[0]
    await rig.clock.advance(RETRY_AFTER_S)
    done = [await final(rig, command_id) for command_id in ids]
    assert [c.state for c in done] == [Q.SUCCEEDED] * 5
    assert done[0].attempts == 2 and all(c.attempts == 1 for c in done[1:])
    assert [c.args["n"] for c in rig.sim.applied] == [0, 1, 2, 3, 4]  # in order, each once
    assert rig.sim.received_keys[done[0].idempotency_key] == 2  # the retry, same key
    assert rig.sim.statistics().duplicates == 1  # ... dropped by the device
    assert rig.link.statistics().connects == connects  # never torn down
    assert (await rig.outbox.device_record("valve")).cycle == cycle  # not a new cycle
    assert rig.states(ids[0]) == ["queued", "sending", "queued", "sending", "succeeded"]


async def test_a_lost_ack_uses_up_exactly_max_attempts_then_fails(rig: Rig) -> None:
    await online(rig)
    rig.sim.drop_acks = True
    command = await rig.outbox.submit("valve", "set", {"n": 1}, max_attempts=3)
    for attempt in range(1, 4):
        await eventually(lambda n=attempt: rig.sim.statistics().requests == n)
        await rig.clock.advance(5)  # times out
        if attempt < 3:
            await eventually(lambda: rig.store.peek(command.id).state is Q.QUEUED)
            await rig.clock.advance(RETRY_AFTER_S)
    await eventually(lambda: rig.store.peek(command.id).state is not Q.SENDING)
    done = rig.store.peek(command.id)
    sent = rig.sim.received_keys[done.idempotency_key]
    assert (done.state, done.attempts, sent) == (Q.FAILED, 3, 3), (
        f"max_attempts=3: {done.state.value} after {done.attempts} attempts, sent {sent} times"
    )
    assert done.last_error is not None and "gave up after 3 attempts" in done.last_error.message


@pytest.mark.parametrize(("max_attempts", "after_restart"), [(2, Q.FAILED), (3, Q.SUCCEEDED)])
async def test_a_restart_during_the_last_attempt_fails_after_exactly_max_attempts(
    tmp_path: Path, max_attempts: int, after_restart: CommandState
) -> None:
    """Two deliveries, no ack, then a restart while the second is in flight: with two
    attempts allowed the recovered command has used them all (failed, never sent a third
    time); with three it goes out once more."""
    clock = VirtualClock(start=EPOCH)
    path = tmp_path / "o.db"

    async def up(sim: DeviceSimulator) -> tuple[Outbox, Link[Any], list[Command]]:
        presence = PresenceTracker(clock=clock, debounce_online_s=1, debounce_offline_s=2)
        outbox = Outbox(
            SqliteStore(path),
            clock=clock,
            presence=presence,
            request_timeout_s=5,
            retry_after_s=RETRY_AFTER_S,
            rng=lambda: 1.0,
        )
        link = Link(
            JsonLineDriver(host=sim.host, port=sim.port),
            name="valve",
            clock=clock,
            heartbeat_s=None,
            rng=lambda: 1.0,
        )
        recovered = await outbox.start()
        await outbox.attach("valve", link)
        link.start()
        await connected(link)
        await clock.advance(1)
        await eventually(lambda: presence.presence("valve").value == "online")
        return outbox, link, recovered

    async def down(outbox: Outbox, link: Link[Any]) -> None:
        await link.stop()
        await outbox.close()
        outbox.presence.close()

    async with DeviceSimulator(device_id="valve", clock=clock, drop_acks=True) as sim:
        outbox, link, _ = await up(sim)
        events: list[object] = []
        outbox.subscribe(events.append)
        queued = lambda: sum(  # noqa: E731
            1 for e in events if isinstance(e, CommandStateChanged) and e.command.state is Q.QUEUED
        )
        try:
            command = await outbox.submit("valve", "set", {"n": 1}, max_attempts=max_attempts)
            await eventually(lambda: sim.statistics().requests == 1, what="first delivery")
            await clock.advance(5)  # times out
            await eventually(lambda: queued() == 2, what="back in the queue")  # submit + retry
            await clock.advance(RETRY_AFTER_S)
            await eventually(lambda: sim.statistics().requests == 2, what="second delivery")
        finally:
            await down(outbox, link)  # the second attempt stays sending, as a crash leaves it
        sim.drop_acks = False
        outbox, link, recovered = await up(sim)
        try:
            assert [(c.id, c.attempts) for c in recovered] == [(command.id, 2)]
            async with asyncio.timeout(10):
                done = await outbox.wait(command.id)
            await io_settle()
        finally:
            await down(outbox, link)
    sent = sim.received_keys[command.idempotency_key]
    assert (done.state, done.attempts, sent) == (after_restart, max_attempts, max_attempts), (
        f"max_attempts={max_attempts}: {done.state.value} after {done.attempts} attempts, "
        f"the device received it {sent} times"
    )
    if after_restart is Q.FAILED:
        assert done.last_error is not None
        assert "attempts exhausted (2 of 2)" in done.last_error.message, done.last_error


# ---------------------------------------------------------------------------- sleepy device


async def test_a_hundred_commands_reach_a_sleepy_device_in_order_across_wake_windows() -> None:
    clock = VirtualClock(start=EPOCH)
    # Awake 2 s every 20 s; each ack takes 0.1 s, so one window carries at most ~20.
    async with DeviceSimulator(
        device_id="sleepy", clock=clock, sleepy=(2.0, 20.0), ack_delay_s=0.1
    ) as sim:
        presence = PresenceTracker(clock=clock, debounce_online_s=0.05, debounce_offline_s=0.5)
        outbox = Outbox(MemoryStore(), clock=clock, presence=presence, request_timeout_s=1)
        link = Link(
            JsonLineDriver(host=sim.host, port=sim.port),
            name="sleepy",
            clock=clock,
            heartbeat_s=None,
            backoff=Backoff(initial_s=0.25, cap_s=0.25),
            rng=lambda: 1.0,
        )
        await outbox.start()
        await outbox.attach("sleepy", link)
        try:
            ids = [
                (await outbox.submit("sleepy", "set", {"n": n}, max_attempts=5)).id
                for n in range(100)
            ]
            link.start()
            for _ in range(2000):  # at most 200 s of virtual time, in 0.1 s steps
                await clock.advance(0.1)
                await io_settle()
                if all(c.final for c in await outbox.list()):
                    break
            commands = [await outbox.get(i) for i in ids]
        finally:
            await link.stop()
            await outbox.close()
            presence.close()
    assert [c.state for c in commands] == [Q.SUCCEEDED] * 100
    applied = [c.args["n"] for c in sim.applied]
    assert applied == list(range(100))  # in order, each exactly once
    assert Counter(c.key for c in sim.applied).most_common(1)[0][1] == 1
    assert sim.statistics().connections_total >= 5  # it took several wake windows


# ---------------------------------------------------------------------------- flapping


async def test_a_flapping_device_gets_bounded_attempts_then_the_breaker_parks_it() -> None:
    clock = VirtualClock(start=EPOCH)
    async with DeviceSimulator(device_id="flappy", clock=clock, ack_delay_s=0.3) as sim:
        async with FaultProxy(sim.host, sim.port, name="flappy") as proxy:
            presence = PresenceTracker(clock=clock, debounce_online_s=0.0, debounce_offline_s=0.0)
            outbox = Outbox(
                MemoryStore(),
                clock=clock,
                presence=presence,
                request_timeout_s=0.25,
                breaker_cycles=3,
                park_s=3600,
            )
            link = Link(
                JsonLineDriver(host=proxy.host, port=proxy.port),
                name="flappy",
                clock=clock,
                heartbeat_s=None,
                backoff=Backoff(initial_s=0.01, cap_s=0.01),
                rng=lambda: 1.0,
            )
            events: list[object] = []
            outbox.subscribe(events.append)
            await outbox.start()
            await outbox.attach("flappy", link)
            try:
                ids = [
                    (await outbox.submit("flappy", "set", {"n": n}, max_attempts=5)).id
                    for n in range(3)
                ]
                link.start()
                for _ in range(100):  # online 200 ms, offline 200 ms, ×100
                    for down in (False, True):
                        proxy.set_down(down)
                        for _ in range(4):
                            await clock.advance(0.05)
                            await io_settle()
                record = await outbox.device_record("flappy")
                commands = [await outbox.get(i) for i in ids]
            finally:
                await link.stop()
                await outbox.close()
                presence.close()
    assert sim.received_keys  # it was reached, and more than once
    assert max(sim.received_keys.values()) <= 5  # each command at most max_attempts times
    assert all(c.attempts <= c.max_attempts for c in commands)
    assert len(sim.applied) == len({c.key for c in sim.applied})  # never applied twice
    assert record.parked_reason is not None
    assert "3 delivery cycles in a row failed" in record.parked_reason
    parked = [e for e in events if isinstance(e, DeliveryParked)]
    assert len(parked) == 1
    assert parked[0].reason == record.parked_reason


# ---------------------------------------------------------------------------- races the
# chaos soak found (bench/chaos.py); each of these failed before its fix.


async def test_a_presence_cycle_that_begins_during_a_delivery_is_not_missed(rig: Rig) -> None:
    await online(rig)
    rig.sim.drop_acks = True
    a = await rig.outbox.submit("valve", "set", {"a": 1}, max_attempts=10)
    await eventually(lambda: rig.sim.statistics().requests == 1)
    await rig.clock.advance(5)  # A times out: tried in this presence cycle, back in the queue
    c = await rig.outbox.submit("valve", "set", {"c": 1}, max_attempts=10, priority=1)
    await eventually(lambda: rig.sim.statistics().requests == 2)
    sent_c = rig.clock.now()  # C is in flight until sent_c + 5 ...
    await dropped(rig, rig.proxy.set_down)  # ... when the device goes away (offline after 2 s)
    await rig.clock.advance(2.5)
    assert rig.outbox.presence.presence("valve") is Presence.OFFLINE
    rig.sim.drop_acks = False
    rig.proxy.set_down(False)  # ... and comes back: reconnect at the next 1 s retry
    await connect(rig)
    assert rig.clock.now() <= sent_c + 3.5, rig.clock.now() - sent_c
    await rig.clock.advance_to(sent_c + 4.5)  # online again (1 s debounce): a new cycle
    assert rig.outbox.presence.cycle("valve") == 2
    assert (await rig.outbox.get(c.id)).state is Q.SENDING  # begun while C is in flight
    await rig.clock.advance_to(sent_c + 5.5)  # C's deadline: its delivery ends
    assert (await final(rig, a.id)).state is Q.SUCCEEDED
    assert (await final(rig, c.id)).state is Q.SUCCEEDED


async def test_cancelling_the_head_of_the_queue_lets_the_rest_go(rig: Rig) -> None:
    await online(rig)
    rig.sim.drop_acks = True
    a = await rig.outbox.submit("valve", "set", {"a": 1}, max_attempts=10)
    await eventually(lambda: rig.sim.statistics().requests == 1)
    await rig.clock.advance(5)  # A timed out in this cycle: B waits behind it (FIFO)
    rig.sim.drop_acks = False
    b = await rig.outbox.submit("valve", "set", {"b": 1})
    await io_settle()
    assert (await rig.outbox.get(b.id)).state is Q.QUEUED
    await rig.outbox.cancel(a.id)
    assert (await final(rig, b.id)).state is Q.SUCCEEDED


async def test_cancel_racing_the_end_of_an_attempt_still_cancels(rig: Rig) -> None:
    stale = rig.store
    await online(rig)
    rig.sim.drop_acks = True
    command = await rig.outbox.submit("valve", "set", {"a": 1}, max_attempts=10)
    await eventually(lambda: rig.sim.statistics().requests == 1)
    stale.gate = asyncio.Event()
    cancel = asyncio.create_task(rig.outbox.cancel(command.id))  # reads "sending"...
    await io_settle()
    await rig.clock.advance(5)  # ... the attempt times out and goes back to "queued" ...
    gate, stale.gate = stale.gate, None
    gate.set()  # ... and only then does the stale "sending" reach cancel()
    assert (await asyncio.wait_for(cancel, 10)).state is Q.CANCELLED
    rig.sim.drop_acks = False
    await dropped(rig, rig.sim.drop_connections)  # a new cycle must not deliver it again
    await rig.clock.advance(5)
    await online(rig)
    assert rig.sim.received_keys[command.idempotency_key] == 1


async def test_cancel_as_the_delivery_starts_leaves_nothing_unawaited(rig: Rig) -> None:
    await online(rig)
    command = await rig.outbox.submit("valve", "set", {"x": 1})
    await asyncio.sleep(0)  # the delivery task takes its first step
    done = await rig.outbox.cancel(command.id)
    assert done.state in (Q.CANCELLED, Q.SUCCEEDED)  # whichever won, it is final
    gc.collect()  # an un-awaited coroutine would warn here (warnings are errors)


# ---------------------------------------------------------------------------- races a
# review found; each of these failed before its fix.


async def test_concurrent_submits_with_one_key_leave_the_newest(tmp_path: Path) -> None:
    clock = VirtualClock(start=EPOCH)
    presence = PresenceTracker(clock=clock)
    outbox = Outbox(SqliteStore(tmp_path / "o.db"), clock=clock, presence=presence)
    await outbox.start()
    try:
        a, b = await asyncio.gather(  # the store's thread interleaves the two submits
            outbox.submit("valve", "set", {"target": 20}, key="target"),
            outbox.submit("valve", "set", {"target": 22}, key="target"),
        )
        states = {(await outbox.get(c.id)).state for c in (a, b)}
    finally:
        await outbox.close()
        presence.close()
    assert states == {Q.SUPERSEDED, Q.QUEUED}  # never both superseded


@pytest.mark.parametrize("key", [None, "target"])
async def test_a_submitted_command_is_committed_when_submit_returns(
    tmp_path: Path, key: str | None
) -> None:
    """Durable means on disk, readable by another connection, the moment submit returns:
    read before anything else runs on the loop (the store's worker must not still hold
    it), then through a second store as a restarted gateway would."""
    clock = VirtualClock(start=EPOCH)
    presence = PresenceTracker(clock=clock)
    path = tmp_path / "o.db"
    outbox = Outbox(SqliteStore(path), clock=clock, presence=presence)
    await outbox.start()
    try:
        command = await outbox.submit("valve", "set", {"target": 20}, key=key)
        with contextlib.closing(sqlite3.connect(path)) as other:  # no await in between
            row = other.execute(
                "SELECT device, state, args FROM commands WHERE id = ?", (command.id,)
            ).fetchone()
        assert row == ("valve", "queued", '{"target":20}'), (
            f"submit returned {command.id}, but another connection reads {row!r}"
        )
        second = SqliteStore(path)
        await second.open()
        try:
            assert await second.get(command.id) == command
        finally:
            await second.close()
    finally:
        await outbox.close()
        presence.close()


class SlowCommits(StaleReads):
    """Commits that take a while (as SQLite's thread can), to land a cancel inside one."""

    delay = False

    async def apply(self, writes: Sequence[Write]) -> list[WriteResult]:
        if self.delay:
            await asyncio.sleep(0.3)  # a commit in flight, in real time
        return await super().apply(writes)


async def test_a_cancel_during_the_sending_commit_writes_nothing(rig: Rig) -> None:
    rig.store.__class__ = SlowCommits
    await online(rig)
    rig.store.delay = True  # type: ignore[attr-defined]
    command = await rig.outbox.submit("valve", "set", {"target": 20})
    await asyncio.sleep(0.05)  # the "sending" commit is under way (not a timing rule)
    done = await rig.outbox.cancel(command.id)
    assert done.state is Q.CANCELLED
    assert rig.sim.statistics().requests == 0  # nothing reached the device


async def test_a_command_queued_again_after_an_attempt_still_expires(rig: Rig) -> None:
    await online(rig)
    rig.sim.drop_acks = True
    x = await rig.outbox.submit("valve", "set", {"target": 20}, ttl_s=100, max_attempts=100)
    await eventually(lambda: rig.sim.statistics().requests == 1)
    await rig.outbox.submit("elsewhere", "set", {"a": 1}, ttl_s=1000)  # re-arms the timer
    await rig.clock.advance(5)  # x times out: queued again
    await eventually(lambda: rig.link.statistics().requests_in_flight == 0)
    await rig.clock.advance(100)
    assert (await final(rig, x.id)).state is Q.EXPIRED


async def test_a_command_the_link_can_never_carry_fails_and_the_queue_moves_on(rig: Rig) -> None:
    """A command longer than a jsonline frame may be (64 KiB) is stored, but its driver
    refuses it at delivery: it fails with invalid_request, once, and the next one goes.
    (It used to be retried forever as if the store were down, blocking the queue.)"""
    huge = await rig.outbox.submit("valve", "set", {"blob": "x" * 70_000})
    after = await rig.outbox.submit("valve", "set", {"open": True})
    await online(rig)
    done = await final(rig, huge.id)
    assert done.state is Q.FAILED
    assert done.last_error is not None and done.last_error.code == "invalid_request"
    assert "line limit" in done.last_error.message
    assert (await final(rig, after.id)).state is Q.SUCCEEDED
    assert [c.key for c in rig.sim.applied] == [after.idempotency_key]
    assert rig.states(huge.id) == ["queued", "sending", "failed"]


async def test_submits_to_an_idle_device_are_delivered_without_reading_its_queue(
    rig: Rig,
) -> None:
    """When the last pass found nothing queued, the next one takes this outbox's own
    submits as its page: in delivery order (priority, then submission), a superseded or
    cancelled one skipped, and no read of the queue between a submit and its delivery."""
    await online(rig)
    first = await rig.outbox.submit("valve", "set", {"n": 0})
    assert (await final(rig, first.id)).state is Q.SUCCEEDED  # now idle, nothing queued
    reads = 0
    real = rig.store.queued

    async def counted(device: str, *, limit: int | None = None) -> list[Command]:
        nonlocal reads
        reads += 1
        return await real(device, limit=limit)

    rig.store.queued = counted  # type: ignore[method-assign]
    # Back to back, before the delivery pass runs: all handed to it.
    low = await rig.outbox.submit("valve", "set", {"n": 1})
    high = await rig.outbox.submit("valve", "set", {"n": 2}, priority=5)
    old = await rig.outbox.submit("valve", "set", {"n": 3}, key="k")
    new = await rig.outbox.submit("valve", "set", {"n": 4}, key="k")
    for command in (low, high, new):
        assert (await final(rig, command.id)).state is Q.SUCCEEDED
    assert (await final(rig, old.id)).state is Q.SUPERSEDED
    assert [c.args["n"] for c in rig.sim.applied] == [0, 2, 1, 4]
    assert reads == 0
    # Anything else that touches the queue (a cancel) makes the next pass read it again.
    await rig.outbox.cancel((await rig.outbox.submit("valve", "set", {"n": 5})).id)
    after = await rig.outbox.submit("valve", "set", {"n": 6})
    assert (await final(rig, after.id)).state is Q.SUCCEEDED
    assert [c.args["n"] for c in rig.sim.applied][-1] == 6
    assert 5 not in [c.args["n"] for c in rig.sim.applied]
    assert reads >= 1
