"""keeplink's own stores run the command-store conformance suite.

The tests are in :mod:`keeplink.testing.store_suite`, where a third-party store finds them
too; here they run once per store in ``STORES``. A new store joins by adding a factory.
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import pytest

from keeplink.outbox.postgres import PostgresStore
from keeplink.outbox.sqlite import SqliteStore
from keeplink.outbox.store import MemoryStore
from keeplink.testing.postgres import PostgresServer
from keeplink.testing.store_suite import CommandStoreSuite, StoreFactory

STORES = ["memory", "sqlite", "postgres"]


def _factories(tmp_path: Path, postgres: PostgresServer | None) -> dict[str, StoreFactory]:
    """A factory of new, unopened stores for each kind; each PostgreSQL store gets a schema
    of its own in the session's server, so every one starts empty."""
    counter = itertools.count()
    factories: dict[str, StoreFactory] = {
        "memory": MemoryStore,
        "sqlite": lambda: SqliteStore(tmp_path / f"store-{next(counter)}.db"),
    }
    if postgres is not None:
        dsn = postgres.dsn()
        factories["postgres"] = lambda: PostgresStore(dsn, schema=f"t{uuid.uuid4().hex}")
    return factories


class TestStores(CommandStoreSuite):
    @pytest.fixture(params=STORES)
    def new_store(self, request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
        """A factory of new, unopened stores of one kind."""
        postgres = (
            request.getfixturevalue("postgres_server") if request.param == "postgres" else None
        )
        factory: StoreFactory = _factories(tmp_path, postgres)[request.param]
        return factory
