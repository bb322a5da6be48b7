"""Command stores: the :class:`CommandStore` protocol and the in-process :class:`MemoryStore`.

A store keeps :class:`~keeplink._core.commands.Command` records and per-device
:class:`~keeplink._core.commands.DeviceRecord` rows. It is deliberately dumb: it assigns
``seq`` on insert, writes a record only through a compare-and-set on the stored state
(:meth:`CommandStore.update`), and answers queries. Which transition is legal, and when,
is decided by the outbox with :func:`~keeplink._core.commands.transition`.

Every store encodes records the same way (:func:`command_values` / :func:`command_from_row`),
so a record read back from any store equals the one written, field by field: ``args``,
``precondition_args`` and ``result`` are JSON objects (stored as JSON text), ``last_error``
is a code and a message, ``None`` stays ``None`` and floats are exact. A value that cannot
be stored that way (a non-JSON argument, a non-string key, NaN, an integer outside 64 bits)
is refused with :class:`~keeplink.InvalidRequestError` by every store alike, before
anything is written.
"""

from __future__ import annotations

import builtins
import json
import math
from collections.abc import Collection, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Protocol, Self, runtime_checkable

from keeplink._core.commands import Command, CommandState, DeviceRecord, transition
from keeplink._core.errors import ErrorCode, ErrorInfo, InvalidRequestError

__all__ = [
    "COMMAND_COLUMNS",
    "DEVICE_COLUMNS",
    "LIST_LIMIT_MAX",
    "CommandStore",
    "MemoryStore",
    "command_from_row",
    "command_values",
    "device_from_row",
    "device_values",
    "recovered",
]

LIST_LIMIT_MAX: Final = 10_000
"""The largest ``limit`` :meth:`CommandStore.list` accepts."""

COMMAND_COLUMNS: Final = (
    "seq",
    "id",
    "device",
    "op",
    "args",
    "state",
    "created_at",
    "updated_at",
    "idempotency_key",
    "key",
    "priority",
    "max_attempts",
    "attempts",
    "expires_at",
    "precondition",
    "precondition_args",
    "error_code",
    "error_message",
    "result",
    "cycle",
)
"""A command row: ``seq`` then the values of :func:`command_values`, in this order."""

DEVICE_COLUMNS: Final = ("device", "cycle", "failed_cycles", "parked_reason", "parked_until")
"""A device row: the values of :func:`device_values`, in this order."""

_STATE: Final = COMMAND_COLUMNS.index("state")
_DEVICE: Final = COMMAND_COLUMNS.index("device")
_PRIORITY: Final = COMMAND_COLUMNS.index("priority")
_QUEUED: Final = CommandState.QUEUED.value
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


@runtime_checkable
class CommandStore(Protocol):
    """Where durable commands live. Every write is committed before its coroutine returns.

    All methods are coroutines. Using a store before :meth:`open` or after :meth:`close`
    raises ``RuntimeError``.
    """

    async def open(self) -> None:
        """Make the store usable (create or migrate a schema). Idempotent."""
        ...

    async def close(self) -> None:
        """Release everything the store holds. Idempotent; a closed store stays closed."""
        ...

    async def insert(self, command: Command) -> Command:
        """Store a new ``queued`` command and return the stored copy, with its ``seq``.

        ``seq`` is strictly increasing in submission order and never reused. Raises
        :class:`~keeplink.InvalidRequestError` if the id exists, if the command is not
        ``queued`` or if a field cannot be stored.
        """
        ...

    async def update(self, command: Command, *, expect: CommandState) -> bool:
        """Write the whole record (all fields but ``id`` and ``seq``) if the stored command
        with this id is in state ``expect``. Returns whether it was written."""
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
    ) -> builtins.list[Command]:
        """Commands with ``seq > after_seq`` (filtered by device and states), by ``seq``,
        at most ``limit`` (1..10000) of them."""
        ...

    async def queued(self, device: str) -> builtins.list[Command]:
        """The device's ``queued`` commands in delivery order: priority descending, then
        ``seq`` ascending."""
        ...

    async def devices_with_queued(self) -> builtins.list[str]:
        """Every device with at least one ``queued`` command, sorted."""
        ...

    async def count(
        self, *, device: str | None = None, states: Collection[CommandState] | None = None
    ) -> int:
        """How many commands match the filters."""
        ...

    async def recover(self, *, now: float) -> builtins.list[Command]:
        """Crash recovery, once at start, atomically: every ``sending`` command goes back to
        ``queued`` (its attempt stays counted), or to ``failed`` if its attempts are
        exhausted (see :func:`recovered`). Returns the changed commands by ``seq``."""
        ...

    async def get_device(self, device: str) -> DeviceRecord | None:
        """The device's record, or ``None``."""
        ...

    async def put_device(self, record: DeviceRecord) -> None:
        """Insert or replace the device's record."""
        ...


# ---------------------------------------------------------------------- shared semantics


