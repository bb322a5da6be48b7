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
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keeplink.testing.store_suite needs hypothesis, a test dependency: "
        "pip install hypothesis (or keeplink[test])"
    ) from exc

from keeplink._core.commands import (
    COMMAND_TRANSITIONS,
    FINAL_STATES,
    Command,
    CommandState,
    DeviceRecord,
    new_command,
    transition,
)
from keeplink._core.errors import ErrorInfo, InvalidRequestError
from keeplink.outbox.store import CommandStore

__all__ = ["T0", "CommandStoreSuite", "StoreFactory", "full_command"]

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


# ---------------------------------------------------------------------- queries


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


# ---------------------------------------------------------------------- the model


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_json_objects = st.dictionaries(st.text(max_size=4), _json_values, max_size=3)
_times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
_messages = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=8)
"""Error messages as keeplink makes them (ErrorInfo.of keeps NUL and lone surrogates out of
them: no store's text column takes those, and the stores refuse them)."""
DEVICES = ["a", "b", "ü"]


def _model_recover(command: Command, now: float) -> Command:
    if command.attempts >= command.max_attempts:
        error = ErrorInfo(
            "connection_aborted",
            f"attempts exhausted ({command.attempts} of {command.max_attempts}); "
            "the last one was interrupted by a restart",
        )
        return dataclasses.replace(command, state=S.FAILED, updated_at=now, last_error=error)
    return dataclasses.replace(command, state=S.QUEUED, updated_at=now)


async def _assert_same(store: CommandStore, model: dict[str, Command]) -> None:
    by_seq = sorted(model.values(), key=lambda c: c.seq)
    for command in by_seq:
        assert await store.get(command.id) == command
    assert await store.list(limit=10_000) == by_seq
    assert await store.count() == len(by_seq)
    for device in DEVICES:
        mine = [c for c in by_seq if c.device == device]
        assert await store.list(device=device) == mine
        queued = sorted(
            (c for c in mine if c.state is S.QUEUED), key=lambda c: (-c.priority, c.seq)
        )
        assert await store.queued(device) == queued
    live = [c for c in by_seq if not c.final]
    assert await store.list(states=[S.QUEUED, S.SENDING]) == live
    assert await store.count(states=FINAL_STATES) == len(by_seq) - len(live)
    assert await store.devices_with_queued() == sorted(
        {c.device for c in by_seq if c.state is S.QUEUED}
    )


