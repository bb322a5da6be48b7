"""StreamChannel's hooks for protocols with a session of their own (MQTT): a goodbye sent
on close and a callback when the connection ends. Real loopback sockets, a pass-through
codec."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from helpers import IO_BOUND_S, eventually
from keeplink._channel import StreamChannel, open_stream_channel
from keeplink._core.errors import LinkBrokenError
from keeplink._core.jsonline import Malformed


class Raw:
    """Bytes in, bytes out: what was read, as it was read."""

    def feed(self, data: bytes) -> list[bytes | Malformed]:
        return [data]

    def encode(self, frame: bytes) -> bytes:
        return frame


@contextlib.asynccontextmanager
async def peer_and_channel() -> AsyncIterator[
    tuple[asyncio.StreamReader, asyncio.StreamWriter, StreamChannel[bytes]]
]:
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    server = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = await open_stream_channel("127.0.0.1", port, Raw())
    async with asyncio.timeout(IO_BOUND_S):
        reader, writer = await accepted.get()
    try:
        yield reader, writer, channel
    finally:
        channel.close()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        await channel.wait_closed()
        server.close()
        await server.wait_closed()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(IO_BOUND_S):
        return await reader.read()  # to EOF; a reset raises instead


async def test_close_with_a_goodbye_sends_it_and_then_a_fin() -> None:
    async with peer_and_channel() as (reader, _, channel):
        channel.write(b"first ")
        channel.write(b"second ")  # corked behind the first in this loop iteration
        channel.close(last=b"bye")
        assert await read_all(reader) == b"first second bye"
        assert channel.closed


async def test_when_ended_tells_once_and_at_once_if_it_has_ended() -> None:
    async with peer_and_channel() as (_, writer, channel):
        told: list[LinkBrokenError] = []
        channel.when_ended(told.append)
        writer.close()  # the peer goes
        await eventually(lambda: bool(told))
        assert len(told) == 1 and "closed the connection" in told[0].message
        late: list[LinkBrokenError] = []
        channel.when_ended(late.append)
        assert late == told  # registered after the end: told at once, with the same reason
        await asyncio.sleep(0.01)
        assert len(told) == 1


class Recording(asyncio.Transport):
    """Records each write the channel makes: one entry per send() it would cost."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def test_frames_of_one_iteration_leave_together_and_a_lone_one_at_once() -> None:
    channel: StreamChannel[bytes] = StreamChannel(Raw(), peer="recorded")
    transport = Recording()
    channel.connection_made(transport)
    channel.write(b"a")
    assert transport.writes == [b"a"]  # the first of an iteration: at once
    channel.write(b"b")
    channel.write(b"c")
    assert transport.writes == [b"a"]  # corked
    await asyncio.sleep(0)
    assert transport.writes == [b"a", b"bc"]  # together, at the iteration's end
    await asyncio.sleep(0)
    channel.write(b"d")
    assert transport.writes == [b"a", b"bc", b"d"]  # a new iteration: at once again
    channel.data_received(b"reply")
    channel.write(b"e")  # written after a read: at once, a batch of its own
    assert transport.writes == [b"a", b"bc", b"d", b"e"]
    channel.write(b"f")
    channel.data_received(b"reply")  # a read while frames are corked leaves them corked
    channel.write(b"g")
    assert transport.writes == [b"a", b"bc", b"d", b"e"]
    await asyncio.sleep(0)
    assert transport.writes == [b"a", b"bc", b"d", b"e", b"fg"]
    await asyncio.sleep(0)
    # Written in a later iteration with no read between: it leaves in the next one at most.
    channel.write(b"h")
    await asyncio.sleep(0)
    assert transport.writes[-1] == b"h"
    channel.close()
