"""ESPHome OTA throughput: keeplink's espota2 executor vs a raw socket sender, same image.

    python -m bench.esphome_ota [--mib 1.5] [--rounds 3] [--max-s 60]

The receiving end runs in its own process (so the sending side is what is measured):
keeplink's OTA receiver (``keeplink.testing.espota.OtaReceiver``, a Python device that
hashes and keeps what it receives), and beside it a raw sink that reads a 4-byte length
and that many bytes and answers one byte.

- The raw sender writes the length and the image with bare asyncio streams and waits for
  that byte: no handshake, no acknowledgements, no hashing; the floor.
- The raw espota2 sender speaks the protocol by hand to the OTA receiver (fixed bytes,
  each 8192-byte block after the previous one's acknowledgement, as ESPHome's own
  uploader does): what the protocol and the receiver cost, without keeplink.
- keeplink's figure is a whole delivery by ``EsphomeOta`` (read the file, check its
  SHA-256, connect, handshake, send in 8192-byte blocks with ``window`` blocks in flight,
  wait for the device's verification), for window 1 (the uploader's way), 2 (the
  default) and 8.

Each round measures every mode once, interleaved; the table shows the median. Bounded:
``--rounds`` rounds, and no new round starts after ``--max-s`` seconds.

Wake to flash: a firmware command queued for an asleep ESPHome device (the simulator, with
its OTA port, and the native API link waiting out a 30 s backoff), then the device comes
up and its link is woken as an mDNS announcement wakes it (``link.wake``): the time from
then to the first acknowledged OTA block, and to the command's success (a 64 KiB image).
Over real mDNS the same path is run by ``tests/gateway_esphome_netns_script.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from keeplink import Link, WallClock
from keeplink._core.commands import Command, CommandState
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import DeliveryContext, MemoryStore, Outbox
from keeplink.outbox.esphome_ota import EsphomeOta
from keeplink.testing.espota import OtaReceiver

WAKE_IMAGE = 64 * 1024

Measure = Callable[[], Awaitable[float]]
WINDOWS = (1, 2, 8)
BLOCK = 8192


# ---------------------------------------------------------------------- the receiving end


async def _raw_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        size = int.from_bytes(await reader.readexactly(4), "big")
        while size:
            chunk = await reader.read(min(size, 1 << 16))
            if not chunk:
                return
            size -= len(chunk)
        writer.write(b"\x00")
        await writer.drain()
    finally:
        writer.close()


async def serve() -> None:
    async with OtaReceiver() as rx:
        rx.on_flash = lambda flash: rx.flashes.clear()  # keep no images around
        sink = await asyncio.start_server(_raw_sink, "127.0.0.1", 0)
        print(f"ota {rx.port} raw {sink.sockets[0].getsockname()[1]}", flush=True)
        # Until the parent goes: its end of our stdin closes then, however it ended.
        await asyncio.to_thread(sys.stdin.buffer.read)


# ---------------------------------------------------------------------- the senders


def raw_sender(port: int, image: bytes) -> Measure:
    async def measure() -> float:
        begin = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(len(image).to_bytes(4, "big"))
        writer.write(image)
        await writer.drain()
        await reader.readexactly(1)
        writer.close()
        await writer.wait_closed()
        return time.perf_counter() - begin

    return measure


def raw_espota_sender(port: int, image: bytes) -> Measure:
    """espota2 by hand, to the same receiver: the fixed bytes of a passwordless session
    of the extended protocol, each block sent after the previous one's acknowledgement
    (as ESPHome's uploader does); no parsing beyond counting bytes, no timeouts."""
    md5 = hashlib.md5(image).hexdigest().encode()

    async def measure() -> float:
        begin = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(bytes([0x6C, 0x26, 0xF7, 0x5C, 0x45]))
        await reader.readexactly(2)  # 00, version
        writer.write(b"\x06")  # SHA-256 auth, extended protocol
        await reader.readexactly(3)  # 48 flags, 41 (no password)
        writer.write(b"\x00" + len(image).to_bytes(4, "big"))
        await reader.readexactly(1)  # 42
        writer.write(md5)
        await reader.readexactly(1)  # 43
        view = memoryview(image)
        for start in range(0, len(image), BLOCK):
            writer.write(view[start : start + BLOCK])
            await reader.readexactly(1)  # 47
        await reader.readexactly(2)  # 44, 45
        writer.write(b"\x00")
        writer.close()
        await writer.wait_closed()
        return time.perf_counter() - begin

    return measure


def keeplink_sender(port: int, path: Path, image: bytes, window: int) -> Measure:
    executor = EsphomeOta(address=lambda device: ("127.0.0.1", port), window=window)
    args = {"path": str(path), "sha256": hashlib.sha256(image).hexdigest(), "size": len(image)}
    command = Command(
        id="bench", device="ota", op="firmware", args=args, state=CommandState.SENDING,
        created_at=0.0, updated_at=0.0, idempotency_key="bench",
    )  # fmt: skip
    ctx = DeliveryContext(
        outbox=Outbox(MemoryStore(), clock=WallClock()), device="ota", now=0.0,
        online_since=None, cycle=1,
    )  # fmt: skip
    link: Link[Any] = Link(JsonLineDriver(host="127.0.0.1", port=1), name="ota")

    async def measure() -> float:
        begin = time.perf_counter()
        outcome = await executor(link, command, ctx)
        elapsed = time.perf_counter() - begin
        if not outcome.ok:
            raise RuntimeError(f"the upload failed: {outcome}")
        return elapsed

    return measure


async def measure(*, mib: float, rounds: int, max_s: float) -> tuple[dict[str, float], int]:
    """Median MB/s of each mode, and the image size."""
    image = random.Random(3232).randbytes(int(mib * (1 << 20)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.esphome_ota", "--serve",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        found = re.fullmatch(r"ota (\d+) raw (\d+)\s*", line)
        if found is None:
            raise RuntimeError(f"the receiver did not start: {line!r}")
        ota_port, raw_port = int(found.group(1)), int(found.group(2))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fw.bin"
            path.write_bytes(image)
            modes: dict[str, Measure] = {
                "raw asyncio sender": raw_sender(raw_port, image),
                "raw asyncio espota2, window 1": raw_espota_sender(ota_port, image),
            }
            for window in WINDOWS:
                modes[f"keeplink EsphomeOta, window {window}"] = keeplink_sender(
                    ota_port, path, image, window
                )
            for run in modes.values():  # warm up: connections, imports, caches
                await run()
            times: dict[str, list[float]] = {name: [] for name in modes}
            started = time.perf_counter()
            for _ in range(rounds):
                if time.perf_counter() - started > max_s:
                    break
                for name, run in modes.items():
                    times[name].append(await run())
    finally:
        proc.terminate()
        await proc.wait()
    return {name: len(image) / statistics.median(t) / 1e6 for name, t in times.items()}, len(image)


async def wake_to_flash(*, rounds: int, max_s: float = 30.0) -> dict[str, float]:
    """Median and worst milliseconds from the wake-up to the first acknowledged block and
    to the command's success, over ``rounds`` (no new round after ``max_s``)."""
    from keeplink import Backoff, LinkState
    from keeplink.drivers.esphome import EsphomeDriver
    from keeplink.outbox import CommandStateChanged, FirmwareProgress, OutboxEvent
    from keeplink.presence import PresenceTracker
    from keeplink.testing import free_port
    from keeplink.testing.esphome import EsphomeSimulator

    sim = EsphomeSimulator(name="porch", port=free_port(), ota_port=free_port())
    assert sim.ota is not None
    presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=0.0)
    ota = EsphomeOta(address=lambda device: ("127.0.0.1", sim.ota.port if sim.ota else 0))
    outbox = Outbox(MemoryStore(), presence=presence, executors={"firmware": ota})
    driver = EsphomeDriver(host="127.0.0.1", port=sim.port, expected_name="porch")
    link: Link[Any] = Link(driver, name="porch", backoff=Backoff(initial_s=30.0, cap_s=30.0))
    marks: dict[str, float] = {}

    def on_event(event: OutboxEvent) -> None:
        if isinstance(event, FirmwareProgress):
            marks.setdefault("first", time.perf_counter())
        elif isinstance(event, CommandStateChanged) and event.command.state.value == "succeeded":
            marks.setdefault("done", time.perf_counter())

    outbox.subscribe(on_event)
    first: list[float] = []
    done: list[float] = []
    started = time.perf_counter()
    await outbox.start()
    try:
        await outbox.attach("porch", link)
        link.start()
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(rounds):
                if time.perf_counter() - started > max_s:
                    break
                image = random.Random(n).randbytes(WAKE_IMAGE)
                path = Path(tmp) / f"fw{n}.bin"
                path.write_bytes(image)
                args = {"path": str(path), "sha256": hashlib.sha256(image).hexdigest()}
                async with asyncio.timeout(10):
                    while link.state is not LinkState.BACKOFF:  # asleep: a long wait
                        await link.wait_for_state(LinkState.BACKOFF)
                command = await outbox.submit("porch", "firmware", args)
                marks.clear()
                await sim.start()
                woken = time.perf_counter()
                link.wake("bench")
                async with asyncio.timeout(10):
                    finished = await outbox.wait(command.id)
                if finished.state is not CommandState.SUCCEEDED:
                    raise RuntimeError(f"the flash failed: {finished.last_error}")
                first.append(marks["first"] - woken)
                done.append(marks["done"] - woken)
                await sim.wait_rebooted()  # into the new build
                await sim.kill()  # and back to sleep
    finally:
        await link.stop()
        await outbox.close()
        presence.close()
        await sim.stop()
    return {
        "rounds": len(done),
        "first_p50_ms": 1e3 * statistics.median(first),
        "first_max_ms": 1e3 * max(first),
        "done_p50_ms": 1e3 * statistics.median(done),
        "done_max_ms": 1e3 * max(done),
    }


async def main(args: argparse.Namespace) -> None:
    if args.serve:
        await serve()
        return
    rates, size = await measure(mib=args.mib, rounds=args.rounds, max_s=args.max_s)
    floor = rates["raw asyncio sender"]
    by_hand = rates["raw asyncio espota2, window 1"]
    print(f"ESPHome OTA, {size:,} bytes over loopback, median of {args.rounds} rounds")
    for name, rate in rates.items():
        print(
            f"  {name:36} {rate:8.1f} MB/s   {rate / floor:5.2f}x of raw"
            f"   {rate / by_hand:5.2f}x of espota2 by hand"
        )
    wake = await wake_to_flash(rounds=args.rounds)
    print(
        f"  wake to flash, {WAKE_IMAGE // 1024} KiB: first block p50 "
        f"{wake['first_p50_ms']:.1f} ms (max {wake['first_max_ms']:.1f}), done p50 "
        f"{wake['done_p50_ms']:.1f} ms (max {wake['done_max_ms']:.1f}), "
        f"{wake['rounds']:.0f} rounds"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=float, default=1.5, help="image size (MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-s", type=float, default=60.0, help="no new round after this")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    asyncio.run(main(parser.parse_args()))
