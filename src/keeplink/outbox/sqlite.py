"""The embedded command store: SQLite (stdlib ``sqlite3``) in WAL mode.

Every sqlite call runs on one dedicated worker thread (``keeplink-sqlite``), where the
connection is created and closed, so the event loop never waits on an fsync. The single
worker also serialises all operations of a store.

Group commit: :meth:`SqliteStore.apply` hands its writes to the worker and waits. The
worker takes every write call that is waiting when it becomes free (at most
``MAX_BATCH_WRITES`` writes) and commits them in one transaction (``BEGIN IMMEDIATE`` …
``COMMIT``): while one transaction is being synced to disk, the next batch gathers, so
concurrent writers share an fsync and an idle worker starts at once, with no timer. Each
call is answered after the commit that holds it; with the default ``synchronous=FULL`` an
answered write survives a power cut, with ``NORMAL`` a crash of the process (not of the
machine). Each call is its own savepoint: one refused call (a duplicate id) leaves the
others in its transaction unaffected.

A write whose coroutine is cancelled before the worker took it is not written; one the
worker had taken may still commit.

Schema
------
``MIGRATIONS`` is the list of schema scripts; ``PRAGMA user_version`` is how many of them
a database has applied. :meth:`SqliteStore.open` applies the missing ones, one transaction
each, and refuses (with :class:`~keeplink.ConfigError`, touching nothing) a database whose
version is newer than this code knows.

``seq`` is the table's ``INTEGER PRIMARY KEY AUTOINCREMENT`` (the rowid): SQLite assigns
it, and ``AUTOINCREMENT`` guarantees it is never reused, even after rows are deleted. The
command id is ``UNIQUE``.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from keeplink._core.commands import Command, CommandState, DeviceRecord
from keeplink._core.errors import ConfigError, InvalidRequestError, StoreBusyError
from keeplink.outbox._protocol import CommandStore
from keeplink.outbox._rows import (
    COMMAND_COLUMNS,
    DEVICE_COLUMNS,
    check_after_seq,
    check_device_filter,
    check_limit,
    check_optional_limit,
    check_real,
    check_str,
    command_from_row,
    command_values,
    device_from_row,
    duplicate_id,
    id_prefix_bounds,
    state_values,
)
from keeplink.outbox._writes import (
    EncodedWrite,
    Write,
    WriteResult,
    encode_writes,
    recovered,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqliteStore"]

_T = TypeVar("_T")

MIGRATIONS: Final[list[str]] = [
    # 1: the initial schema.
    """
    CREATE TABLE commands (
        seq               INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order, never reused
        id                TEXT NOT NULL UNIQUE,
        device            TEXT NOT NULL,
        op                TEXT NOT NULL,
        args              TEXT NOT NULL,                      -- JSON object
        state             TEXT NOT NULL,                      -- CommandState value
        created_at        REAL NOT NULL,                      -- epoch seconds
        updated_at        REAL NOT NULL,
        idempotency_key   TEXT NOT NULL,
        key               TEXT,                               -- supersede key
        priority          INTEGER NOT NULL,
        max_attempts      INTEGER NOT NULL,
        attempts          INTEGER NOT NULL,
        expires_at        REAL,
        precondition      TEXT,
        precondition_args TEXT NOT NULL,                      -- JSON object
        error_code        TEXT,                               -- last_error, both or neither
        error_message     TEXT,
        result            TEXT,                               -- JSON object
        cycle             INTEGER NOT NULL,
        CHECK ((error_code IS NULL) = (error_message IS NULL))
    );
    CREATE INDEX commands_delivery ON commands (device, state, priority DESC, seq);
    CREATE INDEX commands_state ON commands (state);
    CREATE TABLE devices (
        device        TEXT PRIMARY KEY,
        cycle         INTEGER NOT NULL,
        failed_cycles INTEGER NOT NULL,
        parked_reason TEXT,
        parked_until  REAL
    );
    """,
    # 2: find the queued commands a new command with the same key supersedes.
    """
    CREATE INDEX commands_key ON commands (device, key, state) WHERE key IS NOT NULL;
    """,
    # 3: in-cycle retries after a lost ack; a failed cycle counted once; the next expiry
    # from an index instead of a scan of the queue.
    """
    ALTER TABLE commands ADD COLUMN retry_at REAL;
    ALTER TABLE devices ADD COLUMN failed_cycle INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX commands_expiry ON commands (expires_at)
        WHERE state = 'queued' AND expires_at IS NOT NULL;
    """,
]
"""Schema scripts; ``PRAGMA user_version`` counts how many a database has applied."""

SCHEMA_VERSION: Final = len(MIGRATIONS)
"""The schema version this code writes."""

MAX_BATCH_WRITES: Final = 1024
"""The most writes one transaction takes: a large batch amortises an fsync, a bounded one
keeps any caller's wait (and the write lock other processes wait on) short."""

