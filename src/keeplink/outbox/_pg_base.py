"""What the parts of the PostgreSQL store share: the pool, whether it is open, one read,
and which errors say that the database cannot be reached."""

from __future__ import annotations

import builtins
from typing import Any, Final

from keeplink._core.errors import StoreUnavailableError

CONNECT_TIMEOUT_S: Final = 10.0
COMMAND_TIMEOUT_S: Final = 30.0
"""A statement that has not answered by then (a lock held by a stuck transaction, a
database that stopped answering) fails as store_unavailable instead of waiting forever."""


def connection_errors() -> tuple[type[BaseException], ...]:
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


def unavailable(exc: BaseException) -> StoreUnavailableError:
    error = StoreUnavailableError(f"the PostgreSQL store cannot be reached: {exc}")
    error.__cause__ = exc
    return error


class PgConnection:
    """The pool of a :class:`~keeplink.outbox.postgres.PostgresStore` and its state, for the
    store's parts (reads, notifications, leases) to share."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn: Final[str] = dsn
        self.schema: Final[str] = schema.lower()
        self._status = "new"
        self._pool: Any = None  # asyncpg.Pool: imported lazily, the extra is optional

    def _check_open(self) -> Any:
        if self._status != "open":
            raise RuntimeError(
                "store is closed" if self._status == "closed" else "store is not open"
            )
        return self._pool

    async def _fetch(self, sql: str, *params: Any) -> builtins.list[Any]:
        pool = self._check_open()
        try:
            rows: builtins.list[Any] = await pool.fetch(sql, *params)
        except connection_errors() as exc:
            raise unavailable(exc) from exc
        return rows
