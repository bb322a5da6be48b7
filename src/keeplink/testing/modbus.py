"""A Modbus TCP gateway for tests: a real pymodbus server on loopback, units 1..3 behind it.

    gateway = ModbusGateway()
    await gateway.start()          # on a free port: gateway.port
    ...                            # ModbusDriver(host="127.0.0.1", port=gateway.port, ...)
    gateway.offline.add(2)         # unit 2 answers exception 0x0B from now on
    await gateway.stop()           # start() again comes back on the same port

It needs pymodbus (a test dependency of keeplink; the driver itself does not use it). Every
unit has 64 coils (off), 64 discrete inputs (on), 200 holding registers (0) and 200 input
registers (``INPUT_VALUE``). :class:`RawModbusGateway` is a hand-made peer for the bytes no
real gateway sends: noise, replies out of order, replies made up by the test.
:func:`adu_of` and :func:`read_request` frame pymodbus PDUs for the wire and back, with
pymodbus' own PDU encoders and decoders: an oracle independent of keeplink's codec.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import struct
from collections.abc import Callable, Iterator
from typing import Any, Final

try:
    from pymodbus.constants import ExcCodes
    from pymodbus.pdu import DecodePDU, ModbusPDU
    from pymodbus.pdu.register_message import ReadHoldingRegistersResponse
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keeplink.testing.modbus needs pymodbus: pip install 'keeplink[test]' (or pymodbus)"
    ) from exc

__all__ = [
    "BITS",
    "INPUT_VALUE",
    "REGISTERS",
    "UNITS",
    "ModbusGateway",
    "RawModbusGateway",
    "adu_of",
    "read_request",
]

HOST: Final = "127.0.0.1"
UNITS: Final = (1, 2, 3)
"""The units behind the gateway."""
REGISTERS: Final = 200
"""Holding and input registers per unit."""
INPUT_VALUE: Final = 7
"""What every input register holds."""
BITS: Final = 64
"""Coils and discrete inputs per unit."""


_MBAP: Final = struct.Struct(">HHHB")  # transaction id, protocol id (0), length, unit id
_REQUESTS: Final = DecodePDU(is_server=True)


def adu_of(pdu: ModbusPDU) -> bytes:
    """``pdu`` as a Modbus TCP ADU: the MBAP header, the function code and pymodbus'
    encoding of the PDU's data."""
    body = bytes([pdu.function_code]) + pdu.encode()
    return _MBAP.pack(pdu.transaction_id, 0, len(body) + 1, pdu.dev_id) + body


def read_request(buf: bytes) -> tuple[int, ModbusPDU | None]:
    """The first request ADU in ``buf``, decoded by pymodbus as a server would: (bytes
    used, the PDU). (0, None): not a whole ADU yet. A frame pymodbus cannot decode is
    used up and gives None."""
    if len(buf) < _MBAP.size + 1:
        return 0, None
    tid, _, length, unit = _MBAP.unpack_from(buf)
    end = 6 + length
    if len(buf) < end:
        return 0, None
    pdu = _REQUESTS.decode(buf[_MBAP.size : end])
    if pdu is not None:
        pdu.transaction_id, pdu.dev_id = tid, unit
    return end, pdu


