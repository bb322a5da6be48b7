"""Modbus TCP: one link per gateway, the units behind it as devices.

    async with modbus_link("10.0.0.7", 502) as link:
        await link.wait_connected()
        outcome = await link.request(
            "read_holding_registers",
            {"unit": 3, "address": 100, "count": 2, "type": "float32"},
            timeout=5,
        )
        # Acknowledged(result={"registers": [16320, 0], "values": [1.5]})

Frames are encoded and decoded by keeplink's own sans-IO Modbus TCP codec (MBAP header and
PDU, :mod:`keeplink._core.mbap`) over keeplink's stream channel; no other Modbus library is
involved. The MBAP transaction id is the link's request sequence number (``seq_bits = 16``),
so replies are matched by the link's correlator like any other driver's. Every request
names its ``unit`` (0..247): the units behind a gateway are devices reached through one
shared link. Unit 0 is broadcast behind a serial gateway, where nothing answers it, so a
request to it times out. Modbus has no idempotency key: a request's ``key`` is checked and
not sent.

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
Presence of the units is probed with :class:`keeplink.presence.modbus.UnitProbe`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from keeplink._channel import StreamChannel, open_stream_channel
from keeplink._core import mbap
from keeplink._core.errors import ConfigError, ErrorCode, InvalidRequestError
from keeplink._core.jsonline import Malformed
from keeplink._core.mbap import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    MAX_WRITE_BITS,
    MAX_WRITE_REGISTERS,
)
from keeplink._core.registers import TYPES, check_int, decode_values, encode_values
from keeplink._core.requests import is_key
from keeplink._driver import FrameChannel, HeartbeatReply, Reply, SessionInfo
from keeplink._link import Link
from keeplink._slots import HUB_SLOTS, SlotPool

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
    "READ_OPS",
    "UNIT_MAX",
    "ModbusCodec",
    "ModbusDriver",
    "ModbusFrame",
    "ModbusRequest",
    "ModbusResponse",
    "exception_of",
    "gateway_slots",
    "modbus_link",
]

DEFAULT_PORT: Final = 502

UNIT_MAX: Final = 247
"""Unit ids 1..247 address devices behind a gateway, 0 is broadcast; 248..255 are reserved."""

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
"""Exceptions that prove the unit itself answered (what
:class:`~keeplink.presence.modbus.UnitProbe` counts as online): it parsed the request and
refused it (1 illegal function, 2 illegal data address, 3 illegal data value), took it for
later or is busy (5 acknowledge, 6 server device busy), or failed at something only the
unit does (7 negative acknowledge, 8 memory parity error).

