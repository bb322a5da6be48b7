"""Firmware for ESPHome devices over their OTA port (espota2), as an outbox executor.

A firmware command (``op="firmware"``, args ``{"path", "sha256"}`` and optionally
``"size"``) for an ESPHome device is queued and delivered like any other durable command:
the outbox hands it to :class:`EsphomeOta` once the device is present and its link (the
native API) is up. The image then goes over a connection of its own to the device's OTA
port, with keeplink's espota2 client (:mod:`keeplink._core.espota`); ESPHome's own
tooling is not needed.

espota2 cannot resume: a session that breaks starts again from byte 0. So a drop, a
timeout or a device error that a new upload may cure (a flash write error, an MD5
mismatch on the way) sends the whole image again, up to ``max_attempts`` times within one
delivery, ``retry_delay_s`` apart; :class:`~keeplink.outbox.FirmwareProgress` counts those
restarts in ``resumes`` (its ``offset`` goes back to 0 with each). When they are used up,
the delivery fails like any other and the outbox's own limits (the command's
``max_attempts``, its delivery cycles) decide whether it goes out again.

Checked at every delivery, never at submit only:

- **The image is what was queued**: the file's SHA-256 must still be ``args.sha256``
  (and its size ``args.size``). A changed file fails the command for good with
  ``precondition_failed``; a file that cannot be read is a local failure of this attempt
  (``precondition_failed``, retried within the command's attempts). Neither is a
  refusal by the device.
- **The device does not run it already.** The build a device runs is what its native API
  session's DeviceInfo says (:func:`build_of`: ESPHome version, project version,
  compilation time; every new build has a new compilation time). Before the first upload
  the executor notes that build in the command's durable progress
  (``result["pre_flash"]``, :meth:`~keeplink.outbox.Outbox.note`): a later attempt,
  after a drop, a reconnect, a gateway restart or a crash, that finds the device reporting
  another build knows it rebooted into the new one and succeeds with ``{"skipped": True}``
  without sending. Args may carry the target ``build`` (any of those keys): a device
  already reporting it is acknowledged the same way. ``installed(device, command)``, given
  by the caller, is asked too. Past the data phase a device installs and reboots on its
  own, so a connection lost then says nothing about whether the update took: the executor
  then waits up to ``settle_s`` for one of those to say yes (the device reboots and
  reconnects meanwhile) before it sends the image again. A device that flaps or
  reconnects after a successful flash is never flashed twice. Without a build to compare
  (a link whose session has no DeviceInfo) and without ``installed``, such a loss is not
  retried here.

A wrong password ends the command ``rejected`` with ``auth_failed``; other refusals by the
device end it ``rejected`` with the device's word (``not_enough_space``, …).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeAlias

from keeplink._channel import CLOSING_ERRORS
from keeplink._clock import deadline, sleep_until
from keeplink._core.clock import Clock
from keeplink._core.commands import Command
from keeplink._core.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    InvalidRequestError,
    KeeplinkError,
    LinkBrokenError,
    PreconditionFailedError,
    ProtocolError,
    RequestTimeout,
)
from keeplink._core.espota import (
    ChunkAcknowledged,
    ImageReceived,
    OtaClient,
    OtaRefusedError,
    TransferStarted,
)
from keeplink._core.outcomes import Acknowledged, Outcome, Rejected, TimedOut, Unavailable
from keeplink._driver import SessionInfo
from keeplink._link import Link
from keeplink.outbox._outbox import DeliveryContext
from keeplink.outbox.events import FirmwareProgress
from keeplink.outbox.firmware import _args_problem, _image_problem

__all__ = [
    "BUILD_KEYS",
    "DEFAULT_PORT",
    "Address",
    "EsphomeOta",
    "Installed",
    "PasswordFor",
    "build_of",
    "runs_build",
]

_log = logging.getLogger("keeplink.outbox.esphome_ota")

DEFAULT_PORT: Final = 3232
"""ESPHome's OTA port on an ESP32 (an ESP8266 listens on 8266)."""

