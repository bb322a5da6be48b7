"""The loopback OTA receiver itself: what it records, its timeouts, one upload at a time."""

from __future__ import annotations

import asyncio
import hashlib

from helpers import eventually
from keeplink import VirtualClock
from keeplink._core.espota import MAGIC, ClientState, OtaClient, Response, UpdateFailed
from keeplink.testing.espota import Flash, OtaReceiver

IMAGE = bytes(range(256)) * 100


async def upload(rx: OtaReceiver, data: bytes = IMAGE, password: str | None = None) -> OtaClient:
    """A plain upload with the sans-IO client over a socket (no executor)."""
    reader, writer = await asyncio.open_connection(*rx.address)
    client = OtaClient(data, password=password)
    writer.write(client.start())
    try:
        while not client.done:
            step = client.receive_data(await reader.read(65536))
            writer.writelines(step.send)
            await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()
    return client


async def test_a_flash_is_recorded_and_announced() -> None:
    seen: list[Flash] = []
    async with OtaReceiver(password="pw", on_flash=seen.append, record=True) as rx:
        await upload(rx, password="pw")
        await eventually(lambda: rx.transcripts[0][-1] == ("c", b"\x00"), what="the final ack")
    assert seen == rx.flashes
    [flash] = seen
    assert (flash.image, flash.size, flash.auth, flash.compressed) == (
        IMAGE,
        len(IMAGE),
        "sha256",
        False,
    )
    assert flash.md5 == hashlib.md5(IMAGE).hexdigest()
    assert flash.sha256 == hashlib.sha256(IMAGE).hexdigest()
    [transcript] = rx.transcripts
    assert transcript[0] == ("c", MAGIC)
    assert transcript[1] == ("d", bytes([Response.OK, 2]))
    assert b"".join(d for k, d in transcript if k == "c").count(IMAGE) == 1
    assert rx.sessions == 1


async def test_uploads_are_taken_one_at_a_time() -> None:
    async with OtaReceiver(record=True) as rx:
        await asyncio.gather(upload(rx), upload(rx, IMAGE[::-1]))
    assert sorted(f.image for f in rx.flashes) == sorted([IMAGE, IMAGE[::-1]])
    for transcript in rx.transcripts:  # each session is whole: nothing interleaved
        assert transcript[0] == ("c", MAGIC)
        assert transcript[-1] == ("c", b"\x00")


async def test_a_silent_client_is_dropped_by_the_handshake_watchdog(
    virtual_clock: VirtualClock,
) -> None:
    async with OtaReceiver(clock=virtual_clock) as rx:
        reader, writer = await asyncio.open_connection(*rx.address)
        await eventually(lambda: rx.sessions == 1, what="the session")
        await virtual_clock.advance(19.9)
        assert rx.failures == []
        await virtual_clock.advance(0.1)
        assert await reader.read() == b""  # closed without a word
        writer.close()
        await writer.wait_closed()
    assert rx.failures == [UpdateFailed(None, "handshake timeout")]


async def test_a_stalled_transfer_is_failed_after_105_s(virtual_clock: VirtualClock) -> None:
    async with OtaReceiver(clock=virtual_clock) as rx:
        reader, writer = await asyncio.open_connection(*rx.address)
        client = OtaClient(IMAGE)
        writer.write(client.start())
        while client.state is not ClientState.DATA:
            writer.writelines(client.receive_data(await reader.read(1)).send)
        # the first blocks went out with the last step; now the uploader stalls
        await virtual_clock.settle()
        await virtual_clock.advance(104.0)
        assert rx.failures == []
        await virtual_clock.advance(1.0)
        rest = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert rest.endswith(bytes([Response.ERROR_UNKNOWN]))
    assert rx.failures == [UpdateFailed(Response.ERROR_UNKNOWN, "no data for 105s")]
