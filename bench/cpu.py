"""CPU time per request through a Link, in process, no sockets: ``python -m bench.cpu``.

    python -m bench.cpu [--count 5000] [--rounds 5] [--calls]

A quiet measure for a shared machine, where wall-clock ratios swing twofold: each mode runs
``count`` requests ``rounds`` times and reports the least ``time.process_time()`` per
request (the run the machine disturbed least). The link's channel is keeplink's own
StreamChannel with the driver's real codec, over an in-memory transport whose peer answers
each write in the next event-loop iteration (as a socket's reply arrives in a later one),
with a few bytes of slicing: what is timed is the link, the driver, the codec and the event
loop, not a kernel or a peer. Modes:

- ``raw, window 1``: the floor, bytes written and the ack line awaited with a bare future;
- ``jsonline, window 1`` and ``jsonline, 8 callers`` (window 1, the rest queued);
- ``modbus, window 1`` and ``modbus, 8 callers``: read 10 holding registers.

``--calls`` also counts the Python function calls per request (cProfile, one run of
``count``): a figure no other load on the machine changes.

Bounded: at most ``--count`` 20,000 and ``--rounds`` 9.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from keeplink import Acknowledged, Link
from keeplink._channel import StreamChannel
from keeplink._core.jsonline import Frame
from keeplink._slots import SlotPool
from keeplink.drivers import JsonLineDriver
from keeplink.drivers.jsonline import JsonLineCodec
from keeplink.drivers.modbus import ModbusCodec, ModbusDriver, ModbusFrame

MAX_COUNT = 20_000
MAX_ROUNDS = 9
CALLERS = 8

Peer = Callable[[bytes], bytes]


class MemoryTransport(asyncio.Transport):
    """A transport whose far end is ``peer``: each write's answer arrives on a later tick."""

    def __init__(self, protocol: asyncio.Protocol, peer: Peer) -> None:
        super().__init__()
        self._protocol = protocol
        self._peer = peer
        self._closing = False
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        reply = self._peer(bytes(data))
        if reply:
            self._loop.call_soon(self._protocol.data_received, reply)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self._closing:
            self._closing = True
            self._loop.call_soon(self._protocol.connection_lost, None)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return "memory" if name == "peername" else default


def jsonline_peer(data: bytes) -> bytes:
    """Welcome a hello; acknowledge every request line with an empty result."""
    out = []
    for line in data.splitlines():
        if line.startswith(b'{"t":"req"'):
            seq = line[17 : line.index(b",", 17)]
            out.append(b'{"t":"ack","seq":%s,"ok":true,"result":{}}\n' % seq)
        elif line.startswith(b'{"t":"hello"'):
            out.append(b'{"t":"welcome","v":1,"device":"bench"}\n')
    return b"".join(out)


