"""SqliteStore beyond the conformance suite: schema and migrations, pragmas, URLs, the
worker thread, durability across a reopen and across a process killed mid-write."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keeplink._core.commands import CommandState, DeviceRecord, new_command, transition
from keeplink._core.errors import ConfigError
from keeplink.outbox.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore
from keeplink.outbox.store import COMMAND_COLUMNS, command_values

S = CommandState
T0 = 1_763_812_345.5


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection, closed afterwards (``with sqlite3.connect()`` does not close)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def schema_objects(path: Path) -> set[tuple[str, str]]:
    with raw(path) as conn:
        rows = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
    return {(kind, name) for kind, name in rows if not name.startswith("sqlite_autoindex")}


LATEST_OBJECTS = {
    ("table", "commands"),
    ("table", "devices"),
    ("table", "sqlite_sequence"),  # AUTOINCREMENT's counter: seq is never reused
    ("index", "commands_delivery"),
    ("index", "commands_state"),
    ("index", "commands_key"),
    ("index", "commands_expiry"),
}


def user_version(path: Path) -> int:
    with raw(path) as conn:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def sqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("keeplink-sqlite")}


def cmd(device: str = "dev", **changes: Any) -> Any:
    return dataclasses.replace(
        new_command(device=device, op="set", args={"v": 1}, now=T0), **changes
    )


# ---------------------------------------------------------------------- schema


def test_there_are_three_migrations() -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS) == 3


@pytest.mark.parametrize("existing", [True, False], ids=["empty-file", "no-file"])
async def test_an_empty_database_is_migrated_to_the_latest_schema(
    tmp_path: Path, existing: bool
) -> None:
    path = tmp_path / "new.db"
    if existing:
        path.touch()
    async with SqliteStore(path):
        pass
    assert user_version(path) == SCHEMA_VERSION
    assert schema_objects(path) == LATEST_OBJECTS
    with raw(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(commands)")]
        device_columns = [row[1] for row in conn.execute("PRAGMA table_info(devices)")]
        delivery = [
            (row[2], row[3]) for row in conn.execute("PRAGMA index_xinfo(commands_delivery)")
        ][:4]
        unique = conn.execute("PRAGMA index_list(commands)").fetchall()
    assert columns == list(COMMAND_COLUMNS)
    assert device_columns == [
        "device",
        "cycle",
        "failed_cycles",
        "parked_reason",
        "parked_until",
        "failed_cycle",
    ]
    assert delivery == [("device", 0), ("state", 0), ("priority", 1), ("seq", 0)]  # DESC = 1
    assert any(row[2] == 1 and row[1].startswith("sqlite_autoindex") for row in unique)  # id


async def test_a_version_1_database_is_migrated_without_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    old = cmd(key="k")
    with raw(path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        v1_columns = COMMAND_COLUMNS[1:-1]  # retry_at came with version 3
        conn.execute(
            f"INSERT INTO commands ({', '.join(v1_columns)}) "
            f"VALUES ({', '.join('?' * len(v1_columns))})",
            command_values(old)[:-1],
        )
        conn.execute("INSERT INTO devices VALUES ('dev', 4, 1, 'parked', 12.5)")
    assert ("index", "commands_key") not in schema_objects(path)

    async with SqliteStore(path) as store:
        assert await store.get(old.id) == dataclasses.replace(old, seq=1)
        assert await store.get_device("dev") == DeviceRecord(
            device="dev", cycle=4, failed_cycles=1, parked_reason="parked", parked_until=12.5
        )
        assert (await store.insert(cmd())).seq == 2
    assert user_version(path) == SCHEMA_VERSION
    assert schema_objects(path) == LATEST_OBJECTS


async def test_a_newer_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with raw(path) as conn:
        conn.execute("CREATE TABLE commands (anything)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    threads = sqlite_threads()

    store = SqliteStore(path)
    message = (
        f"database schema version {SCHEMA_VERSION + 1} is newer than this keeplink "
        f"({SCHEMA_VERSION}); upgrade keeplink"
    )
    for _ in range(2):  # a failed open leaves the store unopened; trying again fails again
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            await store.open()
    with pytest.raises(RuntimeError, match="store is not open"):
        await store.count()
    await store.close()

    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["future.db"]  # no -wal, no -shm
    assert sqlite_threads() == threads


async def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the pages you are looking for" * 100)
    with pytest.raises(ConfigError, match=r"notes\.txt.*cannot open: file is not a database"):
        await SqliteStore(path).open()
    with pytest.raises(ConfigError, match="cannot open: unable to open database file"):
        await SqliteStore(tmp_path / "missing-dir" / "x.db").open()


# ---------------------------------------------------------------------- durability


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "keep.db"
    async with SqliteStore(path) as store:
        first = await store.insert(cmd("a", priority=2))
        second = await store.insert(cmd("b"))
        third = await store.insert(cmd("a"))
        sending = transition(second, S.SENDING, now=T0 + 1, attempts=1)
        assert await store.update(sending, expect=S.QUEUED)
        record = DeviceRecord(device="a", cycle=3, failed_cycles=2, parked_until=T0 + 60)
        await store.put_device(record)

    async with SqliteStore(path) as store:
        assert await store.list() == [first, sending, third]
        assert await store.queued("a") == [first, third]
        assert await store.get_device("a") == record
        assert await store.recover(now=T0 + 2) == [
            dataclasses.replace(sending, state=S.QUEUED, updated_at=T0 + 2)
        ]
        assert (await store.insert(cmd())).seq == 4  # seq continues after a restart


async def test_seq_is_never_reused_even_after_rows_are_deleted(tmp_path: Path) -> None:
    path = tmp_path / "seq.db"
    async with SqliteStore(path) as store:
        for _ in range(3):
            await store.insert(cmd())
    with raw(path) as conn:
        conn.execute("DELETE FROM commands WHERE seq >= 2")  # e.g. a purge of old commands
    async with SqliteStore(path) as store:
        assert (await store.insert(cmd())).seq == 4


async def test_close_waits_for_writes_already_submitted(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    store = SqliteStore(path)
    await store.open()
    commands = [cmd() for _ in range(20)]
    tasks = [asyncio.create_task(store.insert(c)) for c in commands]
    await asyncio.sleep(0)  # every insert is now submitted to the worker
    await store.close()
    stored = await asyncio.gather(*tasks)
    assert [c.seq for c in stored] == list(range(1, 21))
    async with SqliteStore(path) as store:
        assert await store.count() == 20


async def test_two_stores_on_one_file(tmp_path: Path) -> None:
    """Two processes sharing a file: concurrent opens migrate once; CAS holds across them."""
    path = tmp_path / "shared.db"
    one, two = SqliteStore(path), SqliteStore(path)
    await asyncio.gather(one.open(), two.open())
    try:
        queued = await one.insert(cmd())
        assert await two.get(queued.id) == queued
        a = transition(queued, S.SENDING, now=T0 + 1, attempts=1)
        b = transition(queued, S.CANCELLED, now=T0 + 1)
        assert await two.update(a, expect=S.QUEUED) is True
        assert await one.update(b, expect=S.QUEUED) is False
        assert await one.get(queued.id) == a
        assert (await two.insert(cmd())).seq == 2
    finally:
        await one.close()
        await two.close()
    assert user_version(path) == SCHEMA_VERSION


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("given", "expected"), [("FULL", 2), ("NORMAL", 1), ("normal", 1), ("Full", 2)]
)
async def test_pragmas_are_as_configured(tmp_path: Path, given: str, expected: int) -> None:
    path = tmp_path / "p.db"
    async with SqliteStore(path, synchronous=given) as store:
        assert store.synchronous == given.upper()
        pragmas = await store._run(
            lambda conn: [
                conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            ]
        )
        thread = await store._run(lambda conn: threading.current_thread().name)
    assert pragmas == ["wal", expected, 1, 5000]
    assert thread.startswith("keeplink-sqlite")
    with raw(path) as conn:  # WAL is a property of the file
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("synchronous", ["OFF", "EXTRA", "", 2, None])
def test_an_unknown_synchronous_mode_is_a_config_error(tmp_path: Path, synchronous: Any) -> None:
    with pytest.raises(ConfigError, match="synchronous must be one of FULL, NORMAL, got"):
        SqliteStore(tmp_path / "x.db", synchronous=synchronous)


async def test_close_leaves_no_thread_behind(tmp_path: Path) -> None:
    before = sqlite_threads()
    store = SqliteStore(tmp_path / "t.db")
    await store.open()
    assert len(sqlite_threads() - before) == 1
    await store.insert(cmd())
    await store.close()
    assert sqlite_threads() == before


async def test_a_memory_database_works() -> None:
    async with SqliteStore(":memory:") as store:
        stored = await store.insert(cmd())
        assert await store.get(stored.id) == stored


@pytest.mark.parametrize(
    ("url", "path", "synchronous"),
    [
        ("sqlite:///relative.db", "relative.db", "FULL"),
        ("sqlite:///dir/sub.db", "dir/sub.db", "FULL"),
        ("sqlite:////abs/path.db", "/abs/path.db", "FULL"),
        ("SQLite:///x.db", "x.db", "FULL"),
        ("sqlite:///x.db?synchronous=NORMAL", "x.db", "NORMAL"),
        ("sqlite:////var/lib/keeplink/k.db?synchronous=full", "/var/lib/keeplink/k.db", "FULL"),
        ("sqlite:///:memory:", ":memory:", "FULL"),
    ],
)
def test_from_url(url: str, path: str, synchronous: str) -> None:
    store = SqliteStore.from_url(url)
    assert (store.path, store.synchronous) == (path, synchronous)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://db.example/keeplink", "not a sqlite URL"),
        ("keeplink.db", "not a sqlite URL"),
        ("", "not a sqlite URL"),
        ("sqlite:keeplink.db", "expected three slashes"),
        ("sqlite://host/keeplink.db", "expected three slashes"),
        ("sqlite:///", "no database path"),
        ("sqlite:////", "no database path"),
        ("sqlite:///?synchronous=FULL", "no database path"),
        ("sqlite:///k.db?mode=ro", "unknown parameter 'mode=ro'"),
        ("sqlite:///k.db?synchronous", "unknown parameter 'synchronous'"),
        ("sqlite:///k.db?synchronous=OFF", "synchronous must be FULL or NORMAL, got 'OFF'"),
        ("sqlite:///k.db#frag", "a fragment"),
    ],
)
def test_from_url_refuses_bad_urls(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SqliteStore.from_url(url)
    assert repr(url) in caught.value.message
    assert problem in caught.value.message


def test_from_url_refuses_a_non_string() -> None:
    with pytest.raises(ConfigError, match="store URL must be a string"):
        SqliteStore.from_url(b"sqlite:///x.db")  # type: ignore[arg-type]


async def test_a_relative_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with SqliteStore.from_url("sqlite:///relative.db") as store:
        await store.insert(cmd())
    assert user_version(tmp_path / "relative.db") == SCHEMA_VERSION


# ---------------------------------------------------------------------- killed mid-write

CHILD = """
import asyncio, dataclasses, sys
from keeplink._core.commands import CommandState, new_command, transition
from keeplink.outbox.sqlite import SqliteStore

