"""A framed channel over asyncio streams (TCP or TLS), with a sans-IO codec."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from typing import Generic, Protocol, TypeVar

from keeplink._core.classify import broken_from
from keeplink._core.errors import LinkBrokenError
from keeplink._core.jsonline import Malformed

__all__ = ["Codec", "StreamChannel", "tune_socket"]

F = TypeVar("F")

READ_CHUNK = 64 * 1024

# TCP keepalive catches a half-open socket to a peer that never answers heartbeats: with
# these numbers the kernel gives up on a silent peer after about 30 + 3 × 10 = 60 s.
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
# A write nobody acknowledges fails after this long instead of the kernel's ~15 minutes.
USER_TIMEOUT_MS = 60_000

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


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """Turn on TCP keepalive and a user timeout, where the platform has them."""
    sock = writer.get_extra_info("socket")
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


class StreamChannel(Generic[F]):
    """A :class:`~keeplink.Channel` over an asyncio stream pair.

    ``close()`` aborts the transport at once (no waiting for buffered data to drain to a
    peer that may never read it); a pending ``receive()`` then raises ``LinkBrokenError``.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        codec: Codec[F],
        *,
        peer: str = "",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._codec = codec
        self._pending: collections.deque[F | Malformed] = collections.deque()
        self._closed = False
        self.peer = peer or str(writer.get_extra_info("peername"))
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def closed(self) -> bool:
        return self._closed or self._writer.transport.is_closing()

    async def receive(self) -> F | Malformed:
        while not self._pending:
            if self._closed:
                raise LinkBrokenError(f"channel to {self.peer} is closed")
            try:
                data = await self._reader.read(READ_CHUNK)
            except CLOSING_ERRORS as exc:
                raise broken_from(exc, f"reading from {self.peer}") from exc
            if not data:
                raise LinkBrokenError(f"{self.peer} closed the connection")
            self.bytes_in += len(data)
            self._pending.extend(self._codec.feed(data))
        return self._pending.popleft()

    async def send(self, frame: F) -> None:
        data = self._codec.encode(frame)  # may raise InvalidRequestError: nothing written
        if self.closed:
            raise LinkBrokenError(f"channel to {self.peer} is closed")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except CLOSING_ERRORS as exc:
            raise broken_from(exc, f"writing to {self.peer}") from exc
        self.bytes_out += len(data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.transport.abort()

    async def wait_closed(self) -> None:
        # The peer often beats us to closing the socket; what that raises means nothing.
        with contextlib.suppress(*CLOSING_ERRORS):
            await self._writer.wait_closed()
