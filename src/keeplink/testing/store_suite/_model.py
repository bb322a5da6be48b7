"""The model test: random operations on a store and on a dict give the same answers."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keeplink._core.commands import (
    COMMAND_TRANSITIONS,
    FINAL_STATES,
    Command,
    CommandState,
    new_command,
    transition,
)
from keeplink._core.errors import ErrorInfo
from keeplink.outbox.store import CommandStore
from keeplink.testing.store_suite._base import T0, S, StoreFactory, StoreSuiteBase

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


class ModelSuite(StoreSuiteBase):
    """A hypothesis model test of the whole store."""

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
