"""Firmware to ESPHome devices over espota2: the outbox's executor against the loopback
OTA receiver, with a jsonline device simulator standing in for the device's native-API
link (the outbox delivers only while a device's link is up)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from helpers import eventually
from keeplink import Link, WallClock
from keeplink._core.commands import Command, CommandState
from keeplink._core.errors import ConfigError, ErrorCode, InvalidRequestError
from keeplink._core.espota import OtaFault, Response
from keeplink._core.outcomes import Acknowledged, Rejected, TimedOut, Unavailable
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import DeliveryContext, FirmwareProgress, MemoryStore, Outbox
from keeplink.outbox.esphome_ota import EsphomeOta
from keeplink.presence import PresenceTracker
from keeplink.testing import DeviceSimulator, free_port
from keeplink.testing.espota import DeviceAuth, Flash, OtaReceiver

Q = CommandState
IMAGE = random.Random(16).randbytes(100_000)


def write_image(tmp_path: Path, data: bytes = IMAGE) -> dict[str, Any]:
    path = tmp_path / "fw.bin"
    path.write_bytes(data)
    return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


class Bench:
    """An outbox with the ESPHome executor for device ``hall``, whose link is up."""

    def __init__(self, outbox: Outbox, progress: list[FirmwareProgress]) -> None:
        self.outbox = outbox
        self.progress = progress

    async def deliver(self, args: dict[str, Any], **submit: Any) -> Command:
        command = await self.outbox.submit("hall", "firmware", args, **submit)
        async with asyncio.timeout(30):
            return await self.outbox.wait(command.id)


@contextlib.asynccontextmanager
async def bench(executor: EsphomeOta) -> AsyncIterator[Bench]:
    async with DeviceSimulator(device_id="hall") as sim:
        presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=0.0)
        outbox = Outbox(MemoryStore(), presence=presence, executors={"firmware": executor})
        progress: list[FirmwareProgress] = []
        outbox.subscribe(lambda e: progress.append(e) if isinstance(e, FirmwareProgress) else None)
        link = Link(JsonLineDriver(host=sim.host, port=sim.port), name="hall", heartbeat_s=None)
        await outbox.start()
        try:
            await outbox.attach("hall", link)
            link.start()
            yield Bench(outbox, progress)
        finally:
            await link.stop()
            await outbox.close()
            presence.close()


def ota(rx: OtaReceiver, **kw: Any) -> EsphomeOta:
    kw.setdefault("retry_delay_s", 0.01)
    return EsphomeOta(address=lambda device: rx.address, **kw)


async def test_an_image_is_installed_with_progress(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    async with (
        OtaReceiver(password="hall-secret") as rx,
        bench(ota(rx, password="hall-secret")) as b,
    ):
        done = await b.deliver(args)
    assert done.state is Q.SUCCEEDED, done.last_error
    assert [f.image for f in rx.flashes] == [IMAGE]
    assert rx.flashes[0].auth == "sha256"
    assert done.result is not None
    assert done.result["installed"] is True
    assert (done.result["bytes_sent"], done.result["resumes"]) == (len(IMAGE), 0)
    assert done.result["auth"] == "sha256"
    offsets = [p.offset for p in b.progress]
    assert offsets == sorted(offsets)
    assert offsets[-1] == len(IMAGE)
    assert b.progress[-1].percent == 100.0
    assert len(offsets) == -(-len(IMAGE) // 8192) + 1  # each block's ack, then "received"


async def test_a_drop_mid_transfer_sends_the_whole_image_again(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    async with OtaReceiver() as rx, bench(ota(rx)) as b:
        rx.drop_after(40_000)
        done = await b.deliver(args)
    assert done.state is Q.SUCCEEDED, done.last_error
    assert rx.drops == 1
    assert rx.sessions == 2
    assert [f.image for f in rx.flashes] == [IMAGE]  # installed once, whole
    assert done.result is not None
    assert done.result["resumes"] == 1
    assert done.result["bytes_sent"] >= len(IMAGE) + 40_000  # no resume: from byte 0 again
    first = [p.offset for p in b.progress if p.resumes == 0]
    second = [p.offset for p in b.progress if p.resumes == 1]
    assert first
    assert max(first) < len(IMAGE)
    assert second[0] <= 2 * 8192  # it started over
    assert second[-1] == len(IMAGE)
    assert done.attempts == 1  # one delivery of the command, two uploads inside it


async def test_drops_past_max_attempts_fail_the_delivery(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    async with OtaReceiver() as rx:
        rx.drop_after(1000)
        outcome = await ota(rx, max_attempts=2)(*direct(args))
        assert isinstance(outcome, Acknowledged)  # the second upload went through
        rx.drop_after(1000)
        outcome = await ota(rx, max_attempts=1)(*direct(args))
    assert isinstance(outcome, Unavailable)
    assert outcome.cause.code is ErrorCode.CONNECTION_FAILED
    assert rx.sessions == 3
    assert len(rx.flashes) == 1


async def test_a_wrong_password_ends_auth_failed_without_a_retry(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    async with OtaReceiver(password="hall-secret") as rx, bench(ota(rx, password="wrong")) as b:
        done = await b.deliver(args)
    assert done.state is Q.REJECTED
    assert done.last_error is not None
    assert done.last_error.code == "auth_failed"
    assert rx.sessions == 1
    assert rx.flashes == []
    assert [f.response for f in rx.failures] == [Response.ERROR_AUTH_INVALID]


async def test_an_old_md5_device_takes_the_image(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    rx = OtaReceiver(password="pw", auth=DeviceAuth.MD5, extended=False)
    async with rx, bench(ota(rx, password=lambda device: "pw")) as b:
        done = await b.deliver(args)
    assert done.state is Q.SUCCEEDED, done.last_error
    assert done.result is not None
    assert done.result["auth"] == "md5"
    assert [f.auth for f in rx.flashes] == ["md5"]


async def test_a_device_that_already_runs_the_build_is_not_flashed(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    asked: list[tuple[str, str]] = []

    async def installed(device: str, command: Command) -> bool:
        asked.append((device, command.args["sha256"]))
        return True

    async with OtaReceiver() as rx, bench(ota(rx, installed=installed)) as b:
        done = await b.deliver(args)
    assert done.state is Q.SUCCEEDED
    assert done.result is not None
    assert done.result["skipped"] is True
    assert asked == [("hall", args["sha256"])]
    assert rx.sessions == 0


async def test_a_flash_whose_answer_was_lost_is_not_flashed_twice(tmp_path: Path) -> None:
    """The device installs the image and the connection dies before its answer: the
    uploader cannot tell. The hook (here fed by the device's own flash, as DeviceInfo
    would be after the reboot) says the build runs, so nothing is sent again."""
    args = write_image(tmp_path)
    running: dict[str, str] = {}

    def flashed(flash: Flash) -> None:
        running["hall"] = flash.sha256

    def installed(device: str, command: Command) -> bool:
        return running.get(device) == command.args["sha256"]

    async with (
        OtaReceiver(on_flash=flashed) as rx,
        bench(ota(rx, installed=installed, settle_s=5.0)) as b,
    ):
        rx.drop_after_flash()
        done = await b.deliver(args)
    assert done.state is Q.SUCCEEDED, done.last_error
    assert done.result is not None
    assert done.result["skipped"] is True
    assert "after the upload" in done.result["reason"]
    assert len(rx.flashes) == 1
    assert rx.sessions == 1


async def test_without_the_hook_a_lost_answer_is_not_retried_in_the_delivery(
    tmp_path: Path,
) -> None:
    args = write_image(tmp_path)
    async with OtaReceiver() as rx:
        rx.drop_after_flash()
        outcome = await ota(rx)(*direct(args))
    assert isinstance(outcome, Unavailable)
    assert "may have installed it" in outcome.cause.message
    assert rx.sessions == 1
    assert len(rx.flashes) == 1


async def test_a_changed_image_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    write_image(tmp_path, IMAGE[:-1] + b"!")  # the file changes; the command does not
    async with OtaReceiver() as rx, bench(ota(rx)) as b:
        done = await b.deliver(args)
    assert done.state is Q.FAILED  # the image's fault, not the device's: never "rejected"
    assert done.last_error is not None
    assert done.last_error.code == "precondition_failed"
    assert "changed since the command was queued" in done.last_error.message
    assert rx.sessions == 0


def remove(args: dict[str, Any]) -> None:
    Path(args["path"]).unlink()


def direct(args: dict[str, Any]) -> tuple[Link[Any], Command, DeliveryContext]:
    """What the outbox hands an executor, for calls without a dispatcher."""
    command = Command(
        id="c1", device="hall", op="firmware", args=args, state=Q.SENDING,
        created_at=0.0, updated_at=0.0, idempotency_key="c1",
    )  # fmt: skip
    ctx = DeliveryContext(
        outbox=Outbox(MemoryStore(), clock=WallClock()), device="hall", now=0.0,
        online_since=None, cycle=1,
    )  # fmt: skip
    return Link(JsonLineDriver(host="127.0.0.1", port=1), name="hall"), command, ctx


async def test_an_unreadable_image_is_a_local_failure(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    remove(args)
    async with OtaReceiver() as rx:
        outcome = await ota(rx)(*direct(args))
    assert isinstance(outcome, Unavailable)
    assert outcome.cause.code is ErrorCode.PRECONDITION_FAILED
    assert "cannot read the image" in outcome.cause.message
    assert rx.sessions == 0


async def test_bad_args_fail_at_once(tmp_path: Path) -> None:
    async with OtaReceiver() as rx:
        executor = ota(rx)
        with pytest.raises(InvalidRequestError, match=r"args\.sha256 is required"):
            await executor(*direct({"path": "x"}))
        with pytest.raises(InvalidRequestError, match="cannot read the image"):
            await executor.check(
                direct({})[0], {"path": str(tmp_path / "nope"), "sha256": "0" * 64}
            )
        await executor.check(direct({})[0], write_image(tmp_path))


async def test_a_device_error_that_a_new_upload_cures_is_retried(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    async with OtaReceiver() as rx:
        rx.fail_next(OtaFault("write", Response.ERROR_WRITING_FLASH, after_bytes=30_000))
        outcome = await ota(rx)(*direct(args))
    assert isinstance(outcome, Acknowledged)
    assert outcome.result["resumes"] == 1
    assert [f.response for f in rx.failures] == [Response.ERROR_WRITING_FLASH]
    assert [f.image for f in rx.flashes] == [IMAGE]


async def test_a_refusal_that_needs_a_person_is_rejected_with_its_word(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    async with OtaReceiver(max_size=50_000) as rx:
        outcome = await ota(rx)(*direct(args))
    assert isinstance(outcome, Rejected)
    assert outcome.code == "not_enough_space"
    assert "0x89" in outcome.message
    assert rx.sessions == 1


async def test_gzip_goes_out_to_a_device_that_takes_it(tmp_path: Path) -> None:
    data = b"ESPHome firmware " * 6000  # compresses well
    args = write_image(tmp_path, data)
    async with OtaReceiver(compression=True) as rx:
        outcome = await ota(rx, compress=True)(*direct(args))
    assert isinstance(outcome, Acknowledged)
    assert outcome.result["compressed"] is True
    assert outcome.result["bytes_sent"] < len(data) // 10
    assert [(f.image, f.compressed) for f in rx.flashes] == [(data, True)]


async def test_a_silent_device_times_out(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    held: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        executor = EsphomeOta(
            address=lambda d: ("127.0.0.1", port), handshake_timeout_s=0.2, max_attempts=1
        )
        outcome = await executor(*direct(args))
    finally:
        for writer in held:
            writer.close()
        server.close()
    assert isinstance(outcome, TimedOut)
    assert outcome.after_s == 0.2


async def test_a_device_not_listening_is_unavailable(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    port = free_port()
    executor = EsphomeOta(address=lambda d: ("127.0.0.1", port), max_attempts=2, retry_delay_s=0.01)
    outcome = await executor(*direct(args))
    assert isinstance(outcome, Unavailable)
    assert outcome.cause.code is ErrorCode.CONNECTION_FAILED
    assert f"127.0.0.1:{port}" in outcome.cause.message


def test_config_is_checked() -> None:
    for bad in ({"max_attempts": 0}, {"window": 0}, {"settle_s": -1}, {"data_timeout_s": 0}):
        with pytest.raises(ConfigError):
            EsphomeOta(address=lambda d: ("127.0.0.1", 3232), **bad)


async def test_a_failing_hook_sends_nothing(tmp_path: Path) -> None:
    """Not knowing what the device runs, an upload could flash it twice: the attempt ends."""
    args = write_image(tmp_path)

    def installed(device: str, command: Command) -> bool:
        raise RuntimeError("DeviceInfo not there yet")

    async with OtaReceiver() as rx:
        outcome = await ota(rx, installed=installed)(*direct(args))
    assert isinstance(outcome, Unavailable)
    assert outcome.cause.code is ErrorCode.DEVICE_UNAVAILABLE
    assert "DeviceInfo not there yet" in outcome.cause.message
    assert rx.sessions == 0


async def test_a_device_without_an_address_is_a_failed_attempt(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    addresses: dict[str, tuple[str, int]] = {}
    outcome = await EsphomeOta(address=addresses.__getitem__)(*direct(args))
    assert isinstance(outcome, Unavailable)
    assert outcome.cause.code is ErrorCode.CONFIG_ERROR
    assert "KeyError" in outcome.cause.message


async def test_a_cancelled_upload_closes_its_connection(tmp_path: Path) -> None:
    args = write_image(tmp_path)
    seen: list[bytes] = []
    closed = asyncio.Event()

    async def listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(5))
        try:
            seen.append(await reader.read())  # until the uploader goes away
        except ConnectionResetError:
            seen.append(b"")
        closed.set()
        writer.close()

    server = await asyncio.start_server(listen, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        executor = EsphomeOta(address=lambda d: ("127.0.0.1", port))
        task = asyncio.get_running_loop().create_task(executor(*direct(args)))
        await eventually(lambda: bool(seen), what="the magic bytes")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5):
            await closed.wait()
    finally:
        server.close()
    assert seen == [bytes([0x6C, 0x26, 0xF7, 0x5C, 0x45]), b""]
