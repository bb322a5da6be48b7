"""The gateway against devices that are not what they claim, that babble, or that refuse us:
an in-process gateway (links on loopback, the memory store) and HTTP against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from helpers import IO_BOUND_S, eventually
from keeplink import ConfigError, LinkState
from keeplink._core.commands import DeviceRecord
from keeplink.gateway.config import parse_config
from keeplink.gateway.server import Server
from keeplink.outbox import SqliteStore
from keeplink.testing import DeviceSimulator

TOKEN = "gateway-devices-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {"initial_s": 0.05, "cap_s": 0.2}


@contextlib.asynccontextmanager
async def gateway(*devices: dict[str, Any]) -> AsyncIterator[tuple[Server, aiohttp.ClientSession]]:
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0", "store": "memory:", "token": TOKEN},
            "devices": [
                {"driver": "jsonline", "heartbeat_s": 30, "backoff": FAST, **d} for d in devices
            ],
        }
    )
    server = Server(config, token=TOKEN)
    await server.start()
    try:
        async with aiohttp.ClientSession(base_url=server.url) as http:
            yield server, http
    finally:
        await server.stop()


async def submit(http: aiohttp.ClientSession, device: str, op: str = "set") -> Any:
    async with http.post(
        f"/api/devices/{device}/commands", json={"op": op, "args": {"n": 1}}, headers=AUTH
    ) as response:
        assert response.status == 202, await response.text()
        return await response.json()


async def get(http: aiohttp.ClientSession, path: str) -> Any:
    async with http.get(path) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not noisy, [r.getMessage() for r in noisy]


# ---------------------------------------------------------------------------- identity


async def test_a_device_that_names_another_id_is_refused_and_gets_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="keeplink")
    async with DeviceSimulator(device_id="intruder") as sim:
        async with gateway({"id": "dev1", "port": sim.port}) as (server, http):
            link = server.gateway.links["dev1"]
            answer = await submit(http, "dev1")
            # Either the link gives up on the impostor, or (the bug) the command reaches it.
            await eventually(lambda: link.state is LinkState.FAILED or bool(sim.applied))
            assert sim.applied == []
            assert sim.statistics().requests == 0
            view = await get(http, "/api/devices/dev1")
            command = await get(http, f"/api/commands/{answer['id']}")
    assert view["link"]["state"] == "failed"
    assert view["link"]["last_error"]["code"] == "device_mismatch"
    assert "'intruder'" in view["link"]["last_error"]["message"]
    assert "'dev1'" in view["link"]["last_error"]["message"]
    assert command["state"] == "queued"  # kept for the real dev1, not lost
    assert any(
        "device_mismatch" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )
    no_tracebacks(caplog)


async def test_device_id_names_the_id_a_device_reports_in_another_form() -> None:
    async with DeviceSimulator(device_id="AA:BB:CC:01") as sim:
        async with gateway({"id": "dev1", "port": sim.port, "device_id": "AA:BB:CC:01"}) as (
            server,
            http,
        ):
            await submit(http, "dev1")
            await eventually(lambda: bool(sim.applied))
            assert server.gateway.links["dev1"].state is LinkState.CONNECTED
    assert [c.args for c in sim.applied] == [{"n": 1}]


# ---------------------------------------------------------------------------- refusals


async def post(
    http: aiohttp.ClientSession, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with http.post(path, headers=AUTH if headers is None else headers) as response:
        return response.status, await response.json()


async def command_state(http: aiohttp.ClientSession, command_id: str) -> str:
    return str((await get(http, f"/api/commands/{command_id}"))["state"])


async def test_a_refused_link_says_so_on_submit_and_reconnects_on_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with DeviceSimulator(device_id="dev1", token="right") as sim:
        async with gateway({"id": "dev1", "port": sim.port, "token": "wrong"}) as (server, http):
            link = server.gateway.links["dev1"]
            await eventually(lambda: link.state is LinkState.FAILED)
            answer = await submit(http, "dev1")
            assert answer["state"] == "queued"
            note = answer["note"]
            assert note.startswith("queued: the link failed (auth_failed: "), note
            assert "POST /api/devices/dev1/reconnect" in note

            # Writes need the token; an unknown device is a 404; both in the error shape.
            assert await post(http, "/api/devices/dev1/reconnect", headers={}) == (
                401,
                {
                    "code": "auth_failed",
                    "message": "this endpoint needs Authorization: Bearer <token>",
                },
            )
            status, body = await post(http, "/api/devices/nope/reconnect")
            assert (status, body) == (
                404,
                {"code": "device_not_found", "message": "no device 'nope'"},
            )
            assert link.state is LinkState.FAILED  # still: nobody asked with the token

            sim.token = "wrong"  # the device is re-provisioned with the configured token
            status, body = await post(http, "/api/devices/dev1/reconnect")
            assert status == 202, body
            assert body["reconnect"] == "started"
            assert body["device"]["id"] == "dev1"
            assert body["device"]["link"]["state"] in ("connecting", "handshaking", "connected")
            command_id = answer["id"]
            await eventually(lambda: bool(sim.applied))
            view = await get(http, "/api/devices/dev1")
            assert view["link"]["state"] == "connected"

            status, body = await post(http, "/api/devices/dev1/reconnect")
            assert (status, body["reconnect"]) == (202, "none")  # connected: nothing to do
            assert await command_state(http, command_id) in ("sending", "succeeded")
    assert [c.args for c in sim.applied] == [{"n": 1}]
    no_tracebacks(caplog)


async def test_reconnect_cuts_a_long_backoff_wait_short() -> None:
    async with DeviceSimulator(device_id="dev1") as sim:
        port = sim.port
    # Nothing listens on the port now: the link backs off, for 30 s at least.
    slow = {"initial_s": 30, "cap_s": 60}
    async with gateway({"id": "dev1", "port": port, "backoff": slow}) as (server, http):
        link = server.gateway.links["dev1"]
        await eventually(lambda: link.state is LinkState.BACKOFF)
        async with DeviceSimulator(device_id="dev1", port=port) as sim:
            status, body = await post(http, "/api/devices/dev1/reconnect")
            assert (status, body["reconnect"]) == (202, "woken"), body
            await eventually(lambda: link.state is LinkState.CONNECTED)
            assert link.statistics().retry_at is None


async def test_auth_retry_s_retries_a_refused_link_slowly_instead_of_failing() -> None:
    async with DeviceSimulator(device_id="dev1", token="right") as sim:
        device = {"id": "dev1", "port": sim.port, "token": "wrong", "auth_retry_s": 0.5}
        async with gateway(device) as (server, http):
            link = server.gateway.links["dev1"]
            await eventually(lambda: link.state is LinkState.BACKOFF)
            view = await get(http, "/api/devices/dev1")
            assert view["link"]["last_error"]["code"] == "auth_failed"
            assert 0 < view["link"]["retry_in_s"] <= 0.5
            answer = await submit(http, "dev1")
            assert answer["note"].startswith("queued: the link was refused (auth_failed: ")
            assert "retrying every 0.5 s" in answer["note"]
            assert link.state is not LinkState.FAILED
            sim.token = "wrong"
            await eventually(lambda: bool(sim.applied))  # it came back by itself
    assert sim.statistics().auth_failures >= 1


def test_auth_retry_s_is_the_backoffs_terminal_retry_and_is_checked() -> None:
    base = {"id": "dev1", "driver": "jsonline", "port": 7001}
    (device,) = parse_config({"devices": [{**base, "auth_retry_s": 600}]}).devices
    assert device.backoff.terminal_retry_s == 600
    assert device.device_id == "dev1"  # the welcome must name the device's own id
    (device,) = parse_config(
        {"devices": [{**base, "auth_retry_s": 60, "backoff": {"initial_s": 5, "cap_s": 300}}]}
    ).devices
    assert (device.backoff.terminal_retry_s, device.backoff.cap_s) == (60, 300)
    (device,) = parse_config({"devices": [base]}).devices
    assert device.backoff.terminal_retry_s is None  # by default a refusal is terminal
    for bad in (0, -1, "soon", True):
        with pytest.raises(ConfigError, match=r"devices\[0\]\.auth_retry_s: must be a positive"):
            parse_config({"devices": [{**base, "auth_retry_s": bad}]})
    with pytest.raises(ConfigError, match=r"devices\[0\]\.device_id: only jsonline"):
        parse_config({"devices": [{**base, "driver": "mqtt", "device_id": "x"}]})


# ---------------------------------------------------------------------------- babble


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def hostile_frames(seq: int) -> list[bytes]:
    """What a broken or hostile device sends in answer to request ``seq``, before it finally
    acknowledges it properly: each is one protocol error, or one late reply."""
    return [
        b"\x00\x01garbage \xff, not JSON at all\n",
        b"x" * (10 * 1024 * 1024) + b"\n",  # a 10 MB line
        b'{"t":"ack","seq":%d,"ok":true,"result":{"a":%s}}\n' % (seq, _nested(5000)),
        # Under the interpreter's recursion limit, but deeper than any result needs: refused
        # by a fixed limit, not by whatever stack depth the decoder happens to run at.
        b'{"t":"ack","seq":%d,"ok":true,"result":{"a":%s}}\n' % (seq, _nested(200)),
        b'{"t":"ack","seq":%d,"ok":true,"result":[1,2]}\n' % seq,
        # Valid JSON, not text: no store can keep it (it once left the command stuck in
        # sending, its settle refused, retried forever, with every later command behind it).
        b'{"t":"ack","seq":%d,"ok":false,"code":"\\ud800","msg":"x"}\n' % seq,
        b'{"t":"ack","seq":%d,"ok":false,"code":"busy","msg":"\\udfff"}\n' % seq,
        b'{"t":"ack","seq":%d,"ok":true,"result":{}}\n' % (seq + 1000),  # an unknown seq
    ]


PROTOCOL_ERRORS = 7
LATE_REPLIES = 1


class HostileDevice:
    """A raw jsonline peer on loopback: it answers the hello with a proper welcome, then
    answers each request with :func:`hostile_frames` and a good ack last."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.server: asyncio.Server | None = None
        self.requests: list[dict[str, Any]] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> HostileDevice:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.transport.abort()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            hello = json.loads(await reader.readline())
            assert hello["t"] == "hello", hello
            welcome = {"t": "welcome", "v": 1, "device": self.device_id, "fw": "6.6.6"}
            writer.write(json.dumps(welcome).encode() + b"\n")
            while line := await reader.readline():
                frame = json.loads(line)
                if frame["t"] != "req":
                    continue  # pings
                self.requests.append(frame)
                for data in hostile_frames(frame["seq"]):
                    writer.write(data)
                    await writer.drain()
                good = {"t": "ack", "seq": frame["seq"], "ok": True, "result": {"done": 1}}
                writer.write(json.dumps(good).encode() + b"\n")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the gateway went away
        finally:
            writer.close()


