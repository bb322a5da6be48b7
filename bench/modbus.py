"""Modbus TCP request throughput: keeplink's Modbus driver vs pymodbus' own client.

    python -m bench.modbus [--count 2000] [--rounds 5] [--peer pymodbus|raw]

Both clients read 10 holding registers from the SAME server, which runs in its own process
(so the clients are what is measured): pymodbus' ``ModbusTcpServer`` by default, or with
``--peer raw`` a minimal asyncio responder (no datastore, answers pipelined requests) that
shows the clients' own ceiling. Modes, one connection each:

- window 1: one caller, sequential requests;
- 8 callers: 8 tasks issuing requests concurrently. pymodbus' client serialises them behind
  its transaction lock; keeplink queues them in its request window;
- window 8: 8 requests truly in flight (pipelined) on one connection, only if the server
  answers pipelined requests. pymodbus' server (3.16) does not: it decodes one request per
  ``data_received`` and leaves the rest in its buffer. The bench probes for it first.

Each round measures every mode once, interleaved; the table shows the median.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable

from pymodbus.client import AsyncModbusTcpClient

from keeplink import Acknowledged, Link
from keeplink._core import mbap  # keeplink's own codec, not re-exported
from keeplink._slots import SlotPool  # not re-exported by keeplink (yet)
from keeplink.drivers.modbus import ModbusFrame, modbus_link

Measure = Callable[[int], Awaitable[tuple[float, float]]]
"""Runs ``count`` requests; returns (wall seconds, this process' CPU seconds)."""

UNIT = 1
ADDRESS = 0
COUNT = 10
CALLERS = 8
GOAL_WINDOW_1 = 1.3  # keeplink / pymodbus, reported, not gated


# ------------------------------------------------------------------------------ the server


async def serve(port: int, peer: str) -> None:
    """The server process: one unit, holding registers 0..99 = 1234; prints its address."""
    if peer == "raw":
        server = await asyncio.get_running_loop().create_server(_RawPeer, "127.0.0.1", port)
        print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    device = SimDevice(
        UNIT, simdata=[SimData(0, count=100, values=1234, datatype=DataType.REGISTERS)]
    )
    modbus = ModbusTcpServer(device, address=("127.0.0.1", port))
    await modbus.serve_forever(background=True)
    bound = modbus.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    await modbus.serving


class _RawPeer(asyncio.Protocol):
    """Answers every read-holding-registers request at once, pipelined ones included."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while len(self.buffer) >= 12:
            tid, _, length, unit, fc, _, count = struct.unpack_from(">HHHBBHH", self.buffer)
            self.buffer = self.buffer[6 + length :]
            body = bytes([fc, 2 * count]) + b"\x04\xd2" * count
            out.append(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
        self.transport.write(b"".join(out))


async def start_server(peer: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.modbus", "--serve", "--port", "0", "--peer", peer,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    match = re.search(r":(\d+)$", line.strip())
    if match is None:
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, int(match.group(1))


async def server_pipelines(port: int) -> bool:
    """Whether the server answers two requests sent in one segment (both within 1 s)."""
    frames = b"".join(
        mbap.encode_read(tid, UNIT, mbap.READ_HOLDING_REGISTERS, 0, 1) for tid in (1, 2)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(frames)
        await writer.drain()
        got = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while got.count(b"\x00\x00\x00\x05") < 2:  # pid 0, length 5: one reply each
                    data = await reader.read(1024)
                    if not data:
                        break
                    got += data
        return got.count(b"\x00\x00\x00\x05") >= 2
    finally:
        writer.close()


# ------------------------------------------------------------------------------ the clients


async def timed(
    one: Callable[[], Awaitable[None]], count: int, callers: int
) -> tuple[float, float]:
    """``count`` calls of ``one`` from ``callers`` concurrent tasks: wall and CPU seconds.

    The server runs in another process, so this process' CPU time is the client's cost.
    """

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    wall, cpu = time.perf_counter(), time.process_time()
    if callers == 1:
        await worker(count)
    else:
        await asyncio.gather(*(worker(count // callers) for _ in range(callers)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def pymodbus_client(port: int, callers: int) -> tuple[Measure, Callable[[], None]]:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=10, retries=0)
    if not await client.connect():
        raise RuntimeError("pymodbus client could not connect")

    async def one() -> None:
        rr = await client.read_holding_registers(ADDRESS, count=COUNT, device_id=UNIT)
        assert not rr.isError()
        assert len(rr.registers) == COUNT

    async def measure(count: int) -> tuple[float, float]:
        return await timed(one, count, callers)

    return measure, client.close


async def keeplink_client(
    port: int, callers: int, window: int
) -> tuple[Measure, Link[ModbusFrame]]:
    name = f"bench-c{callers}-w{window}"
    # Its own slot pool: the bench's links are separate clients of a server that takes many,
    # not rivals for one gateway slot (modbus_link would share gateway_slots(host, port)).
    link = modbus_link(
        "127.0.0.1", port, name=name, max_in_flight=window, slots=SlotPool(size=1, name=name)
    )
    link.start()
    await asyncio.wait_for(link.wait_connected(), 30)
    args = {"unit": UNIT, "address": ADDRESS, "count": COUNT}

    async def one() -> None:
        outcome = await link.request("read_holding_registers", args, timeout=10)
        assert isinstance(outcome, Acknowledged)
        assert len(outcome.result["registers"]) == COUNT

    async def measure(count: int) -> tuple[float, float]:
        return await timed(one, count, callers)

    return measure, link


# ------------------------------------------------------------------------------ the run


async def measure(
    *, count: int, rounds: int, peer: str = "pymodbus"
) -> tuple[dict[str, float], dict[str, float], bool]:
    """Requests/s and client CPU µs/request per mode, and whether the server pipelines."""
    proc, port = await start_server(peer)
    links: list[Link[ModbusFrame]] = []
    closers: list[Callable[[], None]] = []
    try:
        pipelining = await server_pipelines(port)
        modes: dict[str, Measure] = {}
        # pymodbus' server takes any number of clients; each mode keeps its own connection.
        for label, callers in (("window 1", 1), (f"{CALLERS} callers", CALLERS)):
            measure, close = await pymodbus_client(port, callers)
            closers.append(close)
            modes[f"pymodbus, {label}"] = measure
            measure, link = await keeplink_client(port, callers, 1)
            links.append(link)
            modes[f"keeplink, {label}"] = measure
        if pipelining:
            measure, link = await keeplink_client(port, CALLERS, CALLERS)
            links.append(link)
            modes[f"keeplink, window {CALLERS}"] = measure
        times: dict[str, list[float]] = {name: [] for name in modes}
        cpus: dict[str, list[float]] = {name: [] for name in modes}
        for measure in modes.values():  # warm-up
            await measure(min(count, 400))
        for _ in range(rounds):
            for name, measure in modes.items():
                wall, cpu = await measure(count)
                times[name].append(wall)
                cpus[name].append(cpu)
    finally:
        for link in links:
            await link.stop()
        for close in closers:
            close()
        proc.terminate()
        await proc.wait()

    rate = {name: count / statistics.median(t) for name, t in times.items()}
    cpu_us = {name: 1e6 * statistics.median(c) / count for name, c in cpus.items()}
    return rate, cpu_us, pipelining


async def main(count: int, rounds: int, peer: str) -> None:
    rate, cpu_us, pipelining = await measure(count=count, rounds=rounds, peer=peer)
    server = "pymodbus ModbusTcpServer" if peer == "pymodbus" else "raw asyncio responder"
    print(
        f"Modbus TCP read_holding_registers x{COUNT}, {count} requests a round, "
        f"median of {rounds} interleaved rounds; server: {server}, own process"
    )
    print("ratio: keeplink req/s / pymodbus req/s, same mode")
    print(f"{'mode':<24} {'req/s':>8} {'ratio':>6} {'client CPU us/req':>18}")
    for label in ("window 1", f"{CALLERS} callers"):
        theirs, ours = f"pymodbus, {label}", f"keeplink, {label}"
        ratio = rate[ours] / rate[theirs]
        note = ""
        if label == "window 1":
            verdict = "met" if ratio >= GOAL_WINDOW_1 else "NOT met"
            note = f"  goal >= {GOAL_WINDOW_1} ({verdict})"
        print(f"{theirs:<24} {rate[theirs]:>8.0f} {1.0:>6.2f} {cpu_us[theirs]:>18.1f}")
        print(f"{ours:<24} {rate[ours]:>8.0f} {ratio:>6.2f} {cpu_us[ours]:>18.1f}{note}")
    print(
        f"note: with {CALLERS} callers both clients keep 1 request in flight: pymodbus' client"
        " serialises behind its transaction lock, keeplink's window is max_in_flight=1."
    )
    if pipelining:
        name = f"keeplink, window {CALLERS}"
        print(f"{name:<24} {rate[name]:>8.0f} {'':>6} {cpu_us[name]:>18.1f}  (pipelined)")
    else:
        print(
            f"window {CALLERS} (pipelined): not measured: the server does not answer pipelined"
            " requests (pymodbus' server decodes one request per read); try --peer raw."
        )
    print(
        f"pymodbus' client cannot pipeline (one transaction at a time): no pymodbus window"
        f" {CALLERS}."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peer", choices=["pymodbus", "raw"], default="pymodbus")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.port, args.peer))
    else:
        asyncio.run(main(args.count, args.rounds, args.peer))
