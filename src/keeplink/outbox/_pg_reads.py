"""The PostgreSQL store's queries: commands and device records, each one statement."""

from __future__ import annotations

import builtins
from collections.abc import Collection
from typing import Any

from keeplink._core.commands import Command, CommandState, DeviceRecord
from keeplink.outbox._pg_base import PgConnection
from keeplink.outbox._pg_sql import SELECT
from keeplink.outbox._rows import (
    DEVICE_COLUMNS,
    check_after_seq,
    check_device_filter,
    check_limit,
    check_optional_limit,
    check_real,
    check_str,
    command_from_row,
    device_from_row,
    id_prefix_bounds,
    state_values,
)


class Reads(PgConnection):
    """The read half of :class:`~keeplink.outbox.store.CommandStore`, in SQL."""

    async def get(self, command_id: str) -> Command | None:
        rows = await self._fetch(f"{SELECT} WHERE id = $1", check_str("command_id", command_id))
        return command_from_row(tuple(rows[0])) if rows else None

    @staticmethod
    def _where(
        device: str | None, states: Collection[CommandState] | None
    ) -> tuple[builtins.list[str], builtins.list[Any]] | None:
        device = check_device_filter(device)
        values = state_values(states)
        conditions: builtins.list[str] = []
        params: builtins.list[Any] = []
        if device is not None:
            params.append(device)
            conditions.append(f"device = ${len(params)}")
        if values is not None:
            if not values:
                return None
            params.append(values)
            conditions.append(f"state = ANY(${len(params)}::text[])")
        return conditions, params

    async def list(
        self,
        *,
        device: str | None = None,
        states: Collection[CommandState] | None = None,
        limit: int = 1000,
        after_seq: int = 0,
        newest: bool = False,
    ) -> builtins.list[Command]:
        limit = check_limit(limit)
        after_seq = check_after_seq(after_seq)
        where = self._where(device, states)
        if where is None:
            self._check_open()
            return []
        conditions, params = where
        params += [after_seq, limit]
        conditions.append(f"seq > ${len(params) - 1}")
        order = "seq DESC" if newest else "seq"
        sql = f"{SELECT} WHERE {' AND '.join(conditions)} ORDER BY {order} LIMIT ${len(params)}"
        return [command_from_row(tuple(row)) for row in await self._fetch(sql, *params)]

    async def queued(self, device: str, *, limit: int | None = None) -> builtins.list[Command]:
        device = check_str("device", device)
        limit = check_optional_limit(limit)
        sql = f"{SELECT} WHERE device = $1 AND state = 'queued' ORDER BY priority DESC, seq"
        if limit is not None:
            rows = await self._fetch(sql + " LIMIT $2", device, limit)
        else:
            rows = await self._fetch(sql, device)
        return [command_from_row(tuple(row)) for row in rows]

    async def devices_with_queued(self) -> builtins.list[str]:
        rows = await self._fetch(
            "SELECT DISTINCT device FROM commands WHERE state = 'queued' ORDER BY device"
        )
        return [row[0] for row in rows]

    async def count(
        self, *, device: str | None = None, states: Collection[CommandState] | None = None
    ) -> int:
        where = self._where(device, states)
        if where is None:
            self._check_open()
            return 0
        conditions, params = where
        sql = "SELECT count(*) FROM commands"
        if conditions:
            sql += f" WHERE {' AND '.join(conditions)}"
        rows = await self._fetch(sql, *params)
        return int(rows[0][0])

    async def next_expiry(self) -> float | None:
        rows = await self._fetch(
            "SELECT min(expires_at) FROM commands WHERE state = 'queued' AND expires_at IS NOT NULL"
        )
        value = rows[0][0]
        return None if value is None else float(value)

    async def due(self, *, now: float, limit: int = 1000) -> builtins.list[Command]:
        now = check_real("now", now)
        limit = check_limit(limit)
        rows = await self._fetch(
            f"{SELECT} WHERE state = 'queued' AND expires_at IS NOT NULL AND expires_at <= $1 "
            "ORDER BY expires_at, seq LIMIT $2",
            now,
            limit,
        )
        return [command_from_row(tuple(row)) for row in rows]

    async def depths(self, devices: Collection[str]) -> dict[str, tuple[int, int]]:
        names = [check_str("device", device) for device in devices]
        rows = await self._fetch(
            "SELECT device, count(*) FILTER (WHERE state = 'queued'), "
            "count(*) FILTER (WHERE state = 'sending') FROM commands "
            "WHERE device = ANY($1::text[]) AND state IN ('queued', 'sending') GROUP BY device",
            names,
        )
        found = {row[0]: (int(row[1]), int(row[2])) for row in rows}
        return {device: found.get(device, (0, 0)) for device in names}

    async def get_devices(self, devices: Collection[str]) -> dict[str, DeviceRecord]:
        names = [check_str("device", device) for device in devices]
        rows = await self._fetch(
            f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE device = ANY($1::text[])",
            names,
        )
        return {row[0]: device_from_row(tuple(row)) for row in rows}

    async def ids_with_prefix(self, prefix: str, *, limit: int = 10) -> builtins.list[str]:
        low, high = id_prefix_bounds(prefix)
        limit = check_limit(limit)
        # A range scan of the ids' unique index (in the column's collation, which orders
        # hex digits as they sort); the prefix test keeps exactly the matches.
        params: builtins.list[Any] = [low, len(low), limit]
        sql = "SELECT id FROM commands WHERE id >= $1 AND left(id, $2) = $1"
        if high is not None:
            params.append(high)
            sql += " AND id < $4"
        sql += ' ORDER BY id COLLATE "C" LIMIT $3'
        return [row[0] for row in await self._fetch(sql, *params)]

    async def get_device(self, device: str) -> DeviceRecord | None:
        rows = await self._fetch(
            f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE device = $1",
            check_str("device", device),
        )
        return device_from_row(tuple(rows[0])) if rows else None