HAND_IN_CHUNK: Final = 16
"""Jobs gathered on the event loop before the worker gets them even mid-iteration: when
many writers wake together, the worker commits the first ones while the loop prepares the
rest, so disk and interpreter work overlap instead of taking turns."""

SYNCHRONOUS_MODES: Final = ("FULL", "NORMAL")
BUSY_TIMEOUT_MS: Final = 5000
URL_PREFIX: Final = "sqlite:///"

_COMMAND_SELECT: Final = f"SELECT {', '.join(COMMAND_COLUMNS)} FROM commands"
_COMMAND_INSERT: Final = (
    f"INSERT INTO commands ({', '.join(COMMAND_COLUMNS[1:])}) "
    f"VALUES ({', '.join('?' * len(COMMAND_COLUMNS[1:]))})"
)
_ROW_PLACEHOLDERS: Final = f"({', '.join('?' * len(COMMAND_COLUMNS[1:]))})"
_COMMAND_INSERT_MANY: Final = f"INSERT INTO commands ({', '.join(COMMAND_COLUMNS[1:])}) VALUES {{}}"
_UPDATE_PLACEHOLDERS: Final = f"({', '.join('?' * (len(COMMAND_COLUMNS) + 0))})"
"""id, the expected state, then every column but seq and id: len(COMMAND_COLUMNS) values."""
_CAS_MATCHES: Final = (
    "SELECT json_group_array(c.id) FROM commands AS c JOIN (VALUES {}) AS v "
    "ON c.id = v.column1 AND c.state = v.column2"
)
_CAS_UPDATE_MANY: Final = (
    "UPDATE commands SET "
    + ", ".join(f"{column} = v.column{n + 3}" for n, column in enumerate(COMMAND_COLUMNS[2:]))
    + " FROM (VALUES {}) AS v WHERE commands.id = v.column1 AND commands.state = v.column2"
)
_SUPERSEDE: Final = (
    "UPDATE commands SET state = ?5, updated_at = ?4, error_code = ?6, error_message = ?7, "
    "retry_at = NULL "
    "WHERE device = ?1 AND key = ?2 AND state = 'queued' "
    "AND seq < (SELECT seq FROM commands WHERE id = ?3) "
    f"RETURNING {', '.join(COMMAND_COLUMNS)}"
)
_COMMAND_UPDATE: Final = (
    f"UPDATE commands SET {', '.join(f'{column} = ?' for column in COMMAND_COLUMNS[2:])} "
    "WHERE id = ? AND state = ?"
)
_DEVICE_UPSERT: Final = (
    f"INSERT INTO devices ({', '.join(DEVICE_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(DEVICE_COLUMNS))}) "
    "ON CONFLICT (device) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in DEVICE_COLUMNS[1:])
)
_DEVICE_PLACEHOLDERS: Final = f"({', '.join('?' * len(DEVICE_COLUMNS))})"
_DEVICE_UPSERT_MANY: Final = (
    f"INSERT INTO devices ({', '.join(DEVICE_COLUMNS)}) VALUES {{}} "
    "ON CONFLICT (device) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in DEVICE_COLUMNS[1:])
)
_QUEUED: Final = CommandState.QUEUED.value
_SENDING: Final = CommandState.SENDING.value


def _statements(script: str) -> list[str]:
    """Split a migration script into single statements (``execute`` runs one at a time,
    and ``executescript`` would commit the enclosing transaction)."""
    statements: list[str] = []
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:80]!r}")
    return statements


