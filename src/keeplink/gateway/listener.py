"""The API's listening socket, with its own accept loop, so that clients cannot starve the
device links of descriptors or the log of space.

- **A cap on clients.** At most ``max_clients`` HTTP and WebSocket connections at once; one
  more is answered ``503 out_of_connection_slots`` and closed at once, never queued.
- **A header timeout.** A connection must send complete request headers within
  ``header_timeout_s`` of its accept, and, on a keep-alive connection, of the first byte of
  its next request (a slow-loris holds a descriptor while it trickles its headers).
- **Idle keep-alive connections** are closed by aiohttp's ``keepalive_timeout`` (the server
  sets it to ``idle_timeout_s``): it runs while a connection waits for its next request.
- **Accept errors** (out of descriptors, out of memory) are logged at most once per
  ``LOG_INTERVAL_S`` with the count of the others, and accepting pauses briefly instead of
  spinning on a socket the kernel keeps reporting ready.

Every decision that depends on time (the log's rate) is a small synchronous object fed
``now``; the loop here only acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from aiohttp import web

from keeplink._core.errors import ErrorCode, ErrorInfo

__all__ = [
    "ACCEPT_ERRNOS",
    "DEFAULT_MAX_CLIENTS",
    "Listener",
    "RateLimit",
    "accept_error_handler",
    "client_ceiling",
]

_log = logging.getLogger("keeplink.gateway")

ACCEPT_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""accept() failed for want of a resource: retrying at once fails again."""
ACCEPT_RETRY_S: Final = 0.25
"""Descriptors come back as connections close; until then the listening socket stays
readable, so a retry without a pause would spin."""
LOG_INTERVAL_S: Final = 10.0
"""One line per kind of trouble in this long: enough to see it, too few to fill a disk."""
DEFAULT_MAX_CLIENTS: Final = 1024
FD_RESERVE: Final = 64
"""Descriptors kept out of the clients' reach whatever the devices: stdio, the event loop's
selector and wake-up pipe, the listening socket, the store's files or connection pool, logs."""
FD_PER_DEVICE: Final = 2
"""A device's link socket, and one more for a reconnect that opens before the old closes."""
MIN_CLIENTS: Final = 4
"""Under a descriptor limit too low for the devices, the API still answers a few clients."""
BACKLOG: Final = 128


def client_ceiling(soft_limit: int, *, devices: int) -> int:
    """Client connections that fit under a descriptor limit of ``soft_limit`` after the
    reserve for ``devices`` device links and the gateway's own files."""
    return max(MIN_CLIENTS, soft_limit - FD_RESERVE - FD_PER_DEVICE * devices)


class RateLimit:
    """At most one event reported per ``interval_s``; the others are counted.

    ``allow(now)`` returns None (stay quiet: counted) or how many were kept quiet since the
    last report (report this one, and say how many went unreported).
    """

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._next = -math.inf
        self._quiet = 0

    def allow(self, now: float) -> int | None:
        if now < self._next:
            self._quiet += 1
            return None
        quiet, self._quiet = self._quiet, 0
        self._next = now + self.interval_s
        return quiet


def _since(quiet: int, interval_s: float) -> str:
    return f" ({quiet} more in the last {interval_s:g} s)" if quiet else ""


