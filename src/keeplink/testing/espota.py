"""An ESPHome OTA receiver on loopback: the device end of espota2, for tests and simulators.

:class:`OtaReceiver` listens like a device's OTA port and runs
:class:`keeplink._core.espota.OtaDevice` for each connection, one at a time (a device
takes one upload at once; a second client waits in the listen backlog). It records every
completed flash, calls ``on_flash`` with it (a simulator bumps its firmware version there),
and can misbehave on command: cut the connection part-way (:meth:`OtaReceiver.drop_after`),
cut it after installing but before answering (:meth:`OtaReceiver.drop_after_flash`), or
fail a stage with an error byte (:meth:`OtaReceiver.fail_next`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from keeplink._channel import CLOSING_ERRORS
from keeplink._clock import SystemClock, deadline
from keeplink._core.clock import Clock
from keeplink._core.espota import (
    DeviceAuth,
    ImageProgress,
    OtaDevice,
    OtaFault,
    UpdateCompleted,
    UpdateFailed,
)

__all__ = ["DeviceAuth", "Flash", "OtaFault", "OtaReceiver"]


@dataclass(frozen=True, slots=True)
class Flash:
    """One image the receiver verified and installed."""

    image: bytes = field(repr=False)
    md5: str
    """Of the installed image."""
    sha256: str
    size: int
    compressed: bool
    """It came as a gzip payload."""
    auth: str | None
    """``"sha256"``, ``"md5"`` or None (no password)."""
    at: float


class OtaReceiver:
    """A device's OTA port on loopback. Keyword-only config; see :class:`OtaDevice` for
    ``auth``, ``version``, ``compression``, ``extended`` and ``max_size``.

    ``record=True`` keeps every session's bytes in :attr:`transcripts` as
    ``[(direction, bytes), …]`` with direction ``"c"`` (client to device) or ``"d"``.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        auth: DeviceAuth = DeviceAuth.SHA256,
        version: int = 2,
        compression: bool = False,
        extended: bool = True,
        max_size: int | None = None,
        on_flash: Callable[[Flash], object] | None = None,
        record: bool = False,
        clock: Clock | None = None,
    ) -> None:
        self.password = password
        self.host = host
        self.port = port
        self.auth = auth
        self.version = version
        self.compression = compression
        self.extended = extended
        self.max_size = max_size
        self.on_flash = on_flash
        self.record = record
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.flashes: list[Flash] = []
        self.failures: list[UpdateFailed] = []
        self.transcripts: list[list[tuple[str, bytes]]] = []
        self.sessions = 0
        """Connections accepted so far."""
        self.drops = 0
        self._drop_at: int | None = None
        self._drop_after_flash = False
        self._fault: OtaFault | None = None
        self._server: asyncio.Server | None = None
        self._one_at_a_time = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle

    async def start(self) -> None:
        """Listen (the first start picks a free port). Idempotent."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, cut every connection and wait for their handlers."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def __aenter__(self) -> OtaReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # -- misbehaviour on command

    def drop_after(self, received: int) -> None:
        """Cut the next upload's connection (a reset) once ``received`` payload bytes
        arrived, before the device verifies anything. One-shot."""
        self._drop_at = received

    def drop_after_flash(self) -> None:
        """Let the next upload install, then cut the connection before the device's
        answer goes out: the uploader cannot tell that the flash took. One-shot."""
        self._drop_after_flash = True

    def fail_next(self, fault: OtaFault) -> None:
        """Make the next session fail as ``fault`` says. One-shot."""
        self._fault = fault

    # -- serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._writers.add(writer)
        try:
            async with self._one_at_a_time:
                self.sessions += 1
                await self._session(reader, writer)
        except CLOSING_ERRORS:
            pass  # the uploader went away: what a dying socket raises means nothing here
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(*CLOSING_ERRORS):
                await writer.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fault, self._fault = self._fault, None
        device = OtaDevice(
            password=self.password,
            auth=self.auth,
            version=self.version,
            compression=self.compression,
            extended=self.extended,
            max_size=self.max_size,
            fault=fault,
        )
        transcript: list[tuple[str, bytes]] = []
        if self.record:
            self.transcripts.append(transcript)
        while True:
            try:
                async with deadline(self.clock, self.clock.now() + device.timeout_s):
                    data = await reader.read(65536)
            except TimeoutError:
                step = device.expire()
            else:
                if self.record and data:
                    transcript.append(("c", data))
                step = device.receive_data(data)
            for event in step.events:
                if isinstance(event, UpdateFailed):
                    self.failures.append(event)
                elif isinstance(event, UpdateCompleted):
                    self._installed(event)
            if self._cut(device, step.events, writer):
                return
            if step.send:
                if self.record:
                    transcript.append(("d", step.send))
                writer.write(step.send)
                await writer.drain()
            if step.close:
                return

    def _cut(
        self, device: OtaDevice, events: tuple[object, ...], writer: asyncio.StreamWriter
    ) -> bool:
        """Whether a drop asked for is due now; if so, the connection is reset."""
        completed = any(isinstance(e, UpdateCompleted) for e in events)
        arrived = any(isinstance(e, ImageProgress) for e in events)
        due = False
        if self._drop_at is not None and arrived and device.received >= self._drop_at:
            self._drop_at = None
            due = not completed  # (a threshold at the image's end is past the verification)
        if self._drop_after_flash and completed:
            self._drop_after_flash = False
            due = True
        if due:
            self.drops += 1
            writer.transport.abort()
        return due

    def _installed(self, done: UpdateCompleted) -> None:
        flash = Flash(
            image=done.image,
            md5=hashlib.md5(done.image).hexdigest(),
            sha256=hashlib.sha256(done.image).hexdigest(),
            size=len(done.image),
            compressed=done.compressed,
            auth=done.auth,
            at=self.clock.now(),
        )
        self.flashes.append(flash)
        if self.on_flash is not None:
            self.on_flash(flash)
