"""The suite's time, its commands, and the ``store`` fixture every part of it uses."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from keeplink._core.commands import Command, CommandState, new_command
from keeplink._core.errors import ErrorInfo
from keeplink.outbox.store import CommandStore

S = CommandState
T0 = 1_763_812_345.123456
"""The suite's time: a realistic epoch, with a fraction a float must keep exactly."""

StoreFactory = Callable[[], CommandStore]
"""What a ``new_store`` fixture returns: each call a new, unopened, empty store."""


_ids = itertools.count(1)


def cmd(device: str = "dev-1", **changes: Any) -> Command:
    """A new queued command with a readable id; ``changes`` override any field."""
    command = new_command(device=device, op="set", args={"on": True}, now=T0)
    return dataclasses.replace(command, id=f"cmd-{next(_ids):04d}", **changes)


def full_command() -> Command:
    """A queued command with every field set to something other than its default."""
    return Command(
        id="cmd-fü-λ-🚀",
        device="hall/ünïcødé 灯",
        op="firmware.install",
        args={
            "text": 'héllo \u0000 wörld \n\t"quoted" 🚀',
            "nested": {"list": [1, -2.5, None, True, False, "x", {"deep": [[], {}]}]},
            "big": 2**62 + 1,
            "float": 0.1 + 0.2,
            "tiny": 5e-324,
            "huge": 1.7976931348623157e308,
            "neg_zero": -0.0,
            "": "empty key",
        },
        state=S.QUEUED,
        created_at=T0,
        updated_at=T0 + 0.000001,
        idempotency_key="idem-ü-1",
        key="fw:hall",
        priority=-7,
        max_attempts=9,
        attempts=2,
        expires_at=T0 + 86_400.000_001,
        precondition="min_online",
        precondition_args={"seconds": 30.5, "config": {"sha256": "ab" * 32}},
        last_error=ErrorInfo("timeout", "no reply within 30 s — «device asleep»"),
        result={"offset": 4096, "notes": ["résumé"]},
        cycle=17,
        retry_at=T0 + 4.999_999,
        seq=0,
    )


class StoreSuiteBase:
    """The ``store`` fixture: an opened store from the subclass's ``new_store``, closed
    after the test."""

    @pytest.fixture
    async def store(self, new_store: StoreFactory) -> AsyncIterator[CommandStore]:
        """An opened store, closed after the test."""
        store = new_store()
        await store.open()
        try:
            yield store
        finally:
            await store.close()
