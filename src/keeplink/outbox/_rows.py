"""How every store encodes a record: the column lists, the validation that refuses a value
that would not round-trip, and the conversions between records and rows.

A record read back from any store equals the one written, field by field: ``args``,
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
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

from keeplink._core.commands import Command, CommandState, DeviceRecord
from keeplink._core.errors import ErrorInfo, InvalidRequestError

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
_QUEUED: Final = CommandState.QUEUED.value
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


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


def check_text(name: str, value: object, *, empty: bool = False) -> str:
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
    return None if value is None else check_text(name, value, empty=True)


def check_integer(name: str, value: object) -> int:
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
        check_text("id", command.id),
        check_text("device", command.device),
        check_text("op", command.op),
        _json_object("args", command.args),
        state_value(command.state),
        check_real("created_at", command.created_at),
        check_real("updated_at", command.updated_at),
        check_text("idempotency_key", command.idempotency_key),
        _optional_text("key", command.key),
        check_integer("priority", command.priority),
        check_integer("max_attempts", command.max_attempts),
        check_integer("attempts", command.attempts),
        _optional_real("expires_at", command.expires_at),
        _optional_text("precondition", command.precondition),
        _json_object("precondition_args", command.precondition_args),
        None if error is None else check_text("last_error.code", error.code, empty=True),
        None if error is None else check_text("last_error.message", error.message, empty=True),
        _optional_json_object("result", command.result),
        check_integer("cycle", command.cycle),
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
        check_text("device", record.device),
        check_integer("cycle", record.cycle),
        check_integer("failed_cycles", record.failed_cycles),
        _optional_text("parked_reason", record.parked_reason),
        _optional_real("parked_until", record.parked_until),
        check_integer("failed_cycle", record.failed_cycle),
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


def duplicate_id(command_id: str) -> InvalidRequestError:
    return InvalidRequestError(f"command {command_id} already exists")


def check_optional_limit(limit: object) -> int | None:
    return None if limit is None else check_limit(limit)