def _user_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def _too_new(version: int) -> ConfigError:
    return ConfigError(
        f"database schema version {version} is newer than this keeplink ({SCHEMA_VERSION}); "
        "upgrade keeplink"
    )


def _write(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]) -> _T:
    """Run ``work`` in one immediate transaction and commit it; roll back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _typed(exc: sqlite3.Error) -> BaseException:
    """The error a caller gets: the database locked by another writer past the busy
    timeout is :class:`StoreBusyError` (retry later; nothing was written), with the
    driver's error as its cause; anything else as it is."""
    if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        busy = StoreBusyError(
            f"the store is locked by another writer (waited {BUSY_TIMEOUT_MS / 1000:g} s): "
            "nothing was written; retry later"
        )
        busy.__cause__ = exc
        return busy
    return exc


def _enable_wal(conn: sqlite3.Connection) -> str:
    """``PRAGMA journal_mode = WAL``; the journal mode it reports.

    Switching a new file to WAL while another connection opens it can fail with "database is
    locked" without waiting for the busy timeout, so it is retried until that timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode: str = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
        else:
            return mode


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply the missing migrations, one transaction each (safe against a concurrent
    opener: the version is read again under the write lock)."""
    while _user_version(conn) < SCHEMA_VERSION:

        def step(conn: sqlite3.Connection) -> None:
            version = _user_version(conn)
            if version > SCHEMA_VERSION:
                raise _too_new(version)
            if version == SCHEMA_VERSION:
                return
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")

        _write(conn, step)


@dataclass(slots=True)
class _Job:
    """Work for the worker thread: a write call (``writes``) or any other call (``call``)."""

    future: asyncio.Future[Any]
    writes: builtins.list[EncodedWrite] = field(default_factory=builtins.list)
    call: Callable[[sqlite3.Connection], Any] | None = None


_Answer = tuple[asyncio.Future[Any], bool, Any]


def _resolve(answers: builtins.list[_Answer]) -> None:
    """On the event loop: answer every job of a batch (one loop wake-up per batch)."""
    for future, ok, value in answers:
        if future.done():
            continue  # its caller was cancelled meanwhile
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _write_job(conn: sqlite3.Connection, writes: builtins.list[EncodedWrite]) -> Any:
    """Execute one call's writes inside the open transaction; their raw results (a seq, a
    bool, rows, None), turned into records on the event loop, not here: the less Python
    this thread runs, the less it competes with the loop for the interpreter."""
    results: builtins.list[Any] = []
    for write in writes:
        values = write.values
        if write.kind == "insert":
            try:
                cursor = conn.execute(_COMMAND_INSERT, values)
            except sqlite3.IntegrityError:
                # The id exists (the only constraint a validated row can break). The failed
                # statement is rolled back, seq counter included: no seq is used up.
                raise duplicate_id(values[0]) from None
            results.append(cursor.lastrowid)
        elif write.kind == "update":
            cursor = conn.execute(_COMMAND_UPDATE, (*values[1:], values[0], write.expect))
            results.append(cursor.rowcount == 1)
        elif write.kind == "supersede":
            results.append(conn.execute(_SUPERSEDE, values).fetchall())
        else:
            conn.execute(_DEVICE_UPSERT, values)
            results.append(None)
    return results


