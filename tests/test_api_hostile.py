"""The HTTP edge under hostile input, against a real gateway on loopback.

Each test sends what an attacker (or a careless client) sends, byte for byte where it
matters, and checks the answer is a 4xx in the ``{"code", "message"}`` shape, nothing is
lost, and nothing is logged above DEBUG.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keeplink.gateway import api as gateway_api
from keeplink.gateway.config import parse_config
from keeplink.gateway.server import Server
from keeplink.testing import DeviceSimulator

TOKEN = "hostile-test-write-token"
READ_TOKEN = "hostile-test-read-token"
BOUND_S = 15.0


@dataclass
class Rig:
    server: Server
    hall: DeviceSimulator
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    async def raw(self, request: bytes, *, pause_after: int | None = None) -> tuple[int, bytes]:
        """Send ``request`` as written (split in two writes at ``pause_after``); the status
        and body of the answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            if pause_after is None:
                writer.write(request)
            else:
                writer.write(request[:pause_after])
                await writer.drain()
                await asyncio.sleep(0.2)  # the first part is buffered alone
                writer.write(request[pause_after:])
            await writer.drain()
            async with asyncio.timeout(BOUND_S):
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
            return status, body
        finally:
            writer.close()

    async def submit(self, device: str, body: Any, token: str = TOKEN) -> aiohttp.ClientResponse:
        return await self.http.post(
            f"{self.url}/api/devices/{device}/commands",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )


def _config(store: str, **gateway: Any) -> Any:
    return {
        "gateway": {"listen": "127.0.0.1:0", "store": store, "token": TOKEN, **gateway},
    }


async def _rig(
    store: str = "memory:", devices: list[dict[str, Any]] | None = None, **gateway: Any
) -> tuple[Server, DeviceSimulator]:
    hall = DeviceSimulator(device_id="hall")
    await hall.start()
    data = _config(store, **gateway)
    data["devices"] = [
        {"id": "hall", "driver": "jsonline", "port": hall.port, "heartbeat_s": False},
        *(devices or []),
    ]
    try:
        server = Server(parse_config(data, source="test_api_hostile"), token=TOKEN)
        await server.start()
    except BaseException:
        await hall.stop()
        raise
    return server, hall


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    # Bound but never listening: every connect to "away" is refused at once.
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    away = {"id": "away", "driver": "jsonline", "port": dead.getsockname()[1], "max_queued": 3}
    server, hall = await _rig(devices=[away], ttl_s=600)
    try:
        async with aiohttp.ClientSession() as http:
            yield Rig(server=server, hall=hall, http=http)
    finally:
        await server.stop()
        await hall.stop()
        dead.close()


def _error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)
    assert set(error) == {"code", "message"}, error
    assert error["message"], error
    return error


