"""PostgresStore beyond the conformance suite, against a real server the tests start:
group commit, migrations shared by concurrent openers, and a database that goes away."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from helpers import eventually
from keeplink import ErrorCode, StoreUnavailableError
from keeplink._core.commands import CommandState, DeviceRecord, new_command, transition
from keeplink.outbox.postgres import SCHEMA_VERSION, PostgresStore
from keeplink.outbox.store import Insert, PutDevice, Update
from keeplink.testing.postgres import PostgresServer

S = CommandState
T0 = 1_763_812_345.5


def cmd(device: str = "dev") -> Any:
    return new_command(device=device, op="set", args={"n": 1}, now=T0)


@pytest.fixture
async def store(postgres_server: PostgresServer) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(postgres_server.dsn(), schema=f"t{uuid.uuid4().hex}") as store:
        yield store


async def test_concurrent_calls_share_transactions_and_keep_their_own_results(
    store: PostgresStore,
) -> None:
    base = [await store.insert(cmd(f"d{n % 4}")) for n in range(40)]
    calls: list[Any] = []
    for n, command in enumerate(base):
        sending = transition(command, S.SENDING, now=T0 + 1, attempts=1)
        calls.append([Update(sending, S.QUEUED if n % 2 else S.SENDING)])  # half lose
        calls.append([PutDevice(DeviceRecord(device=f"d{n % 4}", cycle=n)), Insert(cmd())])
    calls.append([Insert(base[0])])  # a duplicate id: refused, alone
    commits = 0
    real = store._writer.commit

    async def counting(batch: Any) -> None:
        nonlocal commits
        commits += 1
        await real(batch)

    store._writer.commit = counting  # type: ignore[method-assign]

    async def run(writes: list[Any]) -> Any:
        try:
            return await store.apply(writes)
        except Exception as exc:
            return type(exc).__name__

    results = await asyncio.gather(*(run(writes) for writes in calls))
    assert commits < len(calls) / 10  # group-committed
    assert results[-1] == "InvalidRequestError"
    assert list(results[:-1:2]) == [[n % 2 == 1] for n in range(40)]
    inserted = [r[1] for r in results[1:-1:2]]
    assert len({c.seq for c in inserted}) == 40
    assert [await store.get(c.id) for c in inserted] == inserted
    assert (await store.get_device("d3")) == DeviceRecord(device="d3", cycle=39)
    assert await store.count(states=[S.SENDING]) == 20


async def test_concurrent_submits_commit_as_one_statement_and_notify_their_owners(
    store: PostgresStore,
) -> None:
    """Submits alone, side by side: one statement each batch (no transaction around it),
    every one in order with its own seq, a submit whose id exists refused alone, and each
    device's owner notified once the batch is committed."""
    existing = await store.insert(cmd("d0"))
    woken: list[str] = []
    listener = await store.listen(woken.append)
    commits = 0
    real = store._writer.commit

    async def counting(batch: Any) -> None:
        nonlocal commits
        commits += 1
        await real(batch)

    store._writer.commit = counting  # type: ignore[method-assign]

    async def run(command: Any) -> Any:
        try:
            return await store.insert(command)
        except Exception as exc:
            return type(exc).__name__

    try:
        fresh = [cmd(f"d{n % 3}") for n in range(31)]
        results = await asyncio.gather(*(run(c) for c in [*fresh[:15], existing, *fresh[15:]]))
        assert commits <= 4  # group-committed
        assert results[15] == "InvalidRequestError"  # the existing id: refused, and only it
        stored = [r for n, r in enumerate(results) if n != 15]
        assert [c.id for c in stored] == [c.id for c in fresh]
        assert [c.seq for c in stored] == sorted(c.seq for c in stored)  # in submit order
        assert [await store.get(c.id) for c in stored] == stored
        assert await store.count() == 32
        await eventually(lambda: set(woken) == {"d0", "d1", "d2"}, what="notified")
    finally:
        await listener.close()


