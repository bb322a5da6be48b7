"""Modbus TCP: one link per gateway, the units behind it as devices.

    async with modbus_link("10.0.0.7", 502) as link:
        await link.wait_connected()
        outcome = await link.request(
            "read_holding_registers",
            {"unit": 3, "address": 100, "count": 2, "type": "float32"},
            timeout=5,
        )
        # Acknowledged(result={"registers": [16320, 0], "values": [1.5]})

Frames are encoded and decoded with pymodbus's PDU classes and its socket (MBAP) framer,
used sans-IO: no pymodbus client and no pymodbus transport are involved. The MBAP
transaction id is the link's request sequence number (``seq_bits = 16``), so replies are
matched by the link's correlator like any other driver's. Every request names its ``unit``
(0..247): the units behind a gateway are devices reached through one shared link. Unit 0
is broadcast behind a serial gateway, where nothing answers it, so a request to it times
out. Modbus has no idempotency key: a request's ``key`` is checked and not sent.

Ops and their ``args`` (checked before anything is sent; a bad one raises
:class:`~keeplink.InvalidRequestError`, nothing else):

========================  ==========================================  =====================
op                        args                                        result
========================  ==========================================  =====================
read_holding_registers    unit, address, count [, type, word_order]   registers [, values]
read_input_registers      unit, address, count [, type, word_order]   registers [, values]
read_coils                unit, address, count                        bits
read_discrete_inputs      unit, address, count                        bits
write_register            unit, address, value [, type]               address, value
write_registers           unit, address, values [, type, word_order]  address, count
write_coil                unit, address, value (bool)                 address, value
write_coils               unit, address, values (bools)               address, count
========================  ==========================================  =====================

``count`` is always what goes on the wire: registers for register reads (1..125; even for
a 32-bit ``type``), bits for bit reads (1..2000). ``type`` is one of ``uint16``, ``int16``,
``uint32``, ``int32``, ``float32``; ``word_order`` (``big``, the default, or ``little``)
says which register of a 32-bit value comes first; bytes within a register are always
big-endian, as Modbus defines them. A ``float32`` that reads as NaN or infinity (a device's
"no reading" marker) is ``None`` in ``values``; writing one is refused.

A Modbus exception response is a reply that refuses: the link yields
:class:`~keeplink.Rejected` with ``code="modbus_exception_<n>"`` (a code keeplink does not
know, so it is kept verbatim as ``RejectedError.wire_code``) and a message such as
``"illegal data address (exception 2)"``; ``exception_code`` comes as side data. The two
gateway exceptions 0x0A/0x0B (the gateway could not reach the unit) are
``device_unavailable`` instead: the unit is away, and a durable command waits for it.

Gateways often accept a single client and answer one request at a time, hence the defaults:
``max_in_flight=1`` and one shared :func:`gateway_slots` pool of size 1 per gateway.
Presence of the units is probed with :class:`UnitProbe`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from keeplink._channel import StreamChannel, open_stream_channel
from keeplink._clock import Wakeable
from keeplink._core.clock import Clock
from keeplink._core.errors import ConfigError, ErrorCode, InvalidRequestError
from keeplink._core.jsonline import Malformed
from keeplink._core.outcomes import Acknowledged, Rejected, TimedOut
from keeplink._core.presence import Source
from keeplink._core.requests import is_key
from keeplink._core.states import LinkState
from keeplink._driver import FrameChannel, HeartbeatReply, Reply, SessionInfo
from keeplink._events import LinkEvent, LinkStateChanged
from keeplink._link import LIVENESS_RATIO, Link
from keeplink._logs import Repeats
from keeplink._slots import SlotPool

__all__ = [
    "DEFAULT_PORT",
    "EXCEPTION_NAMES",
    "GATEWAY_ABSENT_EXCEPTIONS",
    "MAX_READ_BITS",
    "MAX_READ_REGISTERS",
    "MAX_WRITE_BITS",
    "MAX_WRITE_REGISTERS",
    "OP_NAMES",
    "PRESENT_EXCEPTIONS",
    "UNIT_MAX",
    "ModbusCodec",
    "ModbusDriver",
    "ModbusFrame",
    "ModbusRequest",
    "ModbusResponse",
    "PresenceSink",
    "ProbeTarget",
    "UnitProbe",
    "gateway_slots",
    "modbus_link",
]

_log = logging.getLogger("keeplink.drivers.modbus")

DEFAULT_PORT: Final = 502

UNIT_MAX: Final = 247
"""Unit ids 1..247 address devices behind a gateway, 0 is broadcast; 248..255 are reserved."""

# Quantity limits from the Modbus application protocol spec (they keep each PDU within 253
# bytes). The register and coil write limits are lower than the read ones for that reason.
MAX_READ_REGISTERS: Final = 125
MAX_WRITE_REGISTERS: Final = 123
MAX_READ_BITS: Final = 2000
MAX_WRITE_BITS: Final = 1968

# MBAP header: transaction id (2), protocol id (2, always 0), length (2), unit id (1). The
# length counts the unit id and the PDU, and a PDU is at most 253 bytes.
_MBAP: Final = struct.Struct(">HHHB")
_MBAP_SIZE: Final = 7
_MIN_ADU: Final = _MBAP_SIZE + 1  # a header and a function code
_MIN_LENGTH: Final = 2
_MAX_LENGTH: Final = 254
_SAMPLE: Final = 32  # bytes of a malformed input kept for the log
_EXCEPTION_PREFIX: Final = "modbus_exception_"

EXCEPTION_NAMES: Final[Mapping[int, str]] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
"""What each Modbus exception code means, for the Rejected message."""

GATEWAY_ABSENT_EXCEPTIONS: Final = frozenset({10, 11})
"""The gateway answered, the unit behind it did not: the unit is absent, not refusing."""

PRESENT_EXCEPTIONS: Final = frozenset({1, 2, 3, 5, 6, 7, 8})
"""Exceptions that prove the unit itself answered (what :class:`UnitProbe` counts as
online): it parsed the request and refused it (1 illegal function, 2 illegal data address,
3 illegal data value), took it for later or is busy (5 acknowledge, 6 server device busy),
or failed at something only the unit does (7 negative acknowledge, 8 memory parity error).

