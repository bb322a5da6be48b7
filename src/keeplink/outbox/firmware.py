"""Firmware transfer over the jsonline ``ota.*`` ops, as an outbox executor.

A firmware command is a durable command like any other (``op="firmware"``, args
``{"path", "sha256"}`` and optionally ``"size"``), queued for an offline device and
delivered when it is present; :meth:`FirmwareTransfer.check` refuses at submit one that
could never be delivered. Delivery streams the image as ``ota.chunk`` requests with a
window in flight, announces progress, and after a drop waits for the link to come back and
resumes from the offset the device reports in ``ota.begin``: bytes it already holds are
never sent again. The device verifies the hash on ``ota.end``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import logging
import os
import re
import stat
from collections.abc import Mapping
from typing import Any, Final

from keeplink._clock import deadline
from keeplink._core.commands import Command
from keeplink._core.dispatch import PreconditionResult
from keeplink._core.errors import (
    ConfigError,
    InvalidRequestError,
    KeeplinkError,
    PreconditionFailedError,
)
from keeplink._core.outcomes import Acknowledged, Outcome, Rejected
from keeplink._link import Link
from keeplink.outbox._context import DeliveryContext
from keeplink.outbox.events import FirmwareProgress

__all__ = ["FirmwareProgress", "FirmwareTransfer", "image_matches", "sha256_of"]

_log = logging.getLogger("keeplink.outbox.firmware")

DEFAULT_CHUNK = 4096
"""Image bytes a chunk: a 5.5 KB line once base64-encoded, far below the 64 KiB limit, and
small enough that a drop re-sends little."""
DEFAULT_WINDOW: Final = 2
"""Chunks in flight. After a drop at most ``window × chunk_size`` bytes are sent again (what
was written past the cut); 2 × 4 KiB keeps that to 8 KiB while still pipelining."""


_SHA256: Final = re.compile("[0-9a-f]{64}")


def _args_problem(args: Mapping[str, Any]) -> str | None:
    """What makes a firmware command's args unusable (one line), or None."""
    path, digest, size = args.get("path"), args.get("sha256"), args.get("size")
    if path is None:
        return "args.path is required: the image file to send"
    if not isinstance(path, str) or not path:
        return f"args.path must be a non-empty string, got {path!r}"
    if digest is None:
        return "args.sha256 is required: the image's SHA-256, 64 lowercase hex digits"
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        return f"args.sha256 must be 64 lowercase hex digits, got {digest!r:.80}"
    if "size" in args and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        return f"args.size must be the image's size in bytes, an integer >= 0, got {size!r:.80}"
    return None


