"""What goes in comes out: inserts, exact round trips, and values no store can keep."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from keeplink._core.commands import Command, CommandState, transition
from keeplink._core.errors import ErrorInfo, InvalidRequestError
from keeplink.outbox.store import CommandStore
from keeplink.testing.store_suite._base import T0, S, StoreSuiteBase, cmd, full_command


class RecordSuite(StoreSuiteBase):
    """Inserts and exact round trips of every field; unstorable values refused."""

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
