"""FaultProxy: every fault, seen from a real client over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from keeplink.testing.faultproxy import FaultProxy, ProxyStatistics

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connect = Callable[[], Awaitable[Streams]]

SHORT = 0.2  # how long "never answers" is watched for


# --------------------------------------------------------------------------- helpers


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.transports.add(transport)
        self.server.accepted += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.server.received += data
        self.server.sizes.append(len(data))
        if self.server.echo:
            self.transport.write(data)
        if self.server.close_on is not None and self.server.close_on in data:
            self.transport.close()

    def eof_received(self) -> bool:
        self.server.eofs += 1
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.transport is not None
        self.server.transports.discard(self.transport)
        self.server.lost += 1


class Upstream:
    """A tiny callback-based TCP server (no tasks): echoes or sinks, and records recv sizes."""

    def __init__(self, *, echo: bool = True, close_on: bytes | None = None) -> None:
        self.echo = echo
        self.close_on = close_on
        self.received = bytearray()
        self.sizes: list[int] = []
        self.accepted = 0
        self.eofs = 0
        self.lost = 0
        self.transports: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Upstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _UpstreamProtocol(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for transport in list(self.transports):
            transport.abort()
        await self._server.wait_closed()
        await wait_until(lambda: not self.transports)


@contextlib.asynccontextmanager
async def running_upstream(**kwargs: Any) -> AsyncIterator[Upstream]:
    upstream = await Upstream(**kwargs).start()
    try:
        yield upstream
    finally:
        await upstream.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def close_client(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def closed_port() -> int:
    """A loopback port with (very likely) nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def echo(streams: Streams, payload: bytes) -> bytes:
    reader, writer = streams
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), 2)


def faultproxy_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("faultproxy[")]


def live_timers() -> list[asyncio.TimerHandle]:
    scheduled: list[asyncio.TimerHandle] = getattr(asyncio.get_running_loop(), "_scheduled", [])
    return [handle for handle in scheduled if not handle.cancelled()]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
async def _no_leftovers() -> AsyncIterator[None]:
    """Fail a test that leaves a task running or a timer scheduled (after the others)."""
    before = set(asyncio.all_tasks())
    yield
    me = asyncio.current_task()
    for _ in range(10):
        tasks = [t for t in asyncio.all_tasks() if t is not me and t not in before]
        timers = live_timers()
        if not tasks and not timers:
            return
        await asyncio.sleep(0)
    pytest.fail(f"left behind: tasks={tasks} timers={timers}")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as server:
        yield server


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", upstream.port, name="t") as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def connect(proxy: FaultProxy) -> AsyncIterator[Connect]:
    """Open client connections to the proxy; all are closed after the test."""
    writers: list[asyncio.StreamWriter] = []

    async def _connect() -> Streams:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writers.append(writer)
        return reader, writer

    yield _connect
    for writer in writers:
        await close_client(writer)


# --------------------------------------------------------------------------- tests


async def test_passthrough_echo(proxy: FaultProxy, upstream: Upstream, connect: Connect) -> None:
    streams = await connect()
    assert await echo(streams, b"hello") == b"hello"
    assert await echo(streams, b"again") == b"again"

    # Larger than one chunk, both ways at once, byte-exact.
    payload = bytes(range(256)) * 1200  # 307200 bytes
    reader, writer = streams
    writer.write(payload)
    received, _ = await asyncio.gather(
        asyncio.wait_for(reader.readexactly(len(payload)), 3), writer.drain()
    )
    assert received == payload
    assert bytes(upstream.received) == b"helloagain" + payload


async def test_down_refuses_then_comes_back_on_same_port(
    proxy: FaultProxy, connect: Connect
) -> None:
    port = proxy.port
    reader, writer = await connect()
    assert await echo((reader, writer), b"ping") == b"ping"

    proxy.set_down()

    assert await asyncio.wait_for(reader.read(100), 2) == b""  # existing connection closed
    with pytest.raises(ConnectionRefusedError):
        await connect()

    proxy.set_down(False)

    assert proxy.port == port
    assert await echo(await connect(), b"back") == b"back"


async def test_down_can_keep_existing_connections(proxy: FaultProxy, connect: Connect) -> None:
    old = await connect()
    assert await echo(old, b"1") == b"1"

    proxy.set_down(drop_existing=False)

    with pytest.raises(ConnectionRefusedError):
        await connect()
    assert await echo(old, b"still here") == b"still here"

    proxy.set_down(False)

    assert await echo(await connect(), b"new") == b"new"
    assert await echo(old, b"old") == b"old"