class ModbusGateway:
    """A real pymodbus ``ModbusTcpServer`` with units 1..3 behind it.

    Unit behaviour is switched per test: ``offline`` units answer exception 0x0B (what a
    gateway says when the unit behind it does not answer), ``failing`` units answer a given
    exception, ``hanging`` units never answer until the gateway stops. ``applied`` counts,
    per unit, the writes the server applied and acknowledged; ``packets_in`` counts every
    packet that reached it.

    Every start builds a fresh datastore (as a power-cycled gateway would have).
    """

    def __init__(self) -> None:
        self.port = 0
        self.offline: set[int] = set()
        self.failing: dict[int, ExcCodes] = {}
        self.hanging: set[int] = set()
        self.applied: collections.Counter[int] = collections.Counter()
        self.packets_in = 0
        self._server: ModbusTcpServer | None = None
        self._release = asyncio.Event()
        self._backdoor = False

    async def start(self) -> None:
        self._release.clear()
        devices = [
            SimDevice(
                unit,
                simdata=(
                    [SimData(0, count=BITS, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=BITS, values=True, datatype=DataType.BITS)],
                    [SimData(0, count=REGISTERS, values=0, datatype=DataType.REGISTERS)],
                    [SimData(0, count=REGISTERS, values=INPUT_VALUE, datatype=DataType.REGISTERS)],
                ),
                action=functools.partial(self._action, unit),
            )
            for unit in UNITS
        ]
        server = ModbusTcpServer(
            devices,
            address=(HOST, self.port),
            trace_packet=self._trace_packet,
            trace_pdu=self._trace_pdu,
        )
        await server.serve_forever(background=True)
        self.port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._release.set()  # hanging requests finish (into a closed socket)
        await server.shutdown()  # type: ignore[no-untyped-call]

    async def registers(self, unit: int, address: int, count: int) -> list[int]:
        """The unit's holding registers, read straight from the datastore."""
        return [int(v) for v in await self._datastore(unit, 3, address, count)]

    async def coils(self, unit: int, address: int, count: int) -> list[bool]:
        return [bool(v) for v in await self._datastore(unit, 1, address, count)]

    async def preset(self, unit: int, address: int, values: list[int]) -> None:
        """Set holding registers straight in the datastore (not a write over the wire)."""
        with self._direct() as server:
            await server.async_setValues(unit, 16, address, values)

    async def _datastore(self, unit: int, fc: int, address: int, count: int) -> list[Any]:
        with self._direct() as server:
            return list(await server.async_getValues(unit, fc, address, count))

    @contextlib.contextmanager
    def _direct(self) -> Iterator[ModbusTcpServer]:
        """The datastore itself: the units' switches (offline, failing…) apply to the wire."""
        assert self._server is not None
        self._backdoor = True
        try:
            yield self._server
        finally:
            self._backdoor = False

    async def _action(
        self,
        unit: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if self._backdoor:
            return None
        if unit in self.hanging:
            await self._release.wait()
        if unit in self.offline:
            return ExcCodes.GATEWAY_NO_RESPONSE
        return self.failing.get(unit)

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self.packets_in += 1
        return data

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending and pdu.function_code in (5, 6, 15, 16):  # a write acknowledged: applied
            self.applied[pdu.dev_id] += 1
        return pdu


class RawModbusGateway:
    """A hand-made Modbus TCP peer on a raw asyncio server, for the bytes a real gateway
    would never send: it answers every holding register read with ``[n] * count`` (n counts
    requests), after whatever noise ``noise(n, pdu)`` gives, and may hold replies back to
    send them last-first (``batch``). ``answer(n, pdu)``, if given, makes the reply instead
    (to writes, say). ``async with`` starts and stops it, on a free port (``port``);
    ``served`` counts the requests it decoded."""

    def __init__(
        self,
        noise: Callable[[int, ModbusPDU], bytes] = lambda n, pdu: b"",
        batch: int = 1,
        answer: Callable[[int, ModbusPDU], ModbusPDU] | None = None,
    ) -> None:
        self.noise = noise
        self.batch = batch
        self.answer = answer
        self.port = 0
        self.served = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawModbusGateway:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._conns:
            task.cancel()
        if self._conns:
            await asyncio.wait(self._conns)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        buf = b""
        held: list[bytes] = []
        try:
            while data := await reader.read(4096):
                buf += data
                while True:
                    used, pdu = read_request(buf)
                    buf = buf[used:]
                    if pdu is None:
                        if used:
                            continue
                        break
                    self.served += 1
                    reply = (
                        self.answer(self.served, pdu)
                        if self.answer is not None
                        else ReadHoldingRegistersResponse(
                            registers=[self.served] * pdu.count,
                            dev_id=pdu.dev_id,
                            transaction_id=pdu.transaction_id,
                        )
                    )
                    held.append(self.noise(self.served, pdu) + adu_of(reply))
                    if len(held) == self.batch:
                        writer.write(b"".join(reversed(held)))
                        held.clear()
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()
            self._conns.discard(task)