def recovered(command: Command, *, now: float) -> Command:
    """What crash recovery makes of a ``sending`` command (its attempt is already counted)."""
    if command.attempts >= command.max_attempts:
        return transition(
            command,
            CommandState.FAILED,
            now=now,
            last_error=ErrorInfo(
                ErrorCode.CONNECTION_ABORTED.value,
                f"attempts exhausted ({command.attempts} of {command.max_attempts}); "
                "the last one was interrupted by a restart",
            ),
        )
    return transition(command, CommandState.QUEUED, now=now)


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= LIST_LIMIT_MAX:
        raise InvalidRequestError(f"limit must be an integer in 1..{LIST_LIMIT_MAX}, got {limit!r}")
    return limit


def check_after_seq(after_seq: object) -> int:
    if isinstance(after_seq, bool) or not isinstance(after_seq, int):
        raise InvalidRequestError(f"after_seq must be an integer, got {after_seq!r}")
    return max(after_seq, 0)


def check_str(name: str, value: object) -> str:
    """A lookup argument (an id, a device name): any string."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {value!r}")
    return value


def check_device_filter(device: object) -> str | None:
    return None if device is None else check_str("device", device)


def state_values(states: Collection[CommandState] | None) -> builtins.list[str] | None:
    """The filter's state values, sorted and unique; ``None`` for no filter."""
    if states is None:
        return None
    # A lone state is a str: take it as itself, not as a collection of its letters.
    items: Collection[object] = [states] if isinstance(states, str) else states
    return sorted({state_value(state) for state in items})


def state_value(state: object) -> str:
    """The value of a :class:`CommandState` (or of its string)."""
    if isinstance(state, str):
        try:
            return CommandState(state).value
        except ValueError:
            pass
    raise InvalidRequestError(f"unknown command state {state!r}")


def _text(name: str, value: object, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise InvalidRequestError(f"{name} must be a non-empty string, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{name} is not valid unicode: {value!r}") from None
    return value


def _optional_text(name: str, value: object) -> str | None:
    return None if value is None else _text(name, value, empty=True)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise InvalidRequestError(f"{name} does not fit in 64 bits: {value!r}")
    return value


def check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidRequestError(f"{name} is out of range: {value!r}") from None
    if math.isnan(number):
        raise InvalidRequestError(f"{name} must not be NaN")
    return number


def _optional_real(name: str, value: object) -> float | None:
    return None if value is None else check_real(name, value)


def _json_object(name: str, value: object) -> str:
    """``value`` as compact JSON text; only a JSON object with string keys is accepted."""
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{name} must be a JSON object, got {type(value).__name__}")
    try:
        # ASCII output: lone surrogates survive as escapes, and any text column takes it.
        text = json.dumps(dict(value), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"{name} is not a JSON object: {exc}") from None
    # json.dumps turns int/float/bool/None keys into strings; that would not round-trip.
    # (It has already refused circular structures, so this walk ends.)
    stack: builtins.list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidRequestError(f"{name}: object keys must be strings, got {key!r}")
                stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return text


def _optional_json_object(name: str, value: object) -> str | None:
    return None if value is None else _json_object(name, value)


def _load_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"stored JSON is not an object: {text[:80]!r}")
    return value


def command_values(command: Command) -> tuple[Any, ...]:
    """The command as column values (``COMMAND_COLUMNS[1:]``), validated.

    Raises :class:`~keeplink.InvalidRequestError` for anything that would not round-trip.
    """
    if not isinstance(command, Command):
        raise InvalidRequestError(f"expected a Command, got {type(command).__name__}")
    error = command.last_error
    if error is not None and not isinstance(error, ErrorInfo):
        raise InvalidRequestError(f"last_error must be an ErrorInfo, got {error!r}")
    return (
        _text("id", command.id),
        _text("device", command.device),
        _text("op", command.op),
        _json_object("args", command.args),
        state_value(command.state),
        check_real("created_at", command.created_at),
        check_real("updated_at", command.updated_at),
        _text("idempotency_key", command.idempotency_key),
        _optional_text("key", command.key),
        _integer("priority", command.priority),
        _integer("max_attempts", command.max_attempts),
        _integer("attempts", command.attempts),
        _optional_real("expires_at", command.expires_at),
        _optional_text("precondition", command.precondition),
        _json_object("precondition_args", command.precondition_args),
        None if error is None else _text("last_error.code", error.code, empty=True),
        None if error is None else _text("last_error.message", error.message, empty=True),
        _optional_json_object("result", command.result),
        _integer("cycle", command.cycle),
    )


def new_command_values(command: Command) -> tuple[Any, ...]:
    """:func:`command_values` of a command about to be inserted, which must be queued."""
    values = command_values(command)
    if values[_STATE - 1] != _QUEUED:
        raise InvalidRequestError(
            f"a new command must be queued, got {values[_STATE - 1]} ({command.id})"
        )
    return values


