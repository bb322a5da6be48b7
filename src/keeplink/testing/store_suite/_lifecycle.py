"""``recover`` after a crash, and ``open``/``close``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from keeplink._core.commands import Command, transition
from keeplink._core.errors import ErrorInfo
from keeplink.outbox.store import CommandStore
from keeplink.testing.store_suite._base import T0, S, StoreFactory, StoreSuiteBase, cmd


class LifecycleSuite(StoreSuiteBase):
    """Recovery of what was sending, and a store's open/close life."""

    async def test_recover_requeues_or_fails_what_was_sending(self, store: CommandStore) -> None:
        def sending(attempts: int, max_attempts: int, **changes: Any) -> Command:
            return cmd(max_attempts=max_attempts, attempts=attempts - 1, **changes)

        plan = [
            sending(1, 3),  # requeued, attempt kept
            cmd(),  # queued: untouched
            sending(3, 3, last_error=ErrorInfo("timeout", "slow")),  # exhausted: failed
            cmd(),  # will be succeeded: untouched
            sending(2, 3, priority=4),  # requeued
            sending(6, 5),  # over the limit (max lowered since): failed
        ]
        stored = [await store.insert(c) for c in plan]
        now = T0 + 100.25
        for i in (0, 2, 4, 5):
            old = stored[i]
            stored[i] = transition(old, S.SENDING, now=T0 + i, attempts=old.attempts + 1)
            assert await store.update(stored[i], expect=S.QUEUED)
        done = transition(
            transition(stored[3], S.SENDING, now=T0, attempts=1), S.SUCCEEDED, now=T0 + 1
        )
        assert await store.update(
            transition(stored[3], S.SENDING, now=T0, attempts=1), expect=S.QUEUED
        )
        assert await store.update(done, expect=S.SENDING)
        stored[3] = done

        recovered = await store.recover(now=now)

        expected = [
            dataclasses.replace(stored[0], state=S.QUEUED, updated_at=now),
            dataclasses.replace(
                stored[2],
                state=S.FAILED,
                updated_at=now,
                last_error=ErrorInfo(
                    "connection_aborted",
                    "attempts exhausted (3 of 3); the last one was interrupted by a restart",
                ),
            ),
            dataclasses.replace(stored[4], state=S.QUEUED, updated_at=now),
            dataclasses.replace(
                stored[5],
                state=S.FAILED,
                updated_at=now,
                last_error=ErrorInfo(
                    "connection_aborted",
                    "attempts exhausted (6 of 5); the last one was interrupted by a restart",
                ),
            ),
        ]
        assert recovered == expected
        assert [c.attempts for c in recovered] == [1, 3, 2, 6]
        assert [await store.get(c.id) for c in stored] == [
            expected[0], stored[1], expected[1], stored[3], expected[2], expected[3]
        ]  # fmt: skip
        assert await store.queued(stored[0].device) == [expected[2], expected[0], stored[1]]
        assert await store.recover(now=now + 1) == []  # nothing is sending any more

    async def test_recover_on_an_empty_store(self, store: CommandStore) -> None:
        assert await store.recover(now=T0) == []

    async def test_open_and_close_are_idempotent_and_closed_is_final(
        self,
        new_store: StoreFactory,
    ) -> None:
        store = new_store()
        with pytest.raises(RuntimeError, match="store is not open"):
            await store.get("x")
        await store.open()
        await store.open()
        stored = await store.insert(cmd())
        assert await store.get(stored.id) == stored
        await store.close()
        await store.close()
        with pytest.raises(RuntimeError, match="store is closed"):
            await store.insert(cmd())
        with pytest.raises(RuntimeError, match="store is closed"):
            await store.list()
        with pytest.raises(RuntimeError, match="store is closed"):
            await store.list(states=[])
        with pytest.raises(RuntimeError, match="store is closed"):
            await store.open()

    async def test_a_store_is_an_async_context_manager(self, new_store: StoreFactory) -> None:
        async with new_store() as store:
            stored = await store.insert(cmd())
            assert await store.get(stored.id) == stored
        with pytest.raises(RuntimeError, match="store is closed"):
            await store.get(stored.id)
