"""The reads: ``list``, ``queued``, ``devices_with_queued``, ``count``, ``get`` and
``ids_with_prefix``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from keeplink._core.commands import Command, transition
from keeplink._core.errors import InvalidRequestError
from keeplink.outbox.store import CommandStore
from keeplink.testing.store_suite._base import T0, S, StoreSuiteBase, cmd


async def _populate(store: CommandStore) -> list[Command]:
    """Six commands on two devices, in several states; returned as stored (seq 1..6)."""
    plan = [("a", S.QUEUED), ("b", S.QUEUED), ("a", S.SENDING), ("a", S.SUCCEEDED),
            ("b", S.FAILED), ("a", S.QUEUED)]  # fmt: skip
    out = []
    for i, (device, state) in enumerate(plan):
        stored = await store.insert(cmd(device, priority=i % 2))
        if state is not S.QUEUED:
            sending = transition(stored, S.SENDING, now=T0 + i, attempts=1)
            assert await store.update(sending, expect=S.QUEUED)
            stored = sending
            if state is not S.SENDING:
                final = transition(sending, state, now=T0 + i + 0.5)
                assert await store.update(final, expect=S.SENDING)
                stored = final
        out.append(stored)
    return out


PREFIXED = [
    "abc0" + "0" * 28,
    "abc0" + "f" * 28,
    "abcf" + "f" * 28,
    "abd0" + "0" * 28,  # just past "abc"
    "9fff" + "f" * 28,  # just before "a"
    "ffe0" + "0" * 28,
    "ffff" + "f" * 28,  # only f: no upper bound
    "ab",  # shorter than the prefixes looked for
    "abcg-not-hex",  # an id of another shape is still matched exactly
    "ABC0" + "0" * 28,  # upper case is another id
]


class QuerySuite(StoreSuiteBase):
    """What every read answers, in which order, and what it refuses."""

    async def test_list_is_ordered_by_seq_and_filters(self, store: CommandStore) -> None:
        c = await _populate(store)
        assert await store.list() == c
        assert await store.list(device="a") == [c[0], c[2], c[3], c[5]]
        assert await store.list(device="b") == [c[1], c[4]]
        assert await store.list(device="nobody") == []
        assert await store.list(states={S.QUEUED}) == [c[0], c[1], c[5]]
        assert await store.list(states=[S.SUCCEEDED, S.FAILED]) == [c[3], c[4]]
        # A lone state is not its letters:
        assert await store.list(states=S.SENDING) == [c[2]]  # type: ignore[arg-type]
        assert await store.list(states=["queued"]) == [c[0], c[1], c[5]]  # type: ignore[list-item]
        assert await store.list(states=[]) == []
        assert await store.list(device="a", states=[S.QUEUED, S.SENDING]) == [c[0], c[2], c[5]]
        assert await store.list(after_seq=4) == [c[4], c[5]]
        assert await store.list(after_seq=6) == []
        assert await store.list(after_seq=-3) == c
        assert await store.list(limit=2) == [c[0], c[1]]
        assert await store.list(limit=2, after_seq=2) == [c[2], c[3]]
        assert await store.list(device="a", after_seq=1, limit=2) == [c[2], c[3]]
        assert await store.list(limit=10_000) == c

    @pytest.mark.parametrize("limit", [0, -1, 10_001, True, 2.0, "5", None])
    async def test_list_validates_its_limit(self, store: CommandStore, limit: Any) -> None:
        await store.insert(cmd())
        with pytest.raises(InvalidRequestError, match=r"limit must be an integer in 1\.\.10000"):
            await store.list(limit=limit)

    async def test_list_refuses_unknown_states_and_bad_filters(self, store: CommandStore) -> None:
        with pytest.raises(InvalidRequestError, match="unknown command state 'lost'"):
            await store.list(states=["lost"])  # type: ignore[list-item]
        with pytest.raises(InvalidRequestError, match="unknown command state 'lost'"):
            await store.count(states=["lost"])  # type: ignore[list-item]
        with pytest.raises(InvalidRequestError, match="device must be a string"):
            await store.list(device=7)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="after_seq must be an integer"):
            await store.list(after_seq="1")  # type: ignore[arg-type]

    async def test_queued_is_in_delivery_order(self, store: CommandStore) -> None:
        priorities = [0, 5, 0, 5, -1, 2]
        stored = [await store.insert(cmd("d", priority=p)) for p in priorities]
        await store.insert(cmd("other", priority=9))
        taken = transition(stored[5], S.SENDING, now=T0 + 1, attempts=1)
        assert await store.update(taken, expect=S.QUEUED)
        assert [c.seq for c in await store.queued("d")] == [2, 4, 1, 3, 5]
        assert await store.queued("d") == [stored[i] for i in (1, 3, 0, 2, 4)]
        assert await store.queued("nobody") == []

    async def test_devices_with_queued_is_sorted_and_only_queued(self, store: CommandStore) -> None:
        for device in ["b", "é", "a", "z", "a", "c"]:
            await store.insert(cmd(device))
        busy = await store.insert(cmd("only-sending"))
        assert await store.update(transition(busy, S.SENDING, now=T0, attempts=1), expect=S.QUEUED)
        gone = await store.insert(cmd("c"))
        assert await store.update(transition(gone, S.CANCELLED, now=T0), expect=S.QUEUED)
        assert await store.devices_with_queued() == ["a", "b", "c", "z", "é"]

    async def test_devices_with_queued_when_empty(self, store: CommandStore) -> None:
        assert await store.devices_with_queued() == []

    async def test_count(self, store: CommandStore) -> None:
        assert await store.count() == 0
        await _populate(store)
        assert await store.count() == 6
        assert await store.count(device="a") == 4
        assert await store.count(device="zz") == 0
        assert await store.count(states=[S.QUEUED]) == 3
        assert await store.count(states={S.SUCCEEDED, S.FAILED, S.SENDING}) == 3
        assert await store.count(device="b", states=[S.QUEUED]) == 1
        assert await store.count(states=[]) == 0

    async def test_get_of_an_unknown_id_is_none(self, store: CommandStore) -> None:
        assert await store.get("nope") is None

    async def test_ids_with_prefix_finds_exactly_the_ids_that_start_with_it(
        self,
        store: CommandStore,
    ) -> None:
        for command_id in PREFIXED:
            await store.insert(dataclasses.replace(cmd(), id=command_id))
        assert await store.ids_with_prefix("abc") == sorted(
            ["abc0" + "0" * 28, "abc0" + "f" * 28, "abcf" + "f" * 28, "abcg-not-hex"]
        )
        assert await store.ids_with_prefix("abc0") == ["abc0" + "0" * 28, "abc0" + "f" * 28]
        assert await store.ids_with_prefix("abcf") == ["abcf" + "f" * 28]
        assert await store.ids_with_prefix("ab", limit=2) == ["ab", "abc0" + "0" * 28]
        assert await store.ids_with_prefix("9") == ["9fff" + "f" * 28]
        assert await store.ids_with_prefix("ff") == ["ffe0" + "0" * 28, "ffff" + "f" * 28]
        assert await store.ids_with_prefix("ffff") == ["ffff" + "f" * 28]
        assert await store.ids_with_prefix("ffff" + "f" * 28) == ["ffff" + "f" * 28]
        assert await store.ids_with_prefix("abd1") == []
        assert await store.ids_with_prefix("0") == []
        # The protocol's own answer (reading every command, for stores that inherit it) agrees.
        for prefix in ("abc", "abc0", "9", "ff", "ffff", "ab", "0"):
            default = await CommandStore.ids_with_prefix(store, prefix, limit=3)
            assert default == await store.ids_with_prefix(prefix, limit=3), prefix

    @pytest.mark.parametrize("prefix", ["", "ABC", "abz", "ab c", 5, None])
    async def test_ids_with_prefix_takes_only_hex_digits(
        self, store: CommandStore, prefix: Any
    ) -> None:
        with pytest.raises(InvalidRequestError, match="an id prefix is lowercase hex digits"):
            await store.ids_with_prefix(prefix)
        with pytest.raises(InvalidRequestError, match="limit"):
            await store.ids_with_prefix("ab", limit=0)
