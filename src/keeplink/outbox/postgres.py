"""The shared command store: PostgreSQL through asyncpg, group-committed.

Several gateway nodes can share one database. :class:`PostgresStore` keeps the same records
as the SQLite store, encoded the same way (JSON as text, so a record read back equals the
one written, field by field), and passes the same conformance suite.

Group commit: :meth:`PostgresStore.apply` hands its writes to the store's one writer task.
The writer takes every call that is waiting when it becomes free (at most
``MAX_BATCH_WRITES`` writes) and commits them in one transaction: all inserts in one
statement, all compare-and-set updates in one, all device records in one, so a batch costs
a few round trips whatever its size. Each call is answered after the commit that holds it.
A call whose insert names an existing id is refused alone; the others are committed.

Failures: a broken connection or a database that is down fails the calls of that batch
with :class:`~keeplink.StoreUnavailableError` (nothing of the batch was written, or, if
the connection broke during ``COMMIT``, the outcome is unknown to PostgreSQL's client and
the compare-and-set of the next attempt finds out). The pool opens new connections as they
are needed, so the store works again as soon as the database does.

Schema: ``MIGRATIONS`` in the configured schema (``keeplink`` by default), counted in a
``schema_version`` table, applied under an advisory lock so concurrent nodes migrate once.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from keeplink._core.commands import Command, CommandState, DeviceRecord
from keeplink._core.errors import ConfigError, FencedError, StoreUnavailableError
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

__all__ = ["MAX_BATCH_WRITES", "MIGRATIONS", "SCHEMA_VERSION", "PostgresStore"]

_log = logging.getLogger("keeplink.outbox.postgres")

MIGRATIONS: Final[list[str]] = [
    # 1: the initial schema (the SQLite store's version 3, with partial indexes).
    """
    CREATE TABLE commands (
        seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id                TEXT NOT NULL UNIQUE,
        device            TEXT NOT NULL,
        op                TEXT NOT NULL,
        args              TEXT NOT NULL,
        state             TEXT NOT NULL,
        created_at        DOUBLE PRECISION NOT NULL,
        updated_at        DOUBLE PRECISION NOT NULL,
        idempotency_key   TEXT NOT NULL,
        key               TEXT,
        priority          BIGINT NOT NULL,
        max_attempts      BIGINT NOT NULL,
        attempts          BIGINT NOT NULL,
        expires_at        DOUBLE PRECISION,
        precondition      TEXT,
        precondition_args TEXT NOT NULL,
        error_code        TEXT,
        error_message     TEXT,
        result            TEXT,
        cycle             BIGINT NOT NULL,
        retry_at          DOUBLE PRECISION,
        CHECK ((error_code IS NULL) = (error_message IS NULL))
    );
    CREATE INDEX commands_queue ON commands (device, priority DESC, seq)
        WHERE state = 'queued';
    CREATE INDEX commands_sending ON commands (device) WHERE state = 'sending';
    CREATE INDEX commands_key ON commands (device, key)
        WHERE state = 'queued' AND key IS NOT NULL;
    CREATE INDEX commands_expiry ON commands (expires_at)
        WHERE state = 'queued' AND expires_at IS NOT NULL;
    CREATE INDEX commands_device ON commands (device, seq);
    CREATE INDEX commands_state ON commands (state, seq);
    CREATE TABLE devices (
        device        TEXT PRIMARY KEY,
        cycle         BIGINT NOT NULL,
        failed_cycles BIGINT NOT NULL,
        parked_reason TEXT,
        parked_until  DOUBLE PRECISION,
        failed_cycle  BIGINT NOT NULL
    );
    """,
    # 2: nodes of a fleet and the device leases they hold (with their fencing epochs).
    """
    CREATE TABLE nodes (
        node     TEXT PRIMARY KEY,
        seen_at  TIMESTAMPTZ NOT NULL,
        stopping BOOLEAN NOT NULL DEFAULT false
    );
    CREATE TABLE leases (
        device     TEXT PRIMARY KEY,
        node       TEXT,                      -- NULL: released
        epoch      BIGINT NOT NULL,           -- +1 at every change of owner
        expires_at TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX leases_node ON leases (node);
    """,
    # 3: what each owner says of its devices (presence, link), for the other nodes' views.
    """
    CREATE TABLE device_status (
        device     TEXT PRIMARY KEY,
        node       TEXT NOT NULL,
        status     TEXT NOT NULL,             -- JSON object
        updated_at TIMESTAMPTZ NOT NULL
    );
    """,
]
"""Schema scripts; ``schema_version`` counts how many a database has applied."""

SCHEMA_VERSION: Final = len(MIGRATIONS)
MAX_BATCH_WRITES: Final = 1024
"""The most writes one transaction takes (whole calls): bounded, so a caller's wait is."""
POOL_SIZE: Final = 4
"""Connections: one for the writer, the rest for reads, which need not wait for it."""
NOTIFY_MAX: Final = 7900
"""PostgreSQL refuses a notification payload of 8000 bytes or more."""
MIGRATION_LOCK: Final = 0x6B6C_696E_6B00  # "klink": one advisory lock for all migrations
CONNECT_TIMEOUT_S: Final = 10.0
COMMAND_TIMEOUT_S: Final = 30.0
"""A statement that has not answered by then (a lock held by a stuck transaction, a
database that stopped answering) fails as store_unavailable instead of waiting forever."""

_COLUMN_TYPES: Final = {
    "seq": "bigint",
    "created_at": "float8",
    "updated_at": "float8",
    "priority": "bigint",
    "max_attempts": "bigint",
    "attempts": "bigint",
    "expires_at": "float8",
    "cycle": "bigint",
    "retry_at": "float8",
    "failed_cycles": "bigint",
    "failed_cycle": "bigint",
    "parked_until": "float8",
}


def _type(column: str) -> str:
    return _COLUMN_TYPES.get(column, "text")


_COLUMNS: Final = ", ".join(COMMAND_COLUMNS)
_INSERT_COLUMNS: Final = COMMAND_COLUMNS[1:]
_INSERT_MANY: Final = (
    f"INSERT INTO commands ({', '.join(_INSERT_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${n + 1}::{_type(c)}[]" for n, c in enumerate(_INSERT_COLUMNS))
    + ") RETURNING id, seq"
)
_INSERT_ONE: Final = (
    f"WITH ins AS (INSERT INTO commands ({', '.join(_INSERT_COLUMNS)}) SELECT "
    + ", ".join(f"${n + 2}::{_type(c)}" for n, c in enumerate(_INSERT_COLUMNS))
    + " WHERE NOT EXISTS (SELECT 1 FROM commands WHERE id = $2) RETURNING seq, device) "
    "SELECT seq, pg_notify($1, device) FROM ins"
)
"""A submit alone: inserted unless its id exists (then no row, and no seq used up), and its
device's owner notified at commit, in one statement."""
_INSERT_SUBMITS: Final = (
    f"WITH ins AS (INSERT INTO commands ({', '.join(_INSERT_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${n + 2}::{_type(c)}[]" for n, c in enumerate(_INSERT_COLUMNS))
    + ") ON CONFLICT (id) DO NOTHING RETURNING id, seq, device), "
    "woke AS (SELECT count(pg_notify($1, d)) FROM (SELECT DISTINCT device AS d FROM ins) AS t) "
    "SELECT ins.id, ins.seq FROM ins, woke"
)
"""Submits only (a batch of lone inserts with distinct ids): each inserted unless its id
exists, and the owners of their devices notified at commit, in one statement that is its
own transaction: one round trip for the whole batch."""
_UPDATE_COLUMNS: Final = COMMAND_COLUMNS[2:]
_CAS_MANY: Final = (
    "UPDATE commands AS c SET "
    + ", ".join(f"{column} = v.{column}" for column in _UPDATE_COLUMNS)
    + " FROM unnest($1::text[], $2::text[], "
    + ", ".join(f"${n + 3}::{_type(c)}[]" for n, c in enumerate(_UPDATE_COLUMNS))
    + f") AS v(id, expect, {', '.join(_UPDATE_COLUMNS)}) "
    "WHERE c.id = v.id AND c.state = v.expect RETURNING c.id"
)
_SUPERSEDE: Final = (
    "UPDATE commands SET state = $5, updated_at = $4, error_code = $6, error_message = $7, "
    "retry_at = NULL WHERE device = $1 AND key = $2 AND state = 'queued' "
    "AND seq < (SELECT seq FROM commands WHERE id = $3) "
    f"RETURNING {_COLUMNS}"
)
_DEVICES_MANY: Final = (
    f"INSERT INTO devices ({', '.join(DEVICE_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${n + 1}::{_type(c)}[]" for n, c in enumerate(DEVICE_COLUMNS))
    + ") ON CONFLICT (device) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in DEVICE_COLUMNS[1:])
)
_SELECT: Final = f"SELECT {_COLUMNS} FROM commands"
_NOTIFY: Final = (
    "SELECT pg_notify($1, d) FROM unnest($2::text[]) WITH ORDINALITY AS t(d, n) ORDER BY n"
)
_CURRENT_FENCES: Final = (
    "SELECT l.device, l.node, l.epoch FROM leases AS l "
    "JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS f(device, node, epoch) "
    "ON l.device = f.device AND l.node = f.node AND l.epoch = f.epoch "
    "WHERE l.expires_at > clock_timestamp() FOR SHARE OF l"
)
_STATUS_UPSERT: Final = (
    "INSERT INTO device_status (device, node, status, updated_at) "
    "SELECT d, $1, s, clock_timestamp() FROM unnest($2::text[], $3::text[]) AS t(d, s) "
    "ON CONFLICT (device) DO UPDATE SET node = excluded.node, status = excluded.status, "
    "updated_at = excluded.updated_at"
)
_HEARTBEAT: Final = (
    "WITH me AS (INSERT INTO nodes (node, seen_at) VALUES ($1, clock_timestamp()) "
    "ON CONFLICT (node) DO UPDATE SET seen_at = excluded.seen_at, stopping = false) "
    "SELECT node FROM nodes WHERE NOT stopping "
    "AND seen_at > clock_timestamp() - make_interval(secs => $2) "
    "UNION SELECT $1"
)
_ACQUIRE: Final = (
    "INSERT INTO leases (device, node, epoch, expires_at) "
    "SELECT d, $1, 1, clock_timestamp() + make_interval(secs => $3) FROM unnest($2::text[]) AS d "
    "ON CONFLICT (device) DO UPDATE SET node = excluded.node, epoch = leases.epoch + 1, "
    "expires_at = excluded.expires_at "
    "WHERE leases.node IS NULL OR leases.expires_at <= clock_timestamp() "
    "RETURNING device, epoch"
)
_RENEW: Final = (
    "UPDATE leases AS l SET expires_at = clock_timestamp() + make_interval(secs => $4) "
    "FROM unnest($2::text[], $3::bigint[]) AS h(device, epoch) "
    "WHERE l.device = h.device AND l.epoch = h.epoch AND l.node = $1 "
    "AND l.expires_at > clock_timestamp() RETURNING l.device"
)
_RELEASE: Final = (
    "UPDATE leases AS l SET node = NULL, expires_at = clock_timestamp() "
    "FROM unnest($2::text[], $3::bigint[]) AS h(device, epoch) "
    "WHERE l.device = h.device AND l.epoch = h.epoch AND l.node = $1"
)
_SENDING: Final = CommandState.SENDING.value


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


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What says "the database cannot be reached" (as opposed to a bad statement): the
    network, a broken or closed connection, a server starting or shutting down."""
    import asyncpg

    return (
        OSError,
        TimeoutError,
        asyncpg.InterfaceError,
        asyncpg.PostgresConnectionError,
        asyncpg.exceptions.OperatorInterventionError,
    )


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    error = StoreUnavailableError(f"the PostgreSQL store cannot be reached: {exc}")
    error.__cause__ = exc
    return error


class PostgresStore(CommandStore):
    """A :class:`~keeplink.outbox.store.CommandStore` in PostgreSQL, shared by nodes.

    ``dsn`` is a ``postgresql://user[:password]@host[:port]/database`` URL (the password may
    also come from ``PGPASSWORD``); ``schema`` is where its tables live (created if missing).
    Raises :class:`~keeplink.ConfigError` for a malformed URL or schema name.
    """

    def __init__(self, dsn: str, *, schema: str = "keeplink", pool_size: int = POOL_SIZE) -> None:
        if not isinstance(dsn, str) or urlsplit(dsn).scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"postgres store: not a postgresql:// URL: {dsn!r}")
        if not isinstance(schema, str) or not schema.isidentifier() or not schema.isascii():
            raise ConfigError(f"postgres store: schema must be a plain identifier, got {schema!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 2:
            raise ConfigError(f"postgres store: pool_size must be >= 2, got {pool_size!r}")
        self.dsn: Final[str] = dsn
        self.schema: Final[str] = schema.lower()
        self.pool_size = pool_size
        self._status = "new"
        self._lock = asyncio.Lock()
        self._pool: Any = None  # asyncpg.Pool: imported lazily, the extra is optional
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """A store from ``postgresql://…/db``; an optional ``?schema=NAME`` picks the schema
        (every other query parameter goes to the connection)."""
        if not isinstance(url, str):
            raise ConfigError(f"store URL must be a string, got {url!r}")
        parts = urlsplit(url)
        params = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((v for k, v in params if k == "schema"), "keeplink")
        rest = urlencode([(k, v) for k, v in params if k != "schema"])
        return cls(urlunsplit(parts._replace(query=rest)), schema=schema)

    def __repr__(self) -> str:
        where = urlsplit(self.dsn)
        return f"<PostgresStore {where.hostname}:{where.port}{where.path} {self._status}>"

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        async with self._lock:
            if self._status == "open":
                return
            if self._status == "closed":
                raise RuntimeError("store is closed")
            try:
                import asyncpg
            except ImportError:
                raise ConfigError(
                    "the PostgreSQL store needs: pip install 'keeplink[postgres]'"
                ) from None
            try:
                pool = await asyncpg.create_pool(
                    self.dsn,
                    # No floor: connections are made when needed, so while the database
                    # is down nothing keeps trying (and logging) in the background.
                    min_size=0,
                    max_size=self.pool_size,
                    timeout=CONNECT_TIMEOUT_S,
                    command_timeout=COMMAND_TIMEOUT_S,
                    server_settings={"search_path": self.schema},
                )
            except _connection_errors() as exc:
                raise _unavailable(exc) from exc
            except asyncpg.PostgresError as exc:  # a wrong password, no such database…
                raise ConfigError(f"postgres store {self!r}: cannot open: {exc}") from exc
            try:
                async with pool.acquire() as conn:
                    await self._migrate(conn)
            except _connection_errors() as exc:
                await pool.close()
                raise _unavailable(exc) from exc
            except asyncpg.PostgresError as exc:
                await pool.close()
                raise ConfigError(f"postgres store {self!r}: cannot open: {exc}") from exc
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name=f"keeplink.postgres[{self.schema}].writer"
            )
            self._status = "open"

    async def _migrate(self, conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"database schema version {version} is newer than this keeplink "
                    f"({SCHEMA_VERSION}); upgrade keeplink"
                )
            for number in range(version, SCHEMA_VERSION):
                await conn.execute(MIGRATIONS[number])
                await conn.execute("INSERT INTO schema_version VALUES ($1)", number + 1)

    async def close(self) -> None:
        async with self._lock:
            if self._status == "closed":
                return
            opened = self._status == "open"
            self._status = "closed"
            if not opened:
                return
            self._wake.set()  # the writer commits what it was handed, then ends
            if self._writer is not None:
                await asyncio.shield(self._writer)
            await self._pool.close()

    def _check_open(self) -> Any:
        if self._status != "open":
            raise RuntimeError(
                "store is closed" if self._status == "closed" else "store is not open"
            )
        return self._pool

    # ------------------------------------------------------------------ writes

    async def apply(self, writes: Sequence[Write]) -> builtins.list[WriteResult]:
        encoded = encode_writes(writes)
        self._check_open()
        if not encoded:
            return []
        future: asyncio.Future[builtins.list[Any]] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(future, encoded))
        self._wake.set()
        raw = await future
        results: builtins.list[WriteResult] = []
        for write, value in zip(encoded, raw, strict=True):
            if write.kind == "insert":
                results.append(command_from_row((value, *write.values)))
            elif write.kind == "supersede":
                results.append(sorted(map(command_from_row, value), key=lambda c: c.seq))
            else:
                results.append(value)
        return results

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
                        await self._commit(batch)
                    except Exception as exc:  # noqa: BLE001 - the writer must not die
                        # Not a connection problem (those are answered in _commit): a bug
                        # or a database error nobody expected. Logged with its traceback;
                        # this batch's callers get the error; the writer goes on.
                        _log.exception("postgres store: a batch of %d calls failed", len(batch))
                        for job in batch:
                            if not job.future.done():
                                job.future.set_exception(exc)
            if self._status == "closed":
                return

    async def _commit(self, batch: builtins.list[_Job]) -> None:
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
        except _connection_errors() as exc:
            _log.debug("postgres store: a batch of %d calls failed: %s", len(batch), exc)
            answers = [(job, False, _unavailable(exc)) for job in batch]
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
        row = await conn.fetchrow(_INSERT_ONE, self.channel, *values)
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
            _INSERT_SUBMITS, self.channel, *_columns(rows, len(_INSERT_COLUMNS))
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
            returned = await conn.fetch(_INSERT_MANY, *_columns(rows, len(_INSERT_COLUMNS)))
            seqs = {row[0]: row[1] for row in returned}
            for j, w, write in places["insert"]:
                results[j][w] = seqs[write.values[0]]
            # Wake the devices' owners, wherever they run: delivered at commit, not before.
            await conn.execute(_NOTIFY, self.channel, sorted({row[1] for row in rows}))
        if places["update"]:
            rows = [
                (write.values[0], write.expect, *write.values[1:])
                for _, _, write in places["update"]
            ]
            returned = await conn.fetch(_CAS_MANY, *_columns(rows, 2 + len(_UPDATE_COLUMNS)))
            written = {row[0] for row in returned}
            for j, w, write in places["update"]:
                results[j][w] = write.values[0] in written
        for j, w, write in places["supersede"]:
            results[j][w] = [tuple(row) for row in await conn.fetch(_SUPERSEDE, *write.values)]
        if devices:
            await conn.execute(
                _DEVICES_MANY, *_columns(list(devices.values()), len(DEVICE_COLUMNS))
            )
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
        rows = await conn.fetch(_CURRENT_FENCES, devices, nodes, epochs)
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

    # ------------------------------------------------------------------ notifications

    @property
    def channel(self) -> str:
        """The notification channel: each committed submit sends its device's id on it."""
        return f"keeplink_{self.schema}"

    @property
    def event_channel(self) -> str:
        """The channel :meth:`publish` sends on: events for every node's API."""
        return f"keeplink_{self.schema}_events"

    async def listen(
        self,
        on_submit: Callable[[str], object],
        on_event: Callable[[str], object] | None = None,
    ) -> Any:
        """A connection of its own that calls ``on_submit(device)`` for every submit any
        node commits, and ``on_event(text)`` for every :meth:`publish`. Returns the asyncpg
        connection (``is_closed()``, ``close()``). Raises StoreUnavailableError if it
        cannot connect."""
        import asyncpg

        self._check_open()

        def submitted(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            on_submit(str(payload))

        def published(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            if on_event is not None:
                on_event(str(payload))

        try:
            conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_S)
            await conn.add_listener(self.channel, submitted)
            if on_event is not None:
                await conn.add_listener(self.event_channel, published)
        except _connection_errors() as exc:
            raise _unavailable(exc) from exc
        return conn

    async def publish(self, payloads: Sequence[str]) -> None:
        """Send texts (each at most ``NOTIFY_MAX`` bytes) to every listening node, in one
        round trip. Raises StoreUnavailableError when the database cannot be reached."""
        if payloads:
            await self._fetch(_NOTIFY, self.event_channel, list(payloads))

    # ------------------------------------------------------------------ leases

    async def heartbeat(self, node: str, *, lease_s: float) -> builtins.list[str]:
        """Say that ``node`` is alive; the live nodes (seen within ``lease_s``, not
        stopping), sorted. Uses the database's clock, the same for every node."""
        rows = await self._fetch(_HEARTBEAT, check_str("node", node), float(lease_s))
        return sorted(row[0] for row in rows)

    async def leave(self, node: str) -> None:
        """Mark ``node`` as stopping: the others stop counting it at once."""
        await self._fetch("UPDATE nodes SET stopping = true WHERE node = $1", node)

    async def acquire(
        self, node: str, devices: Collection[str], *, lease_s: float
    ) -> dict[str, int]:
        """Take the leases of ``devices`` that are free (never held, released, or expired);
        their new epochs. A device another node holds is not taken."""
        if not devices:
            return {}
        rows = await self._fetch(_ACQUIRE, node, list(devices), float(lease_s))
        return {row[0]: int(row[1]) for row in rows}

    async def renew(self, node: str, leases: Mapping[str, int], *, lease_s: float) -> set[str]:
        """Extend the leases ``node`` still holds (at those epochs, not expired); the devices
        renewed. A device missing from the answer is lost: stop delivering to it."""
        if not leases:
            return set()
        rows = await self._fetch(
            _RENEW, node, list(leases), [int(e) for e in leases.values()], float(lease_s)
        )
        return {row[0] for row in rows}

    async def release(self, node: str, leases: Mapping[str, int]) -> None:
        """Give leases up at once, so the next owner need not wait for them to expire."""
        if not leases:
            return
        await self._fetch(_RELEASE, node, list(leases), [int(e) for e in leases.values()])

    async def put_statuses(self, node: str, statuses: Mapping[str, str]) -> None:
        """Record what ``node`` says of its devices (device → JSON text), one round trip."""
        if statuses:
            await self._fetch(_STATUS_UPSERT, node, list(statuses), list(statuses.values()))

    async def statuses(self) -> dict[str, tuple[str, str]]:
        """Device → (node, JSON text) of the last status its owner recorded."""
        rows = await self._fetch("SELECT device, node, status FROM device_status")
        return {row[0]: (row[1], row[2]) for row in rows}

    async def owners(self) -> dict[str, str]:
        """Every device with a current lease, and the node holding it."""
        rows = await self._fetch(
            "SELECT device, node FROM leases WHERE node IS NOT NULL "
            "AND expires_at > clock_timestamp()"
        )
        return {row[0]: row[1] for row in rows}

    # ------------------------------------------------------------------ reads

    async def _fetch(self, sql: str, *params: Any) -> builtins.list[Any]:

        pool = self._check_open()
        try:
            rows: builtins.list[Any] = await pool.fetch(sql, *params)
        except _connection_errors() as exc:
            raise _unavailable(exc) from exc
        return rows

    async def get(self, command_id: str) -> Command | None:
        rows = await self._fetch(f"{_SELECT} WHERE id = $1", check_str("command_id", command_id))
        return command_from_row(tuple(rows[0])) if rows else None

    @staticmethod
    def _where(
        device: str | None, states: Collection[CommandState] | None
    ) -> tuple[builtins.list[str], builtins.list[Any]] | None:
        device = check_device_filter(device)
        values = state_values(states)
        conditions: builtins.list[str] = []
        params: builtins.list[Any] = []
        if device is not None:
            params.append(device)
            conditions.append(f"device = ${len(params)}")
        if values is not None:
            if not values:
                return None
            params.append(values)
            conditions.append(f"state = ANY(${len(params)}::text[])")
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
            self._check_open()
            return []
        conditions, params = where
        params += [after_seq, limit]
        conditions.append(f"seq > ${len(params) - 1}")
        order = "seq DESC" if newest else "seq"
        sql = f"{_SELECT} WHERE {' AND '.join(conditions)} ORDER BY {order} LIMIT ${len(params)}"
        return [command_from_row(tuple(row)) for row in await self._fetch(sql, *params)]

    async def queued(self, device: str, *, limit: int | None = None) -> builtins.list[Command]:
        device = check_str("device", device)
        limit = check_optional_limit(limit)
        sql = f"{_SELECT} WHERE device = $1 AND state = 'queued' ORDER BY priority DESC, seq"
        if limit is not None:
            rows = await self._fetch(sql + " LIMIT $2", device, limit)
        else:
            rows = await self._fetch(sql, device)
        return [command_from_row(tuple(row)) for row in rows]

    async def devices_with_queued(self) -> builtins.list[str]:
        rows = await self._fetch(
            "SELECT DISTINCT device FROM commands WHERE state = 'queued' ORDER BY device"
        )
        return [row[0] for row in rows]

    async def count(
        self, *, device: str | None = None, states: Collection[CommandState] | None = None
    ) -> int:
        where = self._where(device, states)
        if where is None:
            self._check_open()
            return 0
        conditions, params = where
        sql = "SELECT count(*) FROM commands"
        if conditions:
            sql += f" WHERE {' AND '.join(conditions)}"
        rows = await self._fetch(sql, *params)
        return int(rows[0][0])

    async def next_expiry(self) -> float | None:
        rows = await self._fetch(
            "SELECT min(expires_at) FROM commands WHERE state = 'queued' AND expires_at IS NOT NULL"
        )
        value = rows[0][0]
        return None if value is None else float(value)

    async def due(self, *, now: float, limit: int = 1000) -> builtins.list[Command]:
        now = check_real("now", now)
        limit = check_limit(limit)
        rows = await self._fetch(
            f"{_SELECT} WHERE state = 'queued' AND expires_at IS NOT NULL AND expires_at <= $1 "
            "ORDER BY expires_at, seq LIMIT $2",
            now,
            limit,
        )
        return [command_from_row(tuple(row)) for row in rows]

    async def recover(self, *, now: float) -> builtins.list[Command]:
        """Every ``sending`` command back to ``queued`` (or ``failed``), atomically.

        In a fleet of nodes sharing one database this is only right for the devices this
        node owns; until device ownership exists, run recovery on one node only.
        """

        now = check_real("now", now)
        pool = self._check_open()
        try:
            async with pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    f"{_SELECT} WHERE state = $1 ORDER BY seq FOR UPDATE", _SENDING
                )
                changed = [recovered(command_from_row(tuple(row)), now=now) for row in rows]
                for command in changed:
                    values = command_values(command)
                    await conn.execute(
                        "UPDATE commands SET "
                        + ", ".join(f"{c} = ${n + 1}" for n, c in enumerate(_UPDATE_COLUMNS))
                        + f" WHERE id = ${len(_UPDATE_COLUMNS) + 1} AND state = 'sending'",
                        *values[1:],
                        values[0],
                    )
        except _connection_errors() as exc:
            raise _unavailable(exc) from exc
        return changed

    async def depths(self, devices: Collection[str]) -> dict[str, tuple[int, int]]:
        names = [check_str("device", device) for device in devices]
        rows = await self._fetch(
            "SELECT device, count(*) FILTER (WHERE state = 'queued'), "
            "count(*) FILTER (WHERE state = 'sending') FROM commands "
            "WHERE device = ANY($1::text[]) AND state IN ('queued', 'sending') GROUP BY device",
            names,
        )
        found = {row[0]: (int(row[1]), int(row[2])) for row in rows}
        return {device: found.get(device, (0, 0)) for device in names}

    async def get_devices(self, devices: Collection[str]) -> dict[str, DeviceRecord]:
        names = [check_str("device", device) for device in devices]
        rows = await self._fetch(
            f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE device = ANY($1::text[])",
            names,
        )
        return {row[0]: device_from_row(tuple(row)) for row in rows}

    async def ids_with_prefix(self, prefix: str, *, limit: int = 10) -> builtins.list[str]:
        low, high = id_prefix_bounds(prefix)
        limit = check_limit(limit)
        # A range scan of the ids' unique index (in the column's collation, which orders
        # hex digits as they sort); the prefix test keeps exactly the matches.
        params: builtins.list[Any] = [low, len(low), limit]
        sql = "SELECT id FROM commands WHERE id >= $1 AND left(id, $2) = $1"
        if high is not None:
            params.append(high)
            sql += " AND id < $4"
        sql += ' ORDER BY id COLLATE "C" LIMIT $3'
        return [row[0] for row in await self._fetch(sql, *params)]

    async def get_device(self, device: str) -> DeviceRecord | None:
        rows = await self._fetch(
            f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE device = $1",
            check_str("device", device),
        )
        return device_from_row(tuple(rows[0])) if rows else None
