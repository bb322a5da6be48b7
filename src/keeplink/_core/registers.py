"""Typed values in Modbus registers, sans-IO: 16- and 32-bit integers and floats.

Modbus defines 16-bit registers, big-endian. A 32-bit value spans two registers, and
devices disagree on which comes first: ``word_order`` ``"big"`` puts the high word first,
``"little"`` the low word. A float32 that is NaN or infinity (a device's "no reading"
marker) decodes as None; encoding one is refused.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

from keeplink._core.errors import InvalidRequestError

__all__ = ["TYPES", "check_int", "decode_values", "encode_values"]

TYPES: Final[Mapping[str, tuple[str, int]]] = {
    "uint16": ("H", 1),
    "int16": ("h", 1),
    "uint32": ("I", 2),
    "int32": ("i", 2),
    "float32": ("f", 2),
}
"""Typed values: struct format (big-endian within the value) and registers per value."""
_INT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "uint16": (0, 0xFFFF),
    "int16": (-0x8000, 0x7FFF),
    "uint32": (0, 0xFFFF_FFFF),
    "int32": (-0x8000_0000, 0x7FFF_FFFF),
}


def check_int(op: str, name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"modbus {op}: {name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequestError(f"modbus {op}: {name} must be {low}..{high}, got {value}")
    return value


def encode_values(op: str, values: Sequence[object], value_type: str, word_order: str) -> list[int]:
    """Typed values → registers. Raises InvalidRequestError for a value the type cannot hold."""
    fmt, width = TYPES[value_type]
    packer = struct.Struct(">" + fmt)
    registers: list[int] = []
    for value in values:
        if value_type == "float32":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequestError(
                    f"modbus {op}: float32 values must be numbers, got {value!r}"
                )
            if not math.isfinite(value):
                raise InvalidRequestError(
                    f"modbus {op}: float32 values must be finite, got {value!r}"
                )
            try:
                raw = packer.pack(value)
            except (OverflowError, struct.error) as exc:
                raise InvalidRequestError(f"modbus {op}: {value!r} does not fit a float32") from exc
        else:
            low, high = _INT_RANGES[value_type]
            raw = packer.pack(check_int(op, f"a {value_type} value", value, low, high))
        words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 2 * width, 2)]
        if word_order == "little":
            words.reverse()
        registers.extend(words)
    return registers


def decode_values(registers: Sequence[int], value_type: str, word_order: str) -> list[Any]:
    """Registers → typed values (the count was checked to be a whole number of values)."""
    fmt, width = TYPES[value_type]
    unpacker = struct.Struct(">" + fmt)
    values: list[Any] = []
    for i in range(0, len(registers), width):
        words = list(registers[i : i + width])
        if word_order == "little":
            words.reverse()
        value = unpacker.unpack(b"".join(w.to_bytes(2, "big") for w in words))[0]
        if value_type == "float32" and not math.isfinite(value):
            value = None  # a device's "no reading": never leak NaN into results or JSON
        values.append(value)
    return values
