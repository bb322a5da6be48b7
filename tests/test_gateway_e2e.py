"""Black-box acceptance of the gateway: ``keeplink serve`` and ``keeplink sim``
run as subprocesses; the test speaks only HTTP and WebSocket to them.

The subprocess, port and config helpers live in gateway_procs.py (shared with other
test modules); the ``procs`` fixture is in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway_procs import START_BOUND_S, TOKEN, Events, Procs, write_config
from keeplink.testing import free_port

DELIVERY_BOUND_S = 30.0


# ---------------------------------------------------------------------------- helpers


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
