"""The command-store conformance suite: what every :class:`~keeplink.outbox.CommandStore`
must answer, as pytest tests a store of your own can run.

keeplink runs it on its memory, SQLite and PostgreSQL stores; a third-party store runs the
same tests by subclassing :class:`CommandStoreSuite` in one of its test modules and giving
it a ``new_store`` fixture, a factory of new, *unopened*, empty stores (every call a fresh
one: the suite opens and closes what it makes)::

    # tests/test_my_store_conformance.py
    from pathlib import Path

    import pytest

    from keeplink.testing.store_suite import CommandStoreSuite, StoreFactory
    from my_package import MyStore


    class TestMyStore(CommandStoreSuite):
        @pytest.fixture
        def new_store(self, tmp_path: Path) -> StoreFactory:
            count = iter(range(1_000_000))
            return lambda: MyStore(tmp_path / f"store-{next(count)}.db")

The tests are async methods: the suite needs ``pytest-asyncio`` with ``asyncio_mode =
"auto"`` (or mark the subclass ``@pytest.mark.asyncio``), and ``hypothesis`` for its model
test (random operations on the store and on a dict must give the same answers). Both are in
keeplink's ``test`` extra. A parametrized ``new_store`` fixture runs the suite once per
store kind; the name ``CommandStoreSuite`` does not start with ``Test``, so pytest collects
only the subclasses. The suite's own ``store`` fixture is an opened store from
``new_store()``, closed after the test.

The suite is made of one part per topic (records and round trips, ``update``, the reads,
device records, recovery and lifecycle, the model test); :class:`CommandStoreSuite` is all
of them, and is the name to subclass.
"""

from __future__ import annotations

try:
    import hypothesis  # noqa: F401  (checked here, before the parts that need it are imported)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keeplink.testing.store_suite needs hypothesis, a test dependency: "
        "pip install hypothesis (or keeplink[test])"
    ) from exc

from keeplink.testing.store_suite._base import T0, StoreFactory, full_command
from keeplink.testing.store_suite._devices import DeviceRecordSuite
from keeplink.testing.store_suite._lifecycle import LifecycleSuite
from keeplink.testing.store_suite._model import ModelSuite
from keeplink.testing.store_suite._queries import QuerySuite
from keeplink.testing.store_suite._records import RecordSuite
from keeplink.testing.store_suite._updates import UpdateSuite

__all__ = ["T0", "CommandStoreSuite", "StoreFactory", "full_command"]


class CommandStoreSuite(
    RecordSuite, UpdateSuite, QuerySuite, DeviceRecordSuite, LifecycleSuite, ModelSuite
):
    """The conformance tests; subclass it as ``Test...`` and give it a ``new_store``
    fixture (see the module's documentation)."""
