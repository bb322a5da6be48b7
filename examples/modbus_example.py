"""Read and write a Modbus unit's registers through keeplink's Modbus TCP driver.

A heat pump (or any unit) sits behind a Modbus TCP gateway, as unit 1..247. keeplink
gives the gateway one supervised link (:func:`keeplink.drivers.modbus.modbus_link`), shared
by every unit behind it and holding the gateway's single client slot; each request names
its ``unit``. Values are typed by the driver (``float32`` over two registers, ``int16``…),
a Modbus exception answer is a refusal with the code ``modbus_exception_<n>``, and
:class:`~keeplink.presence.modbus.UnitProbe` turns a cheap read per unit into presence.

Against a real gateway (keeplink alone: its Modbus driver needs no other library)::

    python -m examples.modbus_example --host 192.0.2.7 --port 502 --unit 1

Or without hardware, against a pymodbus server this program starts on a free loopback
port (units 1 and 2 behind it)::

    python -m examples.modbus_example --demo

The register map is made up (check your unit's manual for its own):

=================  =====  =======  =======================================
what               table  address  type
=================  =====  =======  =======================================
flow setpoint °C   hold.  0, 1     float32, big-endian words
mode               hold.  2        uint16: 0 off, 1 heat, 2 cool
outdoor °C × 10    input  0        int16
circulation pump   coil   0        bit
=================  =====  =======  =======================================
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

from keeplink import Acknowledged, Backoff, KeeplinkError, Link, Rejected, enum_or_none
from keeplink.drivers.modbus import ModbusFrame, modbus_link
from keeplink.presence import Presence, PresenceChanged, PresenceTracker
from keeplink.presence.modbus import ProbeTarget, UnitProbe

SETPOINT: Final = 0
MODE: Final = 2
OUTDOOR: Final = 0
PUMP: Final = 0
TIMEOUT_S: Final = 5.0


class Mode(enum.IntEnum):
    OFF = 0
    HEAT = 1
    COOL = 2


class HeatPump:
    """One unit behind a Modbus TCP gateway, through the gateway's (shared) link.

    Every method is one Modbus request. ``link.call`` returns the result or raises the
    outcome's error: RejectedError for a Modbus exception (``wire_code``
    ``modbus_exception_2`` for an address the unit does not have), DeviceUnavailableError
    while the gateway is unreachable or the gateway cannot reach the unit (exceptions
    10, 11), RequestTimeout when the unit does not answer.
    """

    def __init__(self, link: Link[ModbusFrame], unit: int) -> None:
        self.link = link
        self.unit = unit

    async def setpoint(self) -> float | None:
        """The flow setpoint; None when the unit reports "no value" (a NaN float32)."""
        result = await self.link.call(
            "read_holding_registers",
            {"unit": self.unit, "address": SETPOINT, "count": 2, "type": "float32"},
            timeout=TIMEOUT_S,
        )
        value: float | None = result["values"][0]  # the raw words are in "registers"
        return value

    async def set_setpoint(self, celsius: float) -> None:
        await self.link.call(
            "write_registers",
            {"unit": self.unit, "address": SETPOINT, "values": [celsius], "type": "float32"},
            timeout=TIMEOUT_S,
        )

    async def mode(self) -> Mode | None:
        """The mode; None for a value this program does not know (newer firmware)."""
        result = await self.link.call(
            "read_holding_registers",
            {"unit": self.unit, "address": MODE, "count": 1},
            timeout=TIMEOUT_S,
        )
        return enum_or_none(Mode, result["registers"][0])

    async def set_mode(self, mode: Mode) -> None:
        await self.link.call(
            "write_register",
            {"unit": self.unit, "address": MODE, "value": int(mode)},
            timeout=TIMEOUT_S,
        )

    async def outdoor_temperature(self) -> float:
        result = await self.link.call(
            "read_input_registers",
            {"unit": self.unit, "address": OUTDOOR, "count": 1, "type": "int16"},
            timeout=TIMEOUT_S,
        )
        tenths: int = result["values"][0]
        return tenths / 10

    async def pump_on(self) -> bool:
        result = await self.link.call(
            "read_coils", {"unit": self.unit, "address": PUMP, "count": 1}, timeout=TIMEOUT_S
        )
        on: bool = result["bits"][0]
        return on

    async def set_pump(self, on: bool) -> None:
        await self.link.call(
            "write_coil", {"unit": self.unit, "address": PUMP, "value": on}, timeout=TIMEOUT_S
        )


async def first_word(presence: PresenceTracker, device: str) -> Presence:
    """Wait until ``presence`` knows whether ``device`` is there (online or offline)."""
    changed = asyncio.Event()

    def on_change(change: PresenceChanged) -> None:
        if change.device == device:
            changed.set()

    unsubscribe = presence.subscribe(on_change)
    try:
        while (seen := presence.presence(device)) is Presence.UNKNOWN:
            await changed.wait()
            changed.clear()
        return seen
    finally:
        unsubscribe()


async def run(
    host: str,
    port: int,
    units: Sequence[int],
    *,
    setpoint: float = 45.5,
    probe_interval_s: float = 10.0,
) -> dict[int, dict[str, Any]]:
    """Probe each unit; on each present one write the setpoint, the mode and the pump, and
    read everything back. Returns what was read, per unit; prints it too."""
    report: dict[int, dict[str, Any]] = {}
    # Presence of units behind a gateway comes from probing them: the link being up says
    # nothing about one unit. No debounce here: this program only looks once.
    presence = PresenceTracker(debounce_online_s=0, debounce_offline_s=0)
    link = modbus_link(host, port, backoff=Backoff(initial_s=0.5, cap_s=10))
    probe = UnitProbe(
        link=link,
        presence=presence,
        units=[ProbeTarget(device=f"unit-{unit}", unit=unit) for unit in units],
        interval_s=probe_interval_s,
    )
    try:
        async with link, probe:
            await link.wait_connected(timeout=10)
            for unit in units:
                # The probe runs as soon as the link connects; wait for its first word.
                async with asyncio.timeout(2 * probe.timeout_s * len(units)):
                    seen = await first_word(presence, f"unit-{unit}")
                report[unit] = {"present": seen is Presence.ONLINE}
                if seen is not Presence.ONLINE:
                    # A write for it could wait in an Outbox (attach the link with hub=True
                    # and let the probe feed the outbox's presence) until it is back.
                    print(f"unit {unit}: not there", flush=True)
                    continue
                pump = HeatPump(link, unit)
                await pump.set_setpoint(setpoint)
                await pump.set_mode(Mode.HEAT)
                await pump.set_pump(True)
                report[unit] |= {
                    "setpoint": await pump.setpoint(),
                    "mode": await pump.mode(),
                    "outdoor": await pump.outdoor_temperature(),
                    "pump": await pump.pump_on(),
                }
                # request() returns a typed outcome instead of raising: handy where a
                # refusal is an answer. An address the unit does not have:
                outcome = await link.request(
                    "read_holding_registers",
                    {"unit": unit, "address": 9000, "count": 1},
                    timeout=TIMEOUT_S,
                )
                match outcome:
                    case Rejected(code=code, message=message):
                        # code "modbus_exception_2", message "illegal data address …"
                        report[unit]["bad_address"] = code
                        print(f"unit {unit}: address 9000: {message}", flush=True)
                    case Acknowledged(result=result):
                        report[unit]["bad_address"] = result["registers"]
                    case _:
                        raise outcome.error
                print(f"unit {unit}: {report[unit]}", flush=True)
    finally:
        presence.close()
    return report


@contextlib.asynccontextmanager
async def demo_gateway(units: Sequence[int] = (1, 2)) -> AsyncIterator[int]:
    """A pymodbus Modbus TCP server on a free loopback port with ``units`` behind it, each
    with 16 of every kind of register; yields its port. For trying this program out."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    def table(datatype: DataType, value: int | bool) -> list[SimData]:
        return [SimData(0, count=16, values=value, datatype=datatype)]

    devices = [
        SimDevice(
            unit,
            # coils, discrete inputs, holding registers, input registers (outdoor 7.5 °C)
            simdata=(
                table(DataType.BITS, False),
                table(DataType.BITS, False),
                table(DataType.REGISTERS, 0),
                table(DataType.REGISTERS, 75),
            ),
        )
        for unit in units
    ]
    server = ModbusTcpServer(devices, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        yield server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.modbus_example")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=502)
    parser.add_argument("--unit", type=int, action="append", help="repeat for more units")
    parser.add_argument("--setpoint", type=float, default=45.5)
    parser.add_argument("--demo", action="store_true", help="start a local pymodbus server")
    return parser


async def amain(args: argparse.Namespace) -> int:
    try:
        if args.demo:
            # Units 1 and 2 behind the demo gateway, and 3 asked for, which is not there.
            async with demo_gateway((1, 2)) as port:
                await run("127.0.0.1", port, [1, 2, 3], setpoint=args.setpoint)
        else:
            await run(args.host, args.port, args.unit or [1], setpoint=args.setpoint)
    except KeeplinkError as exc:  # e.g. WaitTimeoutError: the gateway is not reachable
        print(f"failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.demo:
        # pymodbus's server logs a traceback for a unit it does not have: not ours to show.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
