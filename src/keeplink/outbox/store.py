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
import itertools
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypeAlias, runtime_checkable

from keeplink._core.commands import Command, CommandState, DeviceRecord, transition
from keeplink._core.dispatch import superseded_info
from keeplink._core.errors import ErrorCode, ErrorInfo, InvalidRequestError

__all__ = [
    "COMMAND_COLUMNS",
    "DEVICE_COLUMNS",
    "LIST_LIMIT_MAX",
    "CommandStore",
    "Fence",
    "Insert",
    "MemoryStore",
    "PutDevice",
    "Supersede",
    "Update",
    "Write",
    "WriteResult",
    "command_from_row",
    "command_values",
    "device_from_row",
    "device_values",
    "id_prefix_bounds",
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
    "retry_at",
)
"""A command row: ``seq`` then the values of :func:`command_values`, in this order."""

DEVICE_COLUMNS: Final = (
    "device",
    "cycle",
    "failed_cycles",
    "parked_reason",
    "parked_until",
    "failed_cycle",
)
"""A device row: the values of :func:`device_values`, in this order."""

_STATE: Final = COMMAND_COLUMNS.index("state")
_DEVICE: Final = COMMAND_COLUMNS.index("device")
_PRIORITY: Final = COMMAND_COLUMNS.index("priority")
_QUEUED: Final = CommandState.QUEUED.value
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Fence:
    """Who may write a device's delivery state: ``node`` holding the device's lease at
    ``epoch``. A store shared by several nodes makes a fenced write only while that lease
    is current, in the same transaction; otherwise it refuses the whole call with
    :class:`~keeplink.outbox.FencedError`. A store of one process has one owner and no
    leases: it takes a fence as always current."""

    node: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Insert:
    """Store a new ``queued`` command; its result is the stored copy, with its ``seq``."""

    command: Command


@dataclass(frozen=True, slots=True)
class Update:
    """Write the whole record (all fields but ``id`` and ``seq``) if the stored command with
    this id is in state ``expect``; its result is whether it was written."""

    command: Command
    expect: CommandState
    fence: Fence | None = None


@dataclass(frozen=True, slots=True)
class Supersede:
    """Supersede every ``queued`` command of ``device`` with this ``key`` that is older
    (lower ``seq``) than the command ``by``, stamped ``now``; its result is the superseded
    commands, by ``seq``. One indexed statement: it does not read the device's queue."""

    device: str
    key: str
    by: str
    now: float


@dataclass(frozen=True, slots=True)
class PutDevice:
    """Insert or replace a device's record; its result is ``None``."""

    record: DeviceRecord
    fence: Fence | None = None


Write: TypeAlias = Insert | Update | Supersede | PutDevice
WriteResult: TypeAlias = Command | bool | builtins.list[Command] | None


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


_HEX: Final = "0123456789abcdef"


def check_id_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not re.fullmatch("[0-9a-f]+", prefix):
        raise InvalidRequestError(f"an id prefix is lowercase hex digits, got {prefix!r}")
    return prefix


def id_prefix_bounds(prefix: str) -> tuple[str, str | None]:
    """``[low, high)`` for a range scan of an index of ids: every id that starts with the
    hex ``prefix`` sorts in it. ``high`` is the prefix without its trailing ``f`` digits
    and with its last digit raised by one (``abf`` → ``ac``, ``a9`` → ``aa``; ``None``
    for a prefix of only ``f``), never the next character (``9`` → ``:``): collations
    other than C order punctuation differently, hex digits alike. The range may hold ids
    of other shapes; a query keeps only those that start with the prefix."""
    head = check_id_prefix(prefix).rstrip("f")
    if not head:
        return prefix, None
    return prefix, head[:-1] + _HEX[_HEX.index(head[-1]) + 1]


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
    if type(value) is str and value.isascii() and (empty or value) and "\x00" not in value:
        return value  # the common case, checked without an encode (submits are hot)
    if not isinstance(value, str) or (not empty and not value):
        raise InvalidRequestError(f"{name} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        # PostgreSQL's text cannot hold NUL; refused by every store alike. (Inside args,
        # NUL is fine: JSON text escapes it.)
        raise InvalidRequestError(f"{name} must not contain NUL: {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{name} is not valid unicode: {value!r}") from None
    return value


def _optional_text(name: str, value: object) -> str | None:
    return None if value is None else _text(name, value, empty=True)


def _integer(name: str, value: object) -> int:
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise InvalidRequestError(f"{name} does not fit in 64 bits: {value!r}")
    return value


def check_real(name: str, value: object) -> float:
    if type(value) is float and value == value:  # not NaN
        return value
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


# ASCII output: lone surrogates survive as escapes, and any text column takes it. One
# encoder, made once: json.dumps with options builds a new one on every call.
_ENCODE: Final = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_SCALARS: Final = (str, int, float, bool, type(None))


def _json_object(name: str, value: object) -> str:
    """``value`` as compact JSON text; only a JSON object with string keys is accepted."""
    if type(value) is dict and not value:
        return "{}"
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{name} must be a JSON object, got {type(value).__name__}")
    try:
        text: str = _ENCODE(value if type(value) is dict else dict(value))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"{name} is not a JSON object: {exc}") from None
    # The encoder turns int/float/bool/None keys into strings; that would not round-trip.
    # (It has already refused circular structures, so this walk ends.)
    stack: builtins.list[object] = [value]
    while stack:
        item = stack.pop()
        if type(item) in _SCALARS:
            continue
        if isinstance(item, Mapping):
            for key, child in item.items():
                if type(key) is not str:
                    raise InvalidRequestError(f"{name}: object keys must be strings, got {key!r}")
                if type(child) not in _SCALARS:
                    stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return text