async def test_concurrent_openers_migrate_once(postgres_server: PostgresServer) -> None:
    schema = f"t{uuid.uuid4().hex}"
    stores = [PostgresStore(postgres_server.dsn(), schema=schema) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        first = await stores[0].insert(cmd())
        assert await stores[3].get(first.id) == first
        versions = await stores[1]._fetch("SELECT version FROM schema_version ORDER BY version")
        assert [row[0] for row in versions] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_database_that_goes_away_is_store_unavailable_then_works_again(
    postgres_server: PostgresServer,
) -> None:
    async with PostgresStore(postgres_server.dsn(), schema=f"t{uuid.uuid4().hex}") as store:
        kept = await store.insert(cmd())
        postgres_server.stop(mode="immediate")  # a crash of the database server
        try:
            with pytest.raises(StoreUnavailableError) as write_error:
                await store.insert(cmd())
            assert write_error.value.code is ErrorCode.STORE_UNAVAILABLE
            assert write_error.value.__cause__ is not None
            with pytest.raises(StoreUnavailableError):
                await store.get(kept.id)
        finally:
            postgres_server.start()
        # The pool opens new connections: no restart of the store is needed.
        for _ in range(50):
            try:
                again = await store.insert(cmd())
                break
            except StoreUnavailableError:
                await asyncio.sleep(0.1)
        assert await store.get(kept.id) == kept
        assert await store.get(again.id) == again


def test_bad_urls_and_schemas_are_config_errors() -> None:
    from keeplink import ConfigError

    with pytest.raises(ConfigError, match="not a postgresql:// URL"):
        PostgresStore("mysql://x/y")
    with pytest.raises(ConfigError, match="schema must be a plain identifier"):
        PostgresStore("postgresql://u@h/db", schema="a; DROP TABLE x")
    store = PostgresStore.from_url("postgresql://u@h:5/db?schema=fleet&sslmode=disable")
    assert store.schema == "fleet"
    assert store.dsn == "postgresql://u@h:5/db?sslmode=disable"


# ---------------------------------------------------------------------- leases and fences


async def test_a_lease_is_held_by_one_node_and_taken_over_only_when_it_expires(
    store: PostgresStore,
) -> None:
    assert await store.acquire("a", ["d1", "d2"], lease_s=0.5) == {"d1": 1, "d2": 1}
    assert await store.acquire("b", ["d1", "d2", "d3"], lease_s=0.5) == {"d3": 1}
    assert await store.owners() == {"d1": "a", "d2": "a", "d3": "b"}
    assert await store.renew("a", {"d1": 1, "d2": 1}, lease_s=0.5) == {"d1", "d2"}
    await asyncio.sleep(0.7)  # a's leases expire (it stopped renewing: paused, partitioned)
    assert await store.owners() == {}
    assert await store.acquire("b", ["d1"], lease_s=5) == {"d1": 2}  # a new epoch
    assert await store.renew("a", {"d1": 1, "d2": 1}, lease_s=5) == set()  # both lost
    assert await store.owners() == {"d1": "b"}


async def test_a_released_lease_is_free_at_once(store: PostgresStore) -> None:
    assert await store.acquire("a", ["d1"], lease_s=60) == {"d1": 1}
    await store.release("a", {"d1": 1})
    assert await store.acquire("b", ["d1"], lease_s=60) == {"d1": 2}
    await store.release("a", {"d1": 1})  # a stale release changes nothing
    assert await store.owners() == {"d1": "b"}


async def test_a_write_fenced_by_a_stale_epoch_is_refused_whole(store: PostgresStore) -> None:
    from keeplink.outbox import FencedError
    from keeplink.outbox.store import Fence

    command = await store.insert(cmd("d1"))
    assert await store.acquire("a", ["d1"], lease_s=0.3) == {"d1": 1}
    sending = transition(command, S.SENDING, now=T0 + 1, attempts=1, cycle=1)
    await asyncio.sleep(0.5)
    assert await store.acquire("b", ["d1"], lease_s=60) == {"d1": 2}
    with pytest.raises(FencedError, match="node 'a' no longer holds device 'd1'"):
        await store.apply(
            [
                Update(sending, S.QUEUED, Fence("a", 1)),
                PutDevice(DeviceRecord(device="d1", cycle=1), Fence("a", 1)),
            ]
        )
    assert await store.get(command.id) == command  # nothing written
    assert await store.get_device("d1") is None
    # The owner's fenced write goes through; unfenced submits from any node always do.
    assert await store.apply([Update(sending, S.QUEUED, Fence("b", 2))]) == [True]
    assert (await store.insert(cmd("d1"))).device == "d1"


async def test_live_nodes_are_the_recently_seen_ones(store: PostgresStore) -> None:
    assert await store.heartbeat("a", lease_s=0.4) == ["a"]
    assert await store.heartbeat("b", lease_s=0.4) == ["a", "b"]
    await store.leave("a")
    assert await store.heartbeat("b", lease_s=0.4) == ["b"]
    await asyncio.sleep(0.6)
    assert await store.heartbeat("c", lease_s=0.4) == ["c"]  # b was not seen for too long
