"""A TCP fault-injection proxy for tests (in the spirit of Toxiproxy), on loopback only.

:class:`FaultProxy` listens on a loopback port and forwards every connection to an
upstream TCP server (a device simulator, a fake hub...), byte for byte in both directions.
Faults can be switched at any time, from synchronous code, while connections are open:

``set_down``
    The listening socket is closed, so new connects fail with ``ConnectionRefusedError``;
    open connections are closed too unless ``drop_existing=False``. Bringing the proxy
    back up binds the *same* port again.
``set_black_hole``
    Connections are accepted and everything is read and thrown away in both directions;
    nothing is forwarded and nothing is closed: the client just never hears back.
``reset_all`` / ``set_reset_after``
    The client connection is reset (RST, the client sees ``ConnectionResetError``) now, or
    once a given number of bytes went through in one direction.
``set_cut_after``
    Like ``set_reset_after`` but an orderly close (FIN): the client sees EOF.
``set_latency``
    Every chunk is delayed by a fixed time plus or minus a uniform jitter; order is kept.
``set_slow_close``
    When one side closes, the close reaches the other side only after a delay.
``set_slicer``
    Writes are split into small pieces, optionally spaced in time (exercises decoders that
    assume one ``read`` returns one message).
``set_bandwidth``
    Forwarding is rate-limited; a rate of 0 stops reading altogether so the sender's
    socket buffers fill and its ``drain()`` blocks (provokes send timeouts).

Half-closes are forwarded: EOF from one side becomes a ``write_eof`` towards the other, and
a connection is closed when both directions are done or either side fails. When the
upstream refuses the connection, the client connection is reset.

The proxy is not thread-safe: call every method from the event loop it runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import math
import os
import random
import socket
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self

__all__ = ["FaultProxy", "ProxyStatistics"]

_log = logging.getLogger("keeplink.faultproxy")

_CHUNK: Final = 65536
"""Bytes read per chunk; faults are applied per chunk, so they switch mid-stream."""
_QUEUE_CHUNKS: Final = 8
"""Chunks buffered per direction between reading and forwarding (bounds memory)."""
_BANDWIDTH_QUANTUM: Final = 0.02
"""Seconds of traffic sent in one piece when a bandwidth limit is set."""

_Direction = Literal["up", "down"]
_KillMode = Literal["close", "rst", "abort"]
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
"""``SO_LINGER`` on with a 0 s timeout: ``close()`` then sends RST and drops unsent data."""
_DIRECTIONS: Final[tuple[_Direction, ...]] = ("up", "down")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyStatistics:
    """A snapshot of a :class:`FaultProxy`'s counters (see :meth:`FaultProxy.statistics`)."""

    connections_total: int
    """Client connections accepted since the proxy was created."""
    connections_active: int
    """Client connections currently open (including those still connecting upstream)."""
    bytes_up: int
    """Bytes forwarded from clients to the upstream."""
    bytes_down: int
    """Bytes forwarded from the upstream to clients."""
    resets_sent: int
    """Client connections the proxy reset (RST): ``reset_all``, ``set_reset_after`` and
    upstream connection failures."""


@dataclass(frozen=True, slots=True)
class _Chunk:
    read_at: float
    jitter_sample: float  # uniform in [-1, 1], scaled by the jitter when forwarded
    data: bytes


@dataclass(eq=False, slots=True)
class _Conn:
    ident: int
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    upstream_reader: asyncio.StreamReader | None = None
    upstream_writer: asyncio.StreamWriter | None = None
    closing: _KillMode | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    forwarded: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    next_send: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})
    last_piece: dict[str, float] = field(
        default_factory=lambda: {"up": -math.inf, "down": -math.inf}
    )

    def writers(self) -> list[asyncio.StreamWriter]:
        writers = [self.client_writer]
        if self.upstream_writer is not None:
            writers.append(self.upstream_writer)
        return writers


