"""Modbus TCP, sans-IO: requests to bytes, a byte stream to framed responses.

An ADU (application data unit) is a 7-byte MBAP header and a PDU::

    transaction id (2) | protocol id (2, always 0) | length (2) | unit id (1) | PDU
    PDU: function code (1) | data

``length`` counts the unit id and the PDU; a PDU is at most 253 bytes. Every number is
big-endian. A server refuses a request with an *exception response*: the request's
function code with bit 0x80 set, and one data byte, the exception code.

The encoders build the client requests keeplink speaks (function codes 1..6, 15 and 16)
and check nothing: callers validate first (the driver does, with messages that name the
op). :class:`MbapReader` splits a byte stream into :class:`Adu` records, skipping what
cannot be a header up to the next place one could start. :func:`reply_problem` says why a
framed response cannot answer a given request (or None). Nothing here awaits, reads a clock
or touches a socket.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, NamedTuple

from keeplink._core.jsonline import Malformed

__all__ = [
    "EXCEPTION_FLAG",
    "MAX_READ_BITS",
    "MAX_READ_REGISTERS",
    "MAX_WRITE_BITS",
    "MAX_WRITE_REGISTERS",
    "READ_BITS",
    "READ_COILS",
    "READ_DISCRETE_INPUTS",
    "READ_HOLDING_REGISTERS",
    "READ_INPUT_REGISTERS",
    "READ_REGISTERS",
    "WRITE_MULTIPLE_COILS",
    "WRITE_MULTIPLE_REGISTERS",
    "WRITE_SINGLE_COIL",
    "WRITE_SINGLE_REGISTER",
    "Adu",
    "MbapReader",
    "bits_of",
    "encode_read",
    "encode_write_coils",
    "encode_write_registers",
    "encode_write_single",
    "registers_of",
    "reply_problem",
]

READ_COILS: Final = 1
READ_DISCRETE_INPUTS: Final = 2
READ_HOLDING_REGISTERS: Final = 3
READ_INPUT_REGISTERS: Final = 4
WRITE_SINGLE_COIL: Final = 5
WRITE_SINGLE_REGISTER: Final = 6
WRITE_MULTIPLE_COILS: Final = 15
WRITE_MULTIPLE_REGISTERS: Final = 16
READ_REGISTERS: Final = frozenset({READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS})
READ_BITS: Final = frozenset({READ_COILS, READ_DISCRETE_INPUTS})
EXCEPTION_FLAG: Final = 0x80
COIL_ON: Final = 0xFF00
"""What a single-coil write sends for "on" (0x0000 is "off"), as the spec defines it."""

# Quantity limits from the Modbus application protocol spec (they keep each PDU within 253
# bytes). The register and coil write limits are lower than the read ones for that reason.
MAX_READ_REGISTERS: Final = 125
MAX_WRITE_REGISTERS: Final = 123
MAX_READ_BITS: Final = 2000
MAX_WRITE_BITS: Final = 1968

_HEADER: Final = struct.Struct(">HHHB")
_HEADER_SIZE: Final = 7
_MIN_ADU: Final = _HEADER_SIZE + 1  # a header and a function code
_MIN_LENGTH: Final = 2  # the unit id and a function code
_MAX_LENGTH: Final = 254  # the unit id and the longest PDU
_SAMPLE: Final = 32  # bytes of a malformed input kept for the log
# A request whose PDU is a function code and two 16-bit fields (reads, single writes).
_FIXED: Final = struct.Struct(">HHHBBHH")
_MULTIPLE: Final = struct.Struct(">HHHBBHHB")  # ... and a byte count (multiple writes)
# A register read's data, by its byte count: unpackers made once, not per reply.
_UNPACK_REGISTERS: Final = tuple(struct.Struct(f">{n // 2}H").unpack_from for n in range(256))
# Each byte's 8 bits, least significant first (the order Modbus packs coils in).
_BITS_OF_BYTE: Final = tuple(tuple(bool(b >> i & 1) for i in range(8)) for b in range(256))


class Adu(NamedTuple):
    """One framed response: its header fields, its function code as on the wire (bit 0x80
    set for an exception response) and the PDU's data after the function code."""

    tid: int
    unit: int
    function: int
    data: bytes


# -------------------------------------------------------------------------------- encoding


def encode_read(tid: int, unit: int, function: int, address: int, count: int) -> bytes:
    """A read request (function 1..4) of ``count`` registers or bits from ``address``."""
    return _FIXED.pack(tid, 0, 6, unit, function, address, count)


def encode_write_single(tid: int, unit: int, function: int, address: int, value: int) -> bytes:
    """A single write (function 5 or 6): ``value`` is the register, or :data:`COIL_ON` / 0."""
    return _FIXED.pack(tid, 0, 6, unit, function, address, value)


def encode_write_registers(tid: int, unit: int, address: int, registers: Sequence[int]) -> bytes:
    """Write multiple registers (function 16)."""
    n = len(registers)
    return _MULTIPLE.pack(
        tid, 0, 7 + 2 * n, unit, WRITE_MULTIPLE_REGISTERS, address, n, 2 * n
    ) + struct.pack(f">{n}H", *registers)


