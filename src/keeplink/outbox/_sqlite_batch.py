"""Group commit for the SQLite store: a batch of write calls committed in one transaction,
in as few statements as its writes allow. The commit runs on the worker thread;
:func:`resolve` and :func:`raw_results` run on the event loop."""

from __future__ import annotations

import asyncio
import builtins
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from keeplink._core.errors import InvalidRequestError
from keeplink.outbox._rows import (
    COMMAND_COLUMNS,
    DEVICE_COLUMNS,
    command_from_row,
    duplicate_id,
)
from keeplink.outbox._writes import (
    EncodedWrite,
    WriteResult,
)

MAX_BATCH_WRITES: Final = 1024
"""The most writes one transaction takes: a large batch amortises an fsync, a bounded one
keeps any caller's wait (and the write lock other processes wait on) short."""


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
COMMAND_UPDATE: Final = (
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


@dataclass(slots=True)
class Job:
    """Work for the worker thread: a write call (``writes``) or any other call (``call``)."""

    future: asyncio.Future[Any]
    writes: builtins.list[EncodedWrite] = field(default_factory=builtins.list)
    call: Callable[[sqlite3.Connection], Any] | None = None


Answer = tuple[asyncio.Future[Any], bool, Any]


def resolve(answers: builtins.list[Answer]) -> None:
    """On the event loop: answer every job of a batch (one loop wake-up per batch)."""
    for future, ok, value in answers:
        if future.done():
            continue  # its caller was cancelled meanwhile
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def write_job(conn: sqlite3.Connection, writes: builtins.list[EncodedWrite]) -> Any:
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
            cursor = conn.execute(COMMAND_UPDATE, (*values[1:], values[0], write.expect))
            results.append(cursor.rowcount == 1)
        elif write.kind == "supersede":
            results.append(conn.execute(_SUPERSEDE, values).fetchall())
        else:
            conn.execute(_DEVICE_UPSERT, values)
            results.append(None)
    return results


def commit_batch(conn: sqlite3.Connection, jobs: builtins.list[Job]) -> builtins.list[Answer]:
    """Commit the write calls ``jobs`` in one transaction; what to answer each.

    Each call of several writes runs under its own savepoint, so a refused call rolls back
    alone. If the transaction itself fails (the database is locked, the disk is full),
    this raises and nothing of the batch is written.
    """
    answers: builtins.list[Answer] = []
    if len(jobs) == 1 and len(jobs[0].writes) == 1 and jobs[0].writes[0].kind != "supersede":
        # One statement alone is its own transaction (autocommit), committed and synced
        # as it runs: no BEGIN and COMMIT around it (a lone writer, as sequential submits
        # are, pays per statement).
        job = jobs[0]
        try:
            return [(job.future, True, write_job(conn, job.writes))]
        except InvalidRequestError as exc:
            return [(job.future, False, exc)]
    conn.execute("BEGIN IMMEDIATE")
    try:
        bulk = commit_bulk(conn, jobs)
        if bulk is not None:
            conn.execute("COMMIT")
            return bulk
        run: builtins.list[Job] = []  # consecutive one-insert calls: one statement for all
        for job in jobs:
            if len(job.writes) == 1 and job.writes[0].kind == "insert":
                run.append(job)
                continue
            answers.extend(insert_run(conn, run))
            run = []
            if len(job.writes) == 1:
                # One statement is atomic by itself: no savepoint needed.
                try:
                    answers.append((job.future, True, write_job(conn, job.writes)))
                except InvalidRequestError as exc:
                    answers.append((job.future, False, exc))
                continue
            conn.execute("SAVEPOINT call")
            try:
                result = write_job(conn, job.writes)
            except InvalidRequestError as exc:
                conn.execute("ROLLBACK TO call")
                answers.append((job.future, False, exc))
            else:
                answers.append((job.future, True, result))
            conn.execute("RELEASE call")
        answers.extend(insert_run(conn, run))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return answers


def commit_bulk(conn: sqlite3.Connection, jobs: builtins.list[Job]) -> builtins.list[Answer] | None:
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


def insert_run(conn: sqlite3.Connection, run: builtins.list[Job]) -> builtins.list[Answer]:
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
    answers: builtins.list[Answer] = []
    for job in run:
        try:
            answers.append((job.future, True, write_job(conn, job.writes)))
        except InvalidRequestError as exc:
            answers.append((job.future, False, exc))
    return answers


def raw_results(
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
