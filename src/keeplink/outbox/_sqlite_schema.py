"""The SQLite store's schema and connection: the migrations, how a database is switched to WAL
and brought up to date, one immediate transaction, and the errors a caller gets."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Final, TypeVar

from keeplink._core.errors import ConfigError, StoreBusyError

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


BUSY_TIMEOUT_MS: Final = 5000


def split_statements(script: str) -> list[str]:
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


def user_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def too_new(version: int) -> ConfigError:
    return ConfigError(
        f"database schema version {version} is newer than this keeplink ({SCHEMA_VERSION}); "
        "upgrade keeplink"
    )


def write_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]) -> _T:
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


def typed_error(exc: sqlite3.Error) -> BaseException:
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


def enable_wal(conn: sqlite3.Connection) -> str:
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


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the missing migrations, one transaction each (safe against a concurrent
    opener: the version is read again under the write lock)."""
    while user_version(conn) < SCHEMA_VERSION:

        def step(conn: sqlite3.Connection) -> None:
            version = user_version(conn)
            if version > SCHEMA_VERSION:
                raise too_new(version)
            if version == SCHEMA_VERSION:
                return
            for statement in split_statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")

        write_transaction(conn, step)
