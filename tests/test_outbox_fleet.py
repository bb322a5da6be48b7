"""Two outboxes on one PostgreSQL store, as two gateway nodes: a device's lease moves
from one to the other, and the fence stops the first at once. Real server, real simulator,
real time (leases are kept by the database's clock)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

from helpers import eventually
from keeplink import Backoff, Link
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import CommandState, Fence, Outbox
from keeplink.outbox.postgres import PostgresStore
from keeplink.presence import PresenceTracker
from keeplink.testing import DeviceSimulator
from keeplink.testing.postgres import PostgresServer

Q = CommandState


def node(dsn: str, schema: str, name: str, epochs: dict[str, int], fenced: list[str]) -> Any:
    presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=0.0)
    outbox = Outbox(
        PostgresStore(dsn, schema=schema),
        presence=presence,
        request_timeout_s=2,
        fences=lambda device: Fence(name, epochs[device]) if device in epochs else None,
        on_fenced=fenced.append,
    )
    return outbox, presence


def link(sim: DeviceSimulator, name: str) -> Link[Any]:
    return Link(
        JsonLineDriver(host=sim.host, port=sim.port),
        name=name,
        heartbeat_s=None,
        backoff=Backoff(initial_s=0.05, cap_s=0.1),
    )


async def test_a_takeover_fences_the_old_owner_and_nothing_is_lost_or_applied_twice(
    postgres_server: PostgresServer,
) -> None:
    dsn, schema = postgres_server.dsn(), f"t{uuid.uuid4().hex}"
    epochs_a: dict[str, int] = {}
    epochs_b: dict[str, int] = {}
    fenced_a: list[str] = []
    fenced_b: list[str] = []
    a, presence_a = node(dsn, schema, "a", epochs_a, fenced_a)
    b, presence_b = node(dsn, schema, "b", epochs_b, fenced_b)
    async with DeviceSimulator(device_id="dev", ack_delay_s=0.02) as sim:
        await a.start(recover=False)
        await b.start(recover=False)
        link_a, link_b = link(sim, "dev@a"), link(sim, "dev@b")
        store_a: PostgresStore = a.store  # type: ignore[assignment]
        try:
            epochs_a.update(await store_a.acquire("a", ["dev"], lease_s=60))
            assert epochs_a == {"dev": 1}
            await a.attach("dev", link_a)
            link_a.start()
            ids = [(await a.submit("dev", "set", {"n": n})).id for n in range(60)]
            # a delivers for a while, then stops renewing (a pause, a partition) ...
            await eventually(lambda: len(sim.applied) >= 10)
            # ... its lease runs out (released here: a short lease could run out before a
            # loaded machine got ten deliveries through) ...
            await store_a.release("a", epochs_a)
            store_b: PostgresStore = b.store  # type: ignore[assignment]
            epochs_b.update(await store_b.acquire("b", ["dev"], lease_s=60))
            assert epochs_b == {"dev": 2}  # ... and b takes the device over.
            await eventually(lambda: bool(fenced_a))  # a's next write is refused: a stops
            await link_a.stop()  # what a node does when it is fenced out
            applied_by_a = len(sim.applied)
            await b.adopt("dev")
            await b.attach("dev", link_b)
            link_b.start()
            finals = []
            async with asyncio.timeout(30):
                for command_id in ids:
                    finals.append(await b.wait(command_id))
        finally:
            await link_a.stop()
            await link_b.stop()
            await a.close()
            await b.close()
            presence_a.close()
            presence_b.close()
    assert fenced_a == ["dev"]
    assert fenced_b == []
    assert [c.state for c in finals] == [Q.SUCCEEDED] * 60
    keys = Counter(c.key for c in sim.applied)
    assert max(keys.values()) == 1  # nothing applied twice (a re-sent one was dropped)
    assert [c.args["n"] for c in sim.applied] == list(range(60))  # in submission order
    assert 10 <= applied_by_a < 60  # both nodes delivered a part