Not 4, *server device failure*: the spec's "unrecoverable error while the server was
attempting the action" is what a Modbus TCP server or gateway answers when it cannot do
the read at all, and in particular what pymodbus's server answers for a unit id it does not
hold (its datastore has no such unit). It says nothing of a unit having answered. Nor
0x0A/0x0B (:data:`GATEWAY_ABSENT_EXCEPTIONS`) or a code the spec does not define."""

_TYPES: Final[Mapping[str, tuple[str, int]]] = {
    "uint16": ("H", 1),
    "int16": ("h", 1),
    "uint32": ("I", 2),
    "int32": ("i", 2),
    "float32": ("f", 2),
}
"""Typed values: struct format (big-endian within the value) and registers per value."""
_WORD_ORDERS: Final = ("big", "little")
_INT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "uint16": (0, 0xFFFF),
    "int16": (-0x8000, 0x7FFF),
    "uint32": (0, 0xFFFF_FFFF),
    "int32": (-0x8000_0000, 0x7FFF_FFFF),
}


@dataclass(frozen=True, slots=True)
class _Op:
    function_code: int
    required: frozenset[str]
    optional: frozenset[str]


_READ_ARGS: Final = frozenset({"unit", "address", "count"})
_TYPED: Final = frozenset({"type", "word_order"})
_OPS: Final[Mapping[str, _Op]] = {
    "read_holding_registers": _Op(3, _READ_ARGS, _TYPED),
    "read_input_registers": _Op(4, _READ_ARGS, _TYPED),
    "read_coils": _Op(1, _READ_ARGS, frozenset()),
    "read_discrete_inputs": _Op(2, _READ_ARGS, frozenset()),
    "write_register": _Op(6, frozenset({"unit", "address", "value"}), frozenset({"type"})),
    "write_registers": _Op(16, frozenset({"unit", "address", "values"}), _TYPED),
    "write_coil": _Op(5, frozenset({"unit", "address", "value"}), frozenset()),
    "write_coils": _Op(15, frozenset({"unit", "address", "values"}), frozenset()),
}
OP_NAMES: Final = frozenset(_OPS)
"""The ops this driver speaks."""

_READ_REGISTERS: Final = frozenset({3, 4})
_READ_BITS: Final = frozenset({1, 2})

# Encoding a request needs no state: one framer serves every driver.
_ENCODER: Final = FramerSocket(DecodePDU(is_server=False))


# ---------------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusRequest:
    """A request, encoded once when it is built (so a bad one fails before any write).

    ``count`` is the quantity on the wire (registers or bits); ``value_type`` and
    ``word_order`` say how to decode the reply's registers.
    """

    tid: int
    unit: int
    op: str
    function_code: int
    address: int
    count: int
    value_type: str | None
    word_order: str
    adu: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusResponse:
    """A decoded response and the request it answers (same transaction id, sent on the
    same channel). A reply to no request sent is Malformed, never a response."""

    tid: int
    unit: int
    pdu: ModbusPDU
    request: ModbusRequest


ModbusFrame = ModbusRequest | ModbusResponse


# ---------------------------------------------------------------------------------- codec


class ModbusCodec:
    """The Modbus TCP client :class:`~keeplink.Codec`: requests out, responses in.

    ``encode`` sends a :class:`ModbusRequest` and remembers it by transaction id; ``feed``
    splits the byte stream on MBAP headers, decodes each PDU with pymodbus and pairs it
    with the request it answers. Anything it cannot use is a :class:`~keeplink.Malformed`
    item (counted and dropped by the link), never an exception: bytes that are not an MBAP
    header are skipped up to the next place a header could start; a well-framed reply to a
    transaction this channel never sent, whose PDU does not decode, or that does not fit
    its request (other unit, other function, wrong length, a write echo that does not
    repeat the address and value or count sent) is dropped whole. A request
    whose reply never comes in a usable shape times out at the link.

    A reply after its request's deadline still decodes (the codec does not know about
    deadlines); the link counts it as late and drops it.
    """

    __slots__ = ("_decoder", "_framer", "_pending", "_rest")

    def __init__(self) -> None:
        self._decoder = DecodePDU(is_server=False)
        self._framer = FramerSocket(self._decoder)
        self._pending: dict[int, ModbusRequest] = {}
        # Bounded: at most one frame (260 bytes) waits here, or up to 7 bytes of a header.
        self._rest = b""

    def encode(self, frame: ModbusFrame) -> bytes:
        if not isinstance(frame, ModbusRequest):
            raise InvalidRequestError("the Modbus client codec sends requests only")
        # At most 2**16 entries: a transaction id is reused only once its request is gone.
        self._pending[frame.tid] = frame
        return frame.adu

    def feed(self, data: bytes) -> list[ModbusFrame | Malformed]:
        buf = self._rest + data if self._rest else data
        out: list[ModbusFrame | Malformed] = []
        pos = 0
        size = len(buf)
        while size - pos >= _MIN_ADU:
            _, protocol, length, _ = _MBAP.unpack_from(buf, pos)
            if protocol != 0 or not _MIN_LENGTH <= length <= _MAX_LENGTH:
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
            out.append(self._decode(buf[pos:end]))
            pos = end
        self._rest = buf[pos:] if pos < size else b""
        return out

    def _decode(self, adu: bytes) -> ModbusFrame | Malformed:
        # The exact ADU only: pymodbus' framer would otherwise stretch an 8-byte frame to 9.
        _, unit, tid, pdu_bytes = self._framer.decode(adu)
        request = self._pending.get(tid)
        if request is None:
            return Malformed(
                f"reply to transaction {tid}, which this channel never sent", adu[:_SAMPLE]
            )
        try:
            # DecodePDU.decode does the same, plus a debug log whose message it builds
            # eagerly for every PDU (half the cost of a reply); the lookup and the PDU
            # classes are pymodbus' own.
            pdu_class = self._decoder.lookupPduClass(adu[6:])
            if pdu_class is None:
                return Malformed(
                    f"transaction {tid}: unknown function code {adu[7]:#04x}", adu[:_SAMPLE]
                )
            pdu = pdu_class(adu[7] & 0x7F) if pdu_class is ExceptionResponse else pdu_class()
            pdu.decode(pdu_bytes[1:])
        except (ModbusException, ValueError, IndexError, struct.error) as exc:
            return Malformed(f"transaction {tid}: undecodable PDU: {exc}", adu[:_SAMPLE])
        except Exception as exc:  # noqa: BLE001 - hostile bytes must cost one frame only
            # Anything else pymodbus raises on bytes from the peer would otherwise escape
            # from data_received and end the session.
            return Malformed(f"transaction {tid}: undecodable PDU: {exc!r}", adu[:_SAMPLE])
        problem = _mismatch(request, unit, pdu, pdu_bytes)
        if problem is not None:
            return Malformed(f"transaction {tid}: {problem}", adu[:_SAMPLE])
        # Only a reply that fits ends the transaction: a mangled one leaves it open for the
        # real reply, and the link's deadline bounds the wait either way.
        del self._pending[tid]
        return ModbusResponse(tid=tid, unit=unit, pdu=pdu, request=request)


def _plausible_header_at(buf: bytes, i: int) -> bool:
    """Whether an MBAP header could start at ``i``, judging by the bytes there so far."""
    n = len(buf)
    if i + 2 < n and buf[i + 2]:
        return False
    if i + 3 < n and buf[i + 3]:
        return False
    if i + 4 < n and buf[i + 4]:
        return False
    return not (i + 5 < n and not _MIN_LENGTH <= buf[i + 5] <= _MAX_LENGTH)


def _next_header(buf: bytes, start: int) -> int:
    """The first index from ``start`` where a header could begin (``len(buf)``: none).

    A plausible header needs a zero protocol id and a length of at most 254: three zero
    bytes in a row, which text and most noise never contain, so resynchronising after
    garbage lands on the next real frame.
    """
    for i in range(start, len(buf)):
        if _plausible_header_at(buf, i):
            return i
    return len(buf)


def _mismatch(request: ModbusRequest, unit: int, pdu: ModbusPDU, pdu_bytes: bytes) -> str | None:
    """Why a decoded reply cannot answer ``request``, or None if it can."""
    if request.unit and unit != request.unit:
        return f"reply from unit {unit} to a request for unit {request.unit}"
    function = pdu.function_code & 0x7F
    if function != request.function_code:
        return f"reply for function {function} to a request for function {request.function_code}"
    if pdu.function_code & 0x80:
        return None
    if function in _READ_REGISTERS or function in _READ_BITS:
        want = 2 * request.count if function in _READ_REGISTERS else (request.count + 7) // 8
        if pdu_bytes[1] != want or len(pdu_bytes) != 2 + want:
            return f"{len(pdu_bytes) - 2} data bytes for {request.count} requested, want {want}"
    elif pdu.address != request.address:
        return f"write echo for address {pdu.address}, sent to {request.address}"
    elif pdu_bytes[3:] != request.adu[10:12]:
        # The echo repeats the value (single writes) or the count (multiple) sent.
        what = "value" if function in (5, 6) else "count"
        echoed = int.from_bytes(pdu_bytes[3:5])
        return f"write echo of {what} {echoed}, sent {int.from_bytes(request.adu[10:12])}"
    return None


# ---------------------------------------------------------------------------------- values


def _check_int(op: str, name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"modbus {op}: {name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequestError(f"modbus {op}: {name} must be {low}..{high}, got {value}")
    return value


def _encode_values(
    op: str, values: Sequence[object], value_type: str, word_order: str
) -> list[int]:
    """Typed values → registers. Raises InvalidRequestError for a value the type cannot hold."""
    fmt, width = _TYPES[value_type]
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
            raw = packer.pack(_check_int(op, f"a {value_type} value", value, low, high))
        words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 2 * width, 2)]
        if word_order == "little":
            words.reverse()
        registers.extend(words)
    return registers


def _decode_values(registers: Sequence[int], value_type: str, word_order: str) -> list[Any]:
    """Registers → typed values (the count was checked to be a whole number of values)."""
    fmt, width = _TYPES[value_type]
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


# ---------------------------------------------------------------------------------- driver


class ModbusDriver:
    """Speaks Modbus TCP to one gateway (or one device). Keyword-only configuration.

    There is nothing on the wire before the first request and no heartbeat (Modbus has
    none; a read is the only proof of life, see :class:`UnitProbe`), so the handshake only
    names the session ``host:port``. Raises :class:`ConfigError` for a bad port or
    in-flight limit.
    """

    name = "modbus"
    seq_bits = 16  # the MBAP transaction id
    heartbeat_reply = HeartbeatReply.NEVER

    def __init__(self, *, host: str, port: int = DEFAULT_PORT, max_in_flight: int = 1) -> None:
        if not isinstance(host, str) or not host:
            raise ConfigError(f"modbus: host must be a non-empty string, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"modbus: port must be 1..65535, got {port!r}")
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or not 1 <= max_in_flight <= 1 << self.seq_bits
        ):
            raise ConfigError(f"modbus: max_in_flight must be 1..65536, got {max_in_flight!r}")
        self.host = host
        self.port = port
        self.max_in_flight = max_in_flight

    def __repr__(self) -> str:
        return f"ModbusDriver({self.host}:{self.port})"

    async def open(self) -> StreamChannel[ModbusFrame]:
        """Open the TCP connection. Raises LinkBrokenError with the OS error as ``__cause__``."""
        return await open_stream_channel(self.host, self.port, ModbusCodec())

    async def handshake(self, channel: FrameChannel[ModbusFrame]) -> SessionInfo:
        return SessionInfo(device_id=f"{self.host}:{self.port}")

    def heartbeat_frame(self) -> ModbusFrame | None:
        return None

    def is_heartbeat_reply(self, frame: ModbusFrame) -> bool:
        return False

    def build_request(
        self, seq: int, op: str, args: Mapping[str, Any], key: str | None
    ) -> ModbusRequest:
        """Validate and encode one request. Raises InvalidRequestError, nothing else.

        ``key`` (an idempotency key) is checked but not sent: Modbus has no place for it.
        """
        spec = _OPS.get(op) if isinstance(op, str) else None
        if spec is None:
            raise InvalidRequestError(f"modbus: unknown op {op!r}; known: {sorted(_OPS)}")
        if not isinstance(args, Mapping):
            raise InvalidRequestError(
                f"modbus {op}: args must be a mapping, got {type(args).__name__}"
            )
        if not is_key(key):
            raise InvalidRequestError(f"modbus {op}: key must be a non-empty string or None")
        missing = spec.required.difference(args)
        if missing:
            raise InvalidRequestError(f"modbus {op}: missing {sorted(missing)}")
        unknown = set(args).difference(spec.required, spec.optional)
        if unknown:
            raise InvalidRequestError(
                f"modbus {op}: unknown args {sorted(map(str, unknown))};"
                f" it takes {sorted(spec.required | spec.optional)}"
            )
        unit = _check_int(op, "unit", args["unit"], 0, UNIT_MAX)
        address = _check_int(op, "address", args["address"], 0, 0xFFFF)
        value_type = args.get("type")
        if value_type is not None and (not isinstance(value_type, str) or value_type not in _TYPES):
            raise InvalidRequestError(
                f"modbus {op}: type must be one of {sorted(_TYPES)}, got {value_type!r}"
            )
        word_order = args.get("word_order", "big")
        if not isinstance(word_order, str) or word_order not in _WORD_ORDERS:
            raise InvalidRequestError(
                f"modbus {op}: word_order must be 'big' or 'little', got {word_order!r}"
            )
        fc = spec.function_code
        pdu: ModbusPDU
        if fc in _READ_REGISTERS or fc in _READ_BITS:
            limit = MAX_READ_REGISTERS if fc in _READ_REGISTERS else MAX_READ_BITS
            count = _check_int(op, "count", args["count"], 1, limit)
            if value_type is not None and count % _TYPES[value_type][1]:
                raise InvalidRequestError(
                    f"modbus {op}: count is in registers; {value_type} takes"
                    f" {_TYPES[value_type][1]} each, so it must be even, got {count}"
                )
            read_class = {
                3: ReadHoldingRegistersRequest,
                4: ReadInputRegistersRequest,
                1: ReadCoilsRequest,
                2: ReadDiscreteInputsRequest,
            }[fc]
            pdu = read_class(address=address, count=count, dev_id=unit, transaction_id=seq)
        elif fc == 6:
            if value_type is not None and _TYPES[value_type][1] != 1:
                raise InvalidRequestError(
                    f"modbus {op}: {value_type} needs 2 registers; use write_registers"
                )
            register = _encode_values(op, [args["value"]], value_type or "uint16", "big")
            count = 1
            pdu = WriteSingleRegisterRequest(
                address=address, registers=register, dev_id=unit, transaction_id=seq
            )
        elif fc == 16:
            values = _sequence(op, args["values"])
            registers = _encode_values(op, values, value_type or "uint16", word_order)
            count = len(registers)
            if not 1 <= count <= MAX_WRITE_REGISTERS:
                raise InvalidRequestError(
                    f"modbus {op}: 1..{MAX_WRITE_REGISTERS} registers per write, got {count}"
                )
            pdu = WriteMultipleRegistersRequest(
                address=address, registers=registers, dev_id=unit, transaction_id=seq
            )
        elif fc == 5:
            bit = _check_bool(op, "value", args["value"])
            count = 1
            pdu = WriteSingleCoilRequest(
                address=address, bits=[bit], dev_id=unit, transaction_id=seq
            )
        else:  # 15
            bits = [_check_bool(op, "values[]", v) for v in _sequence(op, args["values"])]
            count = len(bits)
            if not 1 <= count <= MAX_WRITE_BITS:
                raise InvalidRequestError(
                    f"modbus {op}: 1..{MAX_WRITE_BITS} coils per write, got {count}"
                )
            pdu = WriteMultipleCoilsRequest(
                address=address, bits=bits, dev_id=unit, transaction_id=seq
            )
        if address + count - 1 > 0xFFFF:
            raise InvalidRequestError(
                f"modbus {op}: address {address} + count {count} runs past 65535"
            )
        try:
            adu = _ENCODER.buildFrame(pdu)
        except (ValueError, struct.error) as exc:  # pymodbus' own checks; ours come first
            raise InvalidRequestError(f"modbus {op}: {exc}") from exc
        return ModbusRequest(
            tid=seq,
            unit=unit,
            op=op,
            function_code=fc,
            address=address,
            count=count,
            value_type=value_type,
            word_order=word_order,
            adu=adu,
        )

    def match_reply(self, frame: ModbusFrame) -> Reply | None:
        if not isinstance(frame, ModbusResponse):
            return None
        pdu = frame.pdu
        if pdu.function_code & 0x80:
            code = pdu.exception_code
            what = EXCEPTION_NAMES.get(code, "unknown exception")
            return Reply(
                seq=frame.tid,
                ok=False,
                # 0x0A/0x0B: the gateway could not reach the unit. That is "not now", not
                # "no": keeplink's device_unavailable, which the outbox retries.
                code=(
                    ErrorCode.DEVICE_UNAVAILABLE.value
                    if code in GATEWAY_ABSENT_EXCEPTIONS
                    else f"{_EXCEPTION_PREFIX}{code}"
                ),
                message=f"{what} (exception {code})",
                side={"exception_code": code},
            )
        return Reply(seq=frame.tid, ok=True, result=_result(frame.request, pdu))


def _exception_of(code: str) -> int | None:
    """The Modbus exception number a Rejected's code stands for (None: not one)."""
    if code == ErrorCode.DEVICE_UNAVAILABLE.value:
        return None  # 0x0A/0x0B, mapped to keeplink's code
    number = code.removeprefix(_EXCEPTION_PREFIX)
    if number == code or not (number.isascii() and number.isdigit()):
        return None
    return int(number)


