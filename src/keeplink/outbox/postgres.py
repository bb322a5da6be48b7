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

The pieces: the schema and the statements' text (``_pg_sql``), the group-commit writer with
the fencing check (``_pg_writer``), the queries (``_pg_reads``), notifications and leases
(``_pg_fleet``), over the pool they share (``_pg_base``); here the store's face: lifecycle,
``apply`` and crash recovery.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from keeplink._core.commands import Command
from keeplink._core.errors import ConfigError
from keeplink.outbox._pg_base import (
    COMMAND_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    connection_errors,
    unavailable,
)
from keeplink.outbox._pg_fleet import Leases, Notifications
from keeplink.outbox._pg_reads import Reads
from keeplink.outbox._pg_sql import (
    MIGRATION_LOCK,
    MIGRATIONS,
    SCHEMA_VERSION,
    SELECT,
    SENDING,
    UPDATE_COLUMNS,
)
from keeplink.outbox._pg_writer import MAX_BATCH_WRITES, GroupWriter
from keeplink.outbox._protocol import CommandStore
from keeplink.outbox._rows import check_real, command_from_row, command_values
from keeplink.outbox._writes import Write, WriteResult, encode_writes, recovered

__all__ = ["MAX_BATCH_WRITES", "MIGRATIONS", "SCHEMA_VERSION", "PostgresStore"]

POOL_SIZE: Final = 4
"""Connections: one for the writer, the rest for reads, which need not wait for it."""
NOTIFY_MAX: Final = 7900
"""PostgreSQL refuses a notification payload of 8000 bytes or more."""


class PostgresStore(Notifications, Leases, Reads, CommandStore):
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
        super().__init__(dsn, schema)
        self.pool_size = pool_size
        self._lock = asyncio.Lock()
        self._writer = GroupWriter(
            name=f"keeplink.postgres[{self.schema}].writer", channel=self.channel
        )

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
            except connection_errors() as exc:
                raise unavailable(exc) from exc
            except asyncpg.PostgresError as exc:  # a wrong password, no such database…
                raise ConfigError(f"postgres store {self!r}: cannot open: {exc}") from exc
            try:
                async with pool.acquire() as conn:
                    await self._migrate(conn)
            except connection_errors() as exc:
                await pool.close()
                raise unavailable(exc) from exc
            except asyncpg.PostgresError as exc:
                await pool.close()
                raise ConfigError(f"postgres store {self!r}: cannot open: {exc}") from exc
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
            self._writer.start(pool)
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
            await self._writer.stop()  # it commits what it was handed, then ends
            await self._pool.close()

    # ------------------------------------------------------------------ writes

    async def apply(self, writes: Sequence[Write]) -> builtins.list[WriteResult]:
        encoded = encode_writes(writes)
        self._check_open()
        if not encoded:
            return []
        raw = await self._writer.submit(encoded)
        results: builtins.list[WriteResult] = []
        for write, value in zip(encoded, raw, strict=True):
            if write.kind == "insert":
                results.append(command_from_row((value, *write.values)))
            elif write.kind == "supersede":
                results.append(sorted(map(command_from_row, value), key=lambda c: c.seq))
            else:
                results.append(value)
        return results

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
                    f"{SELECT} WHERE state = $1 ORDER BY seq FOR UPDATE", SENDING
                )
                changed = [recovered(command_from_row(tuple(row)), now=now) for row in rows]
                for command in changed:
                    values = command_values(command)
                    await conn.execute(
                        "UPDATE commands SET "
                        + ", ".join(f"{c} = ${n + 1}" for n, c in enumerate(UPDATE_COLUMNS))
                        + f" WHERE id = ${len(UPDATE_COLUMNS) + 1} AND state = 'sending'",
                        *values[1:],
                        values[0],
                    )
        except connection_errors() as exc:
            raise unavailable(exc) from exc
        return changed