Not 4, *server device failure*: the spec's "unrecoverable error while the server was
attempting the action" is what a Modbus TCP server or gateway answers when it cannot do
the read at all, and in particular what pymodbus's server answers for a unit id it does not
hold (its datastore has no such unit). It says nothing of a unit having answered. Nor
0x0A/0x0B (:data:`GATEWAY_ABSENT_EXCEPTIONS`) or a code the spec does not define."""


@dataclass(frozen=True, slots=True)
class _Op:
    function_code: int
    required: frozenset[str]
    allowed: frozenset[str]


_READ_ARGS: Final = frozenset({"unit", "address", "count"})
_TYPED: Final = frozenset({"type", "word_order"})
_OPS: Final[Mapping[str, _Op]] = {
    "read_holding_registers": _Op(mbap.READ_HOLDING_REGISTERS, _READ_ARGS, _READ_ARGS | _TYPED),
    "read_input_registers": _Op(mbap.READ_INPUT_REGISTERS, _READ_ARGS, _READ_ARGS | _TYPED),
    "read_coils": _Op(mbap.READ_COILS, _READ_ARGS, _READ_ARGS),
    "read_discrete_inputs": _Op(mbap.READ_DISCRETE_INPUTS, _READ_ARGS, _READ_ARGS),
    "write_register": _Op(
        mbap.WRITE_SINGLE_REGISTER,
        frozenset({"unit", "address", "value"}),
        frozenset({"unit", "address", "value", "type"}),
    ),
    "write_registers": _Op(
        mbap.WRITE_MULTIPLE_REGISTERS,
        frozenset({"unit", "address", "values"}),
        frozenset({"unit", "address", "values"}) | _TYPED,
    ),
    "write_coil": _Op(
        mbap.WRITE_SINGLE_COIL,
        frozenset({"unit", "address", "value"}),
        frozenset({"unit", "address", "value"}),
    ),
    "write_coils": _Op(
        mbap.WRITE_MULTIPLE_COILS,
        frozenset({"unit", "address", "values"}),
        frozenset({"unit", "address", "values"}),
    ),
}
OP_NAMES: Final = frozenset(_OPS)
"""The ops this driver speaks."""
READ_OPS: Final = frozenset(op for op, spec in _OPS.items() if "count" in spec.required)
"""The ops that read (``unit``, ``address``, ``count``): what a probe may send."""

_READS: Final = mbap.READ_REGISTERS | mbap.READ_BITS
_TID: Final = struct.Struct(">H")


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
    """A framed response and the request it answers (same transaction id, sent on the
    same channel, checked to fit it). A reply to no request sent is Malformed, never a
    response.

    ``function_code`` is as on the wire (bit 0x80 set for an exception response); ``data``
    is the PDU after the function code.
    """

    tid: int
    unit: int
    function_code: int
    data: bytes
    request: ModbusRequest

    @property
    def exception_code(self) -> int | None:
        """The Modbus exception code of an exception response, else None."""
        return self.data[0] if self.function_code & mbap.EXCEPTION_FLAG else None


ModbusFrame = ModbusRequest | ModbusResponse


# ---------------------------------------------------------------------------------- codec


class ModbusCodec:
    """The Modbus TCP client :class:`~keeplink.Codec`: requests out, responses in.

    ``encode`` sends a :class:`ModbusRequest` and remembers it by transaction id; ``feed``
    splits the byte stream on MBAP headers and pairs each response with the request it
    answers. Anything it cannot use is a :class:`~keeplink.Malformed` item (counted and
    dropped by the link), never an exception: bytes that are not an MBAP header are skipped
    up to the next place a header could start; a well-framed reply to a transaction this
    channel never sent, or that does not fit its request (other unit, other function, wrong
    length, a write echo that does not repeat the address and value or count sent) is
    dropped whole. A request whose reply never comes in a usable shape times out at the
    link.

    A reply after its request's deadline still decodes (the codec does not know about
    deadlines); the link counts it as late and drops it.
    """

    __slots__ = ("_pending", "_reader")

    def __init__(self) -> None:
        self._reader = mbap.MbapReader()
        self._pending: dict[int, ModbusRequest] = {}

    def encode(self, frame: ModbusFrame) -> bytes:
        if not isinstance(frame, ModbusRequest):
            raise InvalidRequestError("the Modbus client codec sends requests only")
        # At most 2**16 entries: a transaction id is reused only once its request is gone.
        self._pending[frame.tid] = frame
        return frame.adu

    def feed(self, data: bytes) -> list[ModbusFrame | Malformed]:
        out: list[ModbusFrame | Malformed] = []
        pending = self._pending
        for item in self._reader.feed(data):
            if isinstance(item, Malformed):
                out.append(item)
                continue
            tid = item.tid
            request = pending.get(tid)
            if request is None:
                why = f"reply to transaction {tid}, which this channel never sent"
                out.append(Malformed(why, _sample(item)))
                continue
            problem = mbap.reply_problem(request.adu, item)
            if problem is not None:
                out.append(Malformed(f"transaction {tid}: {problem}", _sample(item)))
                continue
            # Only a reply that fits ends the transaction: a mangled one leaves it open for
            # the real reply, and the link's deadline bounds the wait either way.
            del pending[tid]
            out.append(
                ModbusResponse(
                    tid=tid,
                    unit=item.unit,
                    function_code=item.function,
                    data=item.data,
                    request=request,
                )
            )
        return out


def _sample(adu: mbap.Adu) -> bytes:
    """The first bytes of a framed reply as they were on the wire, for the log."""
    header = struct.pack(">HHHBB", adu.tid, 0, len(adu.data) + 2, adu.unit, adu.function)
    return (header + adu.data)[:_SAMPLE]


# ---------------------------------------------------------------------------------- driver


class ModbusDriver:
    """Speaks Modbus TCP to one gateway (or one device). Keyword-only configuration.

    There is nothing on the wire before the first request and no heartbeat (Modbus has
    none; a read is the only proof of life, see :class:`keeplink.presence.modbus.UnitProbe`),
    so the handshake only names the session ``host:port``. Raises :class:`ConfigError` for
    a bad port or in-flight limit.
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
        if args.__class__ is not dict and not isinstance(args, Mapping):
            raise InvalidRequestError(
                f"modbus {op}: args must be a mapping, got {type(args).__name__}"
            )
        if key is not None and not is_key(key):
            raise InvalidRequestError(f"modbus {op}: key must be a non-empty string or None")
        names = args.keys()
        if not names >= spec.required:
            raise InvalidRequestError(f"modbus {op}: missing {sorted(spec.required - names)}")
        if not names <= spec.allowed:
            raise InvalidRequestError(
                f"modbus {op}: unknown args {sorted(map(str, names - spec.allowed))};"
                f" it takes {sorted(spec.allowed)}"
            )
        unit = args["unit"]
        if unit.__class__ is not int or not 0 <= unit <= UNIT_MAX:
            unit = check_int(op, "unit", unit, 0, UNIT_MAX)
        address = args["address"]
        if address.__class__ is not int or not 0 <= address <= 0xFFFF:
            address = check_int(op, "address", address, 0, 0xFFFF)
        value_type = args.get("type")
        if value_type is not None and (not isinstance(value_type, str) or value_type not in TYPES):
            raise InvalidRequestError(
                f"modbus {op}: type must be one of {sorted(TYPES)}, got {value_type!r}"
            )
        word_order = args.get("word_order", "big")
        if word_order != "big" and (not isinstance(word_order, str) or word_order != "little"):
            raise InvalidRequestError(
                f"modbus {op}: word_order must be 'big' or 'little', got {word_order!r}"
            )
        fc = spec.function_code
        if fc in _READS:
            limit = MAX_READ_REGISTERS if fc in mbap.READ_REGISTERS else MAX_READ_BITS
            count = args["count"]
            if count.__class__ is not int or not 1 <= count <= limit:
                count = check_int(op, "count", count, 1, limit)
            if value_type is not None and count % TYPES[value_type][1]:
                raise InvalidRequestError(
                    f"modbus {op}: count is in registers; {value_type} takes"
                    f" {TYPES[value_type][1]} each, so it must be even, got {count}"
                )
            _check_span(op, address, count)
            adu = mbap.encode_read(seq, unit, fc, address, count)
        elif fc == mbap.WRITE_SINGLE_REGISTER:
            if value_type is not None and TYPES[value_type][1] != 1:
                raise InvalidRequestError(
                    f"modbus {op}: {value_type} needs 2 registers; use write_registers"
                )
            [register] = encode_values(op, [args["value"]], value_type or "uint16", "big")
            count = 1
            adu = mbap.encode_write_single(seq, unit, fc, address, register)
        elif fc == mbap.WRITE_MULTIPLE_REGISTERS:
            values = _sequence(op, args["values"])
            registers = encode_values(op, values, value_type or "uint16", word_order)
            count = len(registers)
            if not 1 <= count <= MAX_WRITE_REGISTERS:
                raise InvalidRequestError(
                    f"modbus {op}: 1..{MAX_WRITE_REGISTERS} registers per write, got {count}"
                )
            _check_span(op, address, count)
            adu = mbap.encode_write_registers(seq, unit, address, registers)
        elif fc == mbap.WRITE_SINGLE_COIL:
            bit = _check_bool(op, "value", args["value"])
            count = 1
            adu = mbap.encode_write_single(seq, unit, fc, address, mbap.COIL_ON if bit else 0)
        else:
            bits = [_check_bool(op, "values[]", v) for v in _sequence(op, args["values"])]
            count = len(bits)
            if not 1 <= count <= MAX_WRITE_BITS:
                raise InvalidRequestError(
                    f"modbus {op}: 1..{MAX_WRITE_BITS} coils per write, got {count}"
                )
            _check_span(op, address, count)
            adu = mbap.encode_write_coils(seq, unit, address, bits)
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

    def renumber_request(self, frame: ModbusRequest, seq: int) -> ModbusRequest:
        """A request :meth:`build_request` made, under transaction id ``seq`` (0..65535):
        the same ADU but for its first two bytes, with no second check of its arguments."""
        return ModbusRequest(
            tid=seq,
            unit=frame.unit,
            op=frame.op,
            function_code=frame.function_code,
            address=frame.address,
            count=frame.count,
            value_type=frame.value_type,
            word_order=frame.word_order,
            adu=_TID.pack(seq) + frame.adu[2:],
        )

    def match_reply(self, frame: ModbusFrame) -> Reply | None:
        if not isinstance(frame, ModbusResponse):
            return None
        code = frame.exception_code
        if code is None:
            return Reply(seq=frame.tid, ok=True, result=_result(frame))
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


