"""The client commands (``keeplink devices | send | commands | cancel``), run as a user runs
them: real CLI subprocesses against a real ``keeplink serve`` and ``keeplink sim``
subprocesses. Every documented exit code is produced for real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import pty
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import keeplink.cli
from gateway_procs import START_BOUND_S, TOKEN, Procs, write_config
from keeplink._core.commands import new_command
from keeplink.gateway.config import parse_config
from keeplink.gateway.server import Server
from keeplink.testing import free_port

CLI_BOUND_S = 60.0


def _cli_prefix() -> list[str]:
    """``python -m keeplink`` once cli.py dispatches the client commands; until then the
    stand-alone entry point of the same code."""
    wired = "cli_client" in Path(keeplink.cli.__file__).read_text()
    return [sys.executable, "-m", "keeplink" if wired else "keeplink.cli_client"]


CLI = _cli_prefix()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KEEPLINK_URL", "KEEPLINK_TOKEN")}
    env.update(extra)
    return env


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env=env if env is not None else _env(),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_BOUND_S)
    except BaseException:  # cancelled or timed out: never leave the CLI running
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class World:
    """One gateway for the module, with ``hall`` (its simulator running), ``attic`` (never
    reachable: the away device) and ``porch`` (its simulator started by one test)."""

    def __init__(self, procs: Procs, tmp_path: Path) -> None:
        self.procs = procs
        self.tmp_path = tmp_path
        self.ports = {"hall": free_port(), "attic": free_port(), "porch": free_port()}
        self.url = ""

    def start(self) -> World:
        config = write_config(self.tmp_path / "keeplink.toml", devices=self.ports)
        self.procs.sim("hall", self.ports["hall"]).start_ready_sync()
        self.url = self.procs.gateway(config).start_ready_sync()
        deadline = time.monotonic() + START_BOUND_S
        while self.device("hall")["presence"] != "online":
            assert time.monotonic() < deadline, "hall never came online"
            time.sleep(0.05)
        return self

    def device(self, device_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/api/devices/{device_id}", timeout=10) as r:
            view: dict[str, Any] = json.loads(r.read())
        return view

    def command(self, command_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/api/commands/{command_id}", timeout=10) as r:
            command: dict[str, Any] = json.loads(r.read())
        return command

    async def cli(
        self, *args: str, token: str | None = TOKEN, url: str | None = None
    ) -> tuple[int, str, str]:
        extra = ["--token", token] if token is not None else []
        return await run(*args, "--url", url or self.url, *extra)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp_path = tmp_path_factory.mktemp("cli")
    procs = Procs(tmp_path)
    try:
        yield World(procs, tmp_path).start()
    finally:
        procs.cleanup()


def _first_id(out: str) -> str:
    match = re.match(r"([0-9a-f]{32}) ", out)
    assert match, out
    return match.group(1)


async def test_devices_table_and_json(world: World) -> None:
    code, out, err = await world.cli("devices")
    assert code == 0, err
    lines = out.splitlines()
    assert re.match(r"ID\s+PRESENCE\s+LINK\s+QUEUED\s+LAST ERROR\s+RETRY IN$", lines[0]), out
    rows = {line.split()[0]: line for line in lines[1:]}
    assert re.match(r"hall\s+online\s+connected\s+0\s", rows["hall"]), out
    # attic has never been reachable: its link says why, and when it tries again.
    assert re.match(r"attic\s+(unknown|offline)\s+\w+\s+0\s+connection_failed: ", rows["attic"])
    assert len(rows["attic"]) < 140  # the message is truncated, not a wall of text

    code, out, err = await world.cli("devices", "--json")
    assert code == 0, err
    document = json.loads(out)  # exactly one JSON document
    assert [d["id"] for d in document["devices"]] == ["hall", "attic", "porch"]
    assert document["devices"][0]["link"]["state"] == "connected"


async def test_send_to_an_away_device_queues_parses_args_and_cancel(world: World) -> None:
    code, out, err = await world.cli(
        "send", "attic", "set", "t=21.5", "on=true", "--key", "heat", "name=kitchen",
        'obj={"a":1}', 'quoted="5"', "--ttl", "3600", "n=null", "empty=",
        "--max-attempts", "5",  # options may sit between the arguments
    )  # fmt: skip
    assert code == 0, err
    command_id = _first_id(out)
    assert out.splitlines()[0] == f"{command_id} queued"
    assert "queued: attic is away; it will be delivered when it is back" in out

    command = world.command(command_id)
    assert command["args"] == {
        "t": 21.5,
        "on": True,
        "name": "kitchen",
        "obj": {"a": 1},
        "quoted": "5",
        "n": None,
        "empty": "",
    }
    assert command["key"] == "heat"
    assert command["max_attempts"] == 5
    assert command["expires_at"] is not None

    code, out, err = await world.cli("commands", "--device", "attic", "--state", "queued")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert re.match(r"ID\s+DEVICE\s+OP\s+STATE\s+ATTEMPTS\s+AGE\s+WAITING\s+LAST ERROR$", header)
    (row,) = [r for r in rows if r.startswith(command_id)]
    assert all(re.search(r"\sattic\s+set\s+queued\s", r) for r in rows), rows
    # attic is away: its link is not connected, which the WAITING column says.
    assert re.match(rf"{command_id}\s+attic\s+set\s+queued\s+0/5\s+\d+s\s+link_down\s+-$", row), row

    # --json: the API's answer, one document.
    code, out, err = await world.cli("send", "attic", "set", "t=19", "--key", "heat", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["state"] == "queued"
    assert answer["device_presence"] in ("unknown", "offline")
    assert (world.command(command_id))["state"] == "superseded"

    code, out, err = await world.cli("cancel", answer["id"])
    assert code == 0, err
    assert out.strip() == f"{answer['id']} cancelled"
    code, out, err = await world.cli("cancel", answer["id"])
    assert code == 1
    assert re.match(r"keeplink: \[conflict\] .*already cancelled", err), err
    code, out, err = await world.cli("commands", "--state", "cancelled,superseded", "--json")
    assert code == 0, err
    assert {c["state"] for c in json.loads(out)["commands"]} == {"cancelled", "superseded"}


async def test_cancel_takes_a_unique_prefix_of_the_id(world: World) -> None:
    code, out, err = await world.cli("send", "attic", "set", "v=8")
    assert code == 0, err
    command_id = _first_id(out)
    code, out, err = await world.cli("cancel", command_id[:8])  # the short id shown
    assert code == 0, err
    assert out.strip() == f"{command_id} cancelled"
    assert world.command(command_id)["state"] == "cancelled"


async def test_cancel_of_a_prefix_of_several_ids_exits_2_listing_them(tmp_path: Path) -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    config = {
        "gateway": {"listen": "127.0.0.1:0", "store": "memory:", "token": TOKEN},
        "devices": [{"id": "away", "driver": "jsonline", "port": dead.getsockname()[1]}],
    }
    server = Server(parse_config(config, source="test_cli_client"), token=TOKEN)
    ids = ["997e657c" + "0" * 24, "997e657d" + "0" * 24]
    try:
        await server.start()
        for command_id in ids:  # ids chosen to share a prefix: straight into the store
            command = new_command(device="away", op="set", args={}, now=time.time())
            await server.gateway.store.insert(dataclasses.replace(command, id=command_id))
        ambiguous = await run("cancel", "997e65", "--url", server.url, "--token", TOKEN)
        unknown = await run("cancel", "997e65f", "--url", server.url, "--token", TOKEN)
        unique = await run("cancel", "997e657c", "--url", server.url, "--token", TOKEN)
        states = [(await server.gateway.store.get(i)) for i in ids]
    finally:
        await server.stop()
        dead.close()
    code, out, err = ambiguous
    assert (code, out) == (2, "")
    assert err.strip() == (
        "keeplink: [invalid_request] '997e65' is ambiguous: it starts the ids of 2 commands: "
        f"{ids[0]}, {ids[1]}; give more of the id"
    )
    code, out, err = unknown
    assert (code, out) == (5, "")
    assert "[command_not_found] no command '997e65f', nor one whose id starts with it" in err
    assert unique[:2] == (0, f"{ids[0]} cancelled\n"), unique
    assert [c.state.value for c in states if c is not None] == ["cancelled", "queued"]


async def test_send_wait_follows_the_command_to_success(world: World) -> None:
    code, out, err = await world.cli("send", "hall", "set", "target=21.5", "--wait")
    assert code == 0, err
    lines = out.splitlines()
    command_id = _first_id(out)
    assert lines[0] == f"{command_id} queued"
    assert lines[-1] == f'{command_id} succeeded {{"state":{{"target":21.5}}}}'

    code, out, err = await world.cli("send", "hall", "echo", "x=1", "--wait", "--json")
    assert code == 0, err
    final = json.loads(out)
    assert final["state"] == "succeeded"
    assert final["result"] == {"x": 1}


async def test_send_wait_waits_for_the_device_to_come_back(world: World) -> None:
    waiting = asyncio.ensure_future(world.cli("send", "porch", "set", "v=1", "--wait"))
    try:
        await asyncio.sleep(1.5)  # the CLI is following the event stream by now
        assert not waiting.done()
        await world.procs.sim("porch", world.ports["porch"]).start_ready()
        code, out, err = await asyncio.wait_for(waiting, CLI_BOUND_S)
    finally:
        if not waiting.done():
            waiting.cancel()
    assert code == 0, err
    assert "queued: porch is away; it will be delivered when it is back" in out
    assert "porch is online" in out
    assert "sending (attempt 1 of 3)" in out
    assert re.search(r"succeeded \{\"state\":\{\"v\":1\}\}$", out.strip()), out


def _commands_of(url: str, device: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/commands?device={device}", timeout=10) as r:
        commands: list[dict[str, Any]] = json.loads(r.read())["commands"]
    return commands


async def _stored(url: str, device: str) -> None:
    """Wait until the gateway has stored a command for ``device``: the CLI, started a moment
    ago, has submitted it (on a busy machine its start alone can take seconds)."""
    deadline = time.monotonic() + CLI_BOUND_S
    while not await asyncio.to_thread(_commands_of, url, device):
        assert time.monotonic() < deadline, f"the CLI never submitted a command for {device}"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_send_wait_follows_the_command_across_a_gateway_restart(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        port, device_port = free_port(), free_port()
        config = write_config(
            tmp_path / "fixed.toml", devices={"shed": device_port}, listen=f"127.0.0.1:{port}"
        )
        gateway = procs.gateway(config)
        url = await gateway.start_ready()
        waiting = asyncio.ensure_future(
            run("send", "shed", "set", "v=4", "--wait", "--url", url, "--token", TOKEN)
        )
        try:
            await _stored(url, "shed")
            await asyncio.sleep(1)  # the CLI, past its submit, is following the stream
            assert await gateway.stop() == 0
            await asyncio.sleep(1)  # the CLI finds no gateway for a while
            assert await procs.gateway(config).start_ready() == url
            await procs.sim("shed", device_port).start_ready()
            code, out, err = await asyncio.wait_for(waiting, CLI_BOUND_S)
        finally:
            if not waiting.done():
                waiting.cancel()
        assert code == 0, (out, err)
        assert re.search(r"succeeded \{\"state\":\{\"v\":4\}\}$", out.strip()), out
    finally:
        procs.cleanup()


async def test_send_wait_on_a_rejected_command_exits_1(world: World) -> None:
    code, out, err = await world.cli("send", "hall", "fail", "code=rejected", "--wait")
    assert code == 1
    assert re.search(r"[0-9a-f]{32} rejected$", out.strip()), out
    assert err.strip() == "keeplink: [rejected] told to fail"


async def test_send_wait_timeout_exits_6_and_the_command_stays(world: World) -> None:
    code, out, err = await world.cli("send", "attic", "set", "v=2", "--wait", "--wait-timeout", "1")
    assert code == 6
    assert re.match(
        r"keeplink: \[timeout\] command [0-9a-f]{32} is still queued after 1 s; "
        r"it stays queued and will be delivered when attic is back",
        err,
    ), err
    assert (world.command(_first_id(out)))["state"] == "queued"


@pytest.mark.slow
@pytest.mark.timeout(180)  # ~20 CLI processes: slow on a busy 2-core machine
async def test_exit_codes(world: World) -> None:
    missing = world.tmp_path / "missing.bin"
    # (arguments, a token or the URL of no gateway, exit code, last line of stderr)
    cases: list[tuple[list[str], str | None, int, str]] = [
        # 3: nothing listens there.
        (
            ["devices"],
            f"http://127.0.0.1:{free_port()}",
            3, r"keeplink: \[connection_failed\] cannot reach the gateway at http://",
        ),
        # 4: a wrong token, and none at all.
        (
            ["send", "hall", "set", "a=1"],
            "wrong", 4, r"keeplink: \[auth_failed\] the bearer token is not valid$",
        ),
        (
            ["send", "hall", "set", "a=1"],
            None, 4, r"keeplink: \[auth_failed\] .*no token given: use --token or KEEPLINK_TOKEN",
        ),
        (["cancel", "0" * 32], None, 4, r"keeplink: \[auth_failed\] "),
        # 5: unknown device, unknown command.
        (["send", "nope", "set"], TOKEN, 5, r"keeplink: \[device_not_found\] no device 'nope'$"),
        (["cancel", "0" * 32], TOKEN, 5, r"keeplink: \[command_not_found\] "),
        (["commands", "--device", "nope"], TOKEN, 5, r"keeplink: \[device_not_found\] "),
        (["reconnect", "nope"], TOKEN, 5, r"keeplink: \[device_not_found\] no device 'nope'$"),
        (["reconnect", "attic"], None, 4, r"keeplink: \[auth_failed\] .*no token given"),
        # 1: the gateway refuses the command itself (422).
        (
            ["send", "hall", ""],
            TOKEN, 1, r"keeplink: \[invalid_request\] op: String should have at least 1 character",
        ),
        # 2: bad usage, caught before anything is sent.
        (["send", "hall"], TOKEN, 2, r"required: OP"),
        (["send", "hall", "set", "novalue"], TOKEN, 2, r"key=value"),
        (["send", "hall", "set", "=1"], TOKEN, 2, r"key=value"),
        (["send", "hall", "set", "a=1", "a=2"], TOKEN, 2, r"'a' given twice"),
        (["send", "hall", "set", "--ttl", "-1"], TOKEN, 2, r"--ttl"),
        (["send", "hall", "set", "--max-attempts", "0"], TOKEN, 2, r"--max-attempts"),
        (["send", "hall", "firmware", f"path={missing}"], TOKEN, 2, r"cannot read the firmware"),
        (["commands", "--state", "bogus"], TOKEN, 2, r"unknown state 'bogus'"),
        (["devices", "--timeout", "0"], TOKEN, 2, r"--timeout"),
        (["frobnicate"], TOKEN, 2, r"invalid choice"),
    ]  # fmt: skip
    results = await asyncio.gather(
        *(
            world.cli(*args, url=other)
            if other and other.startswith("http")
            else world.cli(*args, token=other)
            for args, other, _, _ in cases
        ),
        run("devices", "--url", "not-a-url"),
    )
    cases.append((["devices", "--url", "not-a-url"], None, 2, r"must look like http://host:port"))
    for (args, _, expected, pattern), (code, out, err) in zip(cases, results, strict=True):
        assert code == expected, (args, out, err)
        assert out == "", args  # errors never go to stdout
        assert re.search(pattern, err.strip().splitlines()[-1]), (args, err)


async def test_send_of_a_command_that_could_never_be_delivered_exits_1_at_once(
    world: World, tmp_path: Path
) -> None:
    image = _image(tmp_path)
    before = json.loads((await world.cli("commands", "--json"))[1])["commands"]
    results = await asyncio.gather(
        world.cli("send", "hall", "firmware"),
        world.cli("send", "hall", "firmware", f"path={image}", "sha256=abc"),
    )
    assert [(code, out) for code, out, _ in results] == [(1, ""), (1, "")], results
    assert [err.strip() for _, _, err in results] == [
        "keeplink: [invalid_request] firmware: args.path is required: the image file to send",
        "keeplink: [invalid_request] firmware: args.sha256 must be 64 lowercase hex digits, "
        "got 'abc'",
    ]
    after = json.loads((await world.cli("commands", "--json"))[1])["commands"]
    assert [c["id"] for c in after] == [c["id"] for c in before]  # nothing was stored


async def test_reconnect_makes_a_backing_off_link_try_again_now(world: World) -> None:
    # attic is never reachable: its link waits out a backoff, or is trying right now.
    code, out, err = await world.cli("reconnect", "attic")
    assert code == 0, err
    assert re.match(
        r"attic: (woken: the link skips the rest of its backoff wait"
        r"|none: nothing to do: the link is (connecting|lost))$",
        out.strip(),
    ), out
    code, out, err = await world.cli("reconnect", "hall", "--json")
    assert code == 0, err
    answer = json.loads(out)  # exactly one JSON document: the API's answer
    assert answer["reconnect"] == "none"  # hall is connected: nothing to do
    assert answer["device"]["link"]["state"] == "connected"


async def test_environment_supplies_url_and_token(world: World) -> None:
    env = _env(KEEPLINK_URL=world.url, KEEPLINK_TOKEN=TOKEN)
    code, out, err = await run("send", "hall", "echo", "--wait", "--json", env=env)
    assert code == 0, err
    assert json.loads(out)["state"] == "succeeded"
    code, out, err = await run("devices", env=_env(KEEPLINK_URL=world.url))
    assert code == 0, err
    assert out.startswith("ID")


def _image(tmp_path: Path, size: int = 96 * 1024) -> Path:
    image = tmp_path / "fw.bin"
    image.write_bytes(hashlib.sha256(b"seed").digest() * (size // 32))
    return image


async def test_firmware_wait_prints_progress_lines_when_not_a_tty(
    world: World, tmp_path: Path
) -> None:
    image = _image(tmp_path)
    code, out, err = await world.cli("send", "hall", "firmware", f"path={image}", "--wait")
    assert code == 0, err
    progress = re.findall(r"^firmware +(\d+\.\d)% .* of 96\.0 KiB .*/s", out, re.MULTILINE)
    assert progress, out
    assert progress[-1] == "100.0"
    assert [float(p) for p in progress] == sorted(float(p) for p in progress)
    assert "\r" not in out
    assert re.search(r"succeeded \{.*\"installed\":true", out), out
    command = world.command(_first_id(out))
    assert command["args"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert command["args"]["size"] == image.stat().st_size


def _run_in_pty(args: list[str]) -> tuple[int, str]:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=secondary, stderr=subprocess.PIPE, env=_env()
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    code = proc.wait(CLI_BOUND_S)
    assert proc.stderr is not None
    proc.stderr.close()
    return code, b"".join(chunks).decode(errors="replace")


async def test_firmware_wait_shows_a_progress_bar_on_a_tty(world: World, tmp_path: Path) -> None:
    image = _image(tmp_path)
    args = [*CLI, "send", "hall", "firmware", f"path={image}", "--wait"]
    code, out = await asyncio.to_thread(_run_in_pty, [*args, "--url", world.url, "--token", TOKEN])
    assert code == 0, out
    assert "\rfirmware [" in out
    assert re.search(r"\rfirmware \[#{30}\] 100\.0%", out), out
    assert "succeeded" in out.splitlines()[-1]


async def test_a_cancelled_wait_keeps_the_command(world: World) -> None:
    """Ctrl-C while waiting ends the CLI (130); the command stays stored."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, "send", "attic", "set", "v=3", "--wait", "--url", world.url, "--token", TOKEN,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), CLI_BOUND_S)
    command_id = _first_id(first.decode())
    await asyncio.sleep(0.5)
    proc.send_signal(2)  # SIGINT
    _, err = await asyncio.wait_for(proc.communicate(), CLI_BOUND_S)
    assert proc.returncode == 130, err
    assert (world.command(command_id))["state"] == "queued"
