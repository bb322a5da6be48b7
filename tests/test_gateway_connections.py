"""Client connections to the gateway's API: header timeout, idle timeout, a cap on clients,
and accept errors that are logged once per interval. Real sockets on loopback against the
real Server, with short timeouts set in the config."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway_procs import TOKEN as E2E_TOKEN
from gateway_procs import Procs, write_config
from keeplink.gateway.config import parse_config
from keeplink.gateway.listener import (
    DEFAULT_MAX_CLIENTS,
    RateLimit,
    accept_error_handler,
    client_ceiling,
)
from keeplink.gateway.server import Server
from keeplink.testing import free_port

TOKEN = "connections-token-01"
HEADER_S = 0.5
IDLE_S = 1.5
IO_BOUND_S = 10.0
"""A safety bound for real socket I/O on a loaded machine, never a timing rule."""
EARLY_S = 0.1
"""Timers fire on the loop: allow this much before the nominal instant (clock granularity)."""
PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # no blank line: headers unfinished
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def _server(**gateway: Any) -> Server:
    config = parse_config(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "store": "memory:",
                "token": TOKEN,
                "header_timeout_s": HEADER_S,
                "idle_timeout_s": IDLE_S,
                **gateway,
            }
        }
    )
    server = Server(config, token=TOKEN)
    await server.start()
    return server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    server = await _server()
    try:
        yield server
    finally:
        await server.stop()


async def _open(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def _closed_after(reader: asyncio.StreamReader, since: float) -> tuple[float, bytes]:
    """Read until the server closes; return how long after ``since`` it did, and the bytes."""
    data = b""
    async with asyncio.timeout(IO_BOUND_S):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return time.monotonic() - since, data


async def _response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP response with a Content-Length body."""
    async with asyncio.timeout(IO_BOUND_S):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head + await reader.readexactly(length)


async def test_partial_headers_are_closed_at_the_header_timeout(server: Server) -> None:
    started = time.monotonic()
    conns = [await _open(server) for _ in range(3)]
    for _, writer in conns:
        writer.write(PARTIAL)
    # One more trickles its headers a byte at a time: bytes do not buy it more time.
    trickle_reader, trickle = await _open(server)

    async def drip() -> None:
        for byte in PARTIAL:
            trickle.write(bytes([byte]))
            await asyncio.sleep(HEADER_S / 8)

    dripping = asyncio.get_running_loop().create_task(drip())
    results = [await _closed_after(reader, started) for reader, _ in conns]
    trickle_closed, _ = await _closed_after(trickle_reader, started)
    dripping.cancel()
    for elapsed, data in [*results, (trickle_closed, b"")]:
        assert data == b""  # closed, never answered
        assert HEADER_S - EARLY_S <= elapsed < HEADER_S + 2.0, elapsed
    assert server.listener is not None and server.listener.header_timeouts == 4
    for _, writer in [*conns, (None, trickle)]:
        writer.close()


async def test_a_silent_connection_is_closed_at_the_header_timeout(server: Server) -> None:
    started = time.monotonic()
    reader, writer = await _open(server)
    elapsed, data = await _closed_after(reader, started)
    assert data == b""
    assert HEADER_S - EARLY_S <= elapsed < HEADER_S + 2.0, elapsed
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(
    server: Server,
) -> None:
    reader, writer = await _open(server)
    writer.write(REQUEST)
    assert (await _response(reader)).startswith(b"HTTP/1.1 200")
    answered = time.monotonic()
    elapsed, data = await _closed_after(reader, answered)
    assert data == b""
    # The idle limit, not the header timeout, applies between requests.
    assert IDLE_S - EARLY_S <= elapsed < IDLE_S + 2.0, elapsed
    writer.close()


async def test_the_next_request_on_a_keep_alive_connection_has_the_header_timeout(
    server: Server,
) -> None:
    reader, writer = await _open(server)
    writer.write(REQUEST)
    assert (await _response(reader)).startswith(b"HTTP/1.1 200")
    await asyncio.sleep(HEADER_S)  # idle a while, within the idle limit
    writer.write(PARTIAL)
    started = time.monotonic()
    elapsed, data = await _closed_after(reader, started)
    assert data == b""
    assert HEADER_S - EARLY_S <= elapsed < IDLE_S, elapsed
    writer.close()


async def test_a_websocket_outlives_both_timeouts(server: Server) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{server.url}/api/events") as ws,
    ):
        await asyncio.sleep(IDLE_S + HEADER_S)
        with pytest.raises(TimeoutError):  # no close frame, no error: just no events
            await ws.receive(timeout=0.2)
        assert not ws.closed