def _sequence(op: str, values: object) -> Sequence[object]:
    if isinstance(values, str | bytes | bytearray) or not isinstance(values, Sequence):
        raise InvalidRequestError(f"modbus {op}: values must be a list, got {values!r}")
    if not values:
        raise InvalidRequestError(f"modbus {op}: values must not be empty")
    return values


def _check_bool(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"modbus {op}: {name} must be true or false, got {value!r}")
    return value


def _result(request: ModbusRequest, pdu: ModbusPDU) -> dict[str, Any]:
    fc = request.function_code
    if fc in _READ_REGISTERS:
        registers = list(pdu.registers)
        if request.value_type is None:
            return {"registers": registers}
        values = _decode_values(registers, request.value_type, request.word_order)
        return {"registers": registers, "values": values}
    if fc in _READ_BITS:
        return {"bits": list(pdu.bits[: request.count])}  # the last byte is zero-padded
    if fc == 6:
        return {"address": pdu.address, "value": pdu.registers[0]}
    if fc == 5:
        return {"address": pdu.address, "value": bool(pdu.bits[0])}
    return {"address": pdu.address, "count": pdu.count}


# ---------------------------------------------------------------------------------- wiring

_GATEWAY_POOLS: weakref.WeakValueDictionary[tuple[str, int], SlotPool] = (
    weakref.WeakValueDictionary()
)
"""(host, port) → the pool every link to that gateway shares. Weak: an entry lives as long
as something (a link) holds its pool, so a forgotten gateway leaves nothing behind."""


