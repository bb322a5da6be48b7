"""The in-process :class:`MemoryStore`: encoded rows in dictionaries, for tests."""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Final

from keeplink._core.commands import Command, CommandState, DeviceRecord
from keeplink.outbox._protocol import CommandStore
from keeplink.outbox._rows import (
    COMMAND_COLUMNS,
    check_after_seq,
    check_device_filter,
    check_id_prefix,
    check_limit,
    check_optional_limit,
    check_real,
    check_str,
    command_from_row,
    command_values,
    device_from_row,
    duplicate_id,
    state_values,
)
from keeplink.outbox._writes import Write, WriteResult, encode_writes, recovered

_STATE: Final = COMMAND_COLUMNS.index("state")
_DEVICE: Final = COMMAND_COLUMNS.index("device")
_PRIORITY: Final = COMMAND_COLUMNS.index("priority")
_QUEUED: Final = CommandState.QUEUED.value
_EXPIRES: Final = COMMAND_COLUMNS.index("expires_at")
_KEY: Final = COMMAND_COLUMNS.index("key")


class MemoryStore(CommandStore):
    """A :class:`CommandStore` in process memory, for tests. Nothing survives the process.

    It keeps encoded rows, exactly like a database would, so it accepts, refuses and
    returns the same values as :class:`~keeplink.outbox.sqlite.SqliteStore`. An
    :meth:`apply` call runs without yielding to the event loop, so it is atomic by itself
    and there is nothing to group.
    """

    def __init__(self) -> None:
        self._rows: dict[str, tuple[Any, ...]] = {}  # id -> row; insertion order == seq order
        self._by_device: dict[str, dict[str, None]] = {}  # device -> ids, in seq order
        self._queued_keys: dict[tuple[str, str], dict[str, None]] = {}  # queued, keyed
        self._expiring: dict[str, float] = {}  # queued ids with a deadline -> expires_at
        self._devices: dict[str, tuple[Any, ...]] = {}
        self._last_seq = 0
        self._status = "new"

    def __repr__(self) -> str:
        return f"<MemoryStore {self._status} commands={len(self._rows)}>"

    def _check_open(self) -> None:
        if self._status != "open":
            raise RuntimeError(
                "store is closed" if self._status == "closed" else "store is not open"
            )

    async def open(self) -> None:
        if self._status == "closed":
            raise RuntimeError("store is closed")
        self._status = "open"

    async def close(self) -> None:
        self._status = "closed"

    # ------------------------------------------------------------------ writes

    def _put_row(self, row: tuple[Any, ...]) -> None:
        """Store ``row`` and keep the indexes in step with it."""
        command_id, device = row[1], row[_DEVICE]
        old = self._rows.get(command_id)
        if old is not None and old[_STATE] == _QUEUED and old[_KEY] is not None:
            self._queued_keys.get((device, old[_KEY]), {}).pop(command_id, None)
        self._rows[command_id] = row
        self._by_device.setdefault(device, {})[command_id] = None
        queued = row[_STATE] == _QUEUED
        if queued and row[_KEY] is not None:
            self._queued_keys.setdefault((device, row[_KEY]), {})[command_id] = None
        if queued and row[_EXPIRES] is not None:
            self._expiring[command_id] = row[_EXPIRES]
        else:
            self._expiring.pop(command_id, None)

    async def apply(self, writes: Sequence[Write]) -> builtins.list[WriteResult]:
        self._check_open()
        encoded = encode_writes(writes)
        new_ids: set[str] = set()
        for write in encoded:  # refuse the whole call before changing anything
            if write.kind == "insert":
                command_id = write.values[0]
                if command_id in self._rows or command_id in new_ids:
                    raise duplicate_id(command_id)
                new_ids.add(command_id)
        results: builtins.list[WriteResult] = []
        for write in encoded:
            if write.kind == "insert":
                self._last_seq += 1
                row = (self._last_seq, *write.values)
                self._put_row(row)
                results.append(command_from_row(row))
            elif write.kind == "update":
                current = self._rows.get(write.values[0])
                if current is None or current[_STATE] != write.expect:
                    results.append(False)
                else:
                    self._put_row((current[0], *write.values))
                    results.append(True)
            elif write.kind == "supersede":
                results.append(self._supersede(*write.values))
            else:
                self._devices[write.values[0]] = write.values
                results.append(None)
        return results

    def _supersede(
        self, device: str, key: str, by: str, now: float, state: str, code: str, message: str
    ) -> builtins.list[Command]:
        newer = self._rows.get(by)
        if newer is None:
            return []
        changed: builtins.list[Command] = []
        for command_id in builtins.list(self._queued_keys.get((device, key), {})):
            row = self._rows[command_id]
            if row[0] >= newer[0]:
                continue
            values = builtins.list(row)
            values[_STATE] = state
            values[COMMAND_COLUMNS.index("updated_at")] = now
            values[COMMAND_COLUMNS.index("error_code")] = code
            values[COMMAND_COLUMNS.index("error_message")] = message
            values[COMMAND_COLUMNS.index("retry_at")] = None
            self._put_row(tuple(values))
            changed.append(command_from_row(tuple(values)))
        changed.sort(key=lambda command: command.seq)
        return changed

    # ------------------------------------------------------------------ reads

    async def get(self, command_id: str) -> Command | None:
        self._check_open()
        row = self._rows.get(check_str("command_id", command_id))
        return None if row is None else command_from_row(row)

    def _select(
        self, device: str | None, states: Collection[CommandState] | None
    ) -> Iterable[tuple[Any, ...]]:
        device = check_device_filter(device)
        values = state_values(states)
        if device is None:
            rows: Iterable[tuple[Any, ...]] = self._rows.values()
        else:
            rows = (self._rows[i] for i in self._by_device.get(device, {}))
        if values is None:
            return rows
        return (row for row in rows if row[_STATE] in values)

    async def list(
        self,
        *,
        device: str | None = None,
        states: Collection[CommandState] | None = None,
        limit: int = 1000,
        after_seq: int = 0,
        newest: bool = False,
    ) -> builtins.list[Command]:
        self._check_open()
        limit = check_limit(limit)
        after_seq = check_after_seq(after_seq)
        rows = self._select(device, states)
        if newest:
            rows = reversed(builtins.list(rows))
        picked = itertools.islice((row for row in rows if row[0] > after_seq), limit)
        return [command_from_row(row) for row in picked]

    async def queued(self, device: str, *, limit: int | None = None) -> builtins.list[Command]:
        self._check_open()
        limit = check_optional_limit(limit)
        rows = builtins.list(self._select(check_str("device", device), [CommandState.QUEUED]))
        rows.sort(key=lambda row: (-row[_PRIORITY], row[0]))
        return [command_from_row(row) for row in rows[:limit]]

    async def devices_with_queued(self) -> builtins.list[str]:
        self._check_open()
        return sorted({row[_DEVICE] for row in self._rows.values() if row[_STATE] == _QUEUED})

    async def count(
        self, *, device: str | None = None, states: Collection[CommandState] | None = None
    ) -> int:
        self._check_open()
        return sum(1 for _ in self._select(device, states))

    async def next_expiry(self) -> float | None:
        self._check_open()
        return min(self._expiring.values(), default=None)

    async def due(self, *, now: float, limit: int = 1000) -> builtins.list[Command]:
        self._check_open()
        now = check_real("now", now)
        limit = check_limit(limit)
        ids = sorted((at, self._rows[i][0], i) for i, at in self._expiring.items() if at <= now)[
            :limit
        ]
        return [command_from_row(self._rows[i]) for _, _, i in ids]

    async def recover(self, *, now: float) -> builtins.list[Command]:
        self._check_open()
        now = check_real("now", now)
        changed = [
            recovered(command_from_row(row), now=now)
            for row in self._select(None, [CommandState.SENDING])
        ]
        # Encode everything first, then write: all or nothing, like one transaction.
        rows = [(command.seq, *command_values(command)) for command in changed]
        for row in rows:
            self._put_row(row)
        return [command_from_row(row) for row in rows]

    async def ids_with_prefix(self, prefix: str, *, limit: int = 10) -> builtins.list[str]:
        self._check_open()
        prefix = check_id_prefix(prefix)
        limit = check_limit(limit)
        return sorted(i for i in self._rows if i.startswith(prefix))[:limit]

    async def get_device(self, device: str) -> DeviceRecord | None:
        self._check_open()
        row = self._devices.get(check_str("device", device))
        return None if row is None else device_from_row(row)