def exception_of(code: str) -> int | None:
    """The Modbus exception number a :class:`~keeplink.Rejected` code from this driver
    stands for: 2 for ``"modbus_exception_2"``; None for ``device_unavailable`` (0x0A/0x0B,
    mapped to keeplink's code) or a code that is not one."""
    if code == ErrorCode.DEVICE_UNAVAILABLE.value:
        return None
    number = code.removeprefix(_EXCEPTION_PREFIX)
    if number == code or not (number.isascii() and number.isdigit()):
        return None
    return int(number)


def _check_span(op: str, address: int, count: int) -> None:
    if address + count - 1 > 0xFFFF:
        raise InvalidRequestError(f"modbus {op}: address {address} + count {count} runs past 65535")


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


def _result(response: ModbusResponse) -> dict[str, Any]:
    request = response.request
    fc = request.function_code
    data = response.data
    if fc in mbap.READ_REGISTERS:
        registers = mbap.registers_of(data)
        if request.value_type is None:
            return {"registers": registers}
        values = decode_values(registers, request.value_type, request.word_order)
        return {"registers": registers, "values": values}
    if fc in mbap.READ_BITS:
        return {"bits": mbap.bits_of(data, request.count)}
    # A write's echo was checked to repeat the request: its address and value or count.
    if fc == mbap.WRITE_SINGLE_REGISTER:
        return {"address": request.address, "value": int.from_bytes(data[2:4])}
    if fc == mbap.WRITE_SINGLE_COIL:
        return {"address": request.address, "value": data[2:4] == b"\xff\x00"}
    return {"address": request.address, "count": request.count}


# ---------------------------------------------------------------------------------- wiring


def gateway_slots(host: str, port: int, *, size: int = 1) -> SlotPool:
    """The one connection-slot pool of the gateway at ``host:port``, shared process-wide.

    Many gateways serve one TCP client at a time (some a few): every link to the same
    gateway must take its connection from the same pool, or they knock each other off.
    The first call creates the pool; later calls return it while any link still holds it
    (the registry keeps pools weakly), or a fresh one once the old pool was closed. ``host``
    is compared as given: ``"localhost"`` and ``"127.0.0.1"`` are different keys.

    Raises ConfigError if the pool exists with another ``size``: one gateway, one truth.
    """
    return HUB_SLOTS.get(f"modbus gateway {host}:{port}", size=size)


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