def _image_problem(path: str, size: object) -> str | None:
    """Whether the image can be read now (and has ``size`` bytes, if that is an int)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return f"the image {path} is not a regular file"
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"cannot read the image {path}: {exc.strerror or exc}"
    if isinstance(size, int) and info.st_size != size:
        return f"the image {path} has {info.st_size} bytes, not args.size = {size}"
    return None


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def image_matches(command: Command, ctx: DeliveryContext) -> PreconditionResult:
    """The image file still is what the command was built from (same sha256)."""
    path, expected = command.args.get("path"), command.args.get("sha256")
    if not isinstance(path, str) or not isinstance(expected, str):
        return PreconditionResult.failed("a firmware command needs args path and sha256")
    try:
        actual = await asyncio.to_thread(sha256_of, path)
    except OSError as exc:
        return PreconditionResult.failed(f"cannot read the image {path}: {exc.strerror or exc}")
    if actual != expected:
        return PreconditionResult.failed(
            f"the image at {path} changed since the command was queued "
            f"(sha256 {actual[:12]}…, expected {expected[:12]}…)"
        )
    return PreconditionResult.passed()


class FirmwareTransfer:
    """An :data:`~keeplink.outbox.Executor` for firmware commands. Keyword-only config.

    ``window × chunk_size`` trades throughput on a slow link against what a drop costs:
    the chunks in flight when the connection dies are sent again.
    """

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        window: int = DEFAULT_WINDOW,
        chunk_timeout_s: float = 30.0,
        resume_within_s: float = 120.0,
        max_resumes: int = 100,
    ) -> None:
        if not 1 <= chunk_size <= 40_000:
            raise ConfigError(f"firmware: chunk_size must be 1..40000, got {chunk_size!r}")
        if not 1 <= window <= 64:
            raise ConfigError(f"firmware: window must be 1..64, got {window!r}")
        if not chunk_timeout_s > 0 or not resume_within_s > 0 or max_resumes < 0:
            raise ConfigError("firmware: timeouts must be > 0 and max_resumes >= 0")
        self.chunk_size = chunk_size
        self.window = window
        self.chunk_timeout_s = chunk_timeout_s
        self.resume_within_s = resume_within_s
        self.max_resumes = max_resumes

    async def check(self, link: Link[Any], args: Mapping[str, Any]) -> None:
        """At submit, for a firmware command to go through ``link``: raise
        InvalidRequestError, naming the problem, when it could never be delivered: the
        link's driver cannot carry the transfer's ``ota.*`` requests (its own checks say
        why), the args are not ``path`` and ``sha256`` (and ``size``, if given) of the right
        types, or the image is not a readable file (of ``size`` bytes, if given).

        The image is not hashed here: that reads all of it, in the submit's time, and the
        delivery hashes it anyway (the file may change while the command waits)."""
        driver = link.driver
        seq = (1 << driver.seq_bits) - 1  # the widest sequence number a request carries
        chunk = base64.b64encode(bytes(self.chunk_size)).decode("ascii")
        for op, example in (
            ("ota.begin", {"size": 0, "sha256": "0" * 64}),
            ("ota.chunk", {"offset": 0, "data": chunk}),
            ("ota.end", {}),
        ):
            try:
                driver.build_request(seq, op, example, None)
            except InvalidRequestError as exc:
                raise InvalidRequestError(
                    f"firmware: the {driver.name} driver cannot carry the transfer's {op} "
                    f"requests ({exc.message})"
                ) from None
        problem = _args_problem(args)
        if problem is None:
            path: str = args["path"]
            problem = await asyncio.to_thread(_image_problem, path, args.get("size"))
        if problem is not None:
            raise InvalidRequestError(f"firmware: {problem}")

    async def __call__(self, link: Link[Any], command: Command, ctx: DeliveryContext) -> Outcome:
        problem = _args_problem(command.args)
        if problem is not None:
            raise InvalidRequestError(f"firmware: {problem}")
        path: str = command.args["path"]
        digest: str = command.args["sha256"]
        try:
            data = await asyncio.to_thread(_read, path)
        except OSError as exc:
            raise PreconditionFailedError(f"cannot read {path}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise PreconditionFailedError(f"{path} no longer matches its sha256")
        run = _Run(self, link, command, ctx, data, digest)
        return await run.go()


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


class _Run:
    """One delivery attempt of one image (which may resume across several sessions)."""

    def __init__(
        self,
        spec: FirmwareTransfer,
        link: Link[Any],
        command: Command,
        ctx: DeliveryContext,
        data: bytes,
        digest: str,
    ) -> None:
        self.spec = spec
        self.link = link
        self.command = command
        self.ctx = ctx
        self.data = data
        self.digest = digest
        self.clock = ctx.outbox.clock
        self.started = self.clock.now()
        self.bytes_sent = 0
        self.resumes = 0
        self.acked = 0

    async def go(self) -> Outcome:
        size = len(self.data)
        while True:
            begin = await self.link.request(
                "ota.begin",
                {"size": size, "sha256": self.digest},
                timeout=self.spec.chunk_timeout_s,
            )
            if isinstance(begin, Acknowledged):
                offset = begin.result.get("offset")
                if not isinstance(offset, int) or not 0 <= offset <= size:
                    return Rejected(
                        seq=begin.seq, code="protocol_error", message=f"bad offset {offset!r}"
                    )
                if self.resumes:
                    _log.info(
                        "firmware %s for %r: resuming at byte %d of %d (resume %d)",
                        self.command.id, self.ctx.device, offset, size, self.resumes,
                    )  # fmt: skip
                self.acked = offset
                failure = await self._stream(offset)
                if failure is None:
                    break
            else:
                failure = begin
            if isinstance(failure, Rejected) or self.resumes >= self.spec.max_resumes:
                return failure
            self.resumes += 1
            if not await self._link_back():
                return failure
        end = await self.link.request(
            "ota.end", {}, timeout=self.spec.chunk_timeout_s, fail_on_drop=True
        )
        if isinstance(end, Acknowledged):
            return Acknowledged(
                seq=end.seq,
                result={**end.result, "bytes_sent": self.bytes_sent, "resumes": self.resumes},
                side=end.side,
            )
        return end

    async def _stream(self, offset: int) -> Outcome | None:
        """Send from ``offset`` with a window in flight; None when all are acknowledged."""
        size = len(self.data)
        inflight: collections.deque[asyncio.Task[Outcome]] = collections.deque()
        nxt = offset
        try:
            while nxt < size or inflight:
                while nxt < size and len(inflight) < self.spec.window:
                    chunk = self.data[nxt : nxt + self.spec.chunk_size]
                    args = {"offset": nxt, "data": base64.b64encode(chunk).decode("ascii")}
                    inflight.append(
                        asyncio.get_running_loop().create_task(
                            self.link.request(
                                "ota.chunk",
                                args,
                                timeout=self.spec.chunk_timeout_s,
                                fail_on_drop=True,
                            ),
                            name=f"keeplink.firmware[{self.ctx.device}].chunk@{nxt}",
                        )
                    )
                    self.bytes_sent += len(chunk)
                    nxt += len(chunk)
                outcome = await inflight.popleft()
                if not isinstance(outcome, Acknowledged):
                    return outcome
                held = outcome.result.get("offset")
                if isinstance(held, int):
                    self.acked = max(self.acked, held)
                self._progress()
            return None
        finally:
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.wait(inflight)

    async def _link_back(self) -> bool:
        """Wait (bounded) for the link to be connected again."""
        try:
            async with deadline(self.clock, self.clock.now() + self.spec.resume_within_s):
                await self.link.wait_connected()
        except (TimeoutError, KeeplinkError) as exc:
            _log.warning(
                "firmware %s for %r: link not back within %gs (%s); giving up this attempt",
                self.command.id, self.ctx.device, self.spec.resume_within_s, exc,
            )  # fmt: skip
            return False
        return True

    def _progress(self) -> None:
        now = self.clock.now()
        size = len(self.data)
        elapsed = max(now - self.started, 1e-9)
        self.ctx.outbox.publish(
            FirmwareProgress(
                command_id=self.command.id,
                device=self.ctx.device,
                offset=self.acked,
                size=size,
                percent=100.0 * self.acked / size if size else 100.0,
                rate_bps=self.acked / elapsed,
                bytes_sent=self.bytes_sent,
                resumes=self.resumes,
                at=now,
            )
        )
