"""The SQLite store's one worker thread: it owns the connection and runs every job."""

from __future__ import annotations

import asyncio
import builtins
import collections
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from keeplink.outbox._sqlite_batch import (
    MAX_BATCH_WRITES,
    Answer,
    Job,
    commit_batch,
    resolve,
)
from keeplink.outbox._sqlite_schema import (
    typed_error,
)


class Worker:
    """The store's one thread: it owns the connection and runs every job, writes grouped.

    Jobs reach it in lists: the event loop side gathers what its coroutines hand in during
    one loop iteration (:meth:`SqliteStore._flush` runs at the end of it, with no timer),
    so writers woken together by one commit join the next one together.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, connect: Callable[[], Any]) -> None:
        self._loop = loop
        self._connect = connect
        self._inbox: queue.SimpleQueue[builtins.list[Job] | None] = queue.SimpleQueue()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.stopped: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._main, name="keeplink-sqlite", daemon=True)
        self._thread.start()

    def submit(self, jobs: builtins.list[Job]) -> None:
        self._inbox.put(jobs)

    def stop(self) -> None:
        """Run what was submitted, then close the connection and end the thread."""
        self._inbox.put(None)

    def join(self) -> None:
        self._thread.join()

    def _post(self, answers: builtins.list[Answer]) -> None:
        if answers:
            try:
                self._loop.call_soon_threadsafe(resolve, answers)
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
            backlog: collections.deque[Job] = collections.deque()
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

    def _round(self, conn: sqlite3.Connection, backlog: collections.deque[Job]) -> None:
        """One write batch (at most MAX_BATCH_WRITES writes, whole calls), then the calls
        that were waiting; what is left stays in ``backlog`` for the next round."""
        batch: builtins.list[Job] = []
        calls: builtins.list[Job] = []
        size = 0
        keep: collections.deque[Job] = collections.deque()
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
        answers: builtins.list[Answer] = []
        for job in calls:
            assert job.call is not None
            try:
                answers.append((job.future, True, job.call(conn)))
            except sqlite3.Error as exc:
                answers.append((job.future, False, typed_error(exc)))
            except BaseException as exc:  # noqa: BLE001 - raised by the caller
                answers.append((job.future, False, exc))
        self._post(answers)

    @staticmethod
    def _run_batch(conn: sqlite3.Connection, batch: builtins.list[Job]) -> builtins.list[Answer]:
        try:
            return commit_batch(conn, batch)
        except sqlite3.Error as exc:
            if len(batch) == 1:
                return [(batch[0].future, False, typed_error(exc))]
        # A failed batch of several calls: each call again in its own transaction, so an
        # error belongs to the call that caused it (a lock timeout fails each alike).
        answers: builtins.list[Answer] = []
        for job in batch:
            try:
                answers.extend(commit_batch(conn, [job]))
            except sqlite3.Error as exc:
                answers.append((job.future, False, typed_error(exc)))
        return answers
