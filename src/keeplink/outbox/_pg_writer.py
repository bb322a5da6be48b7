"""Group commit for the PostgreSQL store: one writer task takes every call that is waiting
when it becomes free (at most ``MAX_BATCH_WRITES`` writes) and commits them together, in a
few statements whatever the batch's size, each call answered after its commit."""

from __future__ import annotations

import asyncio
import builtins
import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from keeplink._core.errors import FencedError
from keeplink.outbox._pg_base import connection_errors, unavailable
from keeplink.outbox._pg_sql import (
    CAS_MANY,
    CURRENT_FENCES,
    DEVICES_MANY,
    INSERT_COLUMNS,
    INSERT_MANY,
    INSERT_ONE,
    INSERT_SUBMITS,
    NOTIFY,
    SUPERSEDE,
    UPDATE_COLUMNS,
)
from keeplink.outbox._rows import DEVICE_COLUMNS, duplicate_id
from keeplink.outbox._writes import EncodedWrite

_log = logging.getLogger("keeplink.outbox.postgres")

MAX_BATCH_WRITES: Final = 1024
"""The most writes one transaction takes (whole calls): bounded, so a caller's wait is."""


def _columns(rows: Sequence[Sequence[Any]], width: int) -> builtins.list[builtins.list[Any]]:
    """Rows as one list a column (what ``unnest`` takes)."""
    return [[row[i] for row in rows] for i in range(width)]


@dataclass(slots=True)
class _Job:
    future: asyncio.Future[builtins.list[Any]]
    writes: builtins.list[EncodedWrite] = field(default_factory=builtins.list)


def _submits_only(batch: builtins.list[_Job]) -> bool:
    """Whether every call in ``batch`` is one unfenced insert, no two of the same id."""
    ids = set()
    for job in batch:
        if len(job.writes) != 1:
            return False
        write = job.writes[0]
        if write.kind != "insert" or write.fence is not None or write.values[0] in ids:
            return False
        ids.add(write.values[0])
    return True