async def test_set_down_before_start() -> None:
    async with running_upstream() as upstream:
        proxy = FaultProxy("127.0.0.1", upstream.port)
        with pytest.raises(RuntimeError, match="after start"):
            _ = proxy.port
        proxy.set_down()
        async with proxy:
            await proxy.start()  # idempotent
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(proxy.host, proxy.port)
            proxy.set_down(False)
            streams = await asyncio.open_connection(proxy.host, proxy.port)
            try:
                assert await echo(streams, b"up") == b"up"
            finally:
                await close_client(streams[1])


async def test_black_hole_swallows_without_closing(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    reader, writer = await connect()
    assert await echo((reader, writer), b"before") == b"before"

    proxy.set_black_hole()

    writer.write(b"lost")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(100), SHORT)
    assert not reader.at_eof()
    assert not writer.is_closing()

    # A new connection is accepted but never answered either.
    new_reader, new_writer = await connect()
    new_writer.write(b"hello?")
    await new_writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(new_reader.read(100), SHORT)
    assert not new_reader.at_eof()
    assert bytes(upstream.received) == b"before"

    proxy.set_black_hole(False)

    assert await echo((reader, writer), b"after") == b"after"
    assert bytes(upstream.received) == b"beforeafter"


async def test_reset_all_resets_open_connections(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    reader, writer = await connect()
    assert await echo((reader, writer), b"ping") == b"ping"

    proxy.reset_all()

    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), 2)
    await wait_until(lambda: upstream.lost == 1)
    await wait_until(lambda: proxy.statistics().connections_active == 0)
    assert proxy.statistics().resets_sent == 1


async def test_reset_after_up_delivers_exactly_n_bytes(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    proxy.set_reset_after(5, direction="up")
    reader, writer = await connect()

    writer.write(b"0123456789")
    await writer.drain()

    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), 2)
    await wait_until(lambda: upstream.lost == 1)
    assert bytes(upstream.received) == b"01234"
    assert proxy.statistics().bytes_up == 5
    assert proxy.statistics().resets_sent == 1


async def test_reset_after_down_delivers_exactly_n_bytes(
    proxy: FaultProxy, connect: Connect
) -> None:
    proxy.set_reset_after(4, direction="down")
    reader, writer = await connect()

    writer.write(b"abcdefgh")
    await writer.drain()

    assert await asyncio.wait_for(reader.readexactly(4), 2) == b"abcd"
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), 2)
    assert proxy.statistics().bytes_down == 4


async def test_cut_after_down_gives_n_bytes_then_eof(proxy: FaultProxy, connect: Connect) -> None:
    proxy.set_cut_after(5)
    reader, writer = await connect()

    writer.write(b"hello world")
    await writer.drain()

    assert await asyncio.wait_for(reader.read(), 2) == b"hello"  # read() = until EOF
    assert reader.at_eof()
    assert proxy.statistics().resets_sent == 0