async def test_protocol_errors_reach_the_device_view_and_metrics_and_never_kill_the_link(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="keeplink")
    async with HostileDevice("dev1") as device:
        async with gateway({"id": "dev1", "port": device.port}) as (_, http):
            started = time.time()
            answer = await submit(http, "dev1")
            command_id = answer["id"]

            async def final() -> bool:
                return await command_state(http, command_id) not in ("queued", "sending")

            await eventually_async(final)
            command = await get(http, f"/api/commands/{command_id}")
            view = await get(http, "/api/devices/dev1")
            async with http.get("/metrics") as response:
                metrics = await response.text()
    # Nothing lost: the good ack after the babble delivered the command, once.
    assert command["state"] == "succeeded", command
    assert command["result"] == {"done": 1}
    assert len(device.requests) == 1
    link = view["link"]
    assert (link["state"], link["connects"], link["disconnects"]) == ("connected", 1, 0)
    assert link["last_error"] is None  # the link itself never failed
    errors = link["protocol_errors"]
    assert errors["count"] == PROTOCOL_ERRORS
    last = errors["last"]
    assert last["code"] == "protocol_error"
    assert "unpaired UTF-16 surrogate" in last["message"]
    assert started - 1 <= last["at"] <= time.time() + 1  # epoch seconds
    late = link["late_replies"]
    assert late["count"] == LATE_REPLIES
    assert late["last"]["seq"] == device.requests[0]["seq"] + 1000
    assert started - 1 <= late["last"]["at"] <= time.time() + 1
    for sample in (
        f'keeplink_device_protocol_errors_total{{device="dev1"}} {PROTOCOL_ERRORS}.0',
        f'keeplink_device_late_replies_total{{device="dev1"}} {LATE_REPLIES}.0',
        'keeplink_device_reconnects_total{device="dev1"} 0.0',
        'keeplink_device_requests_total{device="dev1",outcome="acknowledged"} 1.0',
    ):
        assert sample in metrics, metrics
    reasons = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert any("longer than 65536 bytes" in m for m in reasons), reasons
    assert any("nested too deeply" in m for m in reasons), reasons  # 5,000 deep
    assert any("nested deeper than 64 levels" in m for m in reasons), reasons  # 200 deep
    no_tracebacks(caplog)


