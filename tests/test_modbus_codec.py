"""keeplink's Modbus TCP codec (``keeplink._core.mbap``), sans-IO: requests to exact bytes,
a byte stream to framed responses, resync on garbage, and which reply fits which request.

The oracle is pymodbus' public PDU classes: what keeplink encodes, pymodbus' server-side
decoder reads back field for field; what pymodbus' response classes encode, keeplink frames
and decodes to the same values, however the stream is split.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("pymodbus", minversion="3.16")

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsResponse,
    ReadDiscreteInputsResponse,
    WriteMultipleCoilsResponse,
    WriteSingleCoilResponse,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterResponse,
)

from keeplink import Malformed
from keeplink._core import mbap
from keeplink._core.mbap import Adu, MbapReader, reply_problem
from keeplink.testing.modbus import adu_of, read_request

tids = st.integers(0, 0xFFFF)
units = st.integers(0, 255)
addresses = st.integers(0, 0xFFFF)
registers = st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=mbap.MAX_WRITE_REGISTERS)
bits = st.lists(st.booleans(), min_size=1, max_size=mbap.MAX_WRITE_BITS)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def feed_all(reader: MbapReader, chunks: list[bytes]) -> list[Adu | Malformed]:
    out: list[Adu | Malformed] = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
    return out


# ------------------------------------------------------------------------------ requests


def test_requests_encode_to_the_bytes_of_the_specs_examples() -> None:
    """The Modbus application protocol spec's request examples, behind an MBAP header."""
    header = bytes.fromhex("0001 0000")
    assert mbap.encode_read(1, 0x11, 3, 0x6B, 3) == header + bytes.fromhex("0006 11 03 006B 0003")
    assert mbap.encode_read(1, 0x11, 1, 0x13, 0x13) == header + bytes.fromhex(
        "0006 11 01 0013 0013"
    )
    assert mbap.encode_write_single(1, 0x11, 5, 0xAC, mbap.COIL_ON) == header + bytes.fromhex(
        "0006 11 05 00AC FF00"
    )
    assert mbap.encode_write_single(1, 0x11, 6, 1, 3) == header + bytes.fromhex(
        "0006 11 06 0001 0003"
    )
    # Coils 20..29 = 1 0 1 1 0 0 1 1, 1 0: bytes CD 01.
    coils = [True, False, True, True, False, False, True, True, True, False]
    assert mbap.encode_write_coils(1, 0x11, 0x13, coils) == header + bytes.fromhex(
        "0009 11 0F 0013 000A 02 CD01"
    )
    assert mbap.encode_write_registers(1, 0x11, 1, [0x000A, 0x0102]) == header + bytes.fromhex(
        "000B 11 10 0001 0002 04 000A 0102"
    )


@given(tid=tids, unit=units, address=addresses, data=st.data())
@pytest.mark.parametrize("function", [1, 2, 3, 4])
def test_a_read_request_decodes_in_pymodbus_server_as_sent(
    function: int, tid: int, unit: int, address: int, data: st.DataObject
) -> None:
    limit = mbap.MAX_READ_REGISTERS if function in mbap.READ_REGISTERS else mbap.MAX_READ_BITS
    count = data.draw(st.integers(1, limit))
    adu = mbap.encode_read(tid, unit, function, address, count)
    used, pdu = read_request(adu)
    assert used == len(adu) and pdu is not None
    assert pdu.function_code == function
    assert (pdu.transaction_id, pdu.dev_id, pdu.address, pdu.count) == (tid, unit, address, count)


@given(tid=tids, unit=units, address=addresses, value=st.integers(0, 0xFFFF), on=st.booleans())
def test_single_writes_decode_in_pymodbus_server_as_sent(
    tid: int, unit: int, address: int, value: int, on: bool
) -> None:
    used, pdu = read_request(mbap.encode_write_single(tid, unit, 6, address, value))
    assert pdu is not None and used == 12
    assert (pdu.function_code, pdu.dev_id, pdu.address, pdu.registers) == (
        6,
        unit,
        address,
        [value],
    )
    coil = mbap.encode_write_single(tid, unit, 5, address, mbap.COIL_ON if on else 0)
    used, pdu = read_request(coil)
    assert pdu is not None and used == 12
    assert (pdu.function_code, pdu.address, pdu.bits[0]) == (5, address, on)


@given(tid=tids, unit=units, address=addresses, values=registers, flags=bits)
def test_multiple_writes_decode_in_pymodbus_server_as_sent(
    tid: int, unit: int, address: int, values: list[int], flags: list[bool]
) -> None:
    adu = mbap.encode_write_registers(tid, unit, address, values)
    used, pdu = read_request(adu)
    assert pdu is not None and used == len(adu)
    assert (pdu.function_code, pdu.transaction_id, pdu.dev_id) == (16, tid, unit)
    assert (pdu.address, list(pdu.registers)) == (address, values)
    adu = mbap.encode_write_coils(tid, unit, address, flags)
    used, pdu = read_request(adu)
    assert pdu is not None and used == len(adu)
    assert (pdu.function_code, pdu.address) == (15, address)
    assert list(pdu.bits[: len(flags)]) == flags
    assert not any(pdu.bits[len(flags) :])  # the last byte is zero-padded