async def main(path, synchronous, limit):
    store = SqliteStore(path, synchronous=synchronous)
    await store.open()
    previous = None
    for i in range(limit):
        command = new_command(
            device=f"d{i % 3}", op="set", args={"i": i, "pad": "x" * (i % 500)}, now=1e9 + i
        )
        await store.insert(command)
        print("I", command.id, flush=True)
        if previous is not None:
            sending = transition(previous, CommandState.SENDING, now=1e9 + i, attempts=1)
            assert await store.update(sending, expect=CommandState.QUEUED)
            print("U", previous.id, flush=True)
        previous = command
    await store.close()
    print("done", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _run_child_until(path: Path, synchronous: str, lines: int, deadline_s: float) -> list[str]:
    """Run CHILD, SIGKILL it once it has reported ``lines`` lines; return every complete
    line it printed (including those printed after we decided to kill it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), synchronous, "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    output = b""
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + deadline_s
            while output.count(b"\n") < lines and time.monotonic() < deadline:
                if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break  # the child ended on its own: the assertions below say why
                    output += chunk
        proc.send_signal(signal.SIGKILL)
        rest, errors = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    output += rest
    assert proc.returncode == -signal.SIGKILL, errors.decode(errors="replace")
    reported = output.decode().split("\n")[:-1]  # the last piece is partial (or empty)
    assert len(reported) >= lines, errors.decode(errors="replace")
    return reported


@pytest.mark.parametrize(("synchronous", "lines"), [("FULL", 1), ("FULL", 150), ("NORMAL", 300)])
async def test_a_process_killed_mid_write_loses_nothing_it_reported(
    tmp_path: Path, synchronous: str, lines: int
) -> None:
    path = tmp_path / "killed.db"
    reported = _run_child_until(path, synchronous, lines, deadline_s=20.0)
    inserted = [line.split()[1] for line in reported if line.startswith("I ")]
    updated = {line.split()[1] for line in reported if line.startswith("U ")}
    assert "done" not in reported
    assert len(inserted) + len(updated) == len(reported)

    with raw(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []

    async with SqliteStore(path) as store:
        stored = await store.list(limit=10_000)
        by_id = {c.id: c for c in stored}
        # Every reported insert is there, in the reported order; at most one more insert
        # (committed, killed before it was printed) follows them.
        assert [c.id for c in stored[: len(inserted)]] == inserted
        assert len(stored) - len(inserted) in (0, 1)
        assert [c.seq for c in stored] == list(range(1, len(stored) + 1))
        # Every reported update is there; at most one more (unreported) one.
        for command_id in updated:
            assert by_id[command_id].state is S.SENDING
            assert by_id[command_id].attempts == 1
        sending = {c.id for c in stored if c.state is S.SENDING}
        assert updated <= sending
        assert len(sending - updated) in (0, 1)
        assert {c.state for c in stored} <= {S.QUEUED, S.SENDING}
        for c in stored:
            assert c.args["pad"] == "x" * (c.args["i"] % 500)
        # And the crash recovery puts the interrupted deliveries back in the queue.
        recovered = await store.recover(now=T0)
        assert {c.id for c in recovered} == sending
        assert await store.count(states=[S.SENDING]) == 0


# ---------------------------------------------------------------------- group commit


def _mixed_calls(queued: list[Any], *, duplicate: bool) -> list[Any]:
    """Many calls: inserts, winning and losing compare-and-sets, device records, a keyed
    insert with its supersede, and one duplicate insert."""
    from keeplink.outbox.store import Insert, PutDevice, Supersede, Update

    calls: list[Any] = []
    for n, command in enumerate(queued):
        sending = transition(command, S.SENDING, now=T0 + 1, attempts=1)
        expect = S.QUEUED if n % 3 else S.SENDING  # every third one loses its CAS
        calls.append([Update(sending, expect)])
        calls.append([Insert(cmd(device=f"d{n % 4}"))])
        calls.append([PutDevice(DeviceRecord(device=f"d{n % 4}", cycle=n)), Insert(cmd())])
    keyed = cmd(device="d0", key="target")
    calls.append([Insert(keyed), Supersede(device="d0", key="target", by=keyed.id, now=T0)])
    if duplicate:
        calls.append([Insert(dataclasses.replace(queued[0], seq=0))])  # exists: refused
    return calls


async def _run_concurrently(store: Any, calls: list[Any]) -> list[Any]:
    """Each call's outcome, all of them started at once."""

    async def run(writes: list[Any]) -> Any:
        try:
            return await store.apply(writes)
        except Exception as exc:
            return type(exc).__name__

    return list(await asyncio.gather(*(run(writes) for writes in calls)))


@pytest.mark.parametrize("duplicate", [False, True], ids=["bulk", "call-by-call"])
async def test_a_batch_of_concurrent_calls_answers_like_calls_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, duplicate: bool
) -> None:
    """SQLite commits concurrent calls together, in few statements (or, with a duplicate id
    among them, call by call); each call is answered exactly as the memory store answers
    the same calls one after another."""
    from keeplink.outbox import _sqlite_batch as batch_module
    from keeplink.outbox.store import MemoryStore

    bulk = batch_module.commit_bulk
    paths: list[bool] = []

    def spy(conn: Any, jobs: Any) -> Any:
        answers = bulk(conn, jobs)
        paths.append(answers is not None)
        return answers

    monkeypatch.setattr(batch_module, "commit_bulk", spy)
    base = [cmd(device=f"d{n % 4}", key=f"k{n}") for n in range(60)]
    calls = _mixed_calls(base, duplicate=duplicate)
    answers = []
    for store in (MemoryStore(), SqliteStore(tmp_path / "batch.db")):
        async with store:
            for command in base:
                await store.insert(command)
            answers.append(await _run_concurrently(store, calls))
            answers.append(await store.list(limit=10_000))
            answers.append([await store.get_device(f"d{n}") for n in range(4)])
    memory, sqlite = answers[:3], answers[3:]
    assert sqlite[0] == memory[0]  # every call's results, value for value
    assert sqlite[1] == memory[1]  # the same records, with the same seqs
    assert sqlite[2] == memory[2]
    assert (sqlite[0][-1] == "InvalidRequestError") is duplicate
    assert sum(1 for result in sqlite[0] if result == [True]) == 40  # the CAS winners
    batched = paths  # (the set-up's lone inserts are single statements, not batches)
    assert 0 < len(batched) < len(calls) / 10  # many calls a transaction
    # Without a duplicate every batch took the few-statement path; with one, its batch
    # went call by call.
    assert all(batched) if not duplicate else not all(batched)