class GroupWriter:
    """The store's one writer task and the calls waiting for it.

    :meth:`submit` hands a call's encoded writes in; the future it returns is answered
    after the commit that holds them. :meth:`stop` lets the writer commit what it was
    handed, then end.
    """

    def __init__(self, *, name: str, channel: str) -> None:
        self._name = name
        self._channel = channel  # every committed submit is announced on it
        self._pool: Any = None
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self, pool: Any) -> None:
        """Commit through ``pool`` from now on, in a task of its own."""
        self._pool = pool
        self._task = asyncio.get_running_loop().create_task(self._write_loop(), name=self._name)

    def submit(self, writes: builtins.list[EncodedWrite]) -> asyncio.Future[builtins.list[Any]]:
        """Hand a call's writes in; its future gets their raw results (or the error)."""
        future: asyncio.Future[builtins.list[Any]] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(future, writes))
        self._wake.set()
        return future

    async def stop(self) -> None:
        """Commit what was handed in, then end the writer."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._jobs:
                batch: builtins.list[_Job] = []
                size = 0
                while self._jobs and (
                    not batch or size + len(self._jobs[0].writes) <= MAX_BATCH_WRITES
                ):
                    job = self._jobs.popleft()
                    if not job.future.cancelled():  # cancelled before its batch: not written
                        batch.append(job)
                        size += len(job.writes)
                if batch:
                    try:
                        await self.commit(batch)
                    except Exception as exc:  # noqa: BLE001 - the writer must not die
                        # Not a connection problem (those are answered in commit): a bug
                        # or a database error nobody expected. Logged with its traceback;
                        # this batch's callers get the error; the writer goes on.
                        _log.exception("postgres store: a batch of %d calls failed", len(batch))
                        for job in batch:
                            if not job.future.done():
                                job.future.set_exception(exc)
            if self._stopping:
                return

    async def commit(self, batch: builtins.list[_Job]) -> None:
        """Commit ``batch`` (in one statement or one transaction) and answer its calls."""
        import asyncpg

        answers: builtins.list[tuple[_Job, bool, Any]]
        try:
            async with self._pool.acquire() as conn:
                try:
                    if len(batch) == 1 and [w.kind for w in batch[0].writes] == ["insert"]:
                        answers = await self._insert_alone(conn, batch[0])
                    elif _submits_only(batch):
                        answers = await self._insert_submits(conn, batch)
                    else:
                        async with conn.transaction():
                            answers = await self._bulk(conn, batch)
                except asyncpg.UniqueViolationError:
                    # An id inserted meanwhile by another node: each call on its own.
                    answers = []
                    for job in batch:
                        answers.extend(await self._calls(conn, [job]))
        except connection_errors() as exc:
            _log.debug("postgres store: a batch of %d calls failed: %s", len(batch), exc)
            answers = [(job, False, unavailable(exc)) for job in batch]
        for job, ok, value in answers:
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    async def _insert_alone(self, conn: Any, job: _Job) -> builtins.list[tuple[_Job, bool, Any]]:
        """A lone submit: one statement (insert, unless the id exists, and notify), its
        own transaction: one round trip where a batch takes five."""
        values = job.writes[0].values
        row = await conn.fetchrow(INSERT_ONE, self._channel, *values)
        if row is None:
            return [(job, False, duplicate_id(values[0]))]
        return [(job, True, [row[0]])]

    async def _insert_submits(
        self, conn: Any, batch: builtins.list[_Job]
    ) -> builtins.list[tuple[_Job, bool, Any]]:
        """A batch of submits and nothing else: one statement, one round trip (a mixed
        batch takes five: begin, the duplicate check, the writes, the notification,
        commit). A submit whose id exists is refused; the others are written."""
        rows = [job.writes[0].values for job in batch]
        returned = await conn.fetch(
            INSERT_SUBMITS, self._channel, *_columns(rows, len(INSERT_COLUMNS))
        )
        seqs = {row[0]: row[1] for row in returned}
        return [
            (job, True, [seqs[values[0]]])
            if values[0] in seqs
            else (job, False, duplicate_id(values[0]))
            for job, values in zip(batch, rows, strict=True)
        ]

    async def _calls(
        self, conn: Any, jobs: builtins.list[_Job]
    ) -> builtins.list[tuple[_Job, bool, Any]]:
        """Each call in its own transaction, in order; a duplicate id refuses its call."""
        import asyncpg

        answers: builtins.list[tuple[_Job, bool, Any]] = []
        for job in jobs:
            try:
                async with conn.transaction():
                    answers.extend(await self._bulk(conn, [job]))
            except asyncpg.UniqueViolationError:
                ids = [w.values[0] for w in job.writes if w.kind == "insert"]
                answers.append((job, False, duplicate_id(ids[0] if ids else "?")))
        return answers

    async def _bulk(
        self, conn: Any, jobs: builtins.list[_Job]
    ) -> builtins.list[tuple[_Job, bool, Any]]:
        """The calls' writes in a few statements, inside the caller's transaction. Calls
        whose inserts name existing ids are refused (and none of their writes is made);
        if two writes touch one command, the calls run one at a time, in order."""
        inserted = [w.values[0] for job in jobs for w in job.writes if w.kind == "insert"]
        existing = set()
        if inserted:
            rows = await conn.fetch("SELECT id FROM commands WHERE id = ANY($1::text[])", inserted)
            existing = {row[0] for row in rows}
        answers: builtins.list[tuple[_Job, bool, Any]] = []
        kept: builtins.list[_Job] = []
        seen: set[str] = set()
        for job in jobs:
            ids = [w.values[0] for w in job.writes if w.kind == "insert"]
            clash = next((i for i in ids if i in existing or i in seen), None)
            if clash is not None:
                answers.append((job, False, duplicate_id(clash)))
                continue
            seen.update(ids)
            kept.append(job)
        kept = await self._fenced(conn, kept, answers)
        touched = [
            w.values[0] for job in kept for w in job.writes if w.kind in ("insert", "update")
        ]
        if len(set(touched)) != len(touched) and len(kept) > 1:
            for job in kept:  # their order matters: savepoints, one call after another
                async with conn.transaction():
                    answers.extend(await self._bulk(conn, [job]))
            return answers
        results: builtins.list[builtins.list[Any]] = [[None] * len(job.writes) for job in kept]
        places: dict[str, builtins.list[tuple[int, int, EncodedWrite]]] = {
            "insert": [],
            "update": [],
            "supersede": [],
        }
        devices: dict[str, tuple[Any, ...]] = {}
        for j, job in enumerate(kept):
            for w, write in enumerate(job.writes):
                if write.kind == "device":
                    devices[write.values[0]] = write.values
                else:
                    places[write.kind].append((j, w, write))
        if places["insert"]:
            rows = [write.values for _, _, write in places["insert"]]
            returned = await conn.fetch(INSERT_MANY, *_columns(rows, len(INSERT_COLUMNS)))
            seqs = {row[0]: row[1] for row in returned}
            for j, w, write in places["insert"]:
                results[j][w] = seqs[write.values[0]]
            # Wake the devices' owners, wherever they run: delivered at commit, not before.
            await conn.execute(NOTIFY, self._channel, sorted({row[1] for row in rows}))
        if places["update"]:
            rows = [
                (write.values[0], write.expect, *write.values[1:])
                for _, _, write in places["update"]
            ]
            returned = await conn.fetch(CAS_MANY, *_columns(rows, 2 + len(UPDATE_COLUMNS)))
            written = {row[0] for row in returned}
            for j, w, write in places["update"]:
                results[j][w] = write.values[0] in written
        for j, w, write in places["supersede"]:
            results[j][w] = [tuple(row) for row in await conn.fetch(SUPERSEDE, *write.values)]
        if devices:
            await conn.execute(DEVICES_MANY, *_columns(list(devices.values()), len(DEVICE_COLUMNS)))
        answers.extend((job, True, result) for job, result in zip(kept, results, strict=True))
        return answers

    @staticmethod
    async def _fenced(
        conn: Any, jobs: builtins.list[_Job], answers: builtins.list[tuple[_Job, bool, Any]]
    ) -> builtins.list[_Job]:
        """The calls whose fences are current; the others are refused with FencedError.

        The current lease rows are locked (``FOR SHARE``) until this transaction ends, so a
        takeover, which updates them, waits for these writes and then sees them; a
        takeover that committed first has changed the epoch, and the write is refused.
        """
        fences = {w.fence for job in jobs for w in job.writes if w.fence is not None}
        if not fences:
            return jobs
        devices, nodes, epochs = (list(column) for column in zip(*fences, strict=True))
        rows = await conn.fetch(CURRENT_FENCES, devices, nodes, epochs)
        current = {(row[0], row[1], row[2]) for row in rows}
        kept: builtins.list[_Job] = []
        for job in jobs:
            stale = next(
                (w.fence for w in job.writes if w.fence is not None and w.fence not in current),
                None,
            )
            if stale is None:
                kept.append(job)
                continue
            device, node, epoch = stale
            answers.append(
                (
                    job,
                    False,
                    FencedError(
                        f"node {node!r} no longer holds device {device!r} "
                        f"(lease epoch {epoch} is not current)"
                    ),
                )
            )
        return kept