async def test_cut_after_up_closes_upstream_after_n_bytes(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    proxy.set_cut_after(3, direction="up")
    reader, writer = await connect()

    writer.write(b"abcdef")
    await writer.drain()

    assert await asyncio.wait_for(reader.read(), 2) == b""
    await wait_until(lambda: upstream.lost == 1)
    assert bytes(upstream.received) == b"abc"


async def test_limit_already_passed_closes_open_connection_at_once(
    proxy: FaultProxy, connect: Connect
) -> None:
    reader, writer = await connect()
    assert await echo((reader, writer), b"0123456789") == b"0123456789"

    proxy.set_cut_after(5, direction="up")

    assert await asyncio.wait_for(reader.read(100), 2) == b""


async def test_latency_delays_round_trip(proxy: FaultProxy, connect: Connect) -> None:
    streams = await connect()
    assert await echo(streams, b"warm") == b"warm"
    loop = asyncio.get_running_loop()

    proxy.set_latency(0.1)  # applies to the open connection, once each way

    start = loop.time()
    assert await echo(streams, b"slow") == b"slow"
    assert loop.time() - start >= 0.2

    # Removing the latency also releases chunks already waiting.
    proxy.set_latency(5)
    reader, writer = streams
    start = loop.time()
    writer.write(b"held")
    await asyncio.sleep(0.05)
    proxy.set_latency(0)
    assert await asyncio.wait_for(reader.readexactly(4), 2) == b"held"
    assert loop.time() - start < 2.5


async def test_latency_with_jitter_keeps_order(proxy: FaultProxy, connect: Connect) -> None:
    proxy.set_latency(0.03, jitter=0.03, seed=7)
    reader, writer = await connect()
    messages = [f"<{i:02d}>".encode() for i in range(15)]
    for message in messages:
        writer.write(message)
        await writer.drain()
        await asyncio.sleep(0.002)  # separate chunks, each with its own jitter
    expected = b"".join(messages)
    assert await asyncio.wait_for(reader.readexactly(len(expected)), 3) == expected


async def test_slicer_splits_writes(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    proxy.set_slicer(7, delay=0.01)
    streams = await connect()
    payload = bytes(range(50))

    assert await echo(streams, payload) == payload

    assert bytes(upstream.received) == payload
    assert max(upstream.sizes) <= 7
    assert len(upstream.sizes) >= 8  # ceil(50 / 7)


async def test_bandwidth_zero_stalls_sender_until_cleared() -> None:
    size = 16 * 1024 * 1024  # far more than the socket buffers on the way hold
    async with (
        running_upstream(echo=False) as upstream,
        FaultProxy("127.0.0.1", upstream.port) as proxy,
    ):
        proxy.set_bandwidth(0)
        _reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            writer.write(b"x" * size)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(writer.drain(), SHORT)
            assert len(upstream.received) == 0
            assert proxy.statistics().bytes_up == 0

            proxy.clear()

            await asyncio.wait_for(writer.drain(), 10)
            await wait_until(lambda: len(upstream.received) == size, timeout=10)
            assert proxy.statistics().bytes_up == size
        finally:
            await close_client(writer)


async def test_bandwidth_limits_rate() -> None:
    async with (
        running_upstream(echo=False) as upstream,
        FaultProxy("127.0.0.1", upstream.port) as proxy,
    ):
        proxy.set_bandwidth(20_000)
        loop = asyncio.get_running_loop()
        _reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            start = loop.time()
            writer.write(b"y" * 4000)
            await writer.drain()
            await wait_until(lambda: len(upstream.received) == 4000)
            assert loop.time() - start >= 0.15  # 4000 B at 20 kB/s, the first piece is free
        finally:
            await close_client(writer)


async def test_slow_close_delays_eof_both_ways() -> None:
    async with (
        running_upstream(close_on=b"bye") as upstream,
        FaultProxy("127.0.0.1", upstream.port) as proxy,
    ):
        proxy.set_slow_close(0.15)
        loop = asyncio.get_running_loop()

        # Upstream closes: the client sees the data at once, the EOF only later.
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            start = loop.time()
            writer.write(b"bye")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(3), 2) == b"bye"
            assert await asyncio.wait_for(reader.read(), 2) == b""
            assert loop.time() - start >= 0.15
        finally:
            await close_client(writer)

        # Client half-closes: the upstream sees the EOF only later.
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            eofs = upstream.eofs
            start = loop.time()
            writer.write_eof()
            await wait_until(lambda: upstream.eofs == eofs + 1)
            assert loop.time() - start >= 0.15
        finally:
            await close_client(writer)


async def test_statistics_count_connections_and_bytes(proxy: FaultProxy, connect: Connect) -> None:
    assert proxy.statistics() == ProxyStatistics(
        connections_total=0, connections_active=0, bytes_up=0, bytes_down=0, resets_sent=0
    )
    first = await connect()
    second = await connect()
    assert await echo(first, b"0123456789") == b"0123456789"
    assert await echo(second, b"abc") == b"abc"

    assert proxy.statistics() == ProxyStatistics(
        connections_total=2, connections_active=2, bytes_up=13, bytes_down=13, resets_sent=0
    )

    await close_client(first[1])  # FIN -> half-close forwarded -> upstream closes -> done
    await wait_until(lambda: proxy.statistics().connections_active == 1)
    assert proxy.statistics().connections_total == 2


async def test_upstream_refusing_resets_client() -> None:
    async with FaultProxy("127.0.0.1", closed_port()) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(100), 2)
        finally:
            await close_client(writer)
        await wait_until(lambda: proxy.statistics().connections_active == 0)
        assert proxy.statistics().resets_sent == 1
        assert proxy.statistics().connections_total == 1


