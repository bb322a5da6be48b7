"""A firmware command's args, as the transfer reads them: checked at submit (``check``, what
the gateway calls) and at delivery (a library outbox submits without the check), with one
account of what is wrong."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from keeplink import Link
from keeplink._core.commands import CommandState
from keeplink._core.errors import InvalidRequestError
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import FirmwareTransfer, MemoryStore, Outbox
from keeplink.presence import PresenceTracker
from keeplink.testing import DeviceSimulator

IMAGE = b"v1 image" * 64


async def test_delivery_fails_what_the_submit_check_refuses(tmp_path: Path) -> None:
    path = tmp_path / "fw.bin"
    path.write_bytes(IMAGE)
    upper = hashlib.sha256(IMAGE).hexdigest().upper()  # never equal to a hexdigest
    args = {"path": str(path), "sha256": upper}
    transfer = FirmwareTransfer()
    async with DeviceSimulator(device_id="ota") as sim:
        presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=0.0)
        outbox = Outbox(MemoryStore(), presence=presence, executors={"firmware": transfer})
        link = Link(JsonLineDriver(host=sim.host, port=sim.port), name="ota", heartbeat_s=None)
        await outbox.start()
        try:
            command = await outbox.submit("ota", "firmware", args)
            await outbox.attach("ota", link)
            link.start()
            async with asyncio.timeout(15):
                done = await outbox.wait(command.id)
        finally:
            await link.stop()
            await outbox.close()
            presence.close()
    message = f"firmware: args.sha256 must be 64 lowercase hex digits, got {upper!r}"
    assert done.state is CommandState.FAILED  # the device refused nothing: it got nothing
    assert done.attempts == 1
    assert done.last_error is not None
    assert (done.last_error.code, done.last_error.message) == ("invalid_request", message)
    assert sim.firmware_images == []
    with pytest.raises(InvalidRequestError) as refused:  # what a submit is told at once
        await transfer.check(link, args)
    assert refused.value.message == message


async def test_the_check_passes_an_image_that_can_be_sent(tmp_path: Path) -> None:
    path = tmp_path / "fw.bin"
    path.write_bytes(IMAGE)
    digest = hashlib.sha256(IMAGE).hexdigest()
    link = Link(JsonLineDriver(host="127.0.0.1", port=7001), name="ota")
    transfer = FirmwareTransfer(chunk_size=40_000)  # the largest chunk still fits a line
    await transfer.check(link, {"path": str(path), "sha256": digest})
    await transfer.check(link, {"path": str(path), "sha256": digest, "size": len(IMAGE)})


@pytest.mark.parametrize("change", ["rewritten", "removed"])
async def test_an_image_changed_since_it_was_queued_fails_and_sends_nothing(
    tmp_path: Path, change: str
) -> None:
    path = tmp_path / "fw.bin"
    path.write_bytes(IMAGE)
    args = {"path": str(path), "sha256": hashlib.sha256(IMAGE).hexdigest()}
    async with DeviceSimulator(device_id="ota") as sim:
        presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=0.0)
        outbox = Outbox(
            MemoryStore(), presence=presence, executors={"firmware": FirmwareTransfer()}
        )
        link = Link(JsonLineDriver(host=sim.host, port=sim.port), name="ota", heartbeat_s=None)
        await outbox.start()
        try:
            command = await outbox.submit("ota", "firmware", args, max_attempts=3)
            if change == "rewritten":
                path.write_bytes(IMAGE + b"tampered")
            else:
                path.unlink()
            await outbox.attach("ota", link)
            link.start()
            async with asyncio.timeout(15):
                done = await outbox.wait(command.id)
            record = await outbox.device_record("ota")
        finally:
            await link.stop()
            await outbox.close()
            presence.close()
    # Not the device's refusal (it was sent nothing), and not worth a retry: the file
    # the command was queued with is gone.
    assert done.state is CommandState.FAILED
    assert done.attempts == 1
    assert done.last_error is not None
    assert done.last_error.code == "precondition_failed"
    expected = "no longer matches its sha256" if change == "rewritten" else "cannot read"
    assert expected in done.last_error.message
    assert sim.firmware_images == []
    assert record.failed_cycles == 0
