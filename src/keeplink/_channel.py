"""A framed channel over an asyncio transport (TCP or TLS), with a sans-IO codec.

:class:`StreamChannel` is both the asyncio ``Protocol`` and the keeplink ``Channel``: bytes
are decoded in ``data_received``. Before :meth:`StreamChannel.deliver_to` is called (during
a handshake) frames queue for :meth:`~StreamChannel.receive`; after it, each frame goes
straight to the link's sink as it arrives, with no task switch in between, and
``receive()`` only waits for the channel to end. Ending is still the one disconnect path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from keeplink._core.classify import broken_from
from keeplink._core.errors import LinkBrokenError
from keeplink._core.jsonline import Malformed

__all__ = ["Codec", "PushChannel", "StreamChannel", "open_stream_channel", "tune_socket"]

F = TypeVar("F")

# TCP keepalive catches a half-open socket to a peer that never answers heartbeats: with
# these numbers the kernel gives up on a silent peer after about 30 + 3 × 10 = 60 s.
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
# A write nobody acknowledges fails after this long instead of the kernel's ~15 minutes.
USER_TIMEOUT_MS = 60_000
# Frames queued for receive() before we stop reading the socket: a peer flooding a
# handshake cannot grow our memory without bound.
MAX_QUEUED = 1024
# Corked output is flushed at once past this size, so the transport's flow control (and
# with it send timeouts) sees a writer that outruns its peer.
CORK_LIMIT = 64 * 1024

# Errors a closing or closed socket raises that mean "already gone", nothing more.
CLOSING_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
    OSError,
    ssl.SSLError,
)


class Codec(Protocol[F]):
    """Sans-IO framing: bytes in, frames out; frame in, bytes out."""

    def feed(self, data: bytes) -> list[F | Malformed]: ...

    def encode(self, frame: F) -> bytes: ...


@runtime_checkable
class PushChannel(Protocol):
    """A channel that can hand each incoming item to a sink as it arrives.

    After ``deliver_to(sink)`` every item (frame or Malformed) goes to ``sink`` in wire
    order, synchronously; ``receive()`` then returns nothing more and raises when the
    channel ends. The sink must not raise.
    """

    def deliver_to(self, sink: Callable[[Any], None]) -> None: ...

    def send_nowait(self, frame: Any) -> bool:
        """Queue ``frame`` for writing without waiting. False (nothing queued) if the
        transport is flow-controlled: the caller then awaits ``send``. Raises like send."""
        ...


def tune_socket(sock: socket.socket | None) -> None:
    """Turn on TCP keepalive, no-delay and a user timeout, where the platform has them."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