@pytest.fixture
def loud(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Everything logged at INFO or above; a client error must add nothing to it."""
    caplog.set_level(logging.INFO)
    return caplog


def _nothing_loud(caplog: pytest.LogCaptureFixture) -> None:
    """No warning and no traceback from the HTTP side: a client error is DEBUG at most."""
    http = [r for r in caplog.records if r.name.startswith(("keeplink.gateway", "aiohttp"))]
    assert not [r for r in http if r.exc_info or r.levelno >= logging.WARNING], [
        r.getMessage() for r in http
    ]


def _post(path: str, body: bytes, *, extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + extra
        + b"Connection: close\r\n\r\n"
        + body
    )


def _chunked(path: str, body: bytes, chunk: int) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    parts = [
        f"{len(body[i : i + chunk]):x}\r\n".encode() + body[i : i + chunk] + b"\r\n"
        for i in range(0, len(body), chunk)
    ]
    return head + b"".join(parts) + b"0\r\n\r\n"


# ---------------------------------------------------------------------------- bodies


async def test_a_body_that_arrives_in_two_reads_is_one_body(rig: Rig) -> None:
    body = json.dumps({"op": "set", "args": {"blob": "x" * 60_000}}).encode()
    request = _post("/api/devices/away/commands", body)
    status, answer = await rig.raw(request, pause_after=len(request) - len(body) + 1000)
    assert status == 202, answer
    command = json.loads(answer)
    assert len(command["args"]["blob"]) == 60_000


async def test_a_chunked_body_is_read_whole(rig: Rig) -> None:
    body = json.dumps({"op": "set", "args": {"blob": "y" * 30_000}}).encode()
    status, answer = await rig.raw(_chunked("/api/devices/away/commands", body, 4096))
    assert status == 202, answer
    assert json.loads(answer)["args"]["blob"] == "y" * 30_000


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_oversized_body_is_413_invalid_request(rig: Rig, framing: str) -> None:
    body = json.dumps({"op": "set", "args": {"blob": "z" * 300_000}}).encode()
    path = "/api/devices/away/commands"
    request = _post(path, body) if framing == "content-length" else _chunked(path, body, 65536)
    status, answer = await rig.raw(request)
    assert status == 413, answer
    error = _error_of(answer)
    assert error["code"] == "invalid_request"
    assert str(gateway_api.MAX_BODY) in error["message"]
    listed = await rig.http.get(f"{rig.url}/api/commands", params={"device": "away"})
    assert (await listed.json())["commands"] == []  # nothing stored


# ---------------------------------------------------------------------------- 500s


async def test_a_non_ascii_authorization_header_is_401(
    rig: Rig, loud: pytest.LogCaptureFixture
) -> None:
    request = (
        b"POST /api/devices/away/commands HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer caf\xc3\xa9\xff\r\nContent-Type: application/json\r\n"
        b'Content-Length: 13\r\nConnection: close\r\n\r\n{"op": "set"}'
    )
    status, answer = await rig.raw(request)
    assert status == 401, answer
    assert _error_of(answer)["code"] == "auth_failed"
    _nothing_loud(loud)


@pytest.mark.parametrize("depth", [1_000, 100_000])
async def test_json_nested_deep_is_a_400(
    rig: Rig, loud: pytest.LogCaptureFixture, depth: int
) -> None:
    body = b'{"op": "set", "args": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    status, answer = await rig.raw(_post("/api/devices/away/commands", body))
    assert status == 400, answer
    assert "recursion limit" in _error_of(answer)["message"]
    _nothing_loud(loud)


@pytest.mark.parametrize(
    "body",
    [b'{"op": "set", "args": {"a": NaN}}', b'{"op": "set", "args": {"a": 1e400}}'],
    ids=["nan", "overflow"],
)
async def test_numbers_that_are_not_finite_are_refused(rig: Rig, body: bytes) -> None:
    status, answer = await rig.raw(_post("/api/devices/away/commands", body))
    assert status in (400, 422), answer
    assert _error_of(answer)["code"] == "invalid_request"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/devices HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET /api/devices HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"G\xffT / HTTP/1.1\r\n\r\n",
        b"POST /api/devices/away/commands HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n",
    ],
    ids=[
        "nul-in-header",
        "oversized-header",
        "oversized-path",
        "garbage",
        "bad-byte",
        "two-lengths",
    ],
)
async def test_what_the_http_parser_refuses_is_a_json_400_and_logged_quietly(
    rig: Rig, loud: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    status, answer = await rig.raw(request_bytes)
    assert status == 400, answer
    error = _error_of(answer)
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("the request could not be parsed: ")
    _nothing_loud(loud)
    # The next client is served as usual.
    assert (await rig.http.get(f"{rig.url}/api/devices")).status == 200


async def test_expect_headers(rig: Rig, loud: pytest.LogCaptureFixture) -> None:
    """A non-ASCII Expect was a 500 (found by the raw-HTTP fuzzer); 100-continue still works."""
    odd = (
        b"GET /api/devices HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: \x80\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    status, answer = await rig.raw(odd)
    assert status == 417, answer
    assert _error_of(answer)["code"] == "invalid_request"
    body = b'{"op": "set"}'
    request = _post("/api/devices/away/commands", body, extra=b"Expect: 100-continue\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    try:
        writer.write(request[: -len(body)])
        async with asyncio.timeout(BOUND_S):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue")
            writer.write(body)
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 202"), head
    finally:
        writer.close()
    _nothing_loud(loud)


async def test_an_odd_expect_on_a_path_no_route_has_is_a_json_417(rig: Rig) -> None:
    """Found by the raw-HTTP fuzzer: aiohttp's own Expect handling answered it with a 500."""
    odd = (
        b"GET /%00 HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: \x80\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    status, answer = await rig.raw(odd)
    assert status == 417, answer
    assert _error_of(answer)["code"] == "invalid_request"
    missing = await rig.http.get(f"{rig.url}/nothing/here")
    assert missing.status == 404
    wrong = await rig.http.put(f"{rig.url}/api/devices")
    assert wrong.status == 405
    assert set(wrong.headers["Allow"].split(",")) == {"GET", "HEAD"}


async def test_a_body_that_cannot_be_decoded_is_a_400(
    rig: Rig, loud: pytest.LogCaptureFixture
) -> None:
    request = _post("/api/devices/away/commands", b"notgzip", extra=b"Content-Encoding: gzip\r\n")
    status, answer = await rig.raw(request)
    assert status == 400, answer
    error = _error_of(answer)
    assert error["code"] == "invalid_request"
    assert "the body could not be read" in error["message"]
    _nothing_loud(loud)


async def test_a_body_cut_short_is_not_logged_loudly(
    rig: Rig, loud: pytest.LogCaptureFixture
) -> None:
    for _ in range(5):
        _, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        writer.write(_post("/api/devices/away/commands", b"x" * 100)[:-95])  # 5 of 100 bytes
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.2)
    assert (await rig.http.get(f"{rig.url}/healthz")).status == 200
    _nothing_loud(loud)


async def test_a_body_that_trickles_is_cut_at_the_header_timeout() -> None:
    server, hall = await _rig(header_timeout_s=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_post("/api/devices/hall/commands", b"x" * 100)[:-90])
        await writer.drain()
        async with asyncio.timeout(BOUND_S):
            head = await reader.readuntil(b"\r\n\r\n")
            rest = await reader.read()  # and then the connection is closed
        writer.close()
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"did not arrive within 0.5 s" in rest
    finally:
        await server.stop()
        await hall.stop()


def test_parser_refusals_print_nothing_at_the_default_level() -> None:
    """The parser's log lines, demoted to DEBUG, stay out of a log that runs at INFO (they
    were printed anyway: the level had been checked before the demotion)."""
    from keeplink.gateway.listener import parser_logger

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        parser_logger().exception("Error handling request from 127.0.0.1")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert seen == []


# ---------------------------------------------------------------------------- cross-site


async def test_a_websocket_from_a_foreign_origin_is_refused(rig: Rig) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await rig.http.ws_connect(
            f"{rig.url}/api/events", headers={"Origin": "http://evil.example"}
        )
    assert refused.value.status == 403
    for origin in ("null", "file://", f"http://127.0.0.1:{rig.port + 1}"):
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await rig.http.ws_connect(f"{rig.url}/api/events", headers={"Origin": origin})
    # The gateway's own page, and clients that are not browsers (no Origin), get through.
    for headers in ({"Origin": rig.url}, {}):
        ws = await rig.http.ws_connect(f"{rig.url}/api/events", headers=headers)
        await ws.close()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8470", "127.0.0.1.evil.example"])
async def test_a_foreign_host_name_is_not_answered(rig: Rig, host: str) -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1."""
    request = f"GET /api/commands HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    status, answer = await rig.raw(request.encode())
    assert status == 421, answer
    assert _error_of(answer)["code"] == "invalid_request"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8470", "[::1]:1", "10.1.2.3"])
async def test_ip_addresses_and_localhost_are_answered(rig: Rig, host: str) -> None:
    request = f"GET /api/devices HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    status, answer = await rig.raw(request.encode())
    assert status == 200, answer


async def test_allowed_hosts_are_answered() -> None:
    server, hall = await _rig(allowed_hosts=["gw.example.com"])
    try:
        async with aiohttp.ClientSession() as http:
            ok = await http.get(f"{server.url}/api/devices", headers={"Host": "GW.example.com"})
            assert ok.status == 200
            other = await http.get(f"{server.url}/api/devices", headers={"Host": "gw2.example"})
            assert other.status == 421
    finally:
        await server.stop()
        await hall.stop()


async def test_a_read_token_guards_every_read() -> None:
    server, hall = await _rig(read_token=READ_TOKEN)
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/api/devices", "/api/devices/hall", "/api/commands", "/metrics"):
                bare = await http.get(server.url + path)
                assert bare.status == 401, path
                assert (await bare.json())["code"] == "auth_failed"
                for token in (READ_TOKEN, TOKEN):  # the write token reads too
                    good = await http.get(
                        server.url + path, headers={"Authorization": f"Bearer {token}"}
                    )
                    assert good.status == 200, (path, token)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{server.url}/api/events")
            assert refused.value.status == 401
            ws = await http.ws_connect(f"{server.url}/api/events?access_token={READ_TOKEN}")
            await ws.close()
            # A read token does not write.
            write = await http.post(
                f"{server.url}/api/devices/hall/commands",
                json={"op": "set"},
                headers={"Authorization": f"Bearer {READ_TOKEN}"},
            )
            assert write.status == 401
            # The page and the health check stay open: they show no device data.
            assert (await http.get(server.url + "/healthz")).status == 200
            assert (await http.get(server.url + "/")).status == 200
    finally:
        await server.stop()
        await hall.stop()


# ---------------------------------------------------------------------------- browsers


async def test_every_answer_carries_the_hardening_headers(rig: Rig) -> None:
    for path in ("/", "/api/devices", "/api/nothing", "/healthz"):
        response = await rig.http.get(rig.url + path)
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["Referrer-Policy"] == "no-referrer", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
    page = (await rig.http.get(rig.url + "/")).headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in page
    assert "script-src 'sha256-" in page
    assert "connect-src 'self'" in page


# ---------------------------------------------------------------------------- growth


async def test_a_full_queue_is_429_queue_full_and_stores_nothing(rig: Rig) -> None:
    for i in range(3):
        assert (await rig.submit("away", {"op": "set", "args": {"i": i}})).status == 202
    full = await rig.submit("away", {"op": "set", "args": {"i": 3}})
    assert full.status == 429
    error = await full.json()
    assert error["code"] == "queue_full"
    assert "max_queued = 3" in error["message"]
    listed = await rig.http.get(f"{rig.url}/api/commands", params={"device": "away"})
    assert [c["args"]["i"] for c in (await listed.json())["commands"]] == [0, 1, 2]


async def test_concurrent_submits_never_overshoot_max_queued(rig: Rig) -> None:
    answers = await asyncio.gather(*(rig.submit("away", {"op": "set"}) for _ in range(20)))
    assert sorted(a.status for a in answers).count(202) <= 3
    assert {a.status for a in answers} <= {202, 429}
    listed = await rig.http.get(f"{rig.url}/api/commands", params={"device": "away"})
    assert len((await listed.json())["commands"]) <= 3


async def test_the_gateway_ttl_applies_to_commands_without_one(rig: Rig) -> None:
    plain = await (await rig.submit("away", {"op": "set"})).json()
    command = plain
    assert command["expires_at"] == pytest.approx(command["created_at"] + 600, abs=1)
    own = await (await rig.submit("away", {"op": "set", "ttl_s": 5})).json()
    assert own["expires_at"] == pytest.approx(own["created_at"] + 5, abs=1)


def _ws_handshake(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def test_a_websocket_client_that_never_reads_is_dropped_and_resumes_with_since(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_api, "CLIENT_BUFFER", 20)
    # A client with a tiny receive window that reads its handshake answer, then nothing.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", rig.port))
        await loop.sock_sendall(sock, _ws_handshake(rig.port))
        head = b""
        async with asyncio.timeout(BOUND_S):
            while b"\r\n\r\n" not in head:
                head += await loop.sock_recv(sock, 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert await _websockets(rig) == 1
        # Events pile up: every command's events carry its 60 KB of args.
        delivered = 0
        async with asyncio.timeout(BOUND_S * 4):
            for _ in range(200):
                answer = await rig.submit("hall", {"op": "set", "args": {"pad": "p" * 60_000}})
                assert answer.status == 202, await answer.text()
                delivered += 1
                if await _websockets(rig) == 0:
                    break
        assert await _websockets(rig) == 0, "a client that never reads was kept"
    finally:
        sock.close()
    # Delivery went on the whole time, and a reconnect with since= gets what it missed.
    assert 1 < delivered < 200
    since = rig.server.gateway.backlog(0)[-5]["seq"]
    async with rig.http.ws_connect(f"{rig.url}/api/events?since={since}") as ws:
        replayed = await ws.receive_json(timeout=BOUND_S)
        assert replayed["seq"] == since + 1


async def _websockets(rig: Rig) -> int:
    metrics = await (await rig.http.get(f"{rig.url}/metrics")).text()
    for line in metrics.splitlines():
        if line.startswith("keeplink_api_websockets "):
            return int(float(line.split()[1]))
    raise AssertionError("no keeplink_api_websockets in /metrics")


async def test_a_client_further_behind_than_its_buffer_is_closed_with_1013(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(3):  # three commands: three events each at least
        assert (await rig.submit("away", {"op": "set"})).status in (202, 429)
    assert len(rig.server.gateway.backlog(0)) > 5
    monkeypatch.setattr(gateway_api, "CLIENT_BUFFER", 5)
    async with rig.http.ws_connect(f"{rig.url}/api/events?since=0") as ws:
        message = await ws.receive(timeout=BOUND_S)
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        assert message.data == gateway_api.BEHIND_CLOSE_CODE
        assert message.extra == "fell behind; reconnect with since=0"


# ---------------------------------------------------------------------------- the store


async def test_a_locked_store_is_503_store_busy_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keeplink.db"
    server, hall = await _rig(store=f"sqlite:///{path}")
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        async with aiohttp.ClientSession() as http:

            async def submit(i: int) -> aiohttp.ClientResponse:
                return await http.post(
                    f"{server.url}/api/devices/hall/commands",
                    json={"op": "set", "args": {"i": i}},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )

            assert (await submit(0)).status == 202
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            busy = await submit(1)
            assert busy.status == 503
            error = await busy.json()
            assert error["code"] == "store_busy"
            assert "nothing was written" in error["message"]
            blocker.execute("ROLLBACK")
            assert (await submit(2)).status == 202
            listed = await http.get(f"{server.url}/api/commands", params={"device": "hall"})
            stored = [c["args"]["i"] for c in (await listed.json())["commands"]]
            assert stored == [0, 2]
    finally:
        blocker.close()
        await server.stop()
        await hall.stop()