def _commit_batch(conn: sqlite3.Connection, jobs: builtins.list[_Job]) -> builtins.list[_Answer]:
    """Commit the write calls ``jobs`` in one transaction; what to answer each.

    Each call of several writes runs under its own savepoint, so a refused call rolls back
    alone. If the transaction itself fails (the database is locked, the disk is full),
    this raises and nothing of the batch is written.
    """
    answers: builtins.list[_Answer] = []
    if len(jobs) == 1 and len(jobs[0].writes) == 1 and jobs[0].writes[0].kind != "supersede":
        # One statement alone is its own transaction (autocommit), committed and synced
        # as it runs: no BEGIN and COMMIT around it (a lone writer, as sequential submits
        # are, pays per statement).
        job = jobs[0]
        try:
            return [(job.future, True, _write_job(conn, job.writes))]
        except InvalidRequestError as exc:
            return [(job.future, False, exc)]
    conn.execute("BEGIN IMMEDIATE")
    try:
        bulk = _commit_bulk(conn, jobs)
        if bulk is not None:
            conn.execute("COMMIT")
            return bulk
        run: builtins.list[_Job] = []  # consecutive one-insert calls: one statement for all
        for job in jobs:
            if len(job.writes) == 1 and job.writes[0].kind == "insert":
                run.append(job)
                continue
            answers.extend(_insert_run(conn, run))
            run = []
            if len(job.writes) == 1:
                # One statement is atomic by itself: no savepoint needed.
                try:
                    answers.append((job.future, True, _write_job(conn, job.writes)))
                except InvalidRequestError as exc:
                    answers.append((job.future, False, exc))
                continue
            conn.execute("SAVEPOINT call")
            try:
                result = _write_job(conn, job.writes)
            except InvalidRequestError as exc:
                conn.execute("ROLLBACK TO call")
                answers.append((job.future, False, exc))
            else:
                answers.append((job.future, True, result))
            conn.execute("RELEASE call")
        answers.extend(_insert_run(conn, run))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return answers


def _commit_bulk(
    conn: sqlite3.Connection, jobs: builtins.list[_Job]
) -> builtins.list[_Answer] | None:
    """The batch's writes in a handful of statements, whatever its size; ``None`` (having
    written nothing) when they cannot be, and each call must run on its own.

    This thread gives the interpreter back to the event loop for every statement and must
    take it again afterwards; while the loop is busy (it is, when many devices deliver at
    once) each take can wait for the loop's switch interval. So the cost of a batch is its
    number of statements, not its number of rows: all inserts are one statement, all
    compare-and-set updates two (one read of which ones match, one write), all device
    records one. That gives the same result as running the calls one after another
    because no two of them touch the same command (checked first: otherwise ``None``).
    """
    inserts: builtins.list[tuple[int, int, EncodedWrite]] = []
    updates: builtins.list[tuple[int, int, EncodedWrite]] = []
    supersedes: builtins.list[tuple[int, int, EncodedWrite]] = []
    devices: dict[str, tuple[Any, ...]] = {}
    for j, job in enumerate(jobs):
        for w, write in enumerate(job.writes):
            bucket = {"insert": inserts, "update": updates, "supersede": supersedes}.get(write.kind)
            if bucket is None:
                devices[write.values[0]] = write.values  # the last one wins, as in order
            else:
                bucket.append((j, w, write))
    touched = [write.values[0] for _, _, write in inserts + updates]
    if len(set(touched)) != len(touched):
        return None  # two writes to one command: their order matters, run them in order
    results: builtins.list[builtins.list[Any]] = [[None] * len(job.writes) for job in jobs]
    # The inserts go first, in one statement: if that fails on an existing id, it is undone
    # by itself and nothing else has run yet, so no savepoint is needed.
    try:
        if inserts:
            rows = [write.values for _, _, write in inserts]
            cursor = conn.execute(
                _COMMAND_INSERT_MANY.format(", ".join([_ROW_PLACEHOLDERS] * len(rows))),
                [value for row in rows for value in row],
            )
            # The rows of one VALUES list are inserted in order, each given the next seq by
            # AUTOINCREMENT inside this write transaction: consecutive, ending at the last.
            last = cursor.lastrowid
            assert last is not None
            for n, (j, w, _) in enumerate(inserts):
                results[j][w] = last - len(rows) + 1 + n
    except sqlite3.IntegrityError:
        return None  # an id that exists already: each call on its own, the duplicate refused
    if updates:
        keys = [(write.values[0], write.expect) for _, _, write in updates]
        (matched,) = conn.execute(
            _CAS_MATCHES.format(", ".join(["(?, ?)"] * len(keys))),
            [value for key in keys for value in key],
        ).fetchone()
        written = set(json.loads(matched)) if matched else set()
        conn.execute(
            _CAS_UPDATE_MANY.format(", ".join([_UPDATE_PLACEHOLDERS] * len(updates))),
            [
                value
                for _, _, write in updates
                for value in (write.values[0], write.expect, *write.values[1:])
            ],
        )
        for j, w, write in updates:
            results[j][w] = write.values[0] in written
    for j, w, write in supersedes:
        results[j][w] = conn.execute(_SUPERSEDE, write.values).fetchall()
    if devices:
        conn.execute(
            _DEVICE_UPSERT_MANY.format(", ".join([_DEVICE_PLACEHOLDERS] * len(devices))),
            [value for row in devices.values() for value in row],
        )
    return [(job.future, True, result) for job, result in zip(jobs, results, strict=True)]