def encode_write_coils(tid: int, unit: int, address: int, bits: Sequence[bool]) -> bytes:
    """Write multiple coils (function 15): the bits packed 8 a byte, first bit lowest."""
    packed = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            packed[i >> 3] |= 1 << (i & 7)
    n = len(packed)
    return _MULTIPLE.pack(tid, 0, 7 + n, unit, WRITE_MULTIPLE_COILS, address, len(bits), n) + packed


# -------------------------------------------------------------------------------- decoding


def registers_of(data: bytes) -> list[int]:
    """The registers of a register read's data (a byte count, then 2 bytes a register)."""
    return list(_UNPACK_REGISTERS[data[0]](data, 1))


def bits_of(data: bytes, count: int) -> list[bool]:
    """The first ``count`` bits of a bit read's data (a byte count, then the packed bits;
    the last byte is zero-padded)."""
    table = _BITS_OF_BYTE
    bits = [bit for byte in data[1:] for bit in table[byte]]
    del bits[count:]
    return bits


class MbapReader:
    """Splits a byte stream into :class:`Adu` records, incrementally.

    ``feed`` returns every complete ADU in the bytes so far, in order, and keeps the rest
    (at most one ADU, 260 bytes) for the next call. Bytes that cannot start a header (a
    non-zero protocol id, a length outside 2..254) are one :class:`~keeplink.Malformed`
    item each run: they are skipped up to the next place a header could start, so the
    stream resynchronises on the next real frame. ``feed`` never raises on peer bytes.
    """

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    @property
    def buffered(self) -> int:
        """Bytes held for the next ``feed`` (a frame not yet complete)."""
        return len(self._rest)

    def feed(self, data: bytes) -> list[Adu | Malformed]:
        buf = self._rest + data if self._rest else data
        out: list[Adu | Malformed] = []
        pos = 0
        size = len(buf)
        while size - pos >= _MIN_ADU:
            tid, protocol, length, unit = _HEADER.unpack_from(buf, pos)
            if protocol or not _MIN_LENGTH <= length <= _MAX_LENGTH:
                skip_to = _next_header(buf, pos + 1)
                out.append(
                    Malformed(
                        f"not a Modbus TCP header (protocol id {protocol}, length {length});"
                        f" skipped {skip_to - pos} bytes",
                        bytes(buf[pos : min(skip_to, pos + _SAMPLE)]),
                    )
                )
                pos = skip_to
                continue
            end = pos + 6 + length
            if end > size:
                break
            out.append(Adu(tid, unit, buf[pos + 7], buf[pos + 8 : end]))
            pos = end
        self._rest = buf[pos:] if pos < size else b""
        return out


def _plausible_header_at(buf: bytes, i: int) -> bool:
    """Whether a header could start at ``i``, judging by the bytes there so far."""
    n = len(buf)
    for k in (i + 2, i + 3, i + 4):  # the protocol id and the length's high byte are zero
        if k < n and buf[k]:
            return False
    return not (i + 5 < n and not _MIN_LENGTH <= buf[i + 5] <= _MAX_LENGTH)


def _next_header(buf: bytes, start: int) -> int:
    """The first index from ``start`` where a header could begin (``len(buf)``: none).

    A plausible header needs a zero protocol id and a length of at most 254: three zero
    bytes in a row, which text and most noise never contain, so resynchronising after
    garbage lands on the next real frame.
    """
    n = len(buf)
    i = start
    while (j := buf.find(b"\0\0\0", i + 2)) >= 0:
        candidate = j - 2
        if candidate + 5 >= n or _MIN_LENGTH <= buf[candidate + 5] <= _MAX_LENGTH:
            return candidate
        i = candidate + 1
    # No complete zero run ahead: a header may still begin in the last few bytes.
    for k in range(max(i, n - 4), n):
        if _plausible_header_at(buf, k):
            return k
    return n


def reply_problem(request: bytes, adu: Adu) -> str | None:
    """Why ``adu`` cannot answer ``request`` (an ADU built by this module), or None.

    A reply must come from the unit asked (any unit answers a request to unit 0) and carry
    the request's function code, or that code as an exception with one exception byte. A
    read's reply holds exactly the bytes the request's count asks for; a write's reply
    echoes the request's address and its value (single writes) or count (multiple).
    """
    unit = request[6]
    function = request[7]
    if unit and adu.unit != unit:
        return f"reply from unit {adu.unit} to a request for unit {unit}"
    got = adu.function & 0x7F
    if got != function:
        return f"reply for function {got} to a request for function {function}"
    data = adu.data
    if adu.function & EXCEPTION_FLAG:
        if len(data) != 1:
            return f"exception response with {len(data)} data bytes, want 1"
        return None
    if function in READ_REGISTERS or function in READ_BITS:
        count = int.from_bytes(request[10:12])
        want = 2 * count if function in READ_REGISTERS else (count + 7) // 8
        if len(data) != 1 + want or data[0] != want:
            return f"{len(data) - 1} data bytes for {count} requested, want {want}"
        return None
    if data == request[8:12]:
        return None
    if len(data) != 4:
        return f"write echo of {len(data)} data bytes, want 4"
    if data[:2] != request[8:10]:
        address = int.from_bytes(data[:2])
        return f"write echo for address {address}, sent to {int.from_bytes(request[8:10])}"
    # The echo repeats the value (single writes) or the count (multiple) sent.
    what = "value" if function in (WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER) else "count"
    return (
        f"write echo of {what} {int.from_bytes(data[2:4])}, sent {int.from_bytes(request[10:12])}"
    )