def accept_error_handler(
    limit: RateLimit, fallback: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event-loop exception handler: asyncio's "socket.accept() out of system resource"
    reports become one rate-limited WARNING line without a traceback; everything else goes
    to ``fallback`` (the handler that was there, or the loop's default)."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            isinstance(exc, OSError)
            and exc.errno in ACCEPT_ERRNOS
            and str(context.get("message", "")).startswith("socket.accept()")
        ):
            quiet = limit.allow(loop.time())
            if quiet is not None:
                _log.warning(
                    "gateway: cannot accept a connection: %s%s",
                    exc.strerror or exc,
                    _since(quiet, limit.interval_s),
                )
            return
        fallback(loop, context)

    return handle


def _refusal(max_clients: int) -> bytes:
    body = json.dumps(
        ErrorInfo(
            code=ErrorCode.OUT_OF_CONNECTION_SLOTS.value,
            message=f"the gateway serves at most {max_clients} client connections at once "
            "(gateway.max_clients); try again later",
        ).to_wire()
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_PLAIN_ERROR: Final = re.compile(rb"HTTP/1\.[01] (4[0-9][0-9]) [^\r\n]*\r\n")


def _json_error(status: int, text: str) -> bytes:
    """The API's error shape for a request the HTTP parser refused."""
    detail = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = detail.rstrip(":")
    body = json.dumps(
        ErrorInfo(
            code=ErrorCode.INVALID_REQUEST.value,
            message=f"the request could not be parsed: {detail or 'bad request'}"[:300],
        ).to_wire()
    ).encode()
    reason = "Bad Request" if status == 400 else "Client Error"
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Answers(asyncio.Transport):
    """The transport aiohttp's protocol writes to: the client's, except that the plain-text
    4xx answers aiohttp's HTTP parser makes for a request it refused (a line too long, a
    NUL in a header, garbage) leave as the API's JSON error shape. The app itself answers
    every error in JSON, so a ``text/plain`` 4xx can only be the parser's."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._replaced = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._replaced:
            return  # the rest of the parser's plain-text answer
        raw = bytes(data)
        match = _PLAIN_ERROR.match(raw)
        if match is not None:
            head, _, body = raw.partition(b"\r\n\r\n")
            if b"\r\ncontent-type: text/plain" in head.lower():
                self._replaced = True
                text = body.decode("utf-8", "replace")
                self._transport.write(_json_error(int(match.group(1)), text))
                return
        self._transport.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


class QuietParserLog(logging.Filter):
    """For the logger handed to aiohttp's protocol: what it logs is a client's malformed
    request (it never sees the app's errors, which the API answers itself), so each record
    goes out at DEBUG without its traceback, at most one a second."""

    def __init__(self) -> None:
        super().__init__()
        self._limit = RateLimit(1.0)

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False  # the logger's level was checked at the record's first level
        quiet = self._limit.allow(record.created)
        if quiet is None:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        record.stack_info = None
        if quiet:
            record.msg = f"{record.msg} ({quiet} more in the last second)"
        return True


def parser_logger() -> logging.Logger:
    """The logger for aiohttp's protocol (``keeplink.gateway.http``), quiet as above."""
    logger = logging.getLogger("keeplink.gateway.http")
    if not any(isinstance(f, QuietParserLog) for f in logger.filters):
        logger.addFilter(QuietParserLog())
    return logger


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, the header timer around it."""

    def __init__(self, listener: Listener, inner: asyncio.Protocol) -> None:
        self._listener = listener
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._requests = 0
        """Requests whose handler runs now (headers complete): no header timer meanwhile."""

    # ------------------------------------------------------------------ the header timer

    def _arm(self) -> None:
        if self._timer is None and self._requests == 0 and self._transport is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._listener.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            _log.debug("gateway: closing a client that sent no complete request headers")
            self._listener.header_timeouts += 1
            self._transport.close()

    def request_started(self) -> None:
        self._requests += 1
        self._disarm()

    def request_finished(self) -> None:
        self._requests -= 1

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._listener._connections.add(self)
        self._arm()
        self._inner.connection_made(_Answers(transport))

    def data_received(self, data: bytes) -> None:
        self._arm()  # the first bytes of a next request: its headers are now on the clock
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._transport = None
        self._listener._connections.discard(self)
        self._inner.connection_lost(exc)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


@web.middleware
async def _requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Tells the connection its request's headers are complete, and when its handler ends."""
    transport = request.transport
    connection = transport.get_protocol() if transport is not None else None
    if not isinstance(connection, _Connection):
        return await handler(request)
    connection.request_started()
    try:
        return await handler(request)
    finally:
        connection.request_finished()


class Listener:
    """Accepts clients on ``sock`` (bound and listening) for ``factory``'s protocols.

    ``install(app)`` before the app is frozen; ``start()``; ``await stop_accepting()``, then
    (after aiohttp's runner shut the connections down gracefully) ``await close()``, which
    aborts any still open.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        *,
        max_clients: int,
        header_timeout_s: float,
    ) -> None:
        self.sock = sock
        self.factory = factory
        self.max_clients = max_clients
        self.header_timeout_s = header_timeout_s
        self._connections: set[_Connection] = set()
        self._task: asyncio.Task[None] | None = None
        self._refused = RateLimit()
        self._errors = RateLimit()
        self._refusal = _refusal(max_clients)
        self.refused = 0
        """Connections answered 503 because ``max_clients`` were open."""
        self.header_timeouts = 0
        """Connections closed because their request headers did not arrive in time."""

    @staticmethod
    def install(app: web.Application) -> None:
        """Let the listener see when a request's headers are complete (outermost middleware)."""
        app.middlewares.insert(0, _requests)

    @property
    def clients(self) -> int:
        return len(self._connections)

    def start(self) -> None:
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._accept(), name="keeplink.gateway.accept")

    async def stop_accepting(self) -> None:
        """Stop accepting and close the listening socket; open connections stay."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.sock.close()

    async def close(self) -> None:
        """Stop accepting; abort the connections still open."""
        await self.stop_accepting()
        for connection in list(self._connections):
            connection.abort()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # the client left before we took it: nothing to do
            except OSError as exc:
                quiet = self._errors.allow(loop.time())
                if quiet is not None:
                    _log.warning(
                        "gateway: cannot accept a connection: %s%s",
                        exc.strerror or exc,
                        _since(quiet, self._errors.interval_s),
                    )
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            if len(self._connections) >= self.max_clients:
                self._refuse(conn, loop.time())
                continue
            try:
                await loop.connect_accepted_socket(self.factory_with_timer, conn)
            except OSError as exc:  # the client is already gone
                _log.debug("gateway: a client left while being accepted: %s", exc)
                conn.close()

    def factory_with_timer(self) -> asyncio.Protocol:
        return _Connection(self, self.factory())

    def _refuse(self, conn: socket.socket, now: float) -> None:
        self.refused += 1
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(self._refusal)  # a fresh socket's buffer takes it whole, or it is lost
        conn.close()
        quiet = self._refused.allow(now)
        if quiet is not None:
            _log.warning(
                "gateway: refused a client: gateway.max_clients (%d) connections are open%s",
                self.max_clients,
                _since(quiet, self._refused.interval_s),
            )