def gateway_slots(host: str, port: int, *, size: int = 1) -> SlotPool:
    """The one connection-slot pool of the gateway at ``host:port``, shared process-wide.

    Many gateways serve one TCP client at a time (some a few): every link to the same
    gateway must take its connection from the same pool, or they knock each other off.
    The first call creates the pool; later calls return it while any link still holds it
    (the registry keeps pools weakly), or a fresh one once the old pool was closed. ``host``
    is compared as given: ``"localhost"`` and ``"127.0.0.1"`` are different keys.

    Raises ConfigError if the pool exists with another ``size``: one gateway, one truth.
    """
    key = (host, port)
    pool = _GATEWAY_POOLS.get(key)
    if pool is not None and not pool.closed:
        if pool.size != size:
            raise ConfigError(
                f"modbus gateway {host}:{port} already has a slot pool of size {pool.size};"
                f" asked for {size}. Use the same size everywhere."
            )
        return pool
    pool = SlotPool(size=size, name=f"modbus gateway {host}:{port}")
    _GATEWAY_POOLS[key] = pool
    return pool


def modbus_link(
    host: str,
    port: int,
    *,
    name: str | None = None,
    max_in_flight: int = 1,
    slots: SlotPool | None = None,
    **link_kwargs: Any,
) -> Link[ModbusFrame]:
    """A :class:`~keeplink.Link` to a Modbus TCP gateway, holding a slot of its pool.

    ``slots`` defaults to :func:`gateway_slots` for ``(host, port)``. ``heartbeat_s``
    defaults to None (Modbus has no heartbeat); other keywords go to ``Link``. Raises
    ConfigError for a bad configuration. The link is not started.
    """
    driver = ModbusDriver(host=host, port=port, max_in_flight=max_in_flight)
    link_kwargs.setdefault("heartbeat_s", None)
    return Link(
        driver,
        name=name if name is not None else f"modbus:{host}:{port}",
        slots=slots if slots is not None else gateway_slots(host, port),
        **link_kwargs,
    )