class StreamChannel(asyncio.Protocol, Generic[F]):
    """A :class:`~keeplink.Channel` over an asyncio transport, decoding as bytes arrive.

    ``close()`` aborts the transport at once (no waiting for buffered data to drain to a
    peer that may never read it); a pending ``receive()`` then raises ``LinkBrokenError``.
    """

    def __init__(self, codec: Codec[F], *, peer: str = "") -> None:
        self._codec = codec
        self.peer = peer
        self._transport: asyncio.Transport | None = None
        self._queue: collections.deque[F | Malformed] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[F | Malformed], None] | None = None
        self._ended: LinkBrokenError | None = None
        self._closed = False
        self._write_paused = False
        self._read_paused = False
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._lost: asyncio.Future[None] | None = None
        self._on_end: list[Callable[[LinkBrokenError], None]] = []
        # The first frame written in an event-loop iteration leaves at once; the rest of
        # that iteration's frames leave together at its end: pipelined requests cost about
        # one send() a batch, not one each. The flush at the iteration's end is scheduled
        # by the second frame, not the first: a lone request and its reply cost no
        # callback. A read ends the batch too (what is written after a reply answers it).
        self._out: list[bytes] = []
        self._out_size = 0
        self._in_tick = False
        self._flush_due = False
        self.bytes_in = 0
        self.bytes_out = 0

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._lost = asyncio.get_running_loop().create_future()
        if not self.peer:
            self.peer = str(transport.get_extra_info("peername"))

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if not self._flush_due:
            self._in_tick = False
        items = self._codec.feed(data)
        sink = self._sink
        if sink is not None:
            for item in items:
                sink(item)
            return
        self._queue.extend(items)
        self._wake()
        if len(self._queue) > MAX_QUEUED and self._transport is not None:
            self._transport.pause_reading()
            self._read_paused = True

    def eof_received(self) -> bool:
        self._end(LinkBrokenError(f"{self.peer} closed the connection"))
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._end(LinkBrokenError(f"{self.peer} closed the connection"))
        else:
            err = broken_from(exc, f"connection to {self.peer}")
            err.__cause__ = exc
            self._end(err)  # type: ignore[arg-type]
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _end(self, reason: LinkBrokenError) -> None:
        first = self._ended is None
        if self._ended is None:
            self._ended = reason
        ended = self._ended
        self._wake()
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ended)
                waiter.exception()  # retrieved here: the sender sees it, or nobody waits
        if first:
            callbacks, self._on_end = self._on_end, []
            for callback in callbacks:
                callback(ended)

    def when_ended(self, callback: Callable[[LinkBrokenError], None]) -> None:
        """Call ``callback(reason)`` once, when the connection ends (the peer closed it, it
        broke, or it is gone after :meth:`close`); at once if it has. It must not raise."""
        if self._ended is not None:
            callback(self._ended)
        else:
            self._on_end.append(callback)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---------------------------------------------------------------- Channel

    @property
    def closed(self) -> bool:
        transport = self._transport
        return (
            self._closed or self._ended is not None or transport is None or (transport.is_closing())
        )

    async def receive(self) -> F | Malformed:
        while not self._queue:
            if self._ended is not None:
                raise self._ended
            if self._closed:
                raise LinkBrokenError(f"channel to {self.peer} is closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._queue.popleft()
        if self._read_paused and len(self._queue) < MAX_QUEUED // 2 and self._transport:
            self._read_paused = False
            self._transport.resume_reading()
        return item

    def deliver_to(self, sink: Callable[[F | Malformed], None]) -> None:
        """From now on, hand every item to ``sink`` as it arrives (queued ones first)."""
        self._sink = sink
        while self._queue:
            sink(self._queue.popleft())
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()

    def send_nowait(self, frame: F) -> bool:
        if self._write_paused and not self.closed:
            return False
        self._write(self._codec.encode(frame))  # may raise InvalidRequestError: nothing written
        return True

    def write(self, frame: F) -> None:
        """Write ``frame`` now, even while the transport is flow-controlled (it buffers):
        for what a protocol must send from a callback and cannot wait with, such as an
        acknowledgement. Raises like send."""
        self._write(self._codec.encode(frame))  # may raise InvalidRequestError: nothing written

    async def send(self, frame: F) -> None:
        self._write(self._codec.encode(frame))  # may raise InvalidRequestError: nothing written
        if self._write_paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _write(self, data: bytes) -> None:
        if self.closed:
            raise self._ended or LinkBrokenError(f"channel to {self.peer} is closed")
        assert self._transport is not None
        self.bytes_out += len(data)
        if not self._in_tick:
            # First write of this batch: straight out, no added latency. Any more writes
            # before the batch ends are corked and leave together at the iteration's end.
            self._in_tick = True
            self._transport.write(data)
            return
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._end_tick)
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= CORK_LIMIT:
            self._flush()  # may call pause_writing() before we return

    def _end_tick(self) -> None:
        self._in_tick = False
        self._flush_due = False
        self._flush()

    def _flush(self) -> None:
        if not self.closed:
            self._flush_now()
        else:
            self._out, self._out_size = [], 0

    def _flush_now(self) -> None:
        out, self._out, self._out_size = self._out, [], 0
        if out and self._transport is not None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self, *, last: bytes = b"") -> None:
        """Close now. ``last``: bytes to send first (a protocol's goodbye); they go, and
        the connection ends with a FIN, only when they leave at once, with nothing else
        still buffered. Otherwise the transport is aborted like without them: closing
        never waits for a peer that may not read."""
        if self._closed:
            return
        self._closed = True
        transport = self._transport
        if transport is None:
            return
        if last and self._ended is None and not transport.is_closing():
            self._flush_now()
            transport.write(last)
            if transport.get_write_buffer_size() == 0:
                transport.close()
                return
        transport.abort()

    async def wait_closed(self) -> None:
        if self._lost is not None:
            await asyncio.shield(self._lost)


async def open_stream_channel(
    host: str,
    port: int,
    codec: Codec[F],
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> StreamChannel[F]:
    """Connect and return a channel. Raises LinkBrokenError (or AuthError for a certificate
    that does not verify) with the OS error as ``__cause__``."""
    loop = asyncio.get_running_loop()
    channel: StreamChannel[F] = StreamChannel(codec, peer=f"{host}:{port}")
    try:
        transport, _ = await loop.create_connection(
            lambda: channel,
            host,
            port,
            ssl=ssl_context,
            server_hostname=server_hostname if ssl_context is not None else None,
        )
    except CLOSING_ERRORS as exc:
        raise broken_from(exc, f"cannot connect to {host}:{port}") from exc
    tune_socket(transport.get_extra_info("socket"))
    return channel