# ------------------------------------------------------------------------------ responses


@st.composite
def responses(draw: st.DrawFn) -> tuple[ModbusPDU, Adu]:
    """A response pymodbus encodes, and the Adu keeplink must frame of it."""
    tid, unit = draw(tids), draw(units)
    kind = draw(st.sampled_from(["hr", "ir", "co", "di", "w1", "c1", "wn", "cn", "exc"]))
    pdu: ModbusPDU
    if kind in ("hr", "ir"):
        values = draw(registers)
        cls = ReadHoldingRegistersResponse if kind == "hr" else ReadInputRegistersResponse
        pdu = cls(registers=values, dev_id=unit, transaction_id=tid)
        data = bytes([2 * len(values)]) + struct.pack(f">{len(values)}H", *values)
    elif kind in ("co", "di"):
        flags = draw(bits)
        bit_cls = ReadCoilsResponse if kind == "co" else ReadDiscreteInputsResponse
        pdu = bit_cls(bits=flags, dev_id=unit, transaction_id=tid)
        data = bytes([(len(flags) + 7) // 8]) + pdu.encode()[1:]
        assert mbap.bits_of(data, len(flags)) == flags
    elif kind == "w1":
        address, value = draw(addresses), draw(st.integers(0, 0xFFFF))
        pdu = WriteSingleRegisterResponse(
            address=address, registers=[value], dev_id=unit, transaction_id=tid
        )
        data = struct.pack(">HH", address, value)
    elif kind == "c1":
        address, on = draw(addresses), draw(st.booleans())
        pdu = WriteSingleCoilResponse(address=address, bits=[on], dev_id=unit, transaction_id=tid)
        data = struct.pack(">HH", address, mbap.COIL_ON if on else 0)
    elif kind in ("wn", "cn"):
        address, count = draw(addresses), draw(st.integers(1, mbap.MAX_WRITE_REGISTERS))
        many = WriteMultipleRegistersResponse if kind == "wn" else WriteMultipleCoilsResponse
        pdu = many(address=address, count=count, dev_id=unit, transaction_id=tid)
        data = struct.pack(">HH", address, count)
    else:
        code = draw(st.sampled_from(sorted(ExcCodes)))
        function = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 15, 16]))
        pdu = ExceptionResponse(function, code, device_id=unit, transaction=tid)
        data = bytes([code])
    return pdu, Adu(tid, unit, pdu.function_code, data)


@given(
    conversation=st.lists(responses(), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
def test_responses_pymodbus_encodes_frame_alike_however_the_stream_is_split(
    conversation: list[tuple[ModbusPDU, Adu]], cuts: list[int]
) -> None:
    reader = MbapReader()
    stream = b"".join(adu_of(pdu) for pdu, _ in conversation)
    assert feed_all(reader, split(stream, cuts)) == [adu for _, adu in conversation]
    assert reader.buffered == 0


@given(values=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=mbap.MAX_READ_REGISTERS))
def test_registers_decode_as_pymodbus_encoded_them(values: list[int]) -> None:
    pdu = ReadHoldingRegistersResponse(registers=values, dev_id=1, transaction_id=1)
    [adu] = MbapReader().feed(adu_of(pdu))
    assert isinstance(adu, Adu)
    assert mbap.registers_of(adu.data) == values


@given(flags=st.lists(st.booleans(), min_size=1, max_size=mbap.MAX_READ_BITS))
def test_bits_decode_as_pymodbus_encoded_them(flags: list[bool]) -> None:
    [adu] = MbapReader().feed(adu_of(ReadCoilsResponse(bits=flags, dev_id=1, transaction_id=1)))
    assert isinstance(adu, Adu)
    assert mbap.bits_of(adu.data, len(flags)) == flags


def test_an_exception_response_is_framed_with_its_code() -> None:
    pdu = ExceptionResponse(3, ExcCodes.ILLEGAL_ADDRESS, device_id=2, transaction=9)
    assert MbapReader().feed(adu_of(pdu)) == [Adu(9, 2, 0x83, b"\x02")]


# ------------------------------------------------------------------------------ garbage

FRAME = adu_of(ReadHoldingRegistersResponse(registers=[1, 2], dev_id=1, transaction_id=7))
WANT = Adu(7, 1, 3, b"\x04\x00\x01\x00\x02")


@pytest.mark.parametrize(
    "garbage",
    [
        b"ERROR: modem reset\r\n",  # text: no zero bytes at all
        b"\x00\x01\x00\x01\x00\x06\x01\x03",  # protocol id 1
        b"\x00\x01\x00\x00\x00\x00\x01\x03",  # length 0
        b"\x00\x01\x00\x00\x00\xff\x01\x03",  # length 255: longer than any PDU
        b"\x00\x01\x00\x00\x01\x00\x01\x03",  # length 256
        b"\xff" * 300,
    ],
)
def test_garbage_before_a_frame_is_one_malformed_item_and_the_frame_still_decodes(
    garbage: bytes,
) -> None:
    items = MbapReader().feed(garbage + FRAME)
    assert items[-1] == WANT
    assert len(items) == 2
    malformed = items[0]
    assert isinstance(malformed, Malformed)
    assert "not a Modbus TCP header" in malformed.reason
    assert f"skipped {len(garbage)} bytes" in malformed.reason
    assert malformed.sample == garbage[:32]


@given(
    noise=st.lists(st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"!"))),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
