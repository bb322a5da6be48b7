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

The pieces: the schema and connection set-up (``_sqlite_schema``), the batch commit that
runs on the worker thread (``_sqlite_batch``), the worker thread itself
(``_sqlite_worker``), and here the store's face: lifecycle, hand-in, and reads.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sqlite3
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final, TypeVar

from keeplink._core.commands import Command, CommandState, DeviceRecord
from keeplink._core.errors import ConfigError
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
    id_prefix_bounds,
    state_values,
)
from keeplink.outbox._sqlite_batch import (
    COMMAND_UPDATE,
    MAX_BATCH_WRITES,
    Job,
    raw_results,
)
from keeplink.outbox._sqlite_schema import (
    BUSY_TIMEOUT_MS,
    MIGRATIONS,
    SCHEMA_VERSION,
    enable_wal,
    migrate,
    too_new,
    user_version,
    write_transaction,
)
from keeplink.outbox._sqlite_worker import Worker
from keeplink.outbox._writes import (
    Write,
    WriteResult,
    encode_writes,
    recovered,
)

__all__ = ["MAX_BATCH_WRITES", "MIGRATIONS", "SCHEMA_VERSION", "SqliteStore"]

_T = TypeVar("_T")

HAND_IN_CHUNK: Final = 16
"""Jobs gathered on the event loop before the worker gets them even mid-iteration: when
many writers wake together, the worker commits the first ones while the loop prepares the
rest, so disk and interpreter work overlap instead of taking turns."""

SYNCHRONOUS_MODES: Final = ("FULL", "NORMAL")
URL_PREFIX: Final = "sqlite:///"

_COMMAND_SELECT: Final = f"SELECT {', '.join(COMMAND_COLUMNS)} FROM commands"
_QUEUED: Final = CommandState.QUEUED.value
_SENDING: Final = CommandState.SENDING.value


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
        self._worker: Worker | None = None
        self._outgoing: list[Job] = []  # handed to the worker at the end of this iteration

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
            version = user_version(conn)  # first, before anything could write
            if version > SCHEMA_VERSION:
                raise too_new(version)
            journal = enable_wal(conn)
            if str(journal).lower() != "wal" and self.path != ":memory:":
                raise ConfigError(f"sqlite store {self.path!r}: cannot use WAL (got {journal})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError(f"sqlite store {self.path!r}: cannot open: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_usable(self) -> Worker:
        if self._status != "open" or self._worker is None:
            raise RuntimeError(
                "store is closed" if self._status == "closed" else "store is not open"
            )
        return self._worker

    def _hand_in(self, job: Job) -> None:
        """Queue ``job`` for the worker; the queue goes to it once this iteration ends."""
        worker = self._check_usable()
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush, worker)
        self._outgoing.append(job)
        if len(self._outgoing) >= HAND_IN_CHUNK:
            self._flush(worker)

    def _flush(self, worker: Worker) -> None:
        jobs, self._outgoing = self._outgoing, []
        if jobs:
            worker.submit(jobs)

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work(connection)`` on the worker thread."""
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._hand_in(Job(future=future, call=work))
        return await future

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        async with self._lock:
            if self._status == "open":
                return
            if self._status == "closed":
                raise RuntimeError("store is closed")
            worker = Worker(asyncio.get_running_loop(), self._connect)
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
        self._hand_in(Job(future=future, writes=encoded))
        return raw_results(encoded, await future)

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
                conn.execute(COMMAND_UPDATE, (*values[1:], values[0], _SENDING))
            return changed

        return await self._run(lambda conn: write_transaction(conn, work))

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