async def test_over_max_clients_a_client_is_refused_at_once_with_503() -> None:
    server = await _server(max_clients=3, header_timeout_s=5.0)
    try:
        held = [await _open(server) for _ in range(3)]
        for _, writer in held:
            writer.write(PARTIAL)
        assert server.listener is not None
        listener = server.listener
        async with asyncio.timeout(IO_BOUND_S):
            while listener.clients < 3:  # noqa: ASYNC110 - the accepts of real sockets
                await asyncio.sleep(0.01)
        answers = []
        started = time.monotonic()
        for _ in range(20):
            reader, writer = await _open(server)
            answers.append(await _closed_after(reader, started))
            writer.close()
        for elapsed, data in answers:
            assert elapsed < 2.0  # long before the 5 s header timeout of the held ones
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 Service Unavailable"), data
            assert json.loads(body)["code"] == "out_of_connection_slots"
        assert listener.refused == 20
        assert listener.clients == 3
        # A held one leaves: the next client is served.
        held[0][1].close()
        async with asyncio.timeout(IO_BOUND_S):
            while listener.clients > 2:  # noqa: ASYNC110 - the close of a real socket
                await asyncio.sleep(0.01)
        reader, writer = await _open(server)
        writer.write(REQUEST)
        assert (await _response(reader)).startswith(b"HTTP/1.1 200")
        writer.close()
        for _, w in held[1:]:
            w.close()
    finally:
        await server.stop()


async def test_refusals_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    server = await _server(max_clients=1, header_timeout_s=5.0)
    try:
        _, holder = await _open(server)
        holder.write(PARTIAL)
        assert server.listener is not None
        listener = server.listener
        async with asyncio.timeout(IO_BOUND_S):
            while listener.clients < 1:  # noqa: ASYNC110 - the accept of a real socket
                await asyncio.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger="keeplink.gateway"):
            for _ in range(50):
                reader, writer = await _open(server)
                await _closed_after(reader, time.monotonic())
                writer.close()
        refused = [r for r in caplog.records if "refused a client" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in refused]
        assert refused[0].exc_info is None
        holder.close()
    finally:
        await server.stop()


def test_rate_limit_reports_one_event_per_interval_and_counts_the_rest() -> None:
    limit = RateLimit(10.0)
    assert limit.allow(100.0) == 0
    assert [limit.allow(t) for t in (100.0, 101.0, 109.9)] == [None, None, None]
    assert limit.allow(110.0) == 3
    assert limit.allow(115.0) is None
    assert limit.allow(120.0) == 1


async def test_asyncio_accept_errors_become_one_line_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    passed: list[dict[str, Any]] = []
    handler = accept_error_handler(RateLimit(), lambda _loop, context: passed.append(context))
    emfile = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.WARNING, logger="keeplink.gateway"):
        for _ in range(200):  # what asyncio reports for each failed accept()
            handler(loop, {"message": "socket.accept() out of system resource",
                           "exception": emfile})  # fmt: skip
        other = {"message": "Task exception was never retrieved", "exception": ValueError()}
        handler(loop, other)
    assert [r.getMessage() for r in caplog.records] == [
        "gateway: cannot accept a connection: Too many open files"
    ]
    assert caplog.records[0].exc_info is None
    assert passed == [other]  # everything else goes to the handler that was there


async def test_max_clients_is_lowered_to_what_the_descriptor_limit_leaves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 19:
        pytest.skip("the descriptor limit is too high for gateway.max_clients to exceed")
    with caplog.at_level(logging.WARNING, logger="keeplink.gateway"):
        server = await _server(max_clients=1 << 20)
    try:
        assert server.max_clients == client_ceiling(soft, devices=0) < 1 << 20
        assert server.listener is not None and server.listener.max_clients == server.max_clients
        [warning] = [r.getMessage() for r in caplog.records]
        assert "does not fit the descriptor limit" in warning
    finally:
        await server.stop()
    default = await _server()
    try:
        assert default.max_clients == min(DEFAULT_MAX_CLIENTS, client_ceiling(soft, devices=0))
    finally:
        await default.stop()


def test_the_client_ceiling_leaves_descriptors_for_the_devices() -> None:
    assert client_ceiling(256, devices=10) == 256 - 64 - 20
    assert client_ceiling(65536, devices=0) == 65536 - 64
    assert client_ceiling(64, devices=100) == 4  # a few clients still get in