def command_from_row(row: Sequence[Any]) -> Command:
    """A command from a row in ``COMMAND_COLUMNS`` order."""
    (
        seq,
        command_id,
        device,
        op,
        args,
        state,
        created_at,
        updated_at,
        idempotency_key,
        key,
        priority,
        max_attempts,
        attempts,
        expires_at,
        precondition,
        precondition_args,
        error_code,
        error_message,
        result,
        cycle,
    ) = row
    return Command(
        id=command_id,
        device=device,
        op=op,
        args=_load_object(args),
        state=CommandState(state),
        created_at=float(created_at),
        updated_at=float(updated_at),
        idempotency_key=idempotency_key,
        key=key,
        priority=priority,
        max_attempts=max_attempts,
        attempts=attempts,
        expires_at=None if expires_at is None else float(expires_at),
        precondition=precondition,
        precondition_args=_load_object(precondition_args),
        last_error=None if error_code is None else ErrorInfo(error_code, error_message),
        result=None if result is None else _load_object(result),
        cycle=cycle,
        seq=seq,
    )


def device_values(record: DeviceRecord) -> tuple[Any, ...]:
    """The device record as column values (``DEVICE_COLUMNS``), validated."""
    if not isinstance(record, DeviceRecord):
        raise InvalidRequestError(f"expected a DeviceRecord, got {type(record).__name__}")
    return (
        _text("device", record.device),
        _integer("cycle", record.cycle),
        _integer("failed_cycles", record.failed_cycles),
        _optional_text("parked_reason", record.parked_reason),
        _optional_real("parked_until", record.parked_until),
    )


def device_from_row(row: Sequence[Any]) -> DeviceRecord:
    """A device record from a row in ``DEVICE_COLUMNS`` order."""
    device, cycle, failed_cycles, parked_reason, parked_until = row
    return DeviceRecord(
        device=device,
        cycle=cycle,
        failed_cycles=failed_cycles,
        parked_reason=parked_reason,
        parked_until=None if parked_until is None else float(parked_until),
    )


# ---------------------------------------------------------------------- MemoryStore


class MemoryStore:
    """A :class:`CommandStore` in process memory, for tests. Nothing survives the process.

    It keeps encoded rows, exactly like a database would, so it accepts, refuses and
    returns the same values as :class:`~keeplink.outbox.sqlite.SqliteStore`.
    """

    def __init__(self) -> None:
        self._rows: dict[str, tuple[Any, ...]] = {}  # id -> row; insertion order == seq order
        self._devices: dict[str, tuple[Any, ...]] = {}
        self._last_seq = 0
        self._status = "new"

    def __repr__(self) -> str:
        return f"<MemoryStore {self._status} commands={len(self._rows)}>"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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

    async def insert(self, command: Command) -> Command:
        self._check_open()
        values = new_command_values(command)
        if command.id in self._rows:
            raise InvalidRequestError(f"command {command.id} already exists")
        self._last_seq += 1
        row = (self._last_seq, *values)
        self._rows[command.id] = row
        return command_from_row(row)

    async def update(self, command: Command, *, expect: CommandState) -> bool:
        self._check_open()
        values = command_values(command)
        expected = state_value(expect)
        row = self._rows.get(command.id)
        if row is None or row[_STATE] != expected:
            return False
        self._rows[command.id] = (row[0], *values)
        return True

    async def get(self, command_id: str) -> Command | None:
        self._check_open()
        row = self._rows.get(check_str("command_id", command_id))
        return None if row is None else command_from_row(row)

    def _select(
        self, device: str | None, states: Collection[CommandState] | None
    ) -> builtins.list[tuple[Any, ...]]:
        device = check_device_filter(device)
        values = state_values(states)
        return [
            row
            for row in self._rows.values()
            if (device is None or row[_DEVICE] == device)
            and (values is None or row[_STATE] in values)
        ]

    async def list(
        self,
        *,
        device: str | None = None,
        states: Collection[CommandState] | None = None,
        limit: int = 1000,
        after_seq: int = 0,
    ) -> builtins.list[Command]:
        self._check_open()
        limit = check_limit(limit)
        after_seq = check_after_seq(after_seq)
        rows = [row for row in self._select(device, states) if row[0] > after_seq]
        return [command_from_row(row) for row in rows[:limit]]

    async def queued(self, device: str) -> builtins.list[Command]:
        self._check_open()
        rows = self._select(check_str("device", device), [CommandState.QUEUED])
        rows.sort(key=lambda row: (-row[_PRIORITY], row[0]))
        return [command_from_row(row) for row in rows]

    async def devices_with_queued(self) -> builtins.list[str]:
        self._check_open()
        return sorted({row[_DEVICE] for row in self._rows.values() if row[_STATE] == _QUEUED})

    async def count(
        self, *, device: str | None = None, states: Collection[CommandState] | None = None
    ) -> int:
        self._check_open()
        return len(self._select(device, states))

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
            self._rows[row[1]] = row
        return [command_from_row(row) for row in rows]

    async def get_device(self, device: str) -> DeviceRecord | None:
        self._check_open()
        row = self._devices.get(check_str("device", device))
        return None if row is None else device_from_row(row)

    async def put_device(self, record: DeviceRecord) -> None:
        self._check_open()
        values = device_values(record)
        self._devices[values[0]] = values
