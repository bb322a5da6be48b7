"""Firmware transfer that resumes after drops; the dispatcher killed with SIGKILL, for real."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from keeplink import Backoff, Link
from keeplink._core.commands import FINAL_STATES, CommandState
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import FirmwareProgress, FirmwareTransfer, Outbox, SqliteStore
from keeplink.outbox.firmware import image_matches
from keeplink.presence import PresenceTracker
from keeplink.testing import DeviceSimulator, FaultProxy

Q = CommandState
CHILD = Path(__file__).with_name("outbox_child.py")


@pytest.mark.slow
async def test_a_firmware_image_resumes_from_the_devices_offset_after_each_reset(
    tmp_path: Path,
) -> None:
    image = random.Random(7).randbytes(1024 * 1024)  # 1 MiB
    path = tmp_path / "fw-2.0.0.bin"
    path.write_bytes(image)
    digest = hashlib.sha256(image).hexdigest()
    async with DeviceSimulator(device_id="ota") as sim:
        async with FaultProxy(sim.host, sim.port, name="ota") as proxy:
            proxy.set_reset_after(200 * 1024, direction="up")  # every connection dies at 200 KiB
            presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=0.0)
            outbox = Outbox(
                SqliteStore(tmp_path / "outbox.db"),
                presence=presence,
                executors={"firmware": FirmwareTransfer()},  # the defaults
            )
            outbox.preconditions["image_matches"] = image_matches
            progress: list[FirmwareProgress] = []
            outbox.subscribe(
                lambda e: progress.append(e) if isinstance(e, FirmwareProgress) else None
            )
            link = Link(
                JsonLineDriver(host=proxy.host, port=proxy.port),
                name="ota",
                heartbeat_s=None,
                backoff=Backoff(initial_s=0.01, cap_s=0.05),
            )
            await outbox.start()
            try:
                command = await outbox.submit(
                    "ota",
                    "firmware",
                    {"path": str(path), "sha256": digest, "size": len(image)},
                    precondition="image_matches",
                )
                assert command.state is Q.QUEUED  # the device is not there yet
                await outbox.attach("ota", link)
                link.start()
                async with asyncio.timeout(60):
                    done = await outbox.wait(command.id)
            finally:
                await link.stop()
                await outbox.close()
                presence.close()
    assert done.state is Q.SUCCEEDED, done.last_error
    assert sim.firmware_images == [image]  # the device verified the hash and installed it
    assert done.result is not None
    resumes, sent = done.result["resumes"], done.result["bytes_sent"]
    print(
        f"\nfirmware: {len(image)} bytes, {resumes} resumes, {sent - len(image)} bytes re-sent "
        f"({100 * (sent - len(image)) / len(image):.1f}%)"
    )
    assert resumes >= 5  # 1 MiB of base64 through 200 KiB connections: several resets
    assert sent - len(image) < 0.10 * len(image), f"re-sent {sent - len(image)} bytes"
    assert progress[-1].offset == len(image)
    assert progress[-1].percent == 100.0
    offsets = [p.offset for p in progress]
    assert offsets == sorted(offsets)  # progress only moves forward
    assert {p.resumes for p in progress} >= set(range(resumes))


async def test_each_resume_starts_at_exactly_the_offset_the_device_reported(
    tmp_path: Path,
) -> None:
    """Not one byte before it (re-sending what the device holds) nor after it (a gap): on
    every connection, the first chunk starts where ``ota.begin`` said the device stands,
    and each next chunk where the previous one ended."""
    chunk = 4096
    image = random.Random(11).randbytes(24 * chunk + 100)
    path = tmp_path / "fw.bin"
    path.write_bytes(image)
    digest = hashlib.sha256(image).hexdigest()
    async with DeviceSimulator(device_id="ota") as sim:
        async with FaultProxy(sim.host, sim.port, name="ota") as proxy:
            proxy.set_reset_after(5 * chunk * 4 // 3, direction="up")  # ~5 chunks a connection
            presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=0.0)
            outbox = Outbox(
                SqliteStore(tmp_path / "outbox.db"),
                presence=presence,
                executors={"firmware": FirmwareTransfer(chunk_size=chunk)},
            )
            link = Link(
                JsonLineDriver(host=proxy.host, port=proxy.port),
                name="ota",
                heartbeat_s=None,
                backoff=Backoff(initial_s=0.01, cap_s=0.05),
            )
            await outbox.start()
            try:
                await outbox.attach("ota", link)
                link.start()
                command = await outbox.submit(
                    "ota", "firmware", {"path": str(path), "sha256": digest, "size": len(image)}
                )
                async with asyncio.timeout(60):
                    done = await outbox.wait(command.id)
            finally:
                await link.stop()
                await outbox.close()
                presence.close()
    assert done.state is Q.SUCCEEDED, done.last_error
    assert sim.firmware_images == [image]
    assert done.result is not None and done.result["resumes"] >= 3, done.result
    # Replay what the device applied, in order: what it held at each ota.begin is the
    # offset it reported there.
    held = 0
    expected: dict[int, int] = {}  # connection -> where its next chunk must start
    starts: list[tuple[int, int, int]] = []  # (connection, reported, first chunk offset)
    for step in sim.applied:
        if step.op == "ota.begin":
            expected[step.connection] = held
            starts.append((step.connection, held, -1))
        elif step.op == "ota.chunk":
            offset, size = step.args["offset"], len(base64.b64decode(step.args["data"]))
            want = expected[step.connection]
            if starts and starts[-1][0] == step.connection and starts[-1][2] == -1:
                starts[-1] = (step.connection, want, offset)
            assert offset == want, (
                f"connection {step.connection}: a chunk at offset {offset}, where the "
                f"device stood at {want} (it reported {starts[-1][1]} at ota.begin)"
            )
            held = offset + size
            expected[step.connection] = held
    resumed = [s for s in starts[1:] if s[2] != -1]
    assert len(resumed) >= 3, starts  # the check above ran on several resumes
    assert all(reported > 0 for _, reported, _ in resumed), starts


async def run_child(db: Path, sim: DeviceSimulator, *, kill_after: float | None) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), str(db), sim.host, str(sim.port), "dev",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        started = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert started == b"started\n", (started, await proc.stderr.read())  # type: ignore[union-attr]
        if kill_after is None:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, err.decode()
            return out.decode()
        await asyncio.sleep(kill_after)  # a random moment mid-delivery (not a timing rule)
        if proc.returncode is not None:
            return "finished before the kill"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        return "killed"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(180)  # 15-25 s alone; bounded for a loaded machine
async def test_sigkill_at_random_points_loses_nothing_and_applies_nothing_twice(
    tmp_path: Path,
) -> None:
    db = tmp_path / "outbox.db"
    rng = random.Random(1234)
    # 5 ms an ack: 500 commands take a few seconds, so the 20 kills land mid-delivery.
    async with DeviceSimulator(device_id="dev", ack_delay_s=0.005) as sim:
        store = SqliteStore(db)
        outbox = Outbox(store)
        await outbox.start()
        ids = [(await outbox.submit("dev", "set", {"n": n})).id for n in range(500)]
        await outbox.close()

        kills = 0
        for _ in range(20):
            if await run_child(db, sim, kill_after=rng.uniform(0.02, 0.25)) == "killed":
                kills += 1
        out = await run_child(db, sim, kill_after=None)  # one last run, to completion
        assert "done" in out

        store = SqliteStore(db)
        await store.open()
        try:
            commands = [await store.get(i) for i in ids]
        finally:
            await store.close()
    print(
        f"\ncrash safety: {kills} SIGKILLs mid-delivery; device dropped "
        f"{sim.statistics().duplicates} duplicate deliveries by idempotency key"
    )
    assert kills >= 15  # most runs really died mid-delivery
    assert all(c is not None for c in commands)  # nothing lost
    states = Counter(c.state for c in commands if c is not None)
    assert set(states) <= FINAL_STATES
    assert states[Q.SUCCEEDED] == 500
    applied = Counter(c.key for c in sim.applied)
    assert len(applied) == 500
    assert max(applied.values()) == 1  # the device applied each exactly once
    assert sorted(c.args["n"] for c in sim.applied) == list(range(500))


async def run_submitting_child(
    db: Path, sim: DeviceSimulator, *, submits: int, first: int, kill_after: float
) -> tuple[list[str], bool]:
    """The child submitting ``submits`` commands with 32 producers while it delivers; the
    ids whose submit returned (printed before the kill), and whether it was killed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), str(db), sim.host, str(sim.port), "dev",
        str(submits), str(first),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    submitting = asyncio.Event()

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            lines.append(line.decode().strip())
            if lines[-1].startswith("S "):
                submitting.set()

    reader = asyncio.create_task(read())
    try:
        await asyncio.wait_for(submitting.wait(), 30)
        await asyncio.sleep(kill_after)  # a random moment of the submits (not a timing rule)
        killed = proc.returncode is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await asyncio.wait_for(reader, 10)  # everything it printed before it died
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
    return [line.split()[1] for line in lines if line.startswith("S ")], killed