async def test_set_upstream_redirects_new_connections(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    async with running_upstream() as replacement:
        proxy.set_upstream("127.0.0.1", replacement.port)
        assert proxy.upstream == ("127.0.0.1", replacement.port)
        assert await echo(await connect(), b"moved") == b"moved"
        assert bytes(replacement.received) == b"moved"
        assert bytes(upstream.received) == b""


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: p.set_reset_after(-1), "nbytes"),
        (lambda p: p.set_reset_after(5, direction="sideways"), "direction"),
        (lambda p: p.set_cut_after(-3, direction="up"), "nbytes"),
        (lambda p: p.set_cut_after(3, direction="UP"), "direction"),
        (lambda p: p.set_latency(-0.1), "seconds"),
        (lambda p: p.set_latency(0.1, jitter=-1), "jitter"),
        (lambda p: p.set_latency(float("nan")), "seconds"),
        (lambda p: p.set_slow_close(-1), "seconds"),
        (lambda p: p.set_slicer(0), "max_chunk"),
        (lambda p: p.set_slicer(10, delay=-0.5), "delay"),
        (lambda p: p.set_bandwidth(-5), "bytes_per_s"),
        (lambda p: p.set_bandwidth(float("inf")), "bytes_per_s"),
        (lambda p: p.set_upstream("127.0.0.1", 0), "port"),
        (lambda p: p.set_upstream("192.0.2.1", 80), "loopback"),
    ],
)
def test_invalid_arguments_raise_value_error(
    call: Callable[[FaultProxy], None], match: str
) -> None:
    proxy = FaultProxy("127.0.0.1", 9)
    with pytest.raises(ValueError, match=match):
        call(proxy)
    assert proxy.upstream == ("127.0.0.1", 9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"upstream_host": "127.0.0.1", "upstream_port": 0},
        {"upstream_host": "127.0.0.1", "upstream_port": 65536},
        {"upstream_host": "example.com", "upstream_port": 80},
        {"upstream_host": "127.0.0.1", "upstream_port": 80, "listen_host": "0.0.0.0"},
        {"upstream_host": "127.0.0.1", "upstream_port": 80, "listen_port": -1},
    ],
)
def test_invalid_constructor_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        FaultProxy(**kwargs)


async def test_invalid_argument_changes_nothing(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    with pytest.raises(ValueError, match="direction"):
        proxy.set_reset_after(3, direction="sideways")
    with pytest.raises(ValueError, match="delay"):
        proxy.set_slicer(2, delay=-1)

    # Neither the 3-byte reset nor the 2-byte slicer was installed.
    assert await echo(await connect(), b"0123456789") == b"0123456789"
    assert upstream.sizes == [10]


async def test_clear_removes_faults(proxy: FaultProxy, connect: Connect) -> None:
    proxy.set_black_hole()
    proxy.set_latency(5)
    proxy.set_reset_after(1)
    proxy.set_cut_after(1)
    proxy.set_slicer(1, delay=1)
    proxy.set_bandwidth(1)
    proxy.set_slow_close(5)

    proxy.clear()

    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await echo(await connect(), b"clean" * 100) == b"clean" * 100
    assert loop.time() - start < 1


async def test_stop_with_open_connections_leaves_nothing_behind(
    upstream: Upstream,
) -> None:
    proxy = FaultProxy("127.0.0.1", upstream.port, name="stopme")
    await proxy.start()
    port = proxy.port
    clients = [await asyncio.open_connection(proxy.host, proxy.port) for _ in range(3)]
    try:
        assert await echo(clients[0], b"idle") == b"idle"
        proxy.set_latency(5)  # chunks waiting in the proxy
        clients[1][1].write(b"delayed")
        proxy.set_bandwidth(0)  # a stalled sender
        clients[2][1].write(b"z" * (4 * 1024 * 1024))
        await wait_until(lambda: proxy.statistics().connections_active == 3)
        await asyncio.sleep(0.05)
        assert faultproxy_tasks()

        await proxy.stop()

        assert faultproxy_tasks() == []
        assert live_timers() == []
        assert proxy.statistics().connections_active == 0
        for reader, _ in clients:
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 2) == b""
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

        await proxy.stop()  # idempotent

        proxy.clear()
        await proxy.start()  # restartable, on the same port
        assert proxy.port == port
        streams = await asyncio.open_connection(proxy.host, proxy.port)
        clients.append(streams)
        assert await echo(streams, b"again") == b"again"
    finally:
        await proxy.stop()
        for _, writer in clients:
            await close_client(writer)
