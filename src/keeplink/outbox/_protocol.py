"""The :class:`CommandStore` protocol: the seam every store implements."""

from __future__ import annotations

import builtins
from collections.abc import Collection, Sequence
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from keeplink._core.commands import Command, CommandState, DeviceRecord
from keeplink.outbox._rows import LIST_LIMIT_MAX, check_id_prefix, check_limit
from keeplink.outbox._writes import Insert, PutDevice, Update, Write, WriteResult


@runtime_checkable
class CommandStore(Protocol):
    """Where durable commands live. Every write is committed before its coroutine returns.

    Writes go through :meth:`apply`: one call is one atomic unit (all of its writes, or
    none), and concurrent calls are *group-committed*: a store collects the calls that are
    ready while it commits (up to a bounded batch, never waiting on a timer when idle) and
    commits them in one transaction. Each call returns only after its own commit, so a
    crash loses only writes whose caller was not answered yet. A call whose coroutine is
    cancelled before its batch began is not written; one cancelled later may be.

    All methods are coroutines. Using a store before :meth:`open` or after :meth:`close`
    raises ``RuntimeError``. :meth:`insert`, :meth:`update` and :meth:`put_device` are
    one-write :meth:`apply` calls.
    """

    async def open(self) -> None:
        """Make the store usable (create or migrate a schema). Idempotent."""
        ...

    async def close(self) -> None:
        """Release everything the store holds, after the writes already handed to it.
        Idempotent; a closed store stays closed."""
        ...

    async def apply(self, writes: Sequence[Write]) -> builtins.list[WriteResult]:
        """Commit ``writes`` atomically, in order; their results, in the same order (see
        each write type). Every value is validated first: an unstorable one raises
        :class:`~keeplink.InvalidRequestError` and nothing is written. An :class:`Insert`
        whose id exists, or whose command is not ``queued``, raises it too, and none of
        this call's writes is kept (other calls in the same transaction are unaffected)."""
        ...

    async def get(self, command_id: str) -> Command | None:
        """The command with this id, or ``None``."""
        ...

    async def list(
        self,
        *,
        device: str | None = None,
        states: Collection[CommandState] | None = None,
        limit: int = 1000,
        after_seq: int = 0,
        newest: bool = False,
    ) -> builtins.list[Command]:
        """Commands with ``seq > after_seq`` (filtered by device and states), at most
        ``limit`` (1..10000) of them: the oldest first by ``seq``, or with ``newest`` the
        newest first (``seq`` descending)."""
        ...

    async def queued(self, device: str, *, limit: int | None = None) -> builtins.list[Command]:
        """The device's ``queued`` commands in delivery order (priority descending, then
        ``seq`` ascending), at most ``limit`` (1..10000) of them if given."""
        ...

    async def devices_with_queued(self) -> builtins.list[str]:
        """Every device with at least one ``queued`` command, sorted."""
        ...

    async def count(
        self, *, device: str | None = None, states: Collection[CommandState] | None = None
    ) -> int:
        """How many commands match the filters."""
        ...

    async def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` of a ``queued`` command (from an index), or ``None``."""
        ...

    async def due(self, *, now: float, limit: int = 1000) -> builtins.list[Command]:
        """``queued`` commands whose ``expires_at <= now``, earliest first, at most ``limit``."""
        ...

    async def recover(self, *, now: float) -> builtins.list[Command]:
        """Crash recovery, once at start, atomically: every ``sending`` command goes back to
        ``queued`` (its attempt stays counted), or to ``failed`` if its attempts are
        exhausted (see :func:`recovered`). Returns the changed commands by ``seq``."""
        ...

    async def get_device(self, device: str) -> DeviceRecord | None:
        """The device's record, or ``None``."""
        ...

    async def depths(self, devices: Collection[str]) -> dict[str, tuple[int, int]]:
        """For each of ``devices``: how many of its commands are ``queued`` and how many
        ``sending``. A store over a network answers in one round trip; this default asks
        :meth:`count` twice a device."""
        return {
            device: (
                await self.count(device=device, states=[CommandState.QUEUED]),
                await self.count(device=device, states=[CommandState.SENDING]),
            )
            for device in devices
        }

    async def get_devices(self, devices: Collection[str]) -> dict[str, DeviceRecord]:
        """The records of those of ``devices`` that have one. A store over a network
        answers in one round trip; this default asks :meth:`get_device` for each."""
        records = {device: await self.get_device(device) for device in devices}
        return {device: record for device, record in records.items() if record is not None}

    async def ids_with_prefix(self, prefix: str, *, limit: int = 10) -> builtins.list[str]:
        """The ids of the commands whose id starts with ``prefix`` (lowercase hex digits, as
        the ids keeplink makes are), sorted, at most ``limit`` (1..10000) of them.

        The stores of this package answer from their index of ids. This default, for a
        store of another kind that inherits it, reads every command."""
        prefix = check_id_prefix(prefix)
        limit = check_limit(limit)
        found: builtins.list[str] = []
        after = 0
        while page := await self.list(limit=LIST_LIMIT_MAX, after_seq=after):
            found += [c.id for c in page if c.id.startswith(prefix)]
            after = page[-1].seq
        return sorted(found)[:limit]

    async def __aenter__(self) -> Self:
        """``async with store:`` opens it, and closes it at the end."""
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def insert(self, command: Command) -> Command:
        """Store a new ``queued`` command (one :class:`Insert`) and return the stored copy.

        ``seq`` is strictly increasing in submission order and never reused. Raises
        :class:`~keeplink.InvalidRequestError` if the id exists, if the command is not
        ``queued`` or if a field cannot be stored.
        """
        (stored,) = await self.apply([Insert(command)])
        assert isinstance(stored, Command)
        return stored

    async def update(self, command: Command, *, expect: CommandState) -> bool:
        """One :class:`Update`: whether it was written."""
        (written,) = await self.apply([Update(command, expect)])
        return written is True

    async def put_device(self, record: DeviceRecord) -> None:
        """One :class:`PutDevice`."""
        await self.apply([PutDevice(record)])
