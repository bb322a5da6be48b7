"""An executor's durable progress (``Outbox.note``): stored on the command being sent, kept
by a retryable failure and by crash recovery, refused once the command is no longer being
sent; and the ESPHome build identity the firmware executor notes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from helpers import IO_BOUND_S
from keeplink import Link, SessionInfo
from keeplink._core.commands import Command, CommandState, transition
from keeplink._core.errors import InvalidRequestError, LinkBrokenError
from keeplink._core.outcomes import Acknowledged, Outcome, Unavailable
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import DeliveryContext, MemoryStore, Outbox, SqliteStore
from keeplink.outbox.esphome_ota import build_of, runs_build
from keeplink.outbox.store import Update
from keeplink.presence import PresenceTracker
from keeplink.testing import DeviceSimulator


class Noting:
    """Notes how many attempts it saw, fails the first ``fail`` of them, then succeeds
    with the note it found."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.seen: list[Any] = []

    async def __call__(self, link: Link[Any], command: Command, ctx: DeliveryContext) -> Outcome:
        self.seen.append(dict(command.result or {}))
        count = int((command.result or {}).get("count", 0)) + 1
        await ctx.outbox.note(command, {"count": count})
        stored = await ctx.outbox.store.get(command.id)
        assert stored is not None
        assert stored.result == {"count": count}  # durable before the executor goes on
        if len(self.seen) <= self.fail:
            return Unavailable(cause=LinkBrokenError("not yet"))
        return Acknowledged(seq=0, result={"noted": count})


async def test_a_note_is_stored_and_kept_by_a_retryable_failure() -> None:
    noting = Noting(fail=2)
    async with DeviceSimulator(device_id="hall") as sim:
        presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=0.0)
        outbox = Outbox(
            MemoryStore(), presence=presence, executors={"note": noting}, retry_after_s=0.01
        )
        link = Link(JsonLineDriver(host=sim.host, port=sim.port), name="hall", heartbeat_s=None)
        await outbox.start()
        try:
            await outbox.attach("hall", link)
            link.start()
            command = await outbox.submit("hall", "note", {}, max_attempts=5)
            async with asyncio.timeout(IO_BOUND_S):
                done = await outbox.wait(command.id)
        finally:
            await link.stop()
            await outbox.close()
            presence.close()
    assert done.state is CommandState.SUCCEEDED, done.last_error
    assert noting.seen == [{}, {"count": 1}, {"count": 2}]
    assert done.result == {"noted": 3}


async def test_a_note_survives_a_restart_and_is_refused_once_not_sending(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    outbox = Outbox(SqliteStore(db))
    await outbox.start()
    command = await outbox.submit("hall", "note", {})
    with pytest.raises(InvalidRequestError, match="no longer being sent"):
        await outbox.note(command, {"x": 1})  # queued, not sending: nothing written
    assert (await outbox.get(command.id)).result is None
    # As if a delivery had begun, noted its progress, and the process died.
    sending = transition(command, CommandState.SENDING, now=command.created_at, attempts=1)
    assert await outbox.store.apply([Update(sending, CommandState.QUEUED)]) == [True]
    noted = await outbox.note(sending, {"pre_flash": {"compilation_time": "then"}})
    assert noted.result == {"pre_flash": {"compilation_time": "then"}}
    await outbox.close()
    outbox = Outbox(SqliteStore(db))
    await outbox.start()  # crash recovery: sending -> queued, the note kept
    again = await outbox.get(command.id)
    await outbox.close()
    assert again.state is CommandState.QUEUED
    assert again.result == {"pre_flash": {"compilation_time": "then"}}


def test_the_build_is_the_versions_and_the_compilation_time() -> None:
    extra = {"esphome_version": "2026.11.0", "project_version": "1.2", "compilation_time": "t1"}
    build = build_of(SessionInfo(device_id="d", extra=extra))
    assert build == extra
    assert build_of(None) is None
    assert build_of(SessionInfo(device_id="d", extra={"v": 1})) is None  # no DeviceInfo
    assert runs_build(build, {"compilation_time": "t1"})
    assert runs_build(build, {"project_version": "1.2", "compilation_time": "t1"})
    assert not runs_build(build, {"project_version": "1.3"})
    assert not runs_build(build, {})  # an empty target names nothing
    assert not runs_build(build, {"flavour": "t1"})  # nor unknown keys
    assert not runs_build(build, "t1")
    assert not runs_build(None, {"compilation_time": "t1"})