async def eventually_async(predicate: Any) -> None:
    """Poll an async predicate (the live API) until it holds; fail after IO_BOUND_S."""
    async with asyncio.timeout(IO_BOUND_S):
        while not await predicate():  # noqa: ASYNC110 - polls the live API
            await asyncio.sleep(0.02)


async def test_a_parked_device_is_resumed_on_request(tmp_path: Any) -> None:
    """The breaker parked the device (its reason says to resume it, or wait): POST
    /api/devices/{id}/resume delivers now; a device not parked is left alone."""
    db = tmp_path / "keeplink.db"
    async with SqliteStore(db) as store:  # parked before this gateway started, for a day
        await store.put_device(
            DeviceRecord(
                device="dev1",
                failed_cycles=5,
                parked_reason="delivery parked: 5 delivery cycles in a row failed",
                parked_until=time.time() + 86_400,
            )
        )
    async with DeviceSimulator(device_id="dev1") as sim:
        device = {"id": "dev1", "driver": "jsonline", "port": sim.port, "backoff": FAST}
        config = parse_config(
            {
                "gateway": {"listen": "127.0.0.1:0", "store": f"sqlite:///{db}", "token": TOKEN},
                "devices": [device],
            }
        )
        server = Server(config, token=TOKEN)
        await server.start()
        try:
            async with aiohttp.ClientSession(base_url=server.url) as http:
                view = await get(http, "/api/devices/dev1")
                assert view["parked"]["reason"].startswith("delivery parked"), view
                answer = await submit(http, "dev1")
                await eventually(lambda: server.gateway.links["dev1"].state is LinkState.CONNECTED)
                await asyncio.sleep(0.3)
                assert sim.applied == []  # parked: nothing goes out
                assert await command_state(http, answer["id"]) == "queued"

                assert (await post(http, "/api/devices/dev1/resume", headers={}))[0] == 401
                assert (await post(http, "/api/devices/nope/resume"))[0] == 404
                status, body = await post(http, "/api/devices/dev1/resume")
                assert (status, body["resumed"]) == (202, True), body
                assert body["device"]["parked"] is None
                await eventually(lambda: bool(sim.applied))
                status, body = await post(http, "/api/devices/dev1/resume")
                assert (status, body["resumed"]) == (202, False)
                assert "not parked" in body["note"]
        finally:
            await server.stop()
    async with SqliteStore(db) as store:  # and it stays resumed
        record = await store.get_device("dev1")
        assert record is not None and record.parked_reason is None


async def test_presence_and_the_outbox_keep_one_clock() -> None:
    """The outbox compares when a device came online (presence's clock) with its own time
    (a wall clock: deadlines outlive the process), so both must be one clock; the gateway's
    tracker ran on the monotonic clock, which put every device online for decades."""
    async with DeviceSimulator(device_id="dev1") as sim:
        async with gateway({"id": "dev1", "port": sim.port}) as (server, _):
            presence, outbox = server.gateway.presence, server.gateway.outbox
            await eventually(lambda: presence.presence("dev1").value == "online")
            since = presence.online_since("dev1")
            assert since is not None
            assert 0 <= outbox.clock.now() - since < IO_BOUND_S