Address: TypeAlias = Callable[[str], tuple[str, int]]
"""Where a device's OTA port is: ``(host, port)`` for a device id."""
PasswordFor: TypeAlias = Callable[[str], str | None]
Installed: TypeAlias = Callable[[str, Command], bool | Awaitable[bool]]
"""Whether the device already runs the build the firmware command carries."""

READ_SIZE: Final = 65536
BUILD_KEYS: Final = ("esphome_version", "project_version", "compilation_time")
"""What names the build an ESPHome device runs, from its DeviceInfo. The compilation time
changes with every build, even one of the same project version."""


def build_of(session: SessionInfo | None) -> dict[str, str] | None:
    """The build a native API session says the device runs (:data:`BUILD_KEYS`), or None
    when there is no session or it carries no DeviceInfo (no compilation time)."""
    if session is None:
        return None
    build = {key: str(session.extra.get(key) or "") for key in BUILD_KEYS}
    return build if build["compilation_time"] else None


def runs_build(current: Mapping[str, str] | None, target: object) -> bool:
    """Whether the ``current`` build is the ``target`` one: every key the target gives (of
    :data:`BUILD_KEYS`) has the same value. An empty or malformed target matches nothing."""
    if current is None or not isinstance(target, Mapping):
        return False
    given = {k: v for k, v in target.items() if k in BUILD_KEYS}
    return bool(given) and all(current.get(k) == v for k, v in given.items())


class EsphomeOta:
    """An :data:`~keeplink.outbox.Executor` for firmware commands to ESPHome devices.
    Keyword-only config; raises ConfigError for values out of range.

    ``address`` maps a device id to its OTA ``(host, port)``. ``password``: the OTA
    password, or a function of the device id. ``window``: 8192-byte blocks in flight
    before the device's acknowledgement (the reference uploader waits for each: 1).
    ``compress``: offer the image gzipped (ESP8266 firmware takes it). Timeouts follow the
    firmware's: it drops a handshake after 20 s and a transfer after 105 s without data;
    ``data_timeout_s`` stays above that so the device is free again before a retry.
    """

    def __init__(
        self,
        *,
        address: Address,
        password: str | PasswordFor | None = None,
        installed: Installed | None = None,
        max_attempts: int = 3,
        retry_delay_s: float = 5.0,
        settle_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        handshake_timeout_s: float = 20.0,
        data_timeout_s: float = 160.0,
        window: int = 2,
        compress: bool = False,
        allow_md5: bool = True,
    ) -> None:
        if not 1 <= max_attempts <= 100:
            raise ConfigError(f"esphome_ota: max_attempts must be 1..100, got {max_attempts!r}")
        if not 1 <= window <= 64:
            raise ConfigError(f"esphome_ota: window must be 1..64, got {window!r}")
        timeouts = (connect_timeout_s, handshake_timeout_s, data_timeout_s)
        if not all(t > 0 for t in timeouts) or retry_delay_s < 0 or settle_s < 0:
            raise ConfigError("esphome_ota: timeouts must be > 0, delays >= 0")
        self.address = address
        self.password = password
        self.installed = installed
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.settle_s = settle_s
        self.connect_timeout_s = connect_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.data_timeout_s = data_timeout_s
        self.window = window
        self.compress = compress
        self.allow_md5 = allow_md5

    async def check(self, link: Link[Any], args: Mapping[str, Any]) -> None:
        """At submit: raise InvalidRequestError, naming the problem, when the command could
        never be delivered: args that are not ``path`` and ``sha256`` (and ``size``) of the
        right types, or an image that is not a readable file (of ``size`` bytes). The image
        is hashed at delivery, not here."""
        problem = _args_problem(args)
        if problem is None:
            problem = await asyncio.to_thread(_image_problem, args["path"], args.get("size"))
        if problem is not None:
            raise InvalidRequestError(f"esphome_ota: {problem}")

    async def __call__(self, link: Link[Any], command: Command, ctx: DeliveryContext) -> Outcome:
        """Deliver ``command``: raises InvalidRequestError (the command fails for good:
        bad args, or an image that no longer has its sha256); otherwise returns the
        outcome (see the module's docstring)."""
        problem = _args_problem(command.args)
        if problem is not None:
            raise InvalidRequestError(f"esphome_ota: {problem}")
        path: str = command.args["path"]
        try:
            data = await asyncio.to_thread(_read, path)
        except OSError as exc:
            return Unavailable(
                cause=PreconditionFailedError(
                    f"esphome_ota: cannot read the image {path}: {exc.strerror or exc}"
                )
            )
        actual = hashlib.sha256(data).hexdigest()
        size = command.args.get("size")
        if actual != command.args["sha256"] or (isinstance(size, int) and size != len(data)):
            raise InvalidRequestError(
                f"esphome_ota: the image at {path} changed since the command was queued "
                f"(sha256 {actual[:12]}…, {len(data)} bytes; expected "
                f"{command.args['sha256'][:12]}…)",
                code=ErrorCode.PRECONDITION_FAILED,
            )
        compressed = await asyncio.to_thread(_gzip, data) if self.compress else None
        try:
            host, port = self.address(ctx.device)
            password = self.password(ctx.device) if callable(self.password) else self.password
        except Exception as exc:  # noqa: BLE001 - the caller's lookup: logged, ends this attempt
            _log.warning(
                "firmware %s for %r: no OTA address or password", command.id, ctx.device,
                exc_info=True,
            )  # fmt: skip
            return Unavailable(
                cause=ConfigError(
                    f"esphome_ota: no OTA address or password for {ctx.device!r}: "
                    f"{type(exc).__name__}: {exc}"
                )
            )
        run = _Run(self, link, command, ctx, data, compressed, host, port, password)
        return await run.go()


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