def _insert_run(conn: sqlite3.Connection, run: builtins.list[_Job]) -> builtins.list[_Answer]:
    """Insert the commands of one-insert calls with one multi-row statement.

    One statement instead of one per row: this thread gives the interpreter back to the
    event loop and takes it again for every statement, and while the loop is busy (it is
    preparing the next batch) each take can wait, so fewer statements is what makes a
    batch fast. If an id exists the statement fails whole, and each row is inserted on its
    own instead, so only the duplicate's call is refused.
    """
    if not run:
        return []
    if len(run) > 1:
        rows = [job.writes[0].values for job in run]
        try:
            cursor = conn.execute(
                _COMMAND_INSERT_MANY.format(", ".join([_ROW_PLACEHOLDERS] * len(rows))),
                [value for row in rows for value in row],
            )
        except sqlite3.IntegrityError:
            pass  # a duplicate id among them: one by one below
        else:
            # The rows of one VALUES list are inserted in order, and AUTOINCREMENT gives
            # each the next seq, inside this write transaction: consecutive, ending at the
            # last row's. (No RETURNING: a row it returns is one more wait, see above.)
            last = cursor.lastrowid
            assert last is not None
            assert cursor.rowcount == len(run)
            first = last - len(run) + 1
            return [(job.future, True, [first + i]) for i, job in enumerate(run)]
    answers: builtins.list[_Answer] = []
    for job in run:
        try:
            answers.append((job.future, True, _write_job(conn, job.writes)))
        except InvalidRequestError as exc:
            answers.append((job.future, False, exc))
    return answers


def _raw_results(
    writes: builtins.list[EncodedWrite], raw: builtins.list[Any]
) -> builtins.list[WriteResult]:
    """On the event loop: the records a write call's raw results stand for."""
    results: builtins.list[WriteResult] = []
    for write, value in zip(writes, raw, strict=True):
        if write.kind == "insert":
            results.append(command_from_row((value, *write.values)))
        elif write.kind == "supersede":
            results.append(sorted(map(command_from_row, value), key=lambda c: c.seq))
        else:
            results.append(value)
    return results


