"""What the nodes of a fleet share through the PostgreSQL store besides commands: the
notifications that wake a device's owner (and carry events to every node's API), the
nodes' heartbeats, the device leases with their fencing epochs, and the device statuses."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from keeplink.outbox._pg_base import (
    CONNECT_TIMEOUT_S,
    PgConnection,
    connection_errors,
    unavailable,
)
from keeplink.outbox._pg_sql import (
    ACQUIRE,
    HEARTBEAT,
    NOTIFY,
    RELEASE,
    RENEW,
    STATUS_UPSERT,
)
from keeplink.outbox._rows import check_str


class Notifications(PgConnection):
    """``LISTEN``/``NOTIFY``: a committed submit wakes its device's owner, wherever it runs."""

    @property
    def channel(self) -> str:
        """The notification channel: each committed submit sends its device's id on it."""
        return f"keeplink_{self.schema}"

    @property
    def event_channel(self) -> str:
        """The channel :meth:`publish` sends on: events for every node's API."""
        return f"keeplink_{self.schema}_events"

    async def listen(
        self,
        on_submit: Callable[[str], object],
        on_event: Callable[[str], object] | None = None,
    ) -> Any:
        """A connection of its own that calls ``on_submit(device)`` for every submit any
        node commits, and ``on_event(text)`` for every :meth:`publish`. Returns the asyncpg
        connection (``is_closed()``, ``close()``). Raises StoreUnavailableError if it
        cannot connect."""
        import asyncpg

        self._check_open()

        def submitted(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            on_submit(str(payload))

        def published(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            if on_event is not None:
                on_event(str(payload))

        try:
            conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_S)
            await conn.add_listener(self.channel, submitted)
            if on_event is not None:
                await conn.add_listener(self.event_channel, published)
        except connection_errors() as exc:
            raise unavailable(exc) from exc
        return conn

    async def publish(self, payloads: Sequence[str]) -> None:
        """Send texts (each at most ``NOTIFY_MAX`` bytes) to every listening node, in one
        round trip. Raises StoreUnavailableError when the database cannot be reached."""
        if payloads:
            await self._fetch(NOTIFY, self.event_channel, list(payloads))


class Leases(PgConnection):
    """Which node is alive, which node owns which device (at which epoch), and what each
    owner says of its devices. Every time is the database's clock, the same for all."""

    async def heartbeat(self, node: str, *, lease_s: float) -> builtins.list[str]:
        """Say that ``node`` is alive; the live nodes (seen within ``lease_s``, not
        stopping), sorted. Uses the database's clock, the same for every node."""
        rows = await self._fetch(HEARTBEAT, check_str("node", node), float(lease_s))
        return sorted(row[0] for row in rows)

    async def leave(self, node: str) -> None:
        """Mark ``node`` as stopping: the others stop counting it at once."""
        await self._fetch("UPDATE nodes SET stopping = true WHERE node = $1", node)

    async def acquire(
        self, node: str, devices: Collection[str], *, lease_s: float
    ) -> dict[str, int]:
        """Take the leases of ``devices`` that are free (never held, released, or expired);
        their new epochs. A device another node holds is not taken."""
        if not devices:
            return {}
        rows = await self._fetch(ACQUIRE, node, list(devices), float(lease_s))
        return {row[0]: int(row[1]) for row in rows}

    async def renew(self, node: str, leases: Mapping[str, int], *, lease_s: float) -> set[str]:
        """Extend the leases ``node`` still holds (at those epochs, not expired); the devices
        renewed. A device missing from the answer is lost: stop delivering to it."""
        if not leases:
            return set()
        rows = await self._fetch(
            RENEW, node, list(leases), [int(e) for e in leases.values()], float(lease_s)
        )
        return {row[0] for row in rows}

    async def release(self, node: str, leases: Mapping[str, int]) -> None:
        """Give leases up at once, so the next owner need not wait for them to expire."""
        if not leases:
            return
        await self._fetch(RELEASE, node, list(leases), [int(e) for e in leases.values()])

    async def put_statuses(self, node: str, statuses: Mapping[str, str]) -> None:
        """Record what ``node`` says of its devices (device → JSON text), one round trip."""
        if statuses:
            await self._fetch(STATUS_UPSERT, node, list(statuses), list(statuses.values()))

    async def statuses(self) -> dict[str, tuple[str, str]]:
        """Device → (node, JSON text) of the last status its owner recorded."""
        rows = await self._fetch("SELECT device, node, status FROM device_status")
        return {row[0]: (row[1], row[2]) for row in rows}

    async def owners(self) -> dict[str, str]:
        """Every device with a current lease, and the node holding it."""
        rows = await self._fetch(
            "SELECT device, node FROM leases WHERE node IS NOT NULL "
            "AND expires_at > clock_timestamp()"
        )
        return {row[0]: row[1] for row in rows}
