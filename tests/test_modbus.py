"""The Modbus TCP driver against a real pymodbus server: reads, writes, typed values,
exception responses, restarts, malformed replies, slot sharing, unit presence and the outbox.

Each test starts its own :class:`~keeplink.testing.modbus.ModbusGateway` (a pymodbus
``ModbusTcpServer`` on 127.0.0.1 and a free port, with units 1..3 behind it) and stops it
afterwards; the bytes no real gateway sends come from a
:class:`~keeplink.testing.modbus.RawModbusGateway`. The codec is also tested on its own,
sans-IO, with replies encoded by pymodbus' own PDU classes.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("pymodbus", minversion="3.16")

from pymodbus.client.mixin import ModbusClientMixin
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

from helpers import IO_BOUND_S, Recorder, connected, eventually, until_state
from keeplink import (
    Acknowledged,
    Backoff,
    ConfigError,
    DeviceUnavailableError,
    InvalidRequestError,
    LinkState,
    Malformed,
    Rejected,
    RejectedError,
    Reply,
    Unavailable,
)
from keeplink.drivers.modbus import (
    EXCEPTION_NAMES,
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    MAX_WRITE_BITS,
    MAX_WRITE_REGISTERS,
    ModbusCodec,
    ModbusDriver,
    ModbusFrame,
    ModbusRequest,
    ModbusResponse,
    gateway_slots,
    modbus_link,
)
from keeplink.outbox import CommandState, MemoryStore, Outbox
from keeplink.presence import Presence, PresenceTracker, Source
from keeplink.presence.modbus import ProbeTarget, UnitProbe
from keeplink.testing.modbus import (
    INPUT_VALUE,
    REGISTERS,
    UNITS,
    ModbusGateway,
    RawModbusGateway,
    adu_of,
    read_request,
)

S = LinkState
HOST = "127.0.0.1"
FAST = Backoff(initial_s=0.02, cap_s=0.1)  # the gateway comes back within a blink


@pytest.fixture
async def gateway() -> AsyncIterator[ModbusGateway]:
    """A gateway on a free port, stopped after the test."""
    gw = ModbusGateway()
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


def read(unit: Any, address: Any, count: Any, **extra: Any) -> dict[str, Any]:
    return {"unit": unit, "address": address, "count": count, **extra}


# ------------------------------------------------------------------------------ reads, writes


async def test_reads_and_writes_land_in_the_gateways_datastore(gateway: ModbusGateway) -> None:
    link = modbus_link(HOST, gateway.port)
    async with link:
        info = await link.wait_connected()
        assert info.device_id == f"{HOST}:{gateway.port}"

        ack = await link.request(
            "write_registers", {"unit": 1, "address": 10, "values": [1, 2, 65535]}, timeout=5
        )
        assert isinstance(ack, Acknowledged)
        assert ack.result == {"address": 10, "count": 3}
        assert await gateway.registers(1, 10, 3) == [1, 2, 65535]
        assert await gateway.registers(2, 10, 3) == [0, 0, 0]  # another unit, untouched

        await link.call("write_register", {"unit": 2, "address": 0, "value": 4242}, timeout=5)
        assert await gateway.registers(2, 0, 1) == [4242]
        assert await link.call("read_holding_registers", read(1, 9, 5), timeout=5) == {
            "registers": [0, 1, 2, 65535, 0]
        }
        assert await link.call("read_input_registers", read(3, 0, 2), timeout=5) == {
            "registers": [INPUT_VALUE, INPUT_VALUE]
        }

        await link.call("write_coils", {"unit": 1, "address": 3, "values": [True, True]}, timeout=5)
        assert await link.call(
            "write_coil", {"unit": 1, "address": 9, "value": True}, timeout=5
        ) == {"address": 9, "value": True}
        assert await gateway.coils(1, 0, 10) == [False] * 3 + [True] * 2 + [False] * 4 + [True]
        # Ten coils come back as ten bits, not as the two bytes' sixteen.
        assert await link.call("read_coils", read(1, 0, 10), timeout=5) == {
            "bits": [False] * 3 + [True] * 2 + [False] * 4 + [True]
        }
        assert await link.call("read_discrete_inputs", read(1, 0, 3), timeout=5) == {
            "bits": [True, True, True]
        }
        stats = link.statistics()
    assert stats.outcomes == {"acknowledged": 8}
    assert (stats.protocol_errors, stats.late_replies) == (0, 0)
    assert gateway.applied == {1: 3, 2: 1}


# Known patterns: each value's registers with the high word first ("big" word order).
TYPED_CASES: list[tuple[str, list[int | float], list[int]]] = [
    ("uint16", [0, 65535], [0x0000, 0xFFFF]),
    ("int16", [-1, -32768, 1], [0xFFFF, 0x8000, 0x0001]),
    ("uint32", [0x12345678, 70000], [0x1234, 0x5678, 0x0001, 0x1170]),
    ("int32", [-2, 2**31 - 1], [0xFFFF, 0xFFFE, 0x7FFF, 0xFFFF]),
    ("float32", [1.5, -2.25, 0.0], [0x3FC0, 0x0000, 0xC010, 0x0000, 0x0000, 0x0000]),
]


def swap_words(registers: list[int], width: int) -> list[int]:
    out: list[int] = []
    for i in range(0, len(registers), width):
        out.extend(reversed(registers[i : i + width]))
    return out


@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize(("value_type", "values", "big_registers"), TYPED_CASES)
async def test_typed_values_read_and_write_in_both_word_orders(
    gateway: ModbusGateway,
    value_type: str,
    values: list[int | float],
    big_registers: list[int],
    word_order: str,
) -> None:
    width = 2 if value_type.endswith("32") else 1
    wire = big_registers if word_order == "big" else swap_words(big_registers, width)
    typed = {"type": value_type, "word_order": word_order}
    link = modbus_link(HOST, gateway.port)
    async with link:
        await connected(link)
        # Read: registers preset on the gateway decode to the known values.
        await gateway.preset(1, 20, wire)
        result = await link.call(
            "read_holding_registers", read(1, 20, len(wire), **typed), timeout=5
        )
        assert result == {"registers": wire, "values": values}
        # Write: the typed values land as exactly those registers.
        await link.call(
            "write_registers", {"unit": 2, "address": 40, "values": values, **typed}, timeout=5
        )
        assert await gateway.registers(2, 40, len(wire)) == wire


async def test_a_float32_that_is_not_a_number_reads_as_none(gateway: ModbusGateway) -> None:
    link = modbus_link(HOST, gateway.port)
    async with link:
        await connected(link)
        await gateway.preset(1, 0, [0x7FC0, 0x0000, 0x7F80, 0x0000, 0x4120, 0x0000])  # NaN, inf, 10
        result = await link.call("read_holding_registers", read(1, 0, 6, type="float32"), timeout=5)
    assert result["values"] == [None, None, 10.0]


# ------------------------------------------------------------------------------ exceptions


@pytest.mark.parametrize(
    ("failing", "address", "code", "message"),
    [
        ({}, REGISTERS + 10, 2, "illegal data address (exception 2)"),
        ({1: ExcCodes.ILLEGAL_VALUE}, 0, 3, "illegal data value (exception 3)"),
        ({1: ExcCodes.DEVICE_BUSY}, 0, 6, "server device busy (exception 6)"),
        (
            {1: ExcCodes.GATEWAY_NO_RESPONSE},
            0,
            11,
            "gateway target device failed to respond (exception 11)",
        ),
    ],
)
async def test_exception_responses_are_rejected_with_the_modbus_code(
    gateway: ModbusGateway, failing: dict[int, ExcCodes], address: int, code: int, message: str
) -> None:
    gateway.failing.update(failing)
    link = modbus_link(HOST, gateway.port)
    async with link:
        await connected(link)
        outcome = await link.request("read_holding_registers", read(1, address, 2), timeout=5)
        assert isinstance(outcome, Rejected)
        # The gateway's "could not reach the unit" is keeplink's device_unavailable (the
        # outbox retries it); every other exception keeps its Modbus code verbatim.
        expected = "device_unavailable" if code == 11 else f"modbus_exception_{code}"
        assert (outcome.code, outcome.message) == (expected, message)
        assert link.side_data["exception_code"] == code
        error_type = DeviceUnavailableError if code == 11 else RejectedError
        with pytest.raises(error_type) as info:
            await link.call("read_holding_registers", read(1, address, 2), timeout=5)
        assert info.value.wire_code == expected  # a Modbus code is kept verbatim
        assert info.value.code == ("device_unavailable" if code == 11 else "rejected")
        # The link is none the worse for it, and other units still answer.
        assert await link.call("read_holding_registers", read(2, 0, 1), timeout=5)
        assert link.state is S.CONNECTED
        assert link.statistics().outcomes == {"rejected": 2, "acknowledged": 1}


# ------------------------------------------------------------------------------ recovery


async def test_the_link_recovers_on_its_own_when_the_gateway_restarts(
    gateway: ModbusGateway,
) -> None:
    link = modbus_link(HOST, gateway.port, backoff=FAST)
    rec = Recorder(link)
    async with link:
        await connected(link)
        await link.call("write_register", {"unit": 1, "address": 0, "value": 1}, timeout=5)

        await gateway.stop()
        await until_state(link, S.BACKOFF)
        outcome = await link.request("read_holding_registers", read(1, 0, 1), timeout=5)
        assert isinstance(outcome, Unavailable)
        assert outcome.error.code == "device_unavailable"

        await gateway.start()  # the same port
        await until_state(link, S.CONNECTED)
        await link.call("write_register", {"unit": 1, "address": 0, "value": 2}, timeout=5)
        assert await link.call("read_holding_registers", read(1, 0, 1), timeout=5) == {
            "registers": [2]
        }
        assert await gateway.registers(1, 0, 1) == [2]
        stats = link.statistics()
    assert stats.connects == 2
    assert stats.disconnects == 1
    states = rec.states()
    assert states[: states.index(S.LOST) + 2] == [
        S.CONNECTING,
        S.HANDSHAKING,
        S.CONNECTED,
        S.LOST,
        S.BACKOFF,
    ]
    assert states.count(S.CONNECTED) == 2


# ------------------------------------------------------------------------------ malformed


# Noise no frame may die of: text with no zero byte in it (so no MBAP header can hide
# inside), a frame for a transaction never sent, and a mangled reply for the request in
# flight (an odd byte count) that must leave its transaction open for the real reply.
TEXT_NOISE = b"\xde\xad\xbe\xef ERROR: modem reset\r\n"
NEVER_SENT = bytes([0xAB, 0xCD, 0, 0, 0, 3, 1, 0x44, 0])


def mangled(pdu: ModbusPDU) -> bytes:
    return struct.pack(">HHHBBB", pdu.transaction_id, 0, 4, pdu.dev_id, 3, 1) + b"\x07"


def noise_for(n: int, pdu: ModbusPDU) -> bytes:
    return [b"", TEXT_NOISE, NEVER_SENT, TEXT_NOISE + mangled(pdu) + TEXT_NOISE][n % 4]


async def test_malformed_bytes_from_the_peer_are_counted_not_fatal() -> None:
    async with RawModbusGateway(noise=noise_for) as peer:
        link = modbus_link(HOST, peer.port)
        async with link:
            await connected(link)
            for n in range(1, 9):
                outcome = await link.request("read_holding_registers", read(1, 0, 3), timeout=5)
                assert isinstance(outcome, Acknowledged)
                assert outcome.result == {"registers": [n] * 3}
            stats = link.statistics()
    assert stats.state is S.CONNECTED
    assert stats.connects == 1  # never reconnected
    assert stats.protocol_errors >= 10  # 2 × (1 + 1 + 3): each noise counted at least once
    assert stats.outcomes == {"acknowledged": 8}


async def test_replies_out_of_order_resolve_their_own_requests() -> None:
    async with RawModbusGateway(batch=4) as peer:
        link = modbus_link(HOST, peer.port, max_in_flight=4)
        async with link:
            await connected(link)
            outcomes = await asyncio.gather(
                *(
                    link.request("read_holding_registers", read(1, 0, count), timeout=5)
                    for count in (1, 2, 3, 4)
                )
            )
    # The peer saw the requests in order (n = 1..4) and answered them last-first; each
    # outcome still belongs to its own request (count registers of its own n).
    for n, outcome in enumerate(outcomes, start=1):
        assert isinstance(outcome, Acknowledged)
        assert outcome.result == {"registers": [n] * n}


def _echo_one_off(n: int, pdu: ModbusPDU) -> ModbusPDU:
    """Echo a single register write, with the address one off on the first, the value one
    off on the second, and right on the third."""
    address = pdu.address + (n == 1)
    value = pdu.registers[0] + (n == 2)
    return WriteSingleRegisterResponse(
        address=address, registers=[value], dev_id=pdu.dev_id, transaction_id=pdu.transaction_id
    )


async def test_a_write_echo_with_the_wrong_address_or_value_never_acknowledges() -> None:
    async with RawModbusGateway(answer=_echo_one_off) as peer:
        link = modbus_link(HOST, peer.port)
        async with link:
            await connected(link)
            args = {"unit": 1, "address": 10, "value": 7}
            outcomes = [await link.request("write_register", args, timeout=0.3) for _ in range(3)]
            stats = link.statistics()
    wrong_address, wrong_value, right = outcomes
    assert not isinstance(wrong_address, Acknowledged), f"echo of address 11: {wrong_address}"
    assert not isinstance(wrong_value, Acknowledged), f"echo of value 8: {wrong_value}"
    assert isinstance(right, Acknowledged) and right.result == {"address": 10, "value": 7}, right
    assert stats.protocol_errors == 2, stats


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("read_everything", read(1, 0, 1)),
        (None, read(1, 0, 1)),
        ("read_holding_registers", ["not", "a", "mapping"]),
        ("read_holding_registers", {"unit": 1, "address": 0}),
        ("read_holding_registers", {**read(1, 0, 1), "adress": 5}),
        ("read_holding_registers", read(248, 0, 1)),
        ("read_holding_registers", read(-1, 0, 1)),
        ("read_holding_registers", read(True, 0, 1)),
        ("read_holding_registers", read("1", 0, 1)),
        ("read_holding_registers", read(1, 65536, 1)),
        ("read_holding_registers", read(1, -1, 1)),
        ("read_holding_registers", read(1, 1.5, 1)),
        ("read_holding_registers", read(1, 0, 0)),
        ("read_holding_registers", read(1, 0, 126)),
        ("read_holding_registers", read(1, 65535, 2)),
        ("read_holding_registers", read(1, 0, 2, type="int64")),
        ("read_holding_registers", read(1, 0, 2, type=["int32"])),
        ("read_holding_registers", read(1, 0, 2, type="int32", word_order=["big"])),
        ("read_holding_registers", read(1, 0, 2, type="int32", word_order="middle")),
        ("read_holding_registers", read(1, 0, 3, type="int32")),
        ("read_coils", read(1, 0, 2001)),
        ("read_coils", read(1, 0, 8, type="uint16")),
        ("write_register", {"unit": 1, "address": 0, "value": 70000}),
        ("write_register", {"unit": 1, "address": 0, "value": -1}),
        ("write_register", {"unit": 1, "address": 0, "value": 40000, "type": "int16"}),
        ("write_register", {"unit": 1, "address": 0, "value": 1.0, "type": "float32"}),
        ("write_registers", {"unit": 1, "address": 0, "values": []}),
        ("write_registers", {"unit": 1, "address": 0, "values": "12"}),
        ("write_registers", {"unit": 1, "address": 0, "values": [1, "2"]}),
        ("write_registers", {"unit": 1, "address": 0, "values": [1] * 124}),
        ("write_registers", {"unit": 1, "address": 0, "values": [0] * 62, "type": "int32"}),
        ("write_registers", {"unit": 1, "address": 0, "values": [math.nan], "type": "float32"}),
        ("write_registers", {"unit": 1, "address": 0, "values": [1e39], "type": "float32"}),
        ("write_registers", {"unit": 1, "address": 0, "values": [2**32], "type": "uint32"}),
        ("write_registers", {"unit": 1, "address": 65535, "values": [1, 2]}),
        ("write_coil", {"unit": 1, "address": 0, "value": 1}),
        ("write_coils", {"unit": 1, "address": 0, "values": [True, 0]}),
        ("write_coils", {"unit": 1, "address": 0, "values": [True] * 1969}),
    ],
)
async def test_invalid_arguments_fail_before_anything_is_sent(
    gateway: ModbusGateway, op: Any, args: Any
) -> None:
    link = modbus_link(HOST, gateway.port)
    async with link:
        await connected(link)
        with pytest.raises(InvalidRequestError) as info:
            await link.request(op, args, timeout=5)
        assert info.value.code == "invalid_request"
        stats = link.statistics()
        assert (stats.requests_sent, stats.requests_in_flight, stats.frames_out) == (0, 0, 0)
        assert gateway.packets_in == 0
        # The same link then sends a valid request, and the gateway counts it.
        await link.call("read_holding_registers", read(1, 0, 1), timeout=5)
    assert gateway.packets_in == 1


@pytest.mark.parametrize("tid", [0, 1, 255, 256, 0xFFFF])
@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("read_holding_registers", {"unit": 3, "address": 10, "count": 4, "type": "float32"}),
        ("write_registers", {"unit": 1, "address": 0, "values": [1, 2, 3]}),
        ("write_coils", {"unit": 2, "address": 7, "values": [True, False, True]}),
    ],
)
def test_a_renumbered_request_is_the_request_built_under_that_transaction_id(
    tid: int, op: str, args: dict[str, Any]
) -> None:
    driver = ModbusDriver(host=HOST, port=502)
    renumbered = driver.renumber_request(driver.build_request(0, op, args, None), tid)
    assert renumbered == driver.build_request(tid, op, args, None)


def test_an_idempotency_key_is_checked_but_modbus_has_nowhere_to_send_it() -> None:
    driver = ModbusDriver(host=HOST, port=502)
    with_key = driver.build_request(7, "write_register", {"unit": 1, "address": 0, "value": 1}, "k")
    without = driver.build_request(7, "write_register", {"unit": 1, "address": 0, "value": 1}, None)
    assert with_key.adu == without.adu
    with pytest.raises(InvalidRequestError):
        driver.build_request(7, "write_register", {"unit": 1, "address": 0, "value": 1}, "")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "", "port": 502},
        {"host": HOST, "port": 0},
        {"host": HOST, "port": 65536},
        {"host": HOST, "port": 502, "max_in_flight": 0},
        {"host": HOST, "port": 502, "max_in_flight": 65537},
    ],
)
def test_a_bad_driver_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ModbusDriver(**kwargs)


# ------------------------------------------------------------------------------ slots


async def test_links_to_one_gateway_share_its_single_connection_slot(
    gateway: ModbusGateway,
) -> None:
    first = modbus_link(HOST, gateway.port, name="first", backoff=FAST)
    second = modbus_link(HOST, gateway.port, name="second", backoff=FAST)
    pool = gateway_slots(HOST, gateway.port)
    assert first.slots is pool and second.slots is pool and pool.size == 1
    assert gateway_slots(HOST, gateway.port + 1) is not pool
    with pytest.raises(ConfigError):
        gateway_slots(HOST, gateway.port, size=2)
    async with first:
        await connected(first)
        second.start()
        try:
            await eventually(lambda: pool.statistics().waiting == 1, what="second link queued")
            assert second.state is S.CONNECTING
            assert pool.statistics().holders == ("first",)
            await first.stop()  # its slot passes to the second link
            await connected(second)
            assert pool.statistics().holders == ("second",)
            assert await second.call("read_holding_registers", read(1, 0, 1), timeout=5)
        finally:
            await second.stop()
    assert pool.statistics().held == 0


# ------------------------------------------------------------------------------ presence


async def test_the_unit_probe_reports_each_units_presence(gateway: ModbusGateway) -> None:
    gateway.offline.add(2)  # the gateway says 0x0B
    gateway.hanging.add(3)  # the gateway says nothing at all
    tracker = PresenceTracker(debounce_online_s=0, debounce_offline_s=0)
    link = modbus_link(HOST, gateway.port)
    targets = [
        ProbeTarget(device="meter", unit=1),
        ProbeTarget(device="boiler", unit=2),
        ProbeTarget(device="pump", unit=3),
        # Exception 2 is an answer: the unit is there, only the probe address is wrong.
        ProbeTarget(device="valve", unit=1, op="read_input_registers", address=REGISTERS + 5),
    ]
    probe = UnitProbe(
        link=link, presence=tracker, units=targets, interval_s=0.05, timeout_s=0.2, ttl_s=30
    )
    try:
        async with link, probe:
            await connected(link)
            await eventually(lambda: probe.rounds >= 2, what="two probe rounds")
    finally:
        tracker.close()
    claims = {t.device: tracker.claims(t.device)[Source.PROBE] for t in targets}
    assert {d: c.online for d, c in claims.items()} == {
        "meter": True,
        "boiler": False,
        "pump": False,
        "valve": True,
    }
    assert {c.ttl_s for c in claims.values()} == {30}
    assert tracker.presence("meter") is Presence.ONLINE
    assert tracker.presence("pump") is Presence.OFFLINE


async def test_a_unit_the_server_does_not_have_is_offline_and_a_busy_one_online(
    gateway: ModbusGateway,
) -> None:
    ghost = 9  # no such unit behind the gateway (it has units 1..3)
    assert ghost not in UNITS
    gateway.failing[2] = ExcCodes.DEVICE_BUSY  # there, only busy: an answer all the same
    gateway.failing[3] = ExcCodes.ILLEGAL_FUNCTION  # there, refusing the function
    tracker = PresenceTracker(debounce_online_s=0, debounce_offline_s=0)
    link = modbus_link(HOST, gateway.port)
    targets = [
        ProbeTarget(device="ghost", unit=ghost),
        ProbeTarget(device="boiler", unit=2),
        ProbeTarget(device="pump", unit=3),
    ]
    probe = UnitProbe(link=link, presence=tracker, units=targets, interval_s=0.05, ttl_s=30)
    try:
        async with link, probe:
            await connected(link)
            # What pymodbus's server answers for a unit it does not hold: exception 4.
            outcome = await link.request("read_holding_registers", read(ghost, 0, 1), timeout=5)
            assert isinstance(outcome, Rejected)
            assert outcome.code == "modbus_exception_4"
            await eventually(lambda: probe.rounds >= 2, what="two probe rounds")
    finally:
        tracker.close()
    claims = {t.device: tracker.claims(t.device)[Source.PROBE].online for t in targets}
    assert claims == {"ghost": False, "boiler": True, "pump": True}, claims
    assert tracker.presence("ghost") is Presence.OFFLINE, "a unit that does not exist"
    assert tracker.presence("boiler") is Presence.ONLINE


async def test_the_unit_probe_runs_at_once_when_the_link_connects(gateway: ModbusGateway) -> None:
    tracker = PresenceTracker(debounce_online_s=0, debounce_offline_s=0)
    link = modbus_link(HOST, gateway.port)
    # An hour between rounds: only the link's "connected" can make the second one happen.
    probe = UnitProbe(
        link=link, presence=tracker, units=[ProbeTarget(device="meter", unit=1)], interval_s=3600
    )
    try:
        async with probe:  # the first round finds the link down and says nothing
            await eventually(lambda: probe.rounds == 1)
            assert tracker.presence("meter") is Presence.UNKNOWN
            async with link:
                async with asyncio.timeout(IO_BOUND_S):
                    await tracker.wait_for("meter", Presence.ONLINE)
    finally:
        tracker.close()
    assert probe.rounds == 2


def test_a_bad_probe_configuration_is_refused() -> None:
    link = modbus_link(HOST, 1502)
    tracker = PresenceTracker()
    ok = [ProbeTarget(device="meter", unit=1)]
    kwargs: dict[str, Any]
    for kwargs in (
        {"units": []},
        {"units": [ProbeTarget(device="m", unit=1), ProbeTarget(device="m", unit=2)]},
        {"units": [ProbeTarget(device="m", unit=300)]},
        {"units": [ProbeTarget(device="m", unit=1, op="write_coil")]},
        {"units": ok, "interval_s": 0},
        {"units": ok, "timeout_s": -1},
        {"units": ok, "ttl_s": 0},
    ):
        with pytest.raises(ConfigError):
            UnitProbe(link=link, presence=tracker, **kwargs)


async def test_a_queued_write_for_an_offline_unit_is_delivered_once_when_it_returns(
    gateway: ModbusGateway,
) -> None:
    gateway.offline.add(2)
    presence = PresenceTracker(debounce_online_s=0.05, debounce_offline_s=0.05)
    link = modbus_link(HOST, gateway.port, backoff=FAST)
    probe = UnitProbe(
        link=link,
        presence=presence,
        units=[ProbeTarget(device="boiler", unit=2)],
        interval_s=0.02,
        timeout_s=1,
    )

    async def rounds(n: int) -> None:
        target = probe.rounds + n
        await eventually(lambda: probe.rounds >= target, what=f"{n} more probe rounds")

    async def presence_is(state: Presence) -> None:
        async with asyncio.timeout(IO_BOUND_S):
            await presence.wait_for("boiler", state)

    try:
        async with link, probe, Outbox(MemoryStore(), presence=presence) as outbox:
            await connected(link)
            await outbox.attach("boiler", link, hub=True)  # the probe speaks for the unit
            await presence_is(Presence.OFFLINE)

            command = await outbox.submit(
                "boiler", "write_registers", {"unit": 2, "address": 5, "values": [11, 22]}
            )
            assert command.state is CommandState.QUEUED  # said explicitly: the unit is away
            await rounds(3)
            assert (await outbox.get(command.id)).state is CommandState.QUEUED
            assert gateway.applied[2] == 0
            assert await gateway.registers(2, 5, 2) == [0, 0]

            gateway.offline.discard(2)  # the unit answers again
            async with asyncio.timeout(IO_BOUND_S):
                done = await outbox.wait(command.id)
            assert done.state is CommandState.SUCCEEDED
            assert done.result == {"address": 5, "count": 2}
            assert await gateway.registers(2, 5, 2) == [11, 22]

            # Another presence cycle (gone, back) does not send it again.
            gateway.offline.add(2)
            await presence_is(Presence.OFFLINE)
            gateway.offline.discard(2)
            await presence_is(Presence.ONLINE)
            await rounds(3)
    finally:
        presence.close()
    assert gateway.applied[2] == 1
    assert gateway.applied[1] == gateway.applied[3] == 0


# ------------------------------------------------------------------------------ codec

DRIVER = ModbusDriver(host=HOST, port=502)

units = st.integers(0, 247)
addresses = st.integers(0, 1000)


Exchange = tuple[ModbusRequest, ModbusPDU, Reply]
register_lists = st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=MAX_READ_REGISTERS)
bit_lists = st.lists(st.booleans(), min_size=1, max_size=MAX_READ_BITS)


@st.composite
def exchanges(draw: st.DrawFn, tid: int) -> Exchange:
    """A request, the reply a real server would send (a pymodbus PDU), and the Reply the
    driver must make of it."""
    unit = draw(units)
    address = draw(addresses)
    kind = draw(st.sampled_from(["hr", "ir", "co", "di", "w1", "wn", "c1", "cn", "exc"]))
    if kind in ("hr", "ir"):
        registers = draw(register_lists)
        op = "read_holding_registers" if kind == "hr" else "read_input_registers"
        cls = ReadHoldingRegistersResponse if kind == "hr" else ReadInputRegistersResponse
        request = DRIVER.build_request(tid, op, read(unit, address, len(registers)), None)
        return (
            request,
            cls(registers=registers, dev_id=unit, transaction_id=tid),
            ok(tid, registers=registers),
        )
    if kind in ("co", "di"):
        bits = draw(bit_lists)
        op = "read_coils" if kind == "co" else "read_discrete_inputs"
        bit_cls = ReadCoilsResponse if kind == "co" else ReadDiscreteInputsResponse
        request = DRIVER.build_request(tid, op, read(unit, address, len(bits)), None)
        return request, bit_cls(bits=bits, dev_id=unit, transaction_id=tid), ok(tid, bits=bits)
    if kind == "exc":
        code = draw(st.sampled_from(sorted(ExcCodes)))
        request = DRIVER.build_request(tid, "read_coils", read(unit, address, 1), None)
        refusal = Reply(
            seq=tid,
            ok=False,
            code="device_unavailable" if code in (10, 11) else f"modbus_exception_{code}",
            message=f"{EXCEPTION_NAMES[code]} (exception {code})",
            side={"exception_code": code},
        )
        return request, ExceptionResponse(1, code, device_id=unit, transaction=tid), refusal
    if kind == "w1":
        value = draw(st.integers(0, 0xFFFF))
        args = {"unit": unit, "address": address, "value": value}
        request = DRIVER.build_request(tid, "write_register", args, None)
        echo: ModbusPDU = WriteSingleRegisterResponse(
            address=address, registers=[value], dev_id=unit, transaction_id=tid
        )
        return request, echo, ok(tid, address=address, value=value)
    if kind == "c1":
        bit = draw(st.booleans())
        args = {"unit": unit, "address": address, "value": bit}
        request = DRIVER.build_request(tid, "write_coil", args, None)
        echo = WriteSingleCoilResponse(address=address, bits=[bit], dev_id=unit, transaction_id=tid)
        return request, echo, ok(tid, address=address, value=bit)
    if kind == "wn":
        values: list[Any] = draw(register_lists)[:MAX_WRITE_REGISTERS]
        echo = WriteMultipleRegistersResponse(
            address=address, count=len(values), dev_id=unit, transaction_id=tid
        )
        op = "write_registers"
    else:
        values = draw(bit_lists)[:MAX_WRITE_BITS]
        echo = WriteMultipleCoilsResponse(
            address=address, count=len(values), dev_id=unit, transaction_id=tid
        )
        op = "write_coils"
    request = DRIVER.build_request(
        tid, op, {"unit": unit, "address": address, "values": values}, None
    )
    return request, echo, ok(tid, address=address, count=len(values))


def ok(tid: int, **result: Any) -> Reply:
    return Reply(seq=tid, ok=True, result=result)


@st.composite
def conversations(draw: st.DrawFn) -> list[Exchange]:
    tids = draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=6, unique=True))
    return [draw(exchanges(tid)) for tid in tids]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


@given(conversation=conversations(), cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_replies_survive_any_split_of_the_byte_stream(
    conversation: list[Exchange], cuts: list[int]
) -> None:
    codec = ModbusCodec()
    for request, _, _ in conversation:
        codec.encode(request)
    stream = b"".join(adu_of(pdu) for _, pdu, _ in conversation)
    items: list[ModbusFrame | Malformed] = []
    for chunk in split(stream, cuts):
        items.extend(codec.feed(chunk))
    assert not [i for i in items if isinstance(i, Malformed)]
    replies = [DRIVER.match_reply(i) for i in items if isinstance(i, ModbusResponse)]
    assert replies == [e for _, _, e in conversation]


@given(
    conversation=conversations(),
    noise=st.lists(st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"!"))),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
def test_noise_between_replies_is_malformed_and_every_reply_still_decodes(
    conversation: list[Exchange], noise: list[bytes], cuts: list[int]
) -> None:
    codec = ModbusCodec()
    for request, _, _ in conversation:
        codec.encode(request)
    parts: list[bytes] = []
    for i, (_, pdu, _) in enumerate(conversation):
        parts.append(noise[i] if i < len(noise) else b"")
        parts.append(adu_of(pdu))
    items: list[ModbusFrame | Malformed] = []
    for chunk in split(b"".join(parts), cuts):
        items.extend(codec.feed(chunk))
    replies = [DRIVER.match_reply(i) for i in items if isinstance(i, ModbusResponse)]
    assert replies == [e for _, _, e in conversation]
    noisy = sum(1 for p in noise[: len(conversation)] if p)
    assert sum(1 for i in items if isinstance(i, Malformed)) >= noisy


def test_replies_that_do_not_fit_their_request_are_malformed() -> None:
    codec = ModbusCodec()
    request = DRIVER.build_request(5, "read_holding_registers", read(2, 0, 2), None)
    codec.encode(request)
    wrong = [
        ReadHoldingRegistersResponse(registers=[1, 2], dev_id=2, transaction_id=6),  # never sent
        ReadHoldingRegistersResponse(registers=[1, 2], dev_id=3, transaction_id=5),  # other unit
        ReadInputRegistersResponse(registers=[1, 2], dev_id=2, transaction_id=5),  # other function
        ReadHoldingRegistersResponse(registers=[1], dev_id=2, transaction_id=5),  # short
    ]
    for pdu in wrong:
        [item] = codec.feed(adu_of(pdu))
        assert isinstance(item, Malformed), pdu
    # The transaction stayed open: the right reply still resolves it.
    right = ReadHoldingRegistersResponse(registers=[1, 2], dev_id=2, transaction_id=5)
    [item] = codec.feed(adu_of(right))
    assert isinstance(item, ModbusResponse)
    assert DRIVER.match_reply(item) == Reply(seq=5, ok=True, result={"registers": [1, 2]})


TYPED_VALUES = {
    "uint16": st.integers(0, 0xFFFF),
    "int16": st.integers(-0x8000, 0x7FFF),
    "uint32": st.integers(0, 0xFFFF_FFFF),
    "int32": st.integers(-0x8000_0000, 0x7FFF_FFFF),
    "float32": st.floats(width=32, allow_nan=False, allow_infinity=False),
}
ORACLE_TYPES = {
    "uint16": ModbusClientMixin.DATATYPE.UINT16,
    "int16": ModbusClientMixin.DATATYPE.INT16,
    "uint32": ModbusClientMixin.DATATYPE.UINT32,
    "int32": ModbusClientMixin.DATATYPE.INT32,
    "float32": ModbusClientMixin.DATATYPE.FLOAT32,
}


@given(
    data=st.data(),
    value_type=st.sampled_from(sorted(TYPED_VALUES)),
    word_order=st.sampled_from(["big", "little"]),
    unit=units,
    address=addresses,
    tid=st.integers(0, 0xFFFF),
)
def test_typed_writes_encode_like_pymodbus_and_reads_decode_back(
    data: st.DataObject, value_type: str, word_order: str, unit: int, address: int, tid: int
) -> None:
    values = data.draw(st.lists(TYPED_VALUES[value_type], min_size=1, max_size=30))
    typed = {"type": value_type, "word_order": word_order}
    args = {"unit": unit, "address": address, "values": values, **typed}
    request = DRIVER.build_request(tid, "write_registers", args, None)
    # A real server's decoder reads the request off the wire...
    used, pdu = read_request(request.adu)
    assert pdu is not None and used == len(request.adu)
    assert (pdu.dev_id, pdu.transaction_id, pdu.address) == (unit, tid, address)
    # ...and finds what pymodbus' own converter makes of the values.
    oracle = ModbusClientMixin.convert_to_registers(
        values,
        ORACLE_TYPES[value_type],
        word_order=word_order,  # type: ignore[arg-type]
    )
    assert list(pdu.registers) == oracle
    # Reading those registers back with the same type gives the values again.
    codec = ModbusCodec()
    codec.encode(
        DRIVER.build_request(
            tid, "read_holding_registers", read(unit, address, len(oracle), **typed), None
        )
    )
    answer = ReadHoldingRegistersResponse(registers=oracle, dev_id=unit, transaction_id=tid)
    [item] = codec.feed(adu_of(answer))
    assert isinstance(item, ModbusResponse)
    reply = DRIVER.match_reply(item)
    assert reply is not None and reply.result["values"] == values


def _write(tid: int, op: str, **args: Any) -> ModbusRequest:
    return DRIVER.build_request(tid, op, {"unit": 1, "address": 10, **args}, None)


# (request, an echo that does not repeat it, what is wrong). A write is acknowledged by an
# echo of its address and value (single) or count (multiple): anything else is not proof.
BAD_ECHOES: dict[str, tuple[ModbusRequest, ModbusPDU, str]] = {
    "register-address": (
        _write(1, "write_register", value=7),
        WriteSingleRegisterResponse(address=11, registers=[7], dev_id=1, transaction_id=1),
        "address 11",
    ),
    "register-value": (
        _write(1, "write_register", value=7),
        WriteSingleRegisterResponse(address=10, registers=[8], dev_id=1, transaction_id=1),
        "value 8",
    ),
    "coil-address": (
        _write(1, "write_coil", value=True),
        WriteSingleCoilResponse(address=9, bits=[True], dev_id=1, transaction_id=1),
        "address 9",
    ),
    "coil-value": (
        _write(1, "write_coil", value=True),
        WriteSingleCoilResponse(address=10, bits=[False], dev_id=1, transaction_id=1),
        "value 0",
    ),
    "registers-count": (
        _write(1, "write_registers", values=[1, 2, 3]),
        WriteMultipleRegistersResponse(address=10, count=2, dev_id=1, transaction_id=1),
        "count 2",
    ),
    "coils-address": (
        _write(1, "write_coils", values=[True, False]),
        WriteMultipleCoilsResponse(address=0, count=2, dev_id=1, transaction_id=1),
        "address 0",
    ),
}


@pytest.mark.parametrize(("request_", "echo", "problem"), BAD_ECHOES.values(), ids=BAD_ECHOES)
def test_a_write_echo_that_does_not_repeat_the_write_is_malformed(
    request_: ModbusRequest, echo: ModbusPDU, problem: str
) -> None:
    codec = ModbusCodec()
    codec.encode(request_)
    [item] = codec.feed(adu_of(echo))
    assert isinstance(item, Malformed), (
        f"{request_.op} echoed with {problem} was taken as its reply: "
        f"{DRIVER.match_reply(item) if isinstance(item, ModbusResponse) else item}"
    )
    assert problem in item.reason, item.reason
    # The transaction stays open: the real echo still settles it.
    right = {
        "write_register": WriteSingleRegisterResponse(
            address=10, registers=[7], dev_id=1, transaction_id=1
        ),
        "write_coil": WriteSingleCoilResponse(address=10, bits=[True], dev_id=1, transaction_id=1),
        "write_registers": WriteMultipleRegistersResponse(
            address=10, count=3, dev_id=1, transaction_id=1
        ),
        "write_coils": WriteMultipleCoilsResponse(address=10, count=2, dev_id=1, transaction_id=1),
    }[request_.op]
    [reply] = codec.feed(adu_of(right))
    assert isinstance(reply, ModbusResponse), reply
    assert DRIVER.match_reply(reply) is not None