# ---------------------------------------------------------------------------- a flood


FLOOD_FILES = 256
"""The gateway's descriptor limit in the flood test: far fewer than the flood's clients."""
FLOOD_CLIENTS = 600
"""Clients trying to hold a connection at once: more than twice the descriptor limit."""
FLOOD_ATTEMPTS = 40_000
"""Connects the flood may make in all: enough to outlast a device restart and its deliveries
(the test asserts the flood is still on at the end), at most FLOOD_RETRY_S apart per client."""
FLOOD_RETRY_S = 0.2
FLOOD_BOUND_S = 60.0


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_client_flood_under_a_low_descriptor_limit_leaves_the_device_link_working(
    procs: Procs,
    tmp_path: Path,
) -> None:
    port = free_port()
    sim = procs.sim("hall", port)
    await sim.start_ready()
    config = write_config(tmp_path / "keeplink.toml", devices={"hall": port}, token=E2E_TOKEN)
    gateway = procs.gateway(config)
    gateway.max_files = FLOOD_FILES
    url = await gateway.start_ready()
    host, _, gw_port = url.removeprefix("http://").rpartition(":")
    auth = {"Authorization": f"Bearer {E2E_TOKEN}"}
    flooding = asyncio.Event()
    stop = asyncio.Event()
    attempts = 0
    held: set[asyncio.StreamWriter] = set()

    async def attacker() -> None:
        nonlocal attempts
        while not stop.is_set() and attempts < FLOOD_ATTEMPTS:
            attempts += 1
            try:
                reader, writer = await asyncio.open_connection(host, int(gw_port))
            except OSError:
                await asyncio.sleep(0.05)
                continue
            held.add(writer)
            writer.write(PARTIAL)
            flooding.set()
            try:
                async with asyncio.timeout(FLOOD_BOUND_S):
                    while await reader.read(4096):  # refused (503) or timed out: EOF
                        pass
            except (OSError, TimeoutError):
                pass
            held.discard(writer)
            writer.close()
            await asyncio.sleep(FLOOD_RETRY_S)  # a refused attacker tries again, a little later

    # One client that is already connected keeps its keep-alive connection: it submits.
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200

        async def submit(n: int) -> str:
            async with http.post(
                f"{url}/api/devices/hall/commands",
                json={"op": "set", "args": {"n": n}},
                headers=auth,
            ) as response:
                assert response.status == 202, await response.text()
                return str((await response.json())["id"])

        async def final(command_id: str) -> dict[str, Any]:
            async with asyncio.timeout(FLOOD_BOUND_S):
                while True:
                    async with http.get(f"{url}/api/commands/{command_id}") as response:
                        command: dict[str, Any] = await response.json()
                    if command["state"] not in ("queued", "sending"):
                        return command
                    await asyncio.sleep(0.1)  # polling the live API

        loop = asyncio.get_running_loop()
        attackers = [loop.create_task(attacker()) for _ in range(FLOOD_CLIENTS)]
        try:
            async with asyncio.timeout(IO_BOUND_S):
                await flooding.wait()
            await asyncio.sleep(1.0)  # let the flood fill every slot there is
            first = await submit(1)
            assert (await final(first))["state"] == "succeeded"
            # The device restarts during the flood: its link needs a new descriptor.
            assert await sim.stop() == 0
            waiting = [await submit(n) for n in (2, 3)]
            sim = procs.sim("hall", port)
            await sim.start_ready()
            for command_id in waiting:
                done = await final(command_id)
                assert done["state"] == "succeeded", done
            assert not stop.is_set() and attempts < FLOOD_ATTEMPTS  # still flooding
            flood_err = gateway.stderr  # what the flood made the gateway write
            assert "Traceback" not in flood_err, flood_err[:4000]
            assert len(flood_err.splitlines()) <= 20, flood_err[:4000]
            assert attempts > FLOOD_CLIENTS  # refused clients came back, again and again
            assert len(held) > FLOOD_FILES // 2  # and the gateway held what it could
        finally:
            stop.set()
            for writer in list(held):
                writer.close()
            await asyncio.gather(*attackers, return_exceptions=True)
    # The flood is over: a new client gets in.
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
    assert await gateway.stop() == 0
    assert await sim.stop() == 0
    err = gateway.stderr
    assert "Traceback" not in err, err[:4000]
    lines = err.splitlines()
    assert len(lines) <= 20, err[:4000]  # a few rate-limited warnings, not a flood
    assert any("refused a client" in line for line in lines), err
