"""Gateway and simulator subprocesses for black-box tests, shared by several test
modules (test_gateway_e2e.py, test_cli_client.py, test_api_schema.py, test_fleet_e2e.py,
...): ``keeplink serve`` and ``keeplink sim`` run as subprocesses, with config files,
free ports and a WebSocket event subscriber. Not a test module: test modules import
from here, never from each other. The ``procs`` fixture lives in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

TOKEN = "e2e-token-0123456789"
START_BOUND_S = 30.0
"""A safety bound for a subprocess to start or stop (slow CI machines), never a timing rule."""


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