def modbus_peer(data: bytes) -> bytes:
    """Answer every read-holding-registers request with registers of 1234."""
    out = []
    while len(data) >= 12:
        tid, _, length, unit, fc, _, count = struct.unpack_from(">HHHBBHH", data)
        data = data[6 + length :]
        body = bytes([fc, 2 * count]) + b"\x04\xd2" * count
        out.append(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
    return b"".join(out)


def connect(channel: asyncio.Protocol, peer: Peer) -> None:
    channel.connection_made(MemoryTransport(channel, peer))


class MemoryJsonLine(JsonLineDriver):
    async def open(self) -> StreamChannel[Frame]:
        channel: StreamChannel[Frame] = StreamChannel(JsonLineCodec(), peer="memory")
        connect(channel, jsonline_peer)
        return channel


class MemoryModbus(ModbusDriver):
    async def open(self) -> StreamChannel[ModbusFrame]:
        channel: StreamChannel[ModbusFrame] = StreamChannel(ModbusCodec(), peer="memory")
        connect(channel, modbus_peer)
        return channel


Run = Callable[[int], Awaitable[None]]


async def run_link(link: Link[Any], op: str, args: dict[str, Any], callers: int) -> Run:
    link.start()
    await asyncio.wait_for(link.wait_connected(), 10)

    async def worker(n: int) -> None:
        for _ in range(n):
            outcome = await link.request(op, args, timeout=30)
            assert isinstance(outcome, Acknowledged), outcome

    async def run(count: int) -> None:
        if callers == 1:
            await worker(count)
        else:
            await asyncio.gather(*(worker(count // callers) for _ in range(callers)))

    return run


async def raw_run() -> Run:
    """Bytes out, the ack line back through a bare Protocol and future: the floor."""
    loop = asyncio.get_running_loop()

    class Raw(asyncio.Protocol):
        waiter: asyncio.Future[bytes] | None = None

        def data_received(self, data: bytes) -> None:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(data)

    protocol = Raw()
    transport = MemoryTransport(protocol, jsonline_peer)

    async def run(count: int) -> None:
        for seq in range(count):
            protocol.waiter = loop.create_future()
            transport.write(b'{"t":"req","seq":%d,"op":"echo","args":{"n":%d}}\n' % (seq, seq))
            await protocol.waiter

    return run


async def measure(
    count: int, rounds: int, *, calls: bool = False
) -> tuple[dict[str, float], dict[str, float]]:
    """Least CPU µs per request of ``rounds`` runs, per mode; with ``calls``, the Python
    function calls per request too."""
    links: list[Link[Any]] = []
    modes: dict[str, Run] = {"raw, window 1": await raw_run()}
    echo = ("echo", {"n": 1})
    read = ("read_holding_registers", {"unit": 1, "address": 0, "count": 10})
    for label, callers in (("window 1", 1), (f"{CALLERS} callers", CALLERS)):
        jl: Link[Any] = Link(
            MemoryJsonLine(host="memory", port=1, max_in_flight=1),
            name=f"cpu-jsonline-{callers}",
            heartbeat_s=None,
        )
        mb: Link[Any] = Link(
            MemoryModbus(host="memory", port=1, max_in_flight=1),
            name=f"cpu-modbus-{callers}",
            heartbeat_s=None,
            slots=SlotPool(size=1, name=f"cpu-modbus-{callers}"),
        )
        links += [jl, mb]
        modes[f"jsonline, {label}"] = await run_link(jl, *echo, callers)
        modes[f"modbus, {label}"] = await run_link(mb, *read, callers)
    best: dict[str, float] = {}
    try:
        for run in modes.values():
            await run(min(count, 500))  # warm-up
        for _ in range(rounds):
            for name, run in modes.items():
                begin = time.process_time()
                await run(count)
                cpu = 1e6 * (time.process_time() - begin) / count
                best[name] = min(best.get(name, cpu), cpu)
        per_call: dict[str, float] = {}
        for name, run in modes.items() if calls else ():
            profile = cProfile.Profile()
            profile.enable()
            await run(count)
            profile.disable()
            functions = pstats.Stats(profile).get_stats_profile().func_profiles.values()
            total = sum(int(f.ncalls.split("/")[0]) for f in functions)  # "total/primitive"
            per_call[name] = total / count
    finally:
        for link in links:
            await link.stop()
    return best, per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", action="store_true", help="count Python calls too")
    args = parser.parse_args()
    count = max(CALLERS, min(args.count, MAX_COUNT))
    rounds = max(1, min(args.rounds, MAX_ROUNDS))
    best, calls = asyncio.run(measure(count, rounds, calls=args.calls))
    print(f"CPU µs per request, in process, no sockets; least of {rounds} runs of {count}")
    raw = best["raw, window 1"]
    for name, us in best.items():
        counted = f"  {calls[name]:>6.1f} calls" if name in calls else ""
        print(f"{name:<22} {us:>8.1f}  {us / raw:>5.2f}x raw{counted}")


if __name__ == "__main__":
    main()
