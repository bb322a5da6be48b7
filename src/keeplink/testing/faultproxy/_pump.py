"""One proxied connection: connect upstream, pump both directions through the faults, and
close it (FIN, RST or abort) exactly as the faults say."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import socket
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from keeplink.testing.faultproxy._faults import DIRECTIONS, Changes, Direction, Faults, KillMode

CHUNK: Final = 65536
"""Bytes read per chunk; faults are applied per chunk, so they switch mid-stream."""
_QUEUE_CHUNKS: Final = 8
"""Chunks buffered per direction between reading and forwarding (bounds memory)."""
_BANDWIDTH_QUANTUM: Final = 0.02
"""Seconds of traffic sent in one piece when a bandwidth limit is set."""
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
"""``SO_LINGER`` on with a 0 s timeout: ``close()`` then sends RST and drops unsent data."""

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]
"""Starts a named task the proxy owns (and cancels and awaits in ``stop()``)."""


@dataclass(slots=True)
class Traffic:
    """The proxy's counters that its connections add to."""

    bytes: dict[Direction, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    resets_sent: int = 0


@dataclass(frozen=True, slots=True)
class _Chunk:
    read_at: float
    jitter_sample: float  # uniform in [-1, 1], scaled by the jitter when forwarded
    data: bytes


class Connection:
    """A client connection and its upstream, pumped by four tasks (read and send, each way).

    ``on_closed`` is called once when everything of it is closed and its tasks are done.
    """

    def __init__(
        self,
        ident: int,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        *,
        faults: Faults,
        changes: Changes,
        traffic: Traffic,
        spawn: Spawn,
        on_closed: Callable[[Connection], None],
    ) -> None:
        self.ident = ident
        self._client_reader = client_reader
        self._client_writer = client_writer
        self._upstream_writer: asyncio.StreamWriter | None = None
        self.closing: KillMode | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._forwarded: dict[Direction, int] = {"up": 0, "down": 0}
        self._next_send: dict[Direction, float] = {"up": 0.0, "down": 0.0}
        self._last_piece: dict[Direction, float] = {"up": -math.inf, "down": -math.inf}
        self._faults = faults
        self._changes = changes
        self._traffic = traffic
        self._spawn = spawn
        self._on_closed = on_closed

    def _writers(self) -> list[asyncio.StreamWriter]:
        writers = [self._client_writer]
        if self._upstream_writer is not None:
            writers.append(self._upstream_writer)
        return writers

    async def run(self, upstream: tuple[str, int]) -> None:
        """Connect to ``upstream`` and pump until both directions are done or one fails;
        an upstream that refuses gets the client reset."""
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    *upstream, limit=CHUNK
                )
            except OSError:
                self.kill("rst")
                return
            self._upstream_writer = upstream_writer
            if self.closing is not None:  # killed while connecting
                if self.closing == "abort":
                    upstream_writer.transport.abort()
                else:
                    upstream_writer.close()
                return
            up: asyncio.Queue[_Chunk | None] = asyncio.Queue(_QUEUE_CHUNKS)
            down: asyncio.Queue[_Chunk | None] = asyncio.Queue(_QUEUE_CHUNKS)
            ident, client = self.ident, self._client_writer
            self._pumps = [
                self._spawn(self._read_loop(self._client_reader, up), f"up#{ident}"),
                self._spawn(self._send_loop("up", upstream_writer, up), f"up#{ident}.send"),
                self._spawn(self._read_loop(upstream_reader, down), f"down#{ident}"),
                self._spawn(self._send_loop("down", client, down), f"down#{ident}.send"),
            ]
            self.enforce_limits()
            await asyncio.wait(self._pumps)
        except asyncio.CancelledError:
            self.kill("abort")
            raise
        finally:
            try:
                self.kill("close")  # no-op if already closing
                if self._pumps:
                    await asyncio.gather(*self._pumps, return_exceptions=True)
                for writer in self._writers():
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            finally:
                self._on_closed(self)

    def kill(self, how: KillMode) -> None:
        """Close the connection now: ``close`` (FIN both sides), ``rst`` (RST to the client,
        FIN to the upstream) or ``abort`` (drop everything). Only ``abort`` overrides an
        earlier kill."""
        if self.closing is not None and how != "abort":
            return
        self.closing = how
        for writer in self._writers():
            if how == "abort":
                writer.transport.abort()
            elif how == "rst" and writer is self._client_writer:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                writer.transport.abort()
                self._traffic.resets_sent += 1
            else:
                writer.close()
        for task in self._pumps:
            task.cancel()

    def enforce_limits(self) -> None:
        """Kill the connection if a byte limit is already reached in either direction."""
        if self.closing is not None or self._upstream_writer is None:
            return
        for direction in DIRECTIONS:
            room, action = self._faults.limit(self._forwarded[direction], direction)
            if room == 0:
                self.kill(action)
                return

    async def _read_loop(
        self, source: asyncio.StreamReader, queue: asyncio.Queue[_Chunk | None]
    ) -> None:
        loop = asyncio.get_running_loop()
        faults = self._faults
        try:
            while True:
                while faults.bandwidth == 0:  # stall: stop reading so the sender backs up
                    await self._changes.wait(None)
                data = await source.read(CHUNK)
                if not data:
                    break
                if faults.black_hole:
                    continue
                sample = faults.rng.uniform(-1.0, 1.0) if faults.jitter else 0.0
                await queue.put(_Chunk(loop.time(), sample, data))
            while faults.black_hole:  # a black hole never passes a close on
                await self._changes.wait(None)
            await queue.put(None)
        except OSError:
            self.kill("close")

    async def _send_loop(
        self, direction: Direction, sink: asyncio.StreamWriter, queue: asyncio.Queue[_Chunk | None]
    ) -> None:
        loop = asyncio.get_running_loop()
        faults = self._faults
        try:
            while True:
                chunk = await queue.get()
                if chunk is None:
                    break
                due = functools.partial(faults.due, chunk.read_at, chunk.jitter_sample)
                await self._changes.sleep_until(due)
                if faults.black_hole:
                    continue
                if not await self._deliver(direction, sink, chunk.data):
                    return
            while faults.black_hole:
                await self._changes.wait(None)
            eof_at = loop.time()
            await self._changes.sleep_until(lambda: eof_at + faults.slow_close)
            if sink.can_write_eof():
                sink.write_eof()
        except OSError:
            self.kill("close")

    async def _deliver(self, direction: Direction, sink: asyncio.StreamWriter, data: bytes) -> bool:
        """Forward ``data`` applying the per-piece faults; False once the connection is done."""
        loop = asyncio.get_running_loop()
        faults = self._faults
        pos = 0
        while pos < len(data):
            if self.closing is not None:
                return False
            if faults.black_hole:
                return True  # the rest of the chunk falls in
            bandwidth = faults.bandwidth
            if bandwidth == 0:
                await self._changes.wait(None)
                continue
            now = loop.time()
            gate = now
            if faults.slice is not None:
                gate = max(gate, self._last_piece[direction] + faults.slice_delay)
            if bandwidth is not None:
                gate = max(gate, self._next_send[direction])
            if gate > now:
                await self._changes.wait(gate - now)
                continue  # re-check every fault after waiting
            size = len(data) - pos
            if faults.slice is not None:
                size = min(size, faults.slice)
            if bandwidth is not None:
                size = min(size, max(1, int(bandwidth * _BANDWIDTH_QUANTUM)))
            room, action = faults.limit(self._forwarded[direction], direction)
            if room is not None:
                if room == 0:
                    self.kill(action)
                    return False
                size = min(size, room)
            sink.write(data[pos : pos + size])
            pos += size
            self._forwarded[direction] += size
            self._traffic.bytes[direction] += size
            self._last_piece[direction] = loop.time()
            if bandwidth is not None:
                self._next_send[direction] = now + size / bandwidth
            if room is not None and size == room:
                if action == "rst" and sink is self._client_writer:
                    # An RST drops unsent data: flush the last bytes to the kernel first.
                    sink.transport.set_write_buffer_limits(high=0)
                    await sink.drain()
                self.kill(action)
                return False
            await sink.drain()
        return True
