"""``GET /api/commands?order=newest`` past 10,000 commands: answered by the store, newest
first, against a real ``keeplink serve`` on a database that already holds 20,000."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import requests
from gateway_procs import Procs, write_config
from keeplink._core.commands import new_command
from keeplink.outbox import SqliteStore
from keeplink.outbox.store import Insert
from keeplink.testing import free_port

COMMANDS = 20_000


async def _fill(path: Path) -> list[str]:
    """20,000 queued commands for the away device, in submission order; their ids."""
    ids: list[str] = []
    async with SqliteStore(path, synchronous="NORMAL") as store:
        for start in range(0, COMMANDS, 1000):
            commands = [
                new_command(device="attic", op="set", args={"n": n}, now=1.8e9 + n)
                for n in range(start, start + 1000)
            ]
            await store.apply([Insert(c) for c in commands])  # one call, in order
            ids += [c.id for c in commands]
    return ids


@pytest.mark.slow
def test_newest_is_the_real_newest_past_ten_thousand(tmp_path: Path, procs: Procs) -> None:
    store = tmp_path / "store.db"
    ids = asyncio.run(_fill(store))
    config = write_config(tmp_path / "keeplink.toml", devices={"attic": free_port()})
    url = procs.gateway(config).start_ready_sync()
    got = requests.get(
        f"{url}/api/commands", params={"order": "newest", "limit": "200"}, timeout=30
    )
    oldest = requests.get(f"{url}/api/commands", params={"limit": "3"}, timeout=30)
    one_device = requests.get(
        f"{url}/api/commands",
        params={"order": "newest", "limit": "5", "device": "attic", "state": "queued"},
        timeout=30,
    )
    assert got.status_code == 200, got.text
    assert [c["id"] for c in got.json()["commands"]] == ids[::-1][:200]
    assert [c["args"]["n"] for c in got.json()["commands"]][:3] == [19_999, 19_998, 19_997]
    assert [c["id"] for c in oldest.json()["commands"]] == ids[:3]
    assert [c["id"] for c in one_device.json()["commands"]] == ids[::-1][:5]
    waiting = got.json()["commands"][0]["waiting"]
    assert waiting["reason"] in ("link_down", "device_offline")  # the device is away
