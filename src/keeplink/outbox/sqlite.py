"""The embedded command store: SQLite (stdlib ``sqlite3``) in WAL mode.

Every sqlite call runs on one dedicated worker thread (``keeplink-sqlite``), where the
connection is created and closed, so the event loop never waits on an fsync. The single
worker also serialises all operations of a store. Every write is one transaction
(``BEGIN IMMEDIATE`` … ``COMMIT``), committed before its coroutine returns; with the
default ``synchronous=FULL`` a returned write survives a power cut, with ``NORMAL`` it
survives a crash of the process (not of the machine).

A write whose coroutine is cancelled may still commit if the worker had already started
it; one that had not started yet is not written.

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
import os
import sqlite3
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from keeplink._core.commands import Command, CommandState, DeviceRecord
from keeplink._core.errors import ConfigError, InvalidRequestError
from keeplink.outbox.store import (
    COMMAND_COLUMNS,
    DEVICE_COLUMNS,
    check_after_seq,
    check_device_filter,
    check_limit,
    check_real,
    check_str,
    command_from_row,
    command_values,
    device_from_row,
    device_values,
    new_command_values,
    recovered,
    state_value,
    state_values,
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
]
"""Schema scripts; ``PRAGMA user_version`` counts how many a database has applied."""

SCHEMA_VERSION: Final = len(MIGRATIONS)
"""The schema version this code writes."""

SYNCHRONOUS_MODES: Final = ("FULL", "NORMAL")
BUSY_TIMEOUT_MS: Final = 5000
URL_PREFIX: Final = "sqlite:///"

_COMMAND_SELECT: Final = f"SELECT {', '.join(COMMAND_COLUMNS)} FROM commands"
_COMMAND_INSERT: Final = (
    f"INSERT INTO commands ({', '.join(COMMAND_COLUMNS[1:])}) "
    f"VALUES ({', '.join('?' * len(COMMAND_COLUMNS[1:]))})"
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


def _close_result_of(job: Future[sqlite3.Connection]) -> None:
    """Close the connection ``job`` opened, if it opened one (it has finished by now)."""
    if not job.cancelled() and job.exception() is None:
        job.result().close()


class SqliteStore:
    """A :class:`~keeplink.outbox.store.CommandStore` in an SQLite file.

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
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # only ever used on the worker thread

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

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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

    def _check_usable(self) -> None:
        if self._status != "open":
            raise RuntimeError(
                "store is closed" if self._status == "closed" else "store is not open"
            )

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work(connection)`` on the worker thread."""
        self._check_usable()
        conn = self._conn  # bound now: close() clears self._conn while this may still wait
        assert conn is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, work, conn)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        async with self._lock:
            if self._status == "open":
                return
            if self._status == "closed":
                raise RuntimeError("store is closed")
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keeplink-sqlite")
            job = executor.submit(self._connect)
            try:
                conn = await asyncio.wrap_future(job)
            except BaseException:
                # Failed, or cancelled while connecting: close what it opens once it is done.
                executor.submit(_close_result_of, job)
                executor.shutdown(wait=job.done())
                raise
            self._executor, self._conn = executor, conn
            self._status = "open"

    async def close(self) -> None:
        async with self._lock:
            if self._status == "closed":
                return
            self._status = "closed"
            executor, self._executor = self._executor, None
            conn, self._conn = self._conn, None
            if executor is None or conn is None:
                return  # never opened
            # Runs after every operation already submitted; nothing new can be submitted.
            job = executor.submit(conn.close)
            try:
                await asyncio.shield(asyncio.wrap_future(job))
            finally:
                # If close() itself is cancelled the worker still closes the connection,
                # then exits; otherwise it is idle now and joins at once.
                executor.shutdown(wait=job.done())

    # ------------------------------------------------------------------ commands

    async def insert(self, command: Command) -> Command:
        values = new_command_values(command)

        def work(conn: sqlite3.Connection) -> int:
            if conn.execute("SELECT 1 FROM commands WHERE id = ?", (values[0],)).fetchone():
                raise InvalidRequestError(f"command {values[0]} already exists")
            seq = conn.execute(_COMMAND_INSERT, values).lastrowid
            assert seq is not None
            return seq

        seq = await self._run(lambda conn: _write(conn, work))
        return command_from_row((seq, *values))

    async def update(self, command: Command, *, expect: CommandState) -> bool:
        values = command_values(command)
        params = (*values[1:], values[0], state_value(expect))

        def work(conn: sqlite3.Connection) -> bool:
            return conn.execute(_COMMAND_UPDATE, params).rowcount == 1

        return await self._run(lambda conn: _write(conn, work))

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
    ) -> builtins.list[Command]:
        limit = check_limit(limit)
        after_seq = check_after_seq(after_seq)
        where = self._where(device, states)
        if where is None:
            self._check_usable()
            return []
        conditions, params = where
        conditions.append("seq > ?")
        sql = f"{_COMMAND_SELECT} WHERE {' AND '.join(conditions)} ORDER BY seq LIMIT ?"
        rows = await self._run(
            lambda conn: conn.execute(sql, (*params, after_seq, limit)).fetchall()
        )
        return [command_from_row(row) for row in rows]

    async def queued(self, device: str) -> builtins.list[Command]:
        device = check_str("device", device)
        sql = f"{_COMMAND_SELECT} WHERE device = ? AND state = ? ORDER BY priority DESC, seq"
        rows = await self._run(lambda conn: conn.execute(sql, (device, _QUEUED)).fetchall())
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

    async def get_device(self, device: str) -> DeviceRecord | None:
        sql = f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE device = ?"
        params = (check_str("device", device),)
        row = await self._run(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else device_from_row(row)

    async def put_device(self, record: DeviceRecord) -> None:
        values = device_values(record)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(_DEVICE_UPSERT, values)

        await self._run(lambda conn: _write(conn, work))