@pytest.mark.slow
@pytest.mark.timeout(180)  # 15-25 s alone; bounded for a loaded machine
async def test_sigkill_mid_group_commit_loses_no_returned_submit(tmp_path: Path) -> None:
    """32 producers submit while the dispatcher delivers, so every commit carries many
    callers' writes; a SIGKILL at a random moment must lose none that returned."""
    db = tmp_path / "outbox.db"
    rng = random.Random(4321)
    async with DeviceSimulator(device_id="dev", ack_delay_s=0.002) as sim:
        returned: list[str] = []
        kills = mid_submits = 0
        for run in range(24):
            ids, killed = await run_submitting_child(
                db, sim, submits=300, first=run * 300, kill_after=rng.uniform(0.0, 0.05)
            )
            returned += ids
            kills += killed
            mid_submits += killed and 0 < len(ids) < 300  # died with submits in flight
        out = await run_child(db, sim, kill_after=None)  # one last run, to completion
        assert "done" in out
        async with SqliteStore(db) as store:
            stored = {c.id: c for c in await store.list(limit=10_000)}
    print(
        f"\ngroup-commit crash safety: {kills} SIGKILLs, {mid_submits} with submits in "
        f"flight; {len(returned)} submits returned, {len(stored)} commands stored"
    )
    assert kills >= 20
    assert mid_submits >= 15  # most kills landed among concurrent, batched submits
    missing = [command_id for command_id in returned if command_id not in stored]
    assert missing == []  # every submit that returned survived the kill
    assert {c.state for c in stored.values()} == {Q.SUCCEEDED}
    applied = Counter(c.key for c in sim.applied)
    assert max(applied.values()) == 1  # nothing applied twice
    assert set(applied) == {c.idempotency_key for c in stored.values()}
