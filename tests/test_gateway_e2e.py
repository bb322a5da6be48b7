"""Black-box acceptance of the gateway: ``keeplink serve`` and ``keeplink sim``
run as subprocesses; the test speaks only HTTP and WebSocket to them.

The helpers at the top (subprocesses, free ports, config files) are also used by
test_cli_client.py and test_api_schema.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keeplink.testing import free_port

TOKEN = "e2e-token-0123456789"
START_BOUND_S = 30.0
"""A safety bound for a subprocess to start or stop (slow CI machines), never a timing rule."""
DELIVERY_BOUND_S = 30.0


# ---------------------------------------------------------------------------- helpers


def write_config(
    path: Path,
    *,
    devices: dict[str, int],
    store: Path | None = None,
    token: str | None = TOKEN,
    listen: str = "127.0.0.1:0",
    store_url: str | None = None,
) -> Path:
    """A gateway config (loopback, port 0 by default), a SQLite store (or ``store_url``),
    quick reconnects."""
    store = store if store is not None else path.parent / "store.db"
    url = store_url if store_url is not None else f"sqlite:///{store.absolute()}"
    lines = ["[gateway]", f'listen = "{listen}"', f'store = "{url}"']
    if token is not None:
        lines.append(f'token = "{token}"')
    for device_id, port in devices.items():
        lines += [
            "",
            "[[devices]]",
            f'id = "{device_id}"',
            'driver = "jsonline"',
            f"port = {port}",
            "heartbeat_s = 1",
            "backoff = { initial_s = 0.1, cap_s = 0.5 }",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("KEEPLINK_URL", "KEEPLINK_TOKEN"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A ``python -m keeplink ...`` subprocess with stdout/stderr in files (never a full
    pipe that would block it)."""

    def __init__(self, args: list[str], log_dir: Path, name: str) -> None:
        self.args = args
        self.name = name
        self.out_path = log_dir / f"{name}.out"
        self.err_path = log_dir / f"{name}.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.max_files: int | None = None
        """RLIMIT_NOFILE (soft and hard) of the process, None: inherited."""

    def _limit(self) -> None:  # runs in the child, before exec
        if self.max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_files, self.max_files))

    def start(self) -> None:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "keeplink", *self.args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=_env(),
                preexec_fn=self._limit if self.max_files is not None else None,
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def _check_line(self, pattern: str) -> re.Match[str] | None:
        assert self.proc is not None
        match = re.search(pattern, self.stdout)
        if match is None and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited {self.proc.returncode} before printing {pattern!r}:\n"
                f"stdout: {self.stdout}\nstderr: {self.stderr}"
            )
        return match

    async def wait_line(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + START_BOUND_S
        while (match := self._check_line(pattern)) is None:
            assert time.monotonic() < deadline, f"{self.name}: no {pattern!r} in {self.stdout!r}"
            await asyncio.sleep(0.02)
        return match

    def wait_line_sync(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + START_BOUND_S
        while (match := self._check_line(pattern)) is None:
            assert time.monotonic() < deadline, f"{self.name}: no {pattern!r} in {self.stdout!r}"
            time.sleep(0.02)
        return match

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    async def stop(self) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        assert self.proc is not None
        self.terminate()
        deadline = time.monotonic() + START_BOUND_S
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"{self.name} did not exit after SIGTERM"
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def stop_sync(self) -> int:
        assert self.proc is not None
        self.terminate()
        return self.proc.wait(START_BOUND_S)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(START_BOUND_S)


class GatewayProc(Proc):
    def __init__(self, config: Path, log_dir: Path, name: str = "gateway") -> None:
        super().__init__(["serve", "--config", str(config)], log_dir, name)
        self.url = ""

    async def start_ready(self) -> str:
        self.start()
        match = await self.wait_line(r"keeplink gateway on (http://127\.0\.0\.1:\d+)")
        self.url = match.group(1)
        return self.url

    def start_ready_sync(self) -> str:
        self.start()
        match = self.wait_line_sync(r"keeplink gateway on (http://127\.0\.0\.1:\d+)")
        self.url = match.group(1)
        return self.url


class SimProc(Proc):
    def __init__(self, device_id: str, port: int, log_dir: Path, name: str | None = None):
        args = ["sim", "--port", str(port), "--device-id", device_id]
        super().__init__(args, log_dir, name or f"sim-{device_id}")

    async def start_ready(self) -> None:
        self.start()
        await self.wait_line(r"listening on 127\.0\.0\.1:\d+")

    def start_ready_sync(self) -> None:
        self.start()
        self.wait_line_sync(r"listening on 127\.0\.0\.1:\d+")


class Procs:
    """Every subprocess a test starts, killed at teardown whatever happened."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[Proc] = []
        self.counter = 0

    def _name(self, base: str) -> str:
        self.counter += 1
        return f"{base}-{self.counter}"

    def gateway(self, config: Path) -> GatewayProc:
        proc = GatewayProc(config, self.log_dir, self._name("gateway"))
        self.all.append(proc)
        return proc

    def sim(self, device_id: str, port: int) -> SimProc:
        proc = SimProc(device_id, port, self.log_dir, self._name(f"sim-{device_id}"))
        self.all.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.all:
            with contextlib.suppress(Exception):
                proc.kill()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.cleanup()


class Events:
    """A WebSocket subscriber that keeps every event the gateway sends."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Events:
        self._task = asyncio.get_running_loop().create_task(self._read(), name="e2e.ws")
        await asyncio.wait_for(self._ready.wait(), START_BOUND_S)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _read(self) -> None:
        async with self.session.ws_connect(self.url + "/api/events") as ws:
            self._ready.set()
            async for message in ws:
                if message.type is aiohttp.WSMsgType.TEXT:
                    self.events.append(json.loads(message.data))

    def of_command(self, command_id: str) -> list[dict[str, Any]]:
        return [
            e for e in self.events if e["type"] == "command" and e["command"]["id"] == command_id
        ]


async def eventually(predicate: Any, what: str, bound: float = DELIVERY_BOUND_S) -> Any:
    """Poll an async predicate until it returns a truthy value; fail after ``bound``."""
    deadline = time.monotonic() + bound
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def submit(
    session: aiohttp.ClientSession, url: str, device: str, op: str, args: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        f"{url}/api/devices/{device}/commands", json={"op": op, "args": args}, headers=AUTH
    ) as response:
        return response.status, await response.json()


async def command_in(
    session: aiohttp.ClientSession, url: str, command_id: str, *states: str
) -> dict[str, Any] | None:
    command: dict[str, Any] = await get_json(session, f"{url}/api/commands/{command_id}")
    return command if command["state"] in states else None


async def presence_is(session: aiohttp.ClientSession, url: str, device: str, presence: str) -> bool:
    view = await get_json(session, f"{url}/api/devices/{device}")
    return bool(view["presence"] == presence)


# ---------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_commands_survive_device_absence_and_gateway_restart(
    tmp_path: Path, procs: Procs, store: str, request: pytest.FixtureRequest
) -> None:
    port = free_port()  # nothing listens here until the simulator starts
    store_url = None
    if store == "postgres":
        server = request.getfixturevalue("postgres_server")
        store_url = f"{server.dsn()}?schema=e2e{uuid.uuid4().hex}"
    config = write_config(tmp_path / "keeplink.toml", devices={"hall": port}, store_url=store_url)
    gateway = procs.gateway(config)
    url = await gateway.start_ready()

    async with http() as session, Events(session, url) as events:
        # 1. The device is away: the command is stored and answered `queued`.
        status, answer = await submit(session, url, "hall", "set", {"target": 21.5})
        assert status == 202, answer
        assert answer["state"] == "queued"
        # Never seen yet: the gateway says "unknown" (presence is online, offline or unknown);
        # either way it is away, and the answer says so.
        assert answer["device_presence"] in ("offline", "unknown")
        assert "away" in answer["note"]
        first = answer["id"]
        await asyncio.sleep(0.5)
        assert await command_in(session, url, first, "queued"), "delivered to nobody?"

        # 2. The device appears: the command is delivered.
        sim = procs.sim("hall", port)
        await sim.start_ready()
        done = await eventually(
            lambda: command_in(session, url, first, "succeeded", "failed", "rejected"),
            "the first command to be final",
        )
        assert done["state"] == "succeeded", done
        assert done["result"] == {"state": {"target": 21.5}}
        assert done["attempts"] == 1
        await eventually(
            lambda: asyncio.sleep(0, result=len(events.of_command(first)) >= 3),
            "the succeeded event",
        )

        # 3. The events, in order on the WebSocket.
        seqs = [e["seq"] for e in events.events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
        mine = events.of_command(first)
        assert [e["command"]["state"] for e in mine] == ["queued", "sending", "succeeded"]
        assert [e["old"] for e in mine] == [None, "queued", "sending"]
        sending_seq = mine[1]["seq"]
        connected = [
            e
            for e in events.events
            if e["type"] == "link" and e["device"] == "hall" and e["new"] == "connected"
        ]
        online = [
            e
            for e in events.events
            if e["type"] == "presence" and e["device"] == "hall" and e["new"] == "online"
        ]
        assert connected and connected[0]["seq"] < sending_seq, events.events
        assert online and online[0]["seq"] < sending_seq, events.events
        assert mine[0]["seq"] < connected[0]["seq"]  # queued before the device was there

        # 4. The device goes away again; more commands wait for it.
        assert await sim.stop() == 0
        await eventually(lambda: presence_is(session, url, "hall", "offline"), "hall to be offline")
        later = []
        for n in (1, 2, 3):
            status, answer = await submit(session, url, "hall", "set", {"n": n})
            assert status == 202, answer
            assert answer["state"] == "queued"
            assert answer["device_presence"] == "offline"
            later.append(answer["id"])

    # 5. Restart the gateway (graceful stop, exit 0) with the same config and store.
    assert await gateway.stop() == 0, gateway.stderr
    gateway = procs.gateway(config)
    url = await gateway.start_ready()
    async with http() as session, Events(session, url) as events:
        queued = await get_json(session, f"{url}/api/commands?device=hall&state=queued")
        assert [c["id"] for c in queued["commands"]] == later  # nothing lost, still in order
        assert all(c["attempts"] == 0 for c in queued["commands"])
        view = await get_json(session, f"{url}/api/devices/hall")
        assert view["queued"] == 3
        old = await get_json(session, f"{url}/api/commands/{first}")
        assert old["state"] == "succeeded"  # history survives too

        # 6. The device is back: every waiting command is delivered, once, in order.
        sim = procs.sim("hall", port)
        await sim.start_ready()
        for n, command_id in enumerate(later, start=1):
            command = await eventually(
                lambda cid=command_id: command_in(session, url, cid, "succeeded", "failed"),
                f"command n={n} to be final",
            )
            assert command["state"] == "succeeded", command
            assert command["result"] == {"state": {"n": n}}  # FIFO: each saw its own n last
            assert command["attempts"] == 1
        sending = [
            e["command"]["id"]
            for e in events.events
            if e["type"] == "command" and e["command"]["state"] == "sending"
        ]
        assert sending == later
        view = await get_json(session, f"{url}/api/devices/hall")
        assert view["queued"] == 0
    assert await sim.stop() == 0
    assert await gateway.stop() == 0, gateway.stderr
    assert "Traceback" not in gateway.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[gateway]\nlisten = "LISTEN"\n\n[[devices]]\nid = "hall"\ndriver = "jsonline"\n'
            "port = 70000\n",
            r"devices\[0\]\.port: must be an integer in 1\.\.65535, got 70000",
        ),
        (
            '[gateway]\nlisten = "LISTEN"\nlisen = "x"\n',
            r"gateway\.lisen: unknown key",
        ),
        ("[gateway\n", r"not valid TOML"),
    ],
    ids=["bad-port", "unknown-key", "not-toml"],
)
async def test_a_bad_config_is_rejected_at_start(
    tmp_path: Path, procs: Procs, text: str, expected: str
) -> None:
    port = free_port()
    config = tmp_path / "bad.toml"
    config.write_text(text.replace("LISTEN", f"127.0.0.1:{port}"))
    gateway = procs.gateway(config)
    gateway.start()
    assert gateway.proc is not None
    code = await asyncio.wait_for(asyncio.to_thread(gateway.proc.wait), START_BOUND_S)
    assert code == 2
    err = gateway.stderr
    assert str(config) in err, err  # the file ...
    assert re.search(expected, err), err  # ... the key and what is wrong
    assert "keeplink gateway on" not in gateway.stdout  # nothing started listening
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "Traceback" not in err
