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

Here are the server, its lifecycle and ``set_down``; the faults as plain data are in
``_faults``, the other setters in ``_controls``, and each connection's pump in ``_pump``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from keeplink.testing.faultproxy._controls import FaultControls
from keeplink.testing.faultproxy._faults import Changes, Faults, check_loopback, check_port, resolve
from keeplink.testing.faultproxy._pump import CHUNK, Connection, Traffic

__all__ = ["FaultProxy", "ProxyStatistics"]

_log = logging.getLogger("keeplink.faultproxy")


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


class FaultProxy(FaultControls):
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
        check_loopback(upstream_host, "upstream_host")
        check_port(upstream_port, "upstream_port", allow_zero=False)
        self._listen_host = check_loopback(listen_host, "listen_host")
        check_port(listen_port, "listen_port", allow_zero=True)
        self._name = name
        self._upstream: tuple[str, int] = (upstream_host, upstream_port)
        self._listen_port = listen_port
        self._port: int | None = None

        self._started = False
        self._stopping: asyncio.Future[None] | None = None
        self._server: asyncio.Server | None = None
        self._pending_sock: socket.socket | None = None
        self._closed_servers: list[asyncio.Server] = []
        self._conns: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self._connections_total = 0
        self._traffic = Traffic()
        self._faults = Faults()
        self._changes = Changes()

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
        if self._faults.down:
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
                conn.kill("abort")
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
            resolve(stopping)

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
        check_loopback(host, "upstream host")
        check_port(port, "upstream port", allow_zero=False)
        self._upstream = (host, port)

    def statistics(self) -> ProxyStatistics:
        """A snapshot of the counters."""
        return ProxyStatistics(
            connections_total=self._connections_total,
            connections_active=len(self._conns),
            bytes_up=self._traffic.bytes["up"],
            bytes_down=self._traffic.bytes["down"],
            resets_sent=self._traffic.resets_sent,
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
            self._faults.down = True
            self._close_listener()
            if drop_existing:
                for conn in list(self._conns):
                    conn.kill("close")
        elif self._faults.down:
            if self._started:
                self._open_listener()
                self._spawn(self._serve_pending(), "listen")
            self._faults.down = False
        self._changes.notify()

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
                self._on_client, sock=sock, limit=CHUNK, start_serving=False
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
        conn = Connection(
            self._next_id,
            reader,
            writer,
            faults=self._faults,
            changes=self._changes,
            traffic=self._traffic,
            spawn=self._spawn,
            on_closed=self._conns.discard,
        )
        self._conns.add(conn)
        if self._stopping is not None:
            conn.kill("abort")
            self._conns.discard(conn)
            return
        self._spawn(conn.run(self._upstream), f"conn#{conn.ident}")