class _HookFailed(Exception):
    def __init__(self, error: KeeplinkError) -> None:
        super().__init__(error.message)
        self.error = error


class _Run:
    """One delivery of one image: up to ``max_attempts`` whole uploads."""

    def __init__(
        self,
        spec: EsphomeOta,
        link: Link[Any],
        command: Command,
        ctx: DeliveryContext,
        data: bytes,
        compressed: bytes | None,
        host: str,
        port: int,
        password: str | None,
    ) -> None:
        self.spec = spec
        self.command = command
        self.ctx = ctx
        self.data = data
        self.compressed = compressed
        self.host = host
        self.port = port
        self.password = password
        self.clock: Clock = ctx.outbox.clock
        self.link = link
        recorded = (command.result or {}).get("pre_flash")
        self.pre_flash: Mapping[str, str] | None = (
            recorded if isinstance(recorded, Mapping) else None
        )
        """The build the device ran before this command's first upload (durable)."""
        self.bytes_sent = 0
        self.restarts = 0
        self.started = self.clock.now()

    async def go(self) -> Outcome:
        try:
            return await self._go()
        except _HookFailed as failed:
            # Not knowing what the device runs, sending could flash it twice: not now.
            return Unavailable(cause=failed.error)

    async def _go(self) -> Outcome:
        spec = self.spec
        last: Outcome | None = None
        for attempt in range(1, spec.max_attempts + 1):
            if await self._runs_it():
                return self._skipped(self._why_installed("the device already runs this build"))
            if self.pre_flash is None:
                await self._note_build()
            if attempt > 1:
                self.restarts += 1
            client = OtaClient(
                self.data,
                password=self.password,
                compressed=self.compressed,
                window=spec.window,
                allow_md5=spec.allow_md5,
            )
            try:
                await self._upload(client)
            except (AuthError, ProtocolError) as exc:
                return self._refused(exc)
            except OtaRefusedError as exc:
                if not exc.retryable:
                    return self._refused(exc)
                last = Unavailable(cause=exc)
                uncertain = False  # it said why: nothing was installed
            except RequestTimeout as exc:
                last = TimedOut(after_s=self._timeout_of(client))
                self._warn(attempt, exc)
                uncertain = client.committed
            except LinkBrokenError as exc:
                last = Unavailable(cause=exc)
                uncertain = client.committed
            else:
                _log.info(
                    "firmware %s for %r: installed (%d bytes, %d restarts)",
                    self.command.id, self.ctx.device, len(client.payload), self.restarts,
                )  # fmt: skip
                return Acknowledged(
                    seq=0,
                    result={
                        "installed": True,
                        "size": len(self.data),
                        "bytes_sent": self.bytes_sent,
                        "resumes": self.restarts,
                        "compressed": client.payload is not self.data,
                        "auth": client.auth_method,
                        "ota_version": client.version,
                    },
                )
            if isinstance(last, Unavailable):
                self._warn(attempt, last.cause)
            if uncertain:
                # The device had the whole image: it may have installed it and rebooted.
                if spec.installed is None and self.pre_flash is None:
                    return last
                if await self._settles():
                    return self._skipped(
                        self._why_installed("the device runs this build after the upload")
                    )
            if attempt < spec.max_attempts and spec.retry_delay_s:
                await sleep_until(self.clock, self.clock.now() + spec.retry_delay_s)
        assert last is not None
        return last

    def _warn(self, attempt: int, exc: KeeplinkError) -> None:
        _log.warning(
            "firmware %s for %r: upload %d of %d to %s:%d failed [%s] %s",
            self.command.id, self.ctx.device, attempt, self.spec.max_attempts,
            self.host, self.port, exc.wire_code, exc.message,
        )  # fmt: skip

    def _refused(self, exc: KeeplinkError) -> Rejected:
        _log.warning(
            "firmware %s for %r: the device refused [%s] %s",
            self.command.id, self.ctx.device, exc.wire_code, exc.message,
        )  # fmt: skip
        return Rejected(seq=0, code=exc.wire_code, message=exc.message)

    def _skipped(self, reason: str) -> Acknowledged:
        _log.info("firmware %s for %r: %s", self.command.id, self.ctx.device, reason)
        return Acknowledged(
            seq=0,
            result={
                "skipped": True,
                "reason": reason,
                "bytes_sent": self.bytes_sent,
                "resumes": self.restarts,
            },
        )

    def _timeout_of(self, client: OtaClient) -> float:
        spec = self.spec
        return spec.data_timeout_s if client.in_data_phase else spec.handshake_timeout_s

    def _build_changed(self) -> bool:
        current = build_of(self.link.session)
        return self.pre_flash is not None and current is not None and current != self.pre_flash

    def _why_installed(self, otherwise: str) -> str:
        current = build_of(self.link.session)
        if runs_build(current, self.command.args.get("build")):
            return "the device already runs the target build"
        if self._build_changed():
            assert self.pre_flash is not None
            assert current is not None
            return (
                f"the device rebooted into a new build since the upload began "
                f"({self.pre_flash['compilation_time']!r} -> {current['compilation_time']!r})"
            )
        return otherwise

    async def _note_build(self) -> None:
        """Note the build the device runs now in the command's durable progress."""
        current = build_of(self.link.session)
        if current is None:
            return
        try:
            self.command = await self.ctx.outbox.note(self.command, {"pre_flash": current})
        except KeeplinkError as exc:  # cancelled meanwhile, or the store failed: send nothing
            raise _HookFailed(
                KeeplinkError(
                    f"esphome_ota: cannot note the build {self.ctx.device!r} runs before "
                    f"the upload: {exc.message}",
                    code=exc.code,
                )
            ) from exc
        self.pre_flash = current

    async def _runs_it(self) -> bool:
        """Whether the device runs the build now: the target build of the args, a build
        other than the one noted before the first upload, or ``installed`` says so.
        Raises _HookFailed when ``installed`` raises."""
        if runs_build(build_of(self.link.session), self.command.args.get("build")):
            return True
        if self._build_changed():
            return True
        hook = self.spec.installed
        if hook is None:
            return False
        try:
            answer = hook(self.ctx.device, self.command)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception as exc:  # deliberate: the caller's hook; logged, ends this attempt
            _log.warning(
                "firmware %s for %r: the installed() hook failed",
                self.command.id, self.ctx.device, exc_info=True,
            )  # fmt: skip
            raise _HookFailed(
                KeeplinkError(
                    f"esphome_ota: cannot tell what {self.ctx.device!r} runs: installed() "
                    f"raised {type(exc).__name__}: {exc}",
                    code=ErrorCode.DEVICE_UNAVAILABLE,
                )
            ) from exc
        return bool(answer)

    async def _settles(self) -> bool:
        """Ask ``installed`` until ``settle_s`` passed: True once it says yes."""
        until = self.clock.now() + self.spec.settle_s
        step = max(min(self.spec.retry_delay_s, self.spec.settle_s), 0.05)
        while True:
            if await self._runs_it():
                return True
            if self.clock.now() >= until:
                return False
            await sleep_until(self.clock, min(until, self.clock.now() + step))

    async def _upload(self, client: OtaClient) -> None:
        """One whole upload; raises the client's typed errors, RequestTimeout, or
        LinkBrokenError (OS errors, with ``__cause__``)."""
        spec, clock = self.spec, self.clock
        try:
            async with deadline(clock, clock.now() + spec.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            raise RequestTimeout(
                f"esphome_ota: connecting to {self.host}:{self.port} took over "
                f"{spec.connect_timeout_s:g}s"
            ) from None
        except OSError as exc:
            raise LinkBrokenError(
                f"esphome_ota: cannot connect to {self.host}:{self.port}: {exc}"
            ) from exc
        attempt_started = clock.now()
        done = False
        try:
            writer.write(client.start())
            while not client.done:
                limit = self._timeout_of(client)
                try:
                    async with deadline(clock, clock.now() + limit):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    raise RequestTimeout(
                        f"esphome_ota: no answer within {limit:g}s while waiting for "
                        f"{client.waiting_for}"
                    ) from None
                step = client.receive_data(data)
                if step.send:
                    # One write for the step: one syscall, not one per 8 KiB block.
                    writer.writelines(step.send)
                    self.bytes_sent += sum(len(b) for b in step.send if isinstance(b, memoryview))
                for event in step.events:
                    if isinstance(event, TransferStarted):
                        attempt_started = clock.now()
                    elif isinstance(event, ChunkAcknowledged | ImageReceived):
                        self._progress(client, attempt_started)
                if writer.transport.get_write_buffer_size():
                    # (Only then can drain() wait: a write the kernel took whole needs no
                    # timer, which is most of them.)
                    try:
                        async with deadline(clock, clock.now() + limit):
                            await writer.drain()
                    except TimeoutError:
                        raise RequestTimeout(
                            f"esphome_ota: the device took no data for {limit:g}s"
                        ) from None
            done = True
        except OSError as exc:
            raise LinkBrokenError(
                f"esphome_ota: the connection to {self.host}:{self.port} broke while "
                f"waiting for {client.waiting_for}: {exc}"
            ) from exc
        finally:
            if done:
                writer.close()  # the final 00 goes out before the FIN
                with contextlib.suppress(TimeoutError, *CLOSING_ERRORS):
                    async with deadline(clock, clock.now() + spec.handshake_timeout_s):
                        await writer.wait_closed()
            else:
                writer.transport.abort()

    def _progress(self, client: OtaClient, since: float) -> None:
        now = self.clock.now()
        size = len(client.payload)
        acked = client.acked
        self.ctx.outbox.publish(
            FirmwareProgress(
                command_id=self.command.id,
                device=self.ctx.device,
                offset=acked,
                size=size,
                percent=100.0 * acked / size if size else 100.0,
                rate_bps=acked / max(now - since, 1e-9),
                bytes_sent=self.bytes_sent,
                resumes=self.restarts,
                at=now,
            )
        )