class CommandStoreSuite:
    """The conformance tests; subclass it as ``Test...`` and give it a ``new_store``
    fixture (see the module's documentation)."""

    @pytest.fixture
    async def store(self, new_store: StoreFactory) -> AsyncIterator[CommandStore]:
        """An opened store, closed after the test."""
        store = new_store()
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    # ---------------------------------------------------------------------- basics
    async def test_every_store_satisfies_the_protocol(self, store: CommandStore) -> None:
        assert isinstance(store, CommandStore)

    async def test_insert_assigns_increasing_seq(self, store: CommandStore) -> None:
        commands = [cmd(seq=99) for _ in range(5)]  # a caller's seq is ignored
        stored = [await store.insert(command) for command in commands]
        assert [c.seq for c in stored] == [1, 2, 3, 4, 5]
        assert stored == [dataclasses.replace(c, seq=i) for i, c in enumerate(commands, 1)]
        assert [await store.get(c.id) for c in commands] == stored

    async def test_get_round_trips_every_field_exactly(self, store: CommandStore) -> None:
        command = full_command()
        stored = await store.insert(command)
        assert stored == dataclasses.replace(command, seq=1)
        got = await store.get(command.id)
        assert got == stored
        assert got is not None
        for f in dataclasses.fields(Command):
            assert getattr(got, f.name) == getattr(stored, f.name), f.name
        # Floats are bit-exact, the sign of zero included.
        for name in ("created_at", "updated_at", "expires_at"):
            assert getattr(got, name).hex() == getattr(command, name).hex()
        for name in ("float", "tiny", "huge", "neg_zero"):
            assert got.args[name].hex() == command.args[name].hex()
        assert math.copysign(1.0, got.args["neg_zero"]) == -1.0
        assert type(got.state) is CommandState
        assert got.last_error == ErrorInfo("timeout", "no reply within 30 s — «device asleep»")

    def test_the_full_command_exercises_every_field(self) -> None:
        """If Command grows a field, full_command() (and the stores) must learn about it."""
        command = full_command()
        for f in dataclasses.fields(Command):
            if f.name in ("seq", "state"):
                continue
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            assert getattr(command, f.name) != default, f"full_command() leaves {f.name} default"

    async def test_none_and_empty_stay_as_they_are(self, store: CommandStore) -> None:
        command = cmd(key=None, expires_at=None, precondition=None, last_error=None, result=None)
        await store.insert(command)
        got = await store.get(command.id)
        assert got is not None
        assert (got.key, got.expires_at, got.precondition, got.last_error, got.result) == (
            None,
            None,
            None,
            None,
            None,
        )
        assert got.precondition_args == {}
        finished = transition(got, S.SENDING, now=T0 + 1, attempts=1)
        await store.update(finished, expect=S.QUEUED)
        finished = transition(finished, S.SUCCEEDED, now=T0 + 2, result={})
        assert await store.update(finished, expect=S.SENDING) is True
        got = await store.get(command.id)
        assert got is not None
        assert got.result == {}
        assert got == finished

    async def test_stored_records_do_not_share_mutable_state(self, store: CommandStore) -> None:
        command = cmd(args={"list": [1, 2]})
        stored = await store.insert(command)
        command.args["list"].append(3)
        stored.args["list"].append(4)
        got = await store.get(command.id)
        assert got is not None
        assert got.args == {"list": [1, 2]}
        got.args["list"].append(5)
        again = await store.get(command.id)
        assert again is not None
        assert again.args == {"list": [1, 2]}

    async def test_duplicate_insert_raises_and_keeps_the_original(
        self, store: CommandStore
    ) -> None:
        first = await store.insert(cmd())
        twin = dataclasses.replace(first, op="other", seq=0)
        with pytest.raises(InvalidRequestError, match=f"command {first.id} already exists"):
            await store.insert(twin)
        assert await store.get(first.id) == first
        assert await store.count() == 1
        later = await store.insert(cmd())
        assert later.seq == 2

    async def test_insert_refuses_a_command_that_is_not_queued(self, store: CommandStore) -> None:
        with pytest.raises(InvalidRequestError, match="a new command must be queued, got sending"):
            await store.insert(cmd(state=S.SENDING))
        assert await store.count() == 0

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"args": {"x": {1, 2}}}, "args is not a JSON object"),
            ({"args": {"x": {1: "int key"}}}, "args: object keys must be strings"),
            ({"args": {"x": float("nan")}}, "args is not a JSON object"),
            ({"args": {"x": float("inf")}}, "args is not a JSON object"),
            ({"args": ["not", "an", "object"]}, "args must be a JSON object, got list"),
            ({"result": {"x": object()}}, "result is not a JSON object"),
            ({"precondition_args": {(1, 2): 3}}, "precondition_args is not a JSON object"),
            ({"created_at": float("nan")}, "created_at must not be NaN"),
            ({"expires_at": "tomorrow"}, "expires_at must be a number"),
            ({"priority": 2**63}, "priority does not fit in 64 bits"),
            ({"attempts": True}, "attempts must be an integer"),
            ({"device": ""}, "device must be a non-empty string"),
            ({"device": "bad \udc80 surrogate"}, "device is not valid unicode"),
            ({"last_error": ("code", "message")}, "last_error must be an ErrorInfo"),
            ({"state": "lost"}, "unknown command state 'lost'"),
        ],
    )
    async def test_unstorable_values_are_refused_before_writing(
        self, store: CommandStore, changes: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(InvalidRequestError, match=message):
            await store.insert(cmd(**changes))
        assert await store.count() == 0
        good = await store.insert(cmd())
        with pytest.raises(InvalidRequestError, match=message):
            await store.update(dataclasses.replace(good, **changes), expect=S.QUEUED)
        assert await store.get(good.id) == good

    async def test_a_self_referencing_argument_is_refused(self, store: CommandStore) -> None:
        loop: dict[str, Any] = {}
        loop["self"] = loop
        with pytest.raises(InvalidRequestError, match="args is not a JSON object"):
            await store.insert(cmd(args=loop))

    # ---------------------------------------------------------------------- update (CAS)
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

    # ---------------------------------------------------------------------- recovery
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

    # ---------------------------------------------------------------------- devices
    async def test_device_records_upsert_and_round_trip(self, store: CommandStore) -> None:
        assert await store.get_device("lamp") is None
        plain = DeviceRecord(device="lamp")
        await store.put_device(plain)
        assert await store.get_device("lamp") == plain

        parked = DeviceRecord(
            device="lamp",
            cycle=12,
            failed_cycles=3,
            parked_reason="3 presence cycles failed — «timeout»",
            parked_until=T0 + 3600.000001,
            failed_cycle=11,
        )
        await store.put_device(parked)
        got = await store.get_device("lamp")
        assert got == parked
        assert got is not None
        assert got.parked_until is not None
        assert got.parked_until.hex() == parked.parked_until.hex()  # type: ignore[union-attr]

        other = DeviceRecord(device="ünï 灯", failed_cycles=1)
        await store.put_device(other)
        await store.put_device(plain)  # un-parking writes the Nones back
        assert await store.get_device("lamp") == plain
        assert await store.get_device("ünï 灯") == other
        assert await store.get_device("LAMP") is None

    async def test_many_devices_read_at_once_answer_as_one_at_a_time(
        self, store: CommandStore
    ) -> None:
        """``depths`` and ``get_devices`` (one read for a whole device list) say what
        ``count`` and ``get_device`` say device by device."""
        devices = ["lamp", "fan", "ünï 灯", "never-seen"]
        for n in range(7):
            stored = await store.insert(
                new_command(device=devices[n % 3], op="set", args={}, now=T0)
            )
            if n % 2:
                sending = transition(stored, S.SENDING, now=T0 + 1, attempts=1)
                assert await store.update(sending, expect=S.QUEUED)
                if n == 5:
                    assert await store.update(
                        transition(sending, S.SUCCEEDED, now=T0 + 2), expect=S.SENDING
                    )
        await store.put_device(DeviceRecord(device="fan", cycle=4))
        await store.put_device(DeviceRecord(device="ünï 灯", failed_cycles=2))
        one_by_one = {
            d: (
                await store.count(device=d, states=[S.QUEUED]),
                await store.count(device=d, states=[S.SENDING]),
            )
            for d in devices
        }
        assert one_by_one == {"lamp": (2, 1), "fan": (1, 1), "ünï 灯": (1, 0), "never-seen": (0, 0)}
        assert await store.depths(devices) == one_by_one
        assert await store.depths([]) == {}
        records = {d: r for d in devices if (r := await store.get_device(d)) is not None}
        assert set(records) == {"fan", "ünï 灯"}
        assert await store.get_devices(devices) == records
        assert await store.get_devices([]) == {}

    def test_device_record_fields_are_all_covered(self) -> None:
        """If DeviceRecord grows a field, the stores must learn about it (and this list)."""
        assert [f.name for f in dataclasses.fields(DeviceRecord)] == [
            "device",
            "cycle",
            "failed_cycles",
            "failed_cycle",
            "parked_reason",
            "parked_until",
        ]

    async def test_device_records_refuse_unstorable_values(self, store: CommandStore) -> None:
        with pytest.raises(InvalidRequestError, match="parked_until must not be NaN"):
            await store.put_device(DeviceRecord(device="x", parked_until=float("nan")))
        with pytest.raises(InvalidRequestError, match="failed_cycles must be an integer"):
            await store.put_device(DeviceRecord(device="x", failed_cycles="2"))  # type: ignore[arg-type]
        assert await store.get_device("x") is None

    # ---------------------------------------------------------------------- lifecycle
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

    @settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    async def test_every_store_behaves_like_a_dict(
        self, new_store: StoreFactory, data: st.DataObject
    ) -> None:
        """Random inserts, legal transitions, stale writes and recoveries, applied to a new
        store and to a plain dict, give the same get(), list(), queued(), count() answers."""
        store = new_store()  # a fresh store for every example
        model: dict[str, Command] = {}
        last_seq = 0
        now = T0
        await store.open()
        try:
            for step in range(data.draw(st.integers(1, 25), label="steps")):
                now += data.draw(st.sampled_from([0.0, 0.001, 1.5]))
                action = data.draw(
                    st.sampled_from(["insert", "insert", "move", "move", "stale", "recover"])
                )
                touched: Command | None = None
                if action == "insert" or not model:
                    command = new_command(
                        device=data.draw(st.sampled_from(DEVICES)),
                        op="set",
                        args=data.draw(_json_objects, label="args"),
                        now=now,
                        key=data.draw(st.none() | st.sampled_from(["k1", "k2"])),
                        priority=data.draw(st.integers(-2, 2)),
                        max_attempts=data.draw(st.integers(1, 3)),
                        ttl_s=data.draw(st.none() | st.floats(0.001, 1e6)),
                    )
                    stored = await store.insert(command)
                    assert stored.seq > last_seq
                    assert stored == dataclasses.replace(command, seq=stored.seq)
                    last_seq = stored.seq
                    model[command.id] = touched = stored
                elif action == "move":
                    live = sorted((c for c in model.values() if not c.final), key=lambda c: c.seq)
                    if not live:
                        continue
                    old = data.draw(st.sampled_from(live))
                    target = data.draw(st.sampled_from(sorted(COMMAND_TRANSITIONS[old.state])))
                    changes: dict[str, Any] = {}
                    if target is S.SENDING:
                        changes = {
                            "attempts": old.attempts + 1,
                            "cycle": data.draw(st.integers(0, 9)),
                        }
                    elif target in (S.FAILED, S.REJECTED, S.QUEUED):
                        code = data.draw(st.sampled_from(["timeout", "rejected"]))
                        changes = {"last_error": ErrorInfo(code, data.draw(_messages))}
                    elif target is S.SUCCEEDED:
                        changes = {"result": data.draw(_json_objects | st.none(), label="result")}
                    new = transition(old, target, now=now, **changes)
                    assert await store.update(new, expect=old.state) is True
                    model[old.id] = touched = new
                elif action == "stale":
                    old = data.draw(st.sampled_from(sorted(model.values(), key=lambda c: c.seq)))
                    wrong = data.draw(
                        st.sampled_from([s for s in CommandState if s is not old.state])
                    )
                    stale = dataclasses.replace(old, updated_at=now + 1)
                    assert await store.update(stale, expect=wrong) is False
                    touched = old
                else:
                    by_seq = sorted(model.values(), key=lambda c: c.seq)
                    expected = [_model_recover(c, now) for c in by_seq if c.state is S.SENDING]
                    assert await store.recover(now=now) == expected
                    model.update((c.id, c) for c in expected)
                if touched is not None:
                    assert await store.get(touched.id) == model[touched.id]
                if step % 4 == 3 or action == "recover":
                    await _assert_same(store, model)
            await _assert_same(store, model)
        finally:
            await store.close()