class _Worker:
    """The store's one thread: it owns the connection and runs every job, writes grouped.

    Jobs reach it in lists: the event loop side gathers what its coroutines hand in during
    one loop iteration (:meth:`SqliteStore._flush` runs at the end of it, with no timer),
    so writers woken together by one commit join the next one together.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, connect: Callable[[], Any]) -> None:
        self._loop = loop
        self._connect = connect
        self._inbox: queue.SimpleQueue[builtins.list[_Job] | None] = queue.SimpleQueue()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.stopped: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._main, name="keeplink-sqlite", daemon=True)
        self._thread.start()

    def submit(self, jobs: builtins.list[_Job]) -> None:
        self._inbox.put(jobs)

    def stop(self) -> None:
        """Run what was submitted, then close the connection and end the thread."""
        self._inbox.put(None)

    def join(self) -> None:
        self._thread.join()

    def _post(self, answers: builtins.list[_Answer]) -> None:
        if answers:
            try:
                self._loop.call_soon_threadsafe(_resolve, answers)
            except RuntimeError:
                pass  # the loop is closed: nobody is left to answer

    def _main(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # noqa: BLE001 - handed to open(), which raises it
            self._post([(self.opened, False, exc)])
            self._post([(self.stopped, True, None)])
            return
        self._post([(self.opened, True, None)])
        try:
            stopping = False
            backlog: collections.deque[_Job] = collections.deque()
            while not (stopping and not backlog):
                if not backlog:
                    item = self._inbox.get()
                    if item is None:
                        stopping = True
                    else:
                        backlog.extend(item)
                while True:  # whatever else is waiting joins this round
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                    else:
                        backlog.extend(item)
                self._round(conn, backlog)
        finally:
            conn.close()
            self._post([(self.stopped, True, None)])

    def _round(self, conn: sqlite3.Connection, backlog: collections.deque[_Job]) -> None:
        """One write batch (at most MAX_BATCH_WRITES writes, whole calls), then the calls
        that were waiting; what is left stays in ``backlog`` for the next round."""
        batch: builtins.list[_Job] = []
        calls: builtins.list[_Job] = []
        size = 0
        keep: collections.deque[_Job] = collections.deque()
        while backlog:
            job = backlog.popleft()
            if job.call is not None:
                calls.append(job)
            elif job.future.cancelled():
                continue  # cancelled before it was taken: not written
            elif not batch or size + len(job.writes) <= MAX_BATCH_WRITES:
                batch.append(job)
                size += len(job.writes)
            else:
                keep.append(job)
        backlog.extend(keep)
        if batch:
            self._post(self._run_batch(conn, batch))
        answers: builtins.list[_Answer] = []
        for job in calls:
            assert job.call is not None
            try:
                answers.append((job.future, True, job.call(conn)))
            except sqlite3.Error as exc:
                answers.append((job.future, False, _typed(exc)))
            except BaseException as exc:  # noqa: BLE001 - raised by the caller
                answers.append((job.future, False, exc))
        self._post(answers)

    @staticmethod
    def _run_batch(conn: sqlite3.Connection, batch: builtins.list[_Job]) -> builtins.list[_Answer]:
        try:
            return _commit_batch(conn, batch)
        except sqlite3.Error as exc:
            if len(batch) == 1:
                return [(batch[0].future, False, _typed(exc))]
        # A failed batch of several calls: each call again in its own transaction, so an
        # error belongs to the call that caused it (a lock timeout fails each alike).
        answers: builtins.list[_Answer] = []
        for job in batch:
            try:
                answers.extend(_commit_batch(conn, [job]))
            except sqlite3.Error as exc:
                answers.append((job.future, False, _typed(exc)))
        return answers


class SqliteStore(CommandStore):
    """A :class:`~keeplink.outbox.store.CommandStore` in an SQLite file, group-committed.

    ``synchronous`` is ``"FULL"`` (the default: a committed write survives a power cut) or
    ``"NORMAL"`` (faster; survives a process crash). ``path`` may be ``":memory:"`` for a
    throwaway store.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        try:
            path = os.fspath(path)
        except TypeError:
            raise ConfigError(f"sqlite store: path must be a path, got {path!r}") from None
        if not isinstance(path, str) or not path:
            raise ConfigError(f"sqlite store: path must be a non-empty string, got {path!r}")
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in SYNCHRONOUS_MODES:
            raise ConfigError(
                f"sqlite store: synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, "
                f"got {synchronous!r}"
            )
        self.path: Final[str] = path
        self.synchronous: Final[str] = mode
        self._status = "new"
        self._lock = asyncio.Lock()
        self._worker: _Worker | None = None
        self._outgoing: list[_Job] = []  # handed to the worker at the end of this iteration

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        """A store from ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``,
        optionally with ``?synchronous=FULL|NORMAL``."""
        if not isinstance(url, str):
            raise ConfigError(f"store URL must be a string, got {url!r}")
        scheme, sep, _ = url.partition(":")
        if not sep or scheme.lower() != "sqlite":
            raise ConfigError(
                f"store URL {url!r}: not a sqlite URL; "
                "use sqlite:///relative.db or sqlite:////absolute/path.db"
            )
        if url[: len(URL_PREFIX)].lower() != URL_PREFIX:
            raise ConfigError(
                f"store URL {url!r}: expected three slashes after 'sqlite:' (sqlite URLs have "
                "no host); use sqlite:///relative.db or sqlite:////absolute/path.db"
            )
        rest = url[len(URL_PREFIX) :]
        path, _, query = rest.partition("?")
        if "#" in path:
            raise ConfigError(f"store URL {url!r}: a fragment ('#') is not allowed")
        if not path or path == "/":
            raise ConfigError(f"store URL {url!r}: no database path")
        synchronous = "FULL"
        for item in filter(None, query.split("&")):
            name, eq, value = item.partition("=")
            if name != "synchronous" or not eq:
                raise ConfigError(
                    f"store URL {url!r}: unknown parameter {item!r} (only synchronous=FULL|NORMAL)"
                )
            if value.upper() not in SYNCHRONOUS_MODES:
                raise ConfigError(
                    f"store URL {url!r}: synchronous must be FULL or NORMAL, got {value!r}"
                )
            synchronous = value
        return cls(path, synchronous=synchronous)

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path!r} {self._status}>"

    # ------------------------------------------------------------------ worker thread

    def _connect(self) -> sqlite3.Connection:
        """Open, configure and migrate the database (on the worker thread)."""
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"sqlite store {self.path!r}: cannot open: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            version = _user_version(conn)  # first, before anything could write
            if version > SCHEMA_VERSION:
                raise _too_new(version)
            journal = _enable_wal(conn)
            if str(journal).lower() != "wal" and self.path != ":memory:":
                raise ConfigError(f"sqlite store {self.path!r}: cannot use WAL (got {journal})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError(f"sqlite store {self.path!r}: cannot open: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_usable(self) -> _Worker:
        if self._status != "open" or self._worker is None:
            raise RuntimeError(
                "store is closed" if self._status == "closed" else "store is not open"
            )
        return self._worker

    def _hand_in(self, job: _Job) -> None:
        """Queue ``job`` for the worker; the queue goes to it once this iteration ends."""
        worker = self._check_usable()
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush, worker)
        self._outgoing.append(job)
        if len(self._outgoing) >= HAND_IN_CHUNK:
            self._flush(worker)

    def _flush(self, worker: _Worker) -> None:
        jobs, self._outgoing = self._outgoing, []
        if jobs:
            worker.submit(jobs)

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work(connection)`` on the worker thread."""
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._hand_in(_Job(future=future, call=work))
        return await future

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        async with self._lock:
            if self._status == "open":
                return
            if self._status == "closed":
                raise RuntimeError("store is closed")
            worker = _Worker(asyncio.get_running_loop(), self._connect)
            try:
                await asyncio.shield(worker.opened)
            except BaseException:
                # Failed, or cancelled while connecting: the thread closes what it opened.
                worker.stop()
                if worker.opened.done() and worker.opened.exception() is not None:
                    await asyncio.shield(worker.stopped)
                    worker.join()  # it is returning: gone at once, not a moment later
                raise
            self._worker = worker
            self._status = "open"

    async def close(self) -> None:
        async with self._lock:
            if self._status == "closed":
                return
            self._status = "closed"
            worker, self._worker = self._worker, None
            if worker is None:
                return  # never opened
            # Runs after every job already handed in; nothing new can be handed in.
            self._flush(worker)
            worker.stop()
            await asyncio.shield(worker.stopped)
            worker.join()  # it has closed the connection and is returning: at once

    # ------------------------------------------------------------------ commands

    async def apply(self, writes: Sequence[Write]) -> builtins.list[WriteResult]:
        encoded = encode_writes(writes)
        self._check_usable()
        if not encoded:
            return []
        future: asyncio.Future[builtins.list[Any]] = asyncio.get_running_loop().create_future()
        self._hand_in(_Job(future=future, writes=encoded))
        return _raw_results(encoded, await future)

    async def get(self, command_id: str) -> Command | None:
        sql = f"{_COMMAND_SELECT} WHERE id = ?"
        params = (check_str("command_id", command_id),)
        row = await self._run(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else command_from_row(row)

    @staticmethod
    def _where(
        device: str | None, states: Collection[CommandState] | None
    ) -> tuple[list[str], list[Any]] | None:
        """SQL conditions and parameters for the filters; ``None`` if nothing can match."""
        device = check_device_filter(device)
        values = state_values(states)
        conditions: list[str] = []
        params: list[Any] = []
        if device is not None:
            conditions.append("device = ?")
            params.append(device)
        if values is not None:
            if not values:
                return None
            conditions.append(f"state IN ({', '.join('?' * len(values))})")
            params.extend(values)
        return conditions, params

    async def list(
        self,
        *,
        device: str | None = None,
        states: Collection[CommandState] | None = None,
        limit: int = 1000,
        after_seq: int = 0,
        newest: bool = False,
    ) -> builtins.list[Command]:
        limit = check_limit(limit)
        after_seq = check_after_seq(after_seq)
        where = self._where(device, states)
        if where is None:
            self._check_usable()
            return []
        conditions, params = where
        conditions.append("seq > ?")
        order = "seq DESC" if newest else "seq"
        sql = f"{_COMMAND_SELECT} WHERE {' AND '.join(conditions)} ORDER BY {order} LIMIT ?"
        rows = await self._run(
            lambda conn: conn.execute(sql, (*params, after_seq, limit)).fetchall()
        )
        return [command_from_row(row) for row in rows]

    async def queued(self, device: str, *, limit: int | None = None) -> builtins.list[Command]:
        device = check_str("device", device)
        limit = check_optional_limit(limit)
        sql = (
            f"{_COMMAND_SELECT} WHERE device = ? AND state = ? ORDER BY priority DESC, seq LIMIT ?"
        )
        params = (device, _QUEUED, -1 if limit is None else limit)
        rows = await self._run(lambda conn: conn.execute(sql, params).fetchall())
        return [command_from_row(row) for row in rows]

    async def devices_with_queued(self) -> builtins.list[str]:
        sql = "SELECT DISTINCT device FROM commands WHERE state = ? ORDER BY device"
        rows = await self._run(lambda conn: conn.execute(sql, (_QUEUED,)).fetchall())
        return [row[0] for row in rows]

    async def count(
        self, *, device: str | None = None, states: Collection[CommandState] | None = None
    ) -> int:
        where = self._where(device, states)
        if where is None:
            self._check_usable()
            return 0
        conditions, params = where
        sql = "SELECT count(*) FROM commands"
        if conditions:
            sql += f" WHERE {' AND '.join(conditions)}"
        count: int = await self._run(lambda conn: conn.execute(sql, params).fetchone()[0])
        return count

    async def next_expiry(self) -> float | None:
        sql = (
            "SELECT min(expires_at) FROM commands WHERE state = 'queued' AND expires_at IS NOT NULL"
        )
        value = await self._run(lambda conn: conn.execute(sql).fetchone()[0])
        return None if value is None else float(value)

    async def due(self, *, now: float, limit: int = 1000) -> builtins.list[Command]:
        now = check_real("now", now)
        limit = check_limit(limit)
        sql = (
            f"{_COMMAND_SELECT} WHERE state = 'queued' AND expires_at IS NOT NULL "
            "AND expires_at <= ? ORDER BY expires_at, seq LIMIT ?"
        )
        rows = await self._run(lambda conn: conn.execute(sql, (now, limit)).fetchall())
        return [command_from_row(row) for row in rows]

    async def recover(self, *, now: float) -> builtins.list[Command]:
        now = check_real("now", now)

        def work(conn: sqlite3.Connection) -> builtins.list[Command]:
            rows = conn.execute(
                f"{_COMMAND_SELECT} WHERE state = ? ORDER BY seq", (_SENDING,)
            ).fetchall()
            changed = [recovered(command_from_row(row), now=now) for row in rows]
            for command in changed:
                values = command_values(command)
                conn.execute(_COMMAND_UPDATE, (*values[1:], values[0], _SENDING))
            return changed

        return await self._run(lambda conn: _write(conn, work))

    # ------------------------------------------------------------------ devices

    async def ids_with_prefix(self, prefix: str, *, limit: int = 10) -> builtins.list[str]:
        low, high = id_prefix_bounds(prefix)
        limit = check_limit(limit)
        # A range scan of the ids' unique index; the prefix test keeps exactly the matches.
        sql = "SELECT id FROM commands WHERE id >= ?"
        params: list[Any] = [low]
        if high is not None:
            sql += " AND id < ?"
            params.append(high)
        sql += " AND substr(id, 1, ?) = ? ORDER BY id LIMIT ?"
        params += [len(low), low, limit]
        rows = await self._run(lambda conn: conn.execute(sql, params).fetchall())
        return [row[0] for row in rows]

    async def get_device(self, device: str) -> DeviceRecord | None:
        sql = f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE device = ?"
        params = (check_str("device", device),)
        row = await self._run(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else device_from_row(row)
