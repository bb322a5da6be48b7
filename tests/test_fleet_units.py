"""A fleet node's units on a real PostgreSQL store: starting and stopping a unit never
interleave, whichever of the node's tasks asks for them.

A node that loses a device (a refused write, a lease that lapsed while the database
restarted) stops its unit: the link closes, the devices are detached from the outbox. If
the lease is free again the balancer takes the unit back at once, and that start must wait
for the stop under way: one that ran in between had its freshly attached device detached
by the end of the old stop, and the device's commands stayed queued for good.
"""

from __future__ import annotations

import asyncio
import uuid

from helpers import eventually
from keeplink.gateway.fleet import Fleet, Unit
from keeplink.outbox import Outbox
from keeplink.outbox.postgres import PostgresStore
from keeplink.presence import PresenceTracker
from keeplink.testing.postgres import PostgresServer

LEASE_S = 3.0
STOP_S = 0.3  # a link that takes a moment to close


class Recorder:
    """A unit's start and stop, each taking a while, written down as they begin and end."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.active: list[str] = []  # what is under way now
        self.overlaps: list[str] = []

    async def _run(self, name: str, seconds: float) -> None:
        if self.active:
            self.overlaps.append(f"{name} began during {self.active}")
        self.active.append(name)
        self.calls.append(name)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.active.remove(name)

    async def start(self) -> None:
        await self._run("start", 0.01)

    async def stop(self, settle: bool) -> None:
        await self._run("stop", STOP_S)


async def test_a_unit_lost_and_taken_back_at_once_starts_after_its_stop_has_ended(
    postgres_server: PostgresServer,
) -> None:
    schema = f"t{uuid.uuid4().hex}"
    store = PostgresStore(postgres_server.dsn(), schema=schema)
    outbox = Outbox(store, presence=PresenceTracker())
    await outbox.start(recover=False)
    recorder = Recorder()
    unit = Unit(key="dev", devices=["dev"], start=recorder.start, stop=recorder.stop)
    fleet = Fleet(store=store, outbox=outbox, node="gw-a", lease_s=LEASE_S, units=[unit])
    fleet.start()
    try:
        await eventually(lambda: unit.running and recorder.calls == ["start"])
        # The lease lapses (as while the database was away) and a write is refused: the
        # node stops the unit, and finds the lease free again at once.
        await store.release("gw-a", dict(unit.epochs))
        fleet.fenced("dev")
        await eventually(lambda: recorder.calls == ["start", "stop", "start"])
        await eventually(lambda: unit.running and not recorder.active)
        assert recorder.overlaps == []
        assert unit.epochs["dev"] == 2  # taken back under a new epoch
    finally:
        await fleet.close()
        await outbox.close()