def test_frames_survive_noise_between_them_however_split(
    noise: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(part + FRAME for part in noise) + FRAME
    items = feed_all(MbapReader(), split(stream, cuts))
    assert [i for i in items if isinstance(i, Adu)] == [WANT] * (len(noise) + 1)
    assert sum(isinstance(i, Malformed) for i in items) >= len(noise)  # one a run at least


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 10**6), max_size=20))
def test_any_bytes_never_raise_and_the_buffer_stays_bounded(data: bytes, cuts: list[int]) -> None:
    reader = MbapReader()
    for chunk in split(data, cuts):
        for item in reader.feed(chunk):
            assert isinstance(item, Adu | Malformed)
            if isinstance(item, Adu):
                assert len(item.data) <= 253
        assert reader.buffered <= 6 + 254
    # Whatever came before, a real frame after a pause in the garbage gets through once the
    # held bytes are used up: at most one frame's worth is ever held back.
    assert WANT in reader.feed(FRAME * 3)


def test_a_frame_cut_inside_its_header_waits_for_the_rest() -> None:
    reader = MbapReader()
    assert reader.feed(FRAME[:5]) == []
    assert reader.buffered == 5
    assert reader.feed(FRAME[5:9]) == []
    assert reader.feed(FRAME[9:]) == [WANT]
    assert reader.buffered == 0


# ------------------------------------------------------------------------------ fitting

READ = mbap.encode_read(7, 1, 3, 100, 2)


@pytest.mark.parametrize(
    ("request_", "adu", "problem"),
    [
        (READ, Adu(7, 1, 3, b"\x04\0\1\0\2"), None),
        (READ, Adu(7, 2, 3, b"\x04\0\1\0\2"), "reply from unit 2 to a request for unit 1"),
        (mbap.encode_read(7, 0, 3, 100, 2), Adu(7, 9, 3, b"\x04\0\1\0\2"), None),  # broadcast
        (READ, Adu(7, 1, 4, b"\x04\0\1\0\2"), "reply for function 4 to a request for function 3"),
        (READ, Adu(7, 1, 0x83, b"\x02"), None),
        (READ, Adu(7, 1, 0x83, b"\x02\x00"), "exception response with 2 data bytes, want 1"),
        (READ, Adu(7, 1, 0x83, b""), "exception response with 0 data bytes, want 1"),
        (READ, Adu(7, 1, 3, b"\x02\0\1"), "2 data bytes for 2 requested, want 4"),
        (READ, Adu(7, 1, 3, b"\x04\0\1\0\2\0"), "5 data bytes for 2 requested, want 4"),
        (READ, Adu(7, 1, 3, b"\x06\0\1\0\2"), "4 data bytes for 2 requested, want 4"),
        (READ, Adu(7, 1, 3, b""), "-1 data bytes for 2 requested, want 4"),
        (mbap.encode_read(7, 1, 1, 0, 9), Adu(7, 1, 1, b"\x02\xff\x01"), None),
        (mbap.encode_read(7, 1, 1, 0, 9), Adu(7, 1, 1, b"\x01\xff"), "want 2"),
        (
            mbap.encode_write_single(7, 1, 6, 10, 7),
            Adu(7, 1, 6, b"\0\x0b\0\x07"),
            "write echo for address 11, sent to 10",
        ),
        (
            mbap.encode_write_single(7, 1, 6, 10, 7),
            Adu(7, 1, 6, b"\0\x0a\0\x08"),
            "write echo of value 8, sent 7",
        ),
        (
            mbap.encode_write_registers(7, 1, 10, [1, 2, 3]),
            Adu(7, 1, 16, b"\0\x0a\0\x02"),
            "write echo of count 2, sent 3",
        ),
        (mbap.encode_write_registers(7, 1, 10, [1, 2, 3]), Adu(7, 1, 16, b"\0\x0a\0\x03"), None),
        (
            mbap.encode_write_coils(7, 1, 10, [True]),
            Adu(7, 1, 15, b"\0\x0a\0\x01\0"),
            "write echo of 5 data bytes, want 4",
        ),
    ],
)
def test_a_reply_fits_its_request_or_says_why_not(
    request_: bytes, adu: Adu, problem: str | None
) -> None:
    got = reply_problem(request_, adu)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got, got