# ---------------------------------------------------------------------------------- presence


class PresenceSink(Protocol):
    """Where probe results go: a :class:`~keeplink.presence.PresenceTracker` fits."""

    def report(
        self, device: str, source: Source, online: bool, *, ttl_s: float | None = None
    ) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeTarget:
    """One unit to probe: the device name it has, its unit id, and a cheap read to try."""

    device: str
    unit: int
    op: str = "read_holding_registers"
    address: int = 0

    def args(self) -> dict[str, int]:
        return {"unit": self.unit, "address": self.address, "count": 1}


_PROBE_OPS: Final = frozenset(op for op, spec in _OPS.items() if "count" in spec.required)


class UnitProbe:
    """Reads each unit behind a gateway link every ``interval_s`` and reports its presence.

    An acknowledged read, or an exception in :data:`PRESENT_EXCEPTIONS` (the unit answered,
    it only disliked the address, say), says online. Any other exception says offline: 4
    (server device failure: a server that could not do the read at all, which is what
    pymodbus's server answers for a unit it does not have), 0x0A/0x0B (the gateway could not
    reach the unit) or a code the spec does not define; and so does no reply within
    ``timeout_s``. Probe a register the unit can read: a unit that answers its probe read
    with exception 4 is reported offline, as it cannot serve reads. While the link itself
    is down the probe learns nothing about the units and says nothing: their last claims
    lapse after ``ttl_s`` (default ``LIVENESS_RATIO × interval_s``). Claims go to
    ``presence.report(device, Source.PROBE, online, ttl_s=ttl_s)``.

    A probe runs at once when the link (re)connects. ``timeout_s`` should exceed the
    gateway's own timeout towards its units, so that an absent unit is reported as the
    gateway's 0x0B rather than by our timeout. Probes share the link's in-flight window
    with other requests. Raises ConfigError for a bad configuration (a target whose probe
    read is invalid, a duplicate device name, non-positive times).

    ``start()`` (or ``async with``) starts it; ``await close()`` stops it and waits until
    its task is gone. Time comes from ``clock`` (default: the link's).
    """

    def __init__(
        self,
        *,
        link: Link[ModbusFrame],
        presence: PresenceSink,
        units: Sequence[ProbeTarget],
        interval_s: float = 10.0,
        timeout_s: float = 3.0,
        ttl_s: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        for key, value in (("interval_s", interval_s), ("timeout_s", timeout_s)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"unit probe: {key} must be > 0, got {value!r}")
        if ttl_s is not None and not (isinstance(ttl_s, int | float) and ttl_s > 0):
            raise ConfigError(f"unit probe: ttl_s must be > 0 or None, got {ttl_s!r}")
        targets = list(units)
        if not targets:
            raise ConfigError("unit probe: no units to probe")
        names = [t.device for t in targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"unit probe: device names must be unique, got {names}")
        for target in targets:
            if target.op not in _PROBE_OPS:
                raise ConfigError(
                    f"unit probe: {target.device!r}: probe op must be a read, got {target.op!r}"
                )
            try:
                link.driver.build_request(0, target.op, target.args(), None)
            except InvalidRequestError as exc:
                raise ConfigError(f"unit probe: {target.device!r}: {exc.message}") from exc
        self.link = link
        self.presence = presence
        self.units: tuple[ProbeTarget, ...] = tuple(targets)
        self.interval_s = float(interval_s)
        self.timeout_s = float(timeout_s)
        self.ttl_s = float(ttl_s) if ttl_s is not None else LIVENESS_RATIO * self.interval_s
        self.clock: Clock = clock if clock is not None else link.clock
        self.rounds = 0
        """Completed probe rounds (every unit tried once)."""
        self._task: asyncio.Task[None] | None = None
        self._pause = Wakeable()
        self._again = False  # probe_now() during a round: start the next one at once
        self._unsubscribe: Callable[[], None] | None = None
        self._errors_logged: Repeats[type[BaseException]] = Repeats()

    def start(self) -> None:
        """Start probing (non-blocking). Idempotent while running."""
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"keeplink[{self.link.name}].unit-probe"
        )
        self._unsubscribe = self.link.subscribe(self._on_link_event)

    def probe_now(self) -> None:
        """Probe every unit now: cut the current wait short, or start the next round as soon
        as the current one ends."""
        self._again = True
        self._pause.wake()

    async def close(self) -> None:
        """Stop probing and wait until the probe task is gone. Idempotent. Claims already
        made stay with the presence tracker until their TTL runs out."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def __aenter__(self) -> UnitProbe:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _on_link_event(self, event: LinkEvent) -> None:
        if isinstance(event, LinkStateChanged) and event.new is LinkState.CONNECTED:
            self.probe_now()

    async def _run(self) -> None:
        while True:
            started = self.clock.now()
            for target in self.units:
                try:
                    await self._probe(target)
                except Exception as exc:  # noqa: BLE001 - see below
                    # Deliberately broad: a failing presence sink must not end probing of
                    # every unit for good. Logged with a traceback once per kind.
                    self._note_error(target, exc)
            self.rounds += 1
            await self._wait_until(started + self.interval_s)

    async def _probe(self, target: ProbeTarget) -> None:
        outcome = await self.link.request(target.op, target.args(), timeout=self.timeout_s)
        online: bool | None
        if isinstance(outcome, Acknowledged):
            online = True
        elif isinstance(outcome, Rejected):
            online = _exception_of(outcome.code) in PRESENT_EXCEPTIONS
        elif isinstance(outcome, TimedOut):
            online = False
        else:  # Unavailable or Cancelled: the link is down, the unit unknown
            online = None
        _log.debug(
            "unit probe %r: %s (unit %d) -> %s",
            self.link.name,
            target.device,
            target.unit,
            {True: "online", False: "offline", None: "no opinion"}[online],
        )
        if online is not None:
            self.presence.report(target.device, Source.PROBE, online, ttl_s=self.ttl_s)

    async def _wait_until(self, when: float) -> None:
        if self._again:
            self._again = False
            return
        try:
            await self._pause.sleep_until(self.clock, when)
        finally:
            self._again = False

    def _note_error(self, target: ProbeTarget, exc: Exception) -> None:
        if not self._errors_logged.first(type(exc)):
            _log.debug("unit probe %r: %s failed again: %r", self.link.name, target.device, exc)
            return
        _log.error(
            "unit probe %r: probing %s failed unexpectedly",
            self.link.name,
            target.device,
            exc_info=exc,
        )