def _optional_json_object(name: str, value: object) -> str | None:
    return None if value is None else _json_object(name, value)


def _load_object(text: str) -> dict[str, Any]:
    if text == "{}":
        return {}
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
        _optional_real("retry_at", command.retry_at),
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
        retry_at,
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
        retry_at=None if retry_at is None else float(retry_at),
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
        _integer("failed_cycle", record.failed_cycle),
    )


def device_from_row(row: Sequence[Any]) -> DeviceRecord:
    """A device record from a row in ``DEVICE_COLUMNS`` order."""
    device, cycle, failed_cycles, parked_reason, parked_until, failed_cycle = row
    return DeviceRecord(
        device=device,
        cycle=cycle,
        failed_cycles=failed_cycles,
        parked_reason=parked_reason,
        parked_until=None if parked_until is None else float(parked_until),
        failed_cycle=failed_cycle,
    )


# ---------------------------------------------------------------------- encoded writes


@dataclass(frozen=True, slots=True)
class EncodedWrite:
    """A :data:`Write` validated and encoded as column values, ready for any store.

    ``kind`` is ``insert`` (``values``: :func:`command_values`), ``update`` (``values``,
    and ``expect``: a state value), ``supersede`` (``values``: device, key, the newer
    command's id, ``now``, the superseded state and the error code and message it gets)
    or ``device`` (``values``: :func:`device_values`).
    """

    kind: str
    values: tuple[Any, ...]
    expect: str | None = None
    fence: tuple[str, str, int] | None = None
    """``(device, node, epoch)`` of a fenced write."""


_SUPERSEDED: Final = CommandState.SUPERSEDED.value


def encode_writes(writes: Sequence[Write]) -> builtins.list[EncodedWrite]:
    """Validate and encode ``writes``. Raises InvalidRequestError for anything that would
    not round-trip, or for a write that is not one of the write types."""
    if isinstance(writes, str | bytes) or not isinstance(writes, Sequence):
        raise InvalidRequestError(f"writes must be a sequence, got {type(writes).__name__}")
    encoded: builtins.list[EncodedWrite] = []
    for write in writes:
        if isinstance(write, Insert):
            encoded.append(EncodedWrite("insert", new_command_values(write.command)))
        elif isinstance(write, Update):
            values = command_values(write.command)
            encoded.append(
                EncodedWrite(
                    "update",
                    values,
                    state_value(write.expect),
                    _fence(values[1], write.fence),
                )
            )
        elif isinstance(write, Supersede):
            info = superseded_info(_text("by", write.by))
            encoded.append(
                EncodedWrite(
                    "supersede",
                    (
                        _text("device", write.device),
                        _text("key", write.key),
                        write.by,
                        check_real("now", write.now),
                        _SUPERSEDED,
                        info.code,
                        info.message,
                    ),
                )
            )
        elif isinstance(write, PutDevice):
            values = device_values(write.record)
            encoded.append(EncodedWrite("device", values, fence=_fence(values[0], write.fence)))
        else:
            raise InvalidRequestError(f"not a store write: {write!r}")
    return encoded


def _fence(device: str, fence: object) -> tuple[str, str, int] | None:
    if fence is None:
        return None
    if not isinstance(fence, Fence):
        raise InvalidRequestError(f"fence must be a Fence, got {fence!r}")
    return (device, _text("fence.node", fence.node), _integer("fence.epoch", fence.epoch))


def duplicate_id(command_id: str) -> InvalidRequestError:
    return InvalidRequestError(f"command {command_id} already exists")


def check_optional_limit(limit: object) -> int | None:
    return None if limit is None else check_limit(limit)


# ---------------------------------------------------------------------- MemoryStore

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
