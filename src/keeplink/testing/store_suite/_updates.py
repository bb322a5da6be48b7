"""``update``: a compare-and-set on the stored state."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from keeplink._core.commands import transition
from keeplink._core.errors import InvalidRequestError
from keeplink.outbox.store import CommandStore
from keeplink.testing.store_suite._base import T0, S, StoreSuiteBase, cmd


class UpdateSuite(StoreSuiteBase):
    """``update`` writes only when the stored state is the one expected."""

    async def test_update_is_a_compare_and_set_on_the_state(self, store: CommandStore) -> None:
        queued = await store.insert(cmd())
        sending = transition(queued, S.SENDING, now=T0 + 1, attempts=1, cycle=4)

        assert await store.update(sending, expect=S.SENDING) is False  # stored state is queued
        assert await store.get(queued.id) == queued

        assert await store.update(sending, expect=S.QUEUED) is True
        assert await store.get(queued.id) == sending

        # The same write again: the stored state is no longer queued.
        stale = transition(queued, S.CANCELLED, now=T0 + 2)
        assert await store.update(stale, expect=S.QUEUED) is False
        assert await store.get(queued.id) == sending

        done = transition(sending, S.SUCCEEDED, now=T0 + 3, result={"ok": 1})
        assert await store.update(done, expect=S.SENDING) is True
        assert await store.get(queued.id) == done

    async def test_update_of_an_unknown_command_writes_nothing(self, store: CommandStore) -> None:
        ghost = cmd()
        assert await store.update(ghost, expect=S.QUEUED) is False
        assert await store.get(ghost.id) is None
        assert await store.count() == 0

    async def test_update_keeps_the_stored_seq(self, store: CommandStore) -> None:
        await store.insert(cmd())
        second = await store.insert(cmd())
        moved = dataclasses.replace(
            transition(second, S.SENDING, now=T0 + 1, attempts=1), seq=1, device="elsewhere"
        )
        assert await store.update(moved, expect=S.QUEUED) is True
        assert await store.get(second.id) == dataclasses.replace(moved, seq=2)

    async def test_update_refuses_an_unknown_expected_state(self, store: CommandStore) -> None:
        queued = await store.insert(cmd())
        with pytest.raises(InvalidRequestError, match="unknown command state 'nope'"):
            await store.update(queued, expect="nope")  # type: ignore[arg-type]

    async def test_concurrent_updates_with_the_same_expectation_only_one_wins(
        self,
        store: CommandStore,
    ) -> None:
        queued = await store.insert(cmd())
        rivals = [
            transition(queued, S.SENDING, now=T0 + 1, attempts=1),
            transition(queued, S.CANCELLED, now=T0 + 1),
            transition(queued, S.EXPIRED, now=T0 + 1),
        ]
        results = await asyncio.gather(*(store.update(r, expect=S.QUEUED) for r in rivals))
        assert sorted(results) == [False, False, True]
        winner = rivals[results.index(True)]
        assert await store.get(queued.id) == winner