def _check_loopback(host: str, what: str) -> str:
    """Return the address to use for ``host``; ``ValueError`` unless it is loopback."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"{what} must be a loopback address (127.0.0.0/8, ::1 or 'localhost'), got {host!r}"
        )
    return host


def _check_port(port: int, what: str, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise ValueError(f"{what} must be an integer in {low}..65535, got {port!r}")


def _check_seconds(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_nbytes(nbytes: int | None, what: str, *, minimum: int = 0) -> None:
    if nbytes is None:
        return
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < minimum:
        raise ValueError(f"{what} must be None or an integer >= {minimum}, got {nbytes!r}")


def _check_direction(direction: str) -> _Direction:
    if direction == "up":
        return "up"
    if direction == "down":
        return "down"
    raise ValueError(
        f"direction must be 'up' (client->upstream) or 'down' (upstream->client), got {direction!r}"
    )


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FaultProxy:
    """A loopback TCP proxy in front of ``upstream_host:upstream_port`` that injects faults.

    Use it as an async context manager (or call :meth:`start` and :meth:`stop`)::

        async with FaultProxy("127.0.0.1", device_port) as proxy:
            link = connect_to("127.0.0.1", proxy.port)
            proxy.set_latency(0.2)
            proxy.reset_all()

    Every fault setter is synchronous, validates all its arguments first (raising
    ``ValueError`` and changing nothing when one is invalid) and takes effect at once,
    also on connections already open unless its documentation says otherwise.
    :meth:`clear` removes every fault except :meth:`set_down`.

    Both addresses must be loopback addresses (``127.0.0.0/8``, ``::1`` or ``localhost``):
    the proxy never listens on, nor connects to, anything else.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "proxy",
    ) -> None:
        """Configure the proxy; nothing is bound until :meth:`start`.

        Raises ``ValueError`` if a host is not a loopback address or a port is out of
        range (``listen_port`` may be 0: any free port).
        """
        _check_loopback(upstream_host, "upstream_host")
        _check_port(upstream_port, "upstream_port", allow_zero=False)
        self._listen_host = _check_loopback(listen_host, "listen_host")
        _check_port(listen_port, "listen_port", allow_zero=True)
        self._name = name
        self._upstream: tuple[str, int] = (upstream_host, upstream_port)
        self._listen_port = listen_port
        self._port: int | None = None

        self._started = False
        self._stopping: asyncio.Future[None] | None = None
        self._server: asyncio.Server | None = None
        self._pending_sock: socket.socket | None = None
        self._closed_servers: list[asyncio.Server] = []
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: set[asyncio.Future[None]] = set()
        self._next_id = 0

        self._connections_total = 0
        self._bytes = {"up": 0, "down": 0}
        self._resets_sent = 0

        # Faults.
        self._down = False
        self._black_hole = False
        self._reset_after: tuple[int, _Direction] | None = None
        self._cut_after: tuple[int, _Direction] | None = None
        self._latency = 0.0
        self._jitter = 0.0
        self._rng = random.Random()
        self._slow_close = 0.0
        self._slice: int | None = None
        self._slice_delay = 0.0
        self._bandwidth: float | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the listening socket and start accepting; does nothing if already started.

        The port is ``listen_port``, or a free port chosen now when it is 0; after a
        :meth:`stop` a new :meth:`start` binds the port used before. If the proxy was
        set down before starting, the port is chosen but nothing listens until
        ``set_down(False)``.

        Raises ``OSError`` if the port cannot be bound; the proxy is then left stopped.
        Raises ``RuntimeError`` if :meth:`stop` is still in progress.
        """
        if self._started:
            return
        if self._stopping is not None:
            raise RuntimeError("FaultProxy.start() called while stop() is in progress")
        self._open_listener()
        self._started = True
        if self._down:
            self._close_listener()
            return
        try:
            await self._serve_pending()
        except BaseException:
            self._close_listener()
            self._started = False
            raise

    async def stop(self) -> None:
        """Close the listener and every connection, and wait until all the proxy's tasks end.

        Open connections are aborted (their buffered data is dropped). Does nothing if the
        proxy is not started; a concurrent second call waits for the first. Faults and
        statistics are kept, so the proxy can be started again. Never raises for the
        connections' own errors.
        """
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        if not self._started:
            return
        self._stopping = asyncio.get_running_loop().create_future()
        try:
            self._started = False
            self._close_listener()
            for conn in list(self._conns):
                self._kill(conn, "abort")
            while self._tasks:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            self._conns.clear()
            servers, self._closed_servers = self._closed_servers, []
            for server in servers:
                await server.wait_closed()
        finally:
            stopping, self._stopping = self._stopping, None
            _resolve(stopping)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def name(self) -> str:
        """The name given at construction (used in task names)."""
        return self._name

    @property
    def host(self) -> str:
        """The loopback address the proxy listens on."""
        return self._listen_host

    @property
    def port(self) -> int:
        """The port the proxy listens on (the same across ``set_down`` and restarts).

        Raises ``RuntimeError`` before the first :meth:`start`.
        """
        if self._port is None:
            raise RuntimeError("FaultProxy.port is only known after start()")
        return self._port

    @property
    def upstream(self) -> tuple[str, int]:
        """``(host, port)`` new connections are forwarded to."""
        return self._upstream

    def set_upstream(self, host: str, port: int) -> None:
        """Forward new connections to ``host:port`` (say, after the upstream restarted).

        Connections already open keep their upstream. Raises ``ValueError`` if ``host``
        is not loopback or ``port`` is not in 1..65535; the upstream is then unchanged.
        """
        _check_loopback(host, "upstream host")
        _check_port(port, "upstream port", allow_zero=False)
        self._upstream = (host, port)

    def statistics(self) -> ProxyStatistics:
        """A snapshot of the counters."""
        return ProxyStatistics(
            connections_total=self._connections_total,
            connections_active=len(self._conns),
            bytes_up=self._bytes["up"],
            bytes_down=self._bytes["down"],
            resets_sent=self._resets_sent,
        )

    # ------------------------------------------------------------------ faults

    def set_down(self, down: bool = True, *, drop_existing: bool = True) -> None:
        """Take the proxy down (new connects are refused) or bring it back up.

        Down closes the listening socket, so connecting fails with
        ``ConnectionRefusedError``; with ``drop_existing`` every open connection is also
        closed (FIN on both sides). Up binds the same port again and accepts at once.
        Before :meth:`start` this only records the state.

        Raises ``OSError`` if the port cannot be bound again (someone else took it); the
        proxy then stays down.
        """
        if down:
            self._down = True
            self._close_listener()
            if drop_existing:
                for conn in list(self._conns):
                    self._kill(conn, "close")
        elif self._down:
            if self._started:
                self._open_listener()
                self._spawn(self._serve_pending(), "listen")
            self._down = False
        self._notify()

    def set_black_hole(self, on: bool = True) -> None:
        """Swallow everything: read and discard in both directions, forward nothing, close
        nothing (an EOF is held back until the black hole is switched off).

        Applies to open connections too; data swallowed is lost for good.
        """
        self._black_hole = bool(on)
        self._notify()

    def reset_all(self) -> None:
        """Reset every open connection now.

        The client side is closed with ``SO_LINGER`` 0 (the client sees
        ``ConnectionResetError``, unsent data is dropped); the upstream side is closed
        normally. Counted in ``resets_sent``.
        """
        for conn in list(self._conns):
            self._kill(conn, "rst")

    def set_reset_after(self, nbytes: int | None, *, direction: str = "up") -> None:
        """Reset every connection once it has forwarded ``nbytes`` in ``direction``.

        ``"up"`` counts client->upstream bytes, ``"down"`` upstream->client bytes, since
        the connection opened. The bytes up to the limit are delivered (the upstream side
        is closed normally, after them), nothing after; then the client is reset as by
        :meth:`reset_all`. Open connections that already forwarded that many bytes are
        reset at once. ``None`` removes the limit.

        Raises ``ValueError`` for a negative ``nbytes`` or an unknown direction.
        """
        _check_nbytes(nbytes, "nbytes")
        checked = _check_direction(direction)
        self._reset_after = None if nbytes is None else (nbytes, checked)
        self._enforce_limits()
        self._notify()

    def set_cut_after(self, nbytes: int | None, *, direction: str = "down") -> None:
        """Close every connection (FIN, not RST) once it has forwarded ``nbytes`` in
        ``direction``; the bytes up to the limit are delivered, nothing after.

        Counting is as for :meth:`set_reset_after`; open connections already past the
        limit are closed at once. ``None`` removes the limit. Note that the kernel still
        answers with RST if the client sends more data after the cut.

        Raises ``ValueError`` for a negative ``nbytes`` or an unknown direction.
        """
        _check_nbytes(nbytes, "nbytes")
        checked = _check_direction(direction)
        self._cut_after = None if nbytes is None else (nbytes, checked)
        self._enforce_limits()
        self._notify()

    def set_latency(self, seconds: float, *, jitter: float = 0.0, seed: int | None = None) -> None:
        """Delay every forwarded chunk by ``seconds`` plus a uniform ``[-jitter, +jitter]``
        (never below 0), counted from when the proxy read it; order is preserved.

        ``seed`` makes the jitter repeatable. ``set_latency(0)`` removes the delay, also
        for chunks already waiting. Raises ``ValueError`` for negative or non-finite
        values; nothing is changed then.
        """
        latency = _check_seconds(seconds, "seconds")
        spread = _check_seconds(jitter, "jitter")
        self._latency, self._jitter = latency, spread
        if seed is not None:
            self._rng = random.Random(seed)
        self._notify()

    def set_slow_close(self, seconds: float) -> None:
        """When one side closes (EOF), pass the close to the other side only after
        ``seconds``; data still flows the other way meanwhile. 0 removes the delay.

        Raises ``ValueError`` for negative or non-finite values.
        """
        self._slow_close = _check_seconds(seconds, "seconds")
        self._notify()

    def set_slicer(self, max_chunk: int | None, *, delay: float = 0.0) -> None:
        """Forward data in writes of at most ``max_chunk`` bytes, ``delay`` seconds apart.

        With no delay the pieces are separate writes, but the receiving TCP stack may
        still merge them. ``None`` removes the slicer.

        Raises ``ValueError`` if ``max_chunk`` is below 1 or ``delay`` is negative.
        """
        _check_nbytes(max_chunk, "max_chunk", minimum=1)
        spacing = _check_seconds(delay, "delay")
        self._slice, self._slice_delay = max_chunk, spacing
        self._notify()

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        """Limit forwarding to ``bytes_per_s`` in each direction of each connection.

        0 stalls: the proxy stops reading from both sides, so the sender's socket
        buffers fill and its ``drain()`` blocks, until the limit is changed. ``None``
        removes the limit.

        Raises ``ValueError`` for negative or non-finite values.
        """
        if bytes_per_s is not None:
            if isinstance(bytes_per_s, bool) or not isinstance(bytes_per_s, (int, float)):
                raise ValueError(f"bytes_per_s must be None or a number, got {bytes_per_s!r}")
            if not math.isfinite(bytes_per_s) or bytes_per_s < 0:
                raise ValueError(
                    f"bytes_per_s must be None or a finite number >= 0, got {bytes_per_s!r}"
                )
        self._bandwidth = None if bytes_per_s is None else float(bytes_per_s)
        self._notify()

    def clear(self) -> None:
        """Remove every fault except :meth:`set_down`; stalled or delayed data flows again."""
        self._black_hole = False
        self._reset_after = None
        self._cut_after = None
        self._latency = 0.0
        self._jitter = 0.0
        self._slow_close = 0.0
        self._slice = None
        self._slice_delay = 0.0
        self._bandwidth = None
        self._notify()

    # ------------------------------------------------------------------ listening

    def _open_listener(self) -> None:
        """Bind and listen synchronously (so connects queue up at once) for ``_serve_pending``."""
        self._close_listener()
        family = socket.AF_INET6 if ":" in self._listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            port = self._port if self._port is not None else self._listen_port
            sock.bind((self._listen_host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._pending_sock = sock

    async def _serve_pending(self) -> None:
        sock, self._pending_sock = self._pending_sock, None
        if sock is None:
            return  # taken down again (or served by another call) meanwhile
        try:
            # With a socket and start_serving=False this does not suspend, so the server
            # is recorded before anything else can run.
            server = await asyncio.start_server(
                self._on_client, sock=sock, limit=_CHUNK, start_serving=False
            )
        except BaseException:
            sock.close()
            raise
        self._server = server
        await server.start_serving()

    def _close_listener(self) -> None:
        if self._pending_sock is not None:
            self._pending_sock.close()
            self._pending_sock = None
        if self._server is not None:
            self._server.close()
            self._closed_servers.append(self._server)
            self._server = None

    # ------------------------------------------------------------------ connections

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"faultproxy[{self._name}].{what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("%s failed", task.get_name(), exc_info=exc)

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_id += 1
        self._connections_total += 1
        conn = _Conn(self._next_id, reader, writer)
        self._conns.add(conn)
        if self._stopping is not None:
            self._kill(conn, "abort")
            self._conns.discard(conn)
            return
        self._spawn(self._run_connection(conn), f"conn#{conn.ident}")

    async def _run_connection(self, conn: _Conn) -> None:
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    *self._upstream, limit=_CHUNK
                )
            except OSError:
                self._kill(conn, "rst")
                return
            conn.upstream_reader, conn.upstream_writer = upstream_reader, upstream_writer
            if conn.closing is not None:  # killed while connecting
                if conn.closing == "abort":
                    upstream_writer.transport.abort()
                else:
                    upstream_writer.close()
                return
            up: asyncio.Queue[_Chunk | None] = asyncio.Queue(_QUEUE_CHUNKS)
            down: asyncio.Queue[_Chunk | None] = asyncio.Queue(_QUEUE_CHUNKS)
            ident = conn.ident
            conn.pumps = [
                self._spawn(self._read_loop(conn, "up", conn.client_reader, up), f"up#{ident}"),
                self._spawn(self._send_loop(conn, "up", upstream_writer, up), f"up#{ident}.send"),
                self._spawn(self._read_loop(conn, "down", upstream_reader, down), f"down#{ident}"),
                self._spawn(
                    self._send_loop(conn, "down", conn.client_writer, down), f"down#{ident}.send"
                ),
            ]
            self._enforce_limits(conn)
            await asyncio.wait(conn.pumps)
        except asyncio.CancelledError:
            self._kill(conn, "abort")
            raise
        finally:
            try:
                self._kill(conn, "close")  # no-op if already closing
                if conn.pumps:
                    await asyncio.gather(*conn.pumps, return_exceptions=True)
                for writer in conn.writers():
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            finally:
                self._conns.discard(conn)

    def _kill(self, conn: _Conn, how: _KillMode) -> None:
        """Close a connection now: ``close`` (FIN both sides), ``rst`` (RST to the client,
        FIN to the upstream) or ``abort`` (drop everything). Only ``abort`` overrides an
        earlier kill."""
        if conn.closing is not None and how != "abort":
            return
        conn.closing = how
        for writer in conn.writers():
            if how == "abort":
                writer.transport.abort()
            elif how == "rst" and writer is conn.client_writer:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                writer.transport.abort()
                self._resets_sent += 1
            else:
                writer.close()
        for task in conn.pumps:
            task.cancel()

    def _limit(self, conn: _Conn, direction: _Direction) -> tuple[int | None, _KillMode]:
        """Bytes ``conn`` may still forward in ``direction`` (None: no limit) and the kill
        that follows reaching it."""
        room: int | None = None
        action: _KillMode = "close"
        limits: tuple[tuple[tuple[int, _Direction] | None, _KillMode], ...] = (
            (self._reset_after, "rst"),
            (self._cut_after, "close"),
        )
        for limit, kind in limits:
            if limit is None or limit[1] != direction:
                continue
            left = max(0, limit[0] - conn.forwarded[direction])
            if room is None or left < room or (left == room and kind == "rst"):
                room, action = left, kind
        return room, action

    def _enforce_limits(self, only: _Conn | None = None) -> None:
        conns = [only] if only is not None else list(self._conns)
        for conn in conns:
            if conn.closing is not None or conn.upstream_writer is None:
                continue
            for direction in _DIRECTIONS:
                room, action = self._limit(conn, direction)
                if room == 0:
                    self._kill(conn, action)
                    break

    # ------------------------------------------------------------------ pumping

    def _notify(self) -> None:
        """Wake every pump waiting for a fault to change."""
        for fut in list(self._waiters):
            _resolve(fut)

    async def _wait_change(self, timeout: float | None) -> None:
        """Wait until a fault setting changes, or ``timeout`` seconds (None: no limit)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.add(fut)
        timer = None if timeout is None else loop.call_later(timeout, _resolve, fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if timer is not None:
                timer.cancel()

    async def _sleep_until(self, deadline: Callable[[], float]) -> None:
        """Wait until ``loop.time() >= deadline()``, re-reading the deadline on changes."""
        loop = asyncio.get_running_loop()
        while (left := deadline() - loop.time()) > 0:
            await self._wait_change(left)

    def _due(self, chunk: _Chunk) -> float:
        """When ``chunk`` may be forwarded under the current latency."""
        return chunk.read_at + max(0.0, self._latency + chunk.jitter_sample * self._jitter)

    async def _read_loop(
        self,
        conn: _Conn,
        direction: _Direction,
        source: asyncio.StreamReader,
        queue: asyncio.Queue[_Chunk | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self._bandwidth == 0:  # stall: stop reading so the sender backs up
                    await self._wait_change(None)
                data = await source.read(_CHUNK)
                if not data:
                    break
                if self._black_hole:
                    continue
                sample = self._rng.uniform(-1.0, 1.0) if self._jitter else 0.0
                await queue.put(_Chunk(loop.time(), sample, data))
            while self._black_hole:  # a black hole never passes a close on
                await self._wait_change(None)
            await queue.put(None)
        except OSError:
            self._kill(conn, "close")

    async def _send_loop(
        self,
        conn: _Conn,
        direction: _Direction,
        sink: asyncio.StreamWriter,
        queue: asyncio.Queue[_Chunk | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                chunk = await queue.get()
                if chunk is None:
                    break
                await self._sleep_until(functools.partial(self._due, chunk))
                if self._black_hole:
                    continue
                if not await self._deliver(conn, direction, sink, chunk.data):
                    return
            while self._black_hole:
                await self._wait_change(None)
            eof_at = loop.time()
            await self._sleep_until(lambda: eof_at + self._slow_close)
            if sink.can_write_eof():
                sink.write_eof()
        except OSError:
            self._kill(conn, "close")

    async def _deliver(
        self, conn: _Conn, direction: _Direction, sink: asyncio.StreamWriter, data: bytes
    ) -> bool:
        """Forward ``data`` applying the per-piece faults; False once the connection is done."""
        loop = asyncio.get_running_loop()
        pos = 0
        while pos < len(data):
            if conn.closing is not None:
                return False
            if self._black_hole:
                return True  # the rest of the chunk falls in
            bandwidth = self._bandwidth
            if bandwidth == 0:
                await self._wait_change(None)
                continue
            now = loop.time()
            gate = now
            if self._slice is not None:
                gate = max(gate, conn.last_piece[direction] + self._slice_delay)
            if bandwidth is not None:
                gate = max(gate, conn.next_send[direction])
            if gate > now:
                await self._wait_change(gate - now)
                continue  # re-check every fault after waiting
            size = len(data) - pos
            if self._slice is not None:
                size = min(size, self._slice)
            if bandwidth is not None:
                size = min(size, max(1, int(bandwidth * _BANDWIDTH_QUANTUM)))
            room, action = self._limit(conn, direction)
            if room is not None:
                if room == 0:
                    self._kill(conn, action)
                    return False
                size = min(size, room)
            sink.write(data[pos : pos + size])
            pos += size
            conn.forwarded[direction] += size
            self._bytes[direction] += size
            conn.last_piece[direction] = loop.time()
            if bandwidth is not None:
                conn.next_send[direction] = now + size / bandwidth
            if room is not None and size == room:
                if action == "rst" and sink is conn.client_writer:
                    # An RST drops unsent data: flush the last bytes to the kernel first.
                    sink.transport.set_write_buffer_limits(high=0)
                    await sink.drain()
                self._kill(conn, action)
                return False
            await sink.drain()
        return True
