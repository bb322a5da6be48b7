"""The espota2 receiver: what a device does with an upload, for simulators."""

from __future__ import annotations

import enum
import gzip
import hashlib
import hmac
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from keeplink._core.errors import (
    ConfigError,
)
from keeplink._core.espota._wire import (
    BLOCK_SIZE,
    DATA_TIMEOUT_S,
    FEATURE_COMPRESSION,
    FEATURE_EXTENDED,
    FEATURE_SHA256_AUTH,
    HANDSHAKE_TIMEOUT_S,
    MAGIC,
    OTA_TYPE_APP,
    SERVER_COMPRESSION,
    SUPPORTED_VERSIONS,
    Response,
    auth_answer,
    random_hex,
)

# ---------------------------------------------------------------------- device


class DeviceAuth(enum.Enum):
    """Which challenge a device with a password sends: firmware generations."""

    SHA256 = "sha256"
    """Current firmware: SHA-256, and a client that does not offer it is refused (82)."""
    SHA256_OR_MD5 = "sha256_or_md5"
    """The transition (firmware built to allow a downgrade): SHA-256 if the client offers
    it, else MD5."""
    MD5 = "md5"
    """Older firmware: MD5 always, whatever the client offers."""


class DeviceState(enum.Enum):
    MAGIC = "magic"
    FEATURES = "features"
    AUTH = "auth"  # reading cnonce + answer
    OTA_TYPE = "ota_type"  # extended protocol
    SIZE = "size"
    CHECKSUM = "checksum"
    DATA = "data"
    ACK = "ack"  # installed; reading the client's final 00
    DONE = "done"
    FAILED = "failed"


_D = DeviceState

DEVICE_READS: Final[Mapping[DeviceState, int]] = {
    _D.MAGIC: 5,
    _D.FEATURES: 1,
    _D.OTA_TYPE: 1,
    _D.SIZE: 4,
    _D.CHECKSUM: 32,
    _D.ACK: 1,
}
"""Bytes each fixed-size state of the device reads (AUTH reads twice its nonce's length,
DATA the announced size)."""


@dataclass(frozen=True, slots=True)
class OtaFault:
    """Make a simulated device fail: answer ``response`` at ``stage`` (``"begin"``: after
    the size; ``"write"``: once ``after_bytes`` of the payload arrived; ``"end"``: at the
    verification)."""

    stage: str
    response: int
    after_bytes: int = 0

    def __post_init__(self) -> None:
        if self.stage not in ("begin", "write", "end"):
            raise ConfigError(f"espota: a fault's stage is begin, write or end: {self.stage!r}")
        if not 0x80 <= self.response <= 0xFF:
            raise ConfigError(f"espota: an error response is 0x80..0xFF: {self.response!r}")


@dataclass(frozen=True, slots=True)
class UpdateStarted:
    size: int


@dataclass(frozen=True, slots=True)
class ImageProgress:
    received: int
    size: int


@dataclass(frozen=True, slots=True)
class UpdateCompleted:
    """The device verified and installed the image (it answers 45 and will reboot)."""

    image: bytes = field(repr=False)
    """The firmware as installed (decompressed when it came gzipped)."""
    payload_md5: str
    compressed: bool
    auth: str | None


@dataclass(frozen=True, slots=True)
class UpdateFailed:
    response: int | None
    """The error byte sent, or None when the session just ended (client gone, timeout)."""
    reason: str


DeviceEvent: TypeAlias = UpdateStarted | ImageProgress | UpdateCompleted | UpdateFailed


@dataclass(frozen=True, slots=True)
class DeviceStep:
    send: bytes
    events: tuple[DeviceEvent, ...]
    close: bool
    """Close the connection after writing ``send``."""


class OtaDevice:
    """The device's side of one OTA session, as ESPHome's firmware behaves. Keyword-only.

    ``password`` None: no authentication. ``auth``: which firmware generation answers
    (:class:`DeviceAuth`). ``version``: 2 acknowledges every 8192 bytes, 1 does not.
    ``compression``: takes gzip payloads (and installs them decompressed). ``extended``:
    knows the extended protocol (newer firmware; older answers the features with one
    byte). ``max_size``: a larger image is refused with 89 (the ESP32's partition is too
    small). ``fault``: fail on purpose. ``nonce`` makes the device's nonce (for tests).
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        auth: DeviceAuth = DeviceAuth.SHA256,
        version: int = 2,
        compression: bool = False,
        extended: bool = True,
        max_size: int | None = None,
        fault: OtaFault | None = None,
        nonce: Callable[[int], str] = random_hex,
    ) -> None:
        if version not in SUPPORTED_VERSIONS:
            raise ConfigError(f"espota: a device speaks version 1 or 2, not {version!r}")
        self.password = password or None
        self.auth = auth
        self.version = version
        self.compression = compression
        self.extended_supported = extended
        self.max_size = max_size
        self.fault = fault
        self._nonce_source = nonce
        self.state = DeviceState.MAGIC
        self.features = 0
        self.extended = False
        self.compressed = False
        self.auth_method: str | None = None
        self.size = 0
        self.md5 = ""
        self.received = 0
        self.ota_type = OTA_TYPE_APP
        self.ack: int | None = None
        """The client's final byte (00 from a well-behaved client)."""
        self._nonce = ""
        self._acked = 0
        self._image = bytearray()
        self._hash = hashlib.md5()
        self._buf = bytearray()
        self._out = bytearray()
        self._events: list[DeviceEvent] = []
        self._close = False

    @property
    def timeout_s(self) -> float:
        """How long the device waits for the next bytes in this state."""
        handshake = (_D.MAGIC, _D.FEATURES, _D.AUTH)
        return HANDSHAKE_TIMEOUT_S if self.state in handshake else DATA_TIMEOUT_S

    @property
    def finished(self) -> bool:
        return self.state in (_D.DONE, _D.FAILED)

    def receive_data(self, data: bytes) -> DeviceStep:
        """Feed what the client sent; ``b""`` means it closed the connection."""
        if self.finished:
            return DeviceStep(b"", (), True)
        if not data:
            if self.state is _D.ACK:
                self.state = _D.DONE  # installed already; the final ack is not required
            else:
                self._events.append(
                    UpdateFailed(None, f"the client closed the connection in {self.state.value}")
                )
                self.state = _D.FAILED
            self._close = True
            return self._step_out()
        self._buf += data
        while self._buf and not self.finished and self._advance():
            pass
        return self._step_out()

    def expire(self) -> DeviceStep:
        """The I/O layer's timer for :attr:`timeout_s` ran out."""
        if self.finished:
            return DeviceStep(b"", (), True)
        if self.state in (_D.MAGIC, _D.FEATURES, _D.AUTH):
            # The handshake watchdog closes without a word.
            self._events.append(UpdateFailed(None, "handshake timeout"))
            self.state = _D.FAILED
            self._close = True
        elif self.state is _D.ACK:
            self.state = _D.DONE
            self._close = True
        else:
            self._fail(Response.ERROR_UNKNOWN, f"no data for {self.timeout_s:g}s")
        return self._step_out()

    def _step_out(self) -> DeviceStep:
        step = DeviceStep(bytes(self._out), tuple(self._events), self._close)
        self._out.clear()
        self._events.clear()
        return step

    def _fail(self, response: int, reason: str) -> None:
        self._out.append(response)
        self._events.append(UpdateFailed(response, reason))
        self.state = _D.FAILED
        self._close = True
        self._buf.clear()

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _advance(self) -> bool:
        """Consume what the current state reads; False when more bytes must come first."""
        state = self.state
        if state is _D.DATA:
            self._on_data()
            return True
        if state is _D.AUTH:
            chunk = self._take(2 * len(self._nonce))
            if chunk is None:
                return False
            self._on_auth(chunk)
            return True
        chunk = self._take(DEVICE_READS[state])
        if chunk is None:
            return False
        if state is _D.MAGIC:
            self._on_magic(chunk)
        elif state is _D.FEATURES:
            self._on_features(chunk[0])
        elif state is _D.OTA_TYPE:
            self.ota_type = chunk[0]
            self.state = _D.SIZE
        elif state is _D.SIZE:
            self._on_size(int.from_bytes(chunk, "big"))
        elif state is _D.CHECKSUM:
            self._on_checksum(chunk)
        elif state is _D.ACK:
            self.ack = chunk[0]
            self.state = _D.DONE
            self._close = True
        return True

    def _on_magic(self, magic: bytes) -> None:
        if magic != MAGIC:
            self._fail(Response.ERROR_MAGIC, f"bad magic {magic.hex()}")
            return
        self._out += bytes([Response.OK, self.version])
        self.state = _D.FEATURES

    def _on_features(self, features: int) -> None:
        self.features = features
        self.compressed = bool(features & FEATURE_COMPRESSION) and self.compression
        self.extended = bool(features & FEATURE_EXTENDED) and self.extended_supported
        if self.extended:
            flags = SERVER_COMPRESSION if self.compressed else 0
            self._out += bytes([Response.FEATURE_FLAGS, flags])
        elif self.compressed:
            self._out.append(Response.SUPPORTS_COMPRESSION)
        else:
            self._out.append(Response.HEADER_OK)
        if self.password is None:
            self._authenticated()
            return
        offers_sha = bool(features & FEATURE_SHA256_AUTH)
        if self.auth is DeviceAuth.MD5 or (
            self.auth is DeviceAuth.SHA256_OR_MD5 and not offers_sha
        ):
            self.auth_method, request, length = "md5", Response.REQUEST_AUTH, 32
        elif offers_sha:
            self.auth_method, request, length = "sha256", Response.REQUEST_SHA256_AUTH, 64
        else:
            self._fail(Response.ERROR_AUTH_INVALID, "the client does not offer SHA-256")
            return
        self._nonce = self._nonce_source(length)
        self._out.append(request)
        self._out += self._nonce.encode("ascii")
        self.state = _D.AUTH

    def _on_auth(self, chunk: bytes) -> None:
        half = len(self._nonce)
        cnonce, answer = chunk[:half], chunk[half:]
        assert self.password is not None
        assert self.auth_method is not None
        try:
            expected = auth_answer(
                self.auth_method, self.password, self._nonce, cnonce.decode("ascii")
            )
        except UnicodeDecodeError:
            expected = ""
        if not hmac.compare_digest(expected.encode("ascii"), answer.lower()):
            self._fail(Response.ERROR_AUTH_INVALID, "wrong password")
            return
        self._authenticated()

    def _authenticated(self) -> None:
        self._out.append(Response.AUTH_OK)
        self.state = _D.OTA_TYPE if self.extended else _D.SIZE

    def _on_size(self, size: int) -> None:
        self.size = size
        if self.ota_type != OTA_TYPE_APP:
            self._fail(Response.ERROR_UNSUPPORTED_OTA_TYPE, "only app updates")
            return
        self._events.append(UpdateStarted(size))
        if self.fault is not None and self.fault.stage == "begin":
            self._fail(self.fault.response, "fault at begin")
            return
        if self.max_size is not None and size > self.max_size:
            self._fail(Response.ERROR_ESP32_NOT_ENOUGH_SPACE, f"{size} > {self.max_size} bytes")
            return
        self._out.append(Response.UPDATE_PREPARE_OK)
        self.state = _D.CHECKSUM

    def _on_checksum(self, md5: bytes) -> None:
        self.md5 = md5.decode("ascii", "replace").lower()
        self._out.append(Response.BIN_MD5_OK)
        self.state = _D.DATA
        if self.size == 0:
            self._finish()

    def _on_data(self) -> None:
        n = min(len(self._buf), self.size - self.received)
        fault = self.fault
        if fault is not None and fault.stage == "write" and self.received < fault.after_bytes:
            n = min(n, fault.after_bytes - self.received)  # fail exactly there
        chunk = self._buf[:n]
        del self._buf[:n]
        self._image += chunk
        self._hash.update(chunk)
        self.received += n
        if fault is not None and fault.stage == "write" and self.received >= fault.after_bytes:
            self._fail(fault.response, f"fault after {self.received} bytes")
            return
        if self.version >= 2:
            while self._acked + BLOCK_SIZE <= self.received or (
                self.received == self.size and self._acked < self.size
            ):
                self._out.append(Response.CHUNK_OK)
                self._acked += BLOCK_SIZE
        self._events.append(ImageProgress(self.received, self.size))
        if self.received == self.size:
            self._finish()

    def _finish(self) -> None:
        self._out.append(Response.RECEIVE_OK)
        if self.fault is not None and self.fault.stage == "end":
            self._fail(self.fault.response, "fault at end")
            return
        if self._hash.hexdigest() != self.md5:
            self._fail(Response.ERROR_MD5_MISMATCH, "MD5 mismatch")
            return
        image = bytes(self._image)
        if self.compressed:
            try:
                image = gzip.decompress(image)
            except (OSError, EOFError, zlib.error):
                self._fail(Response.ERROR_UPDATE_END, "the gzip payload does not inflate")
                return
        self._out.append(Response.UPDATE_END_OK)
        self._events.append(
            UpdateCompleted(
                image=image, payload_md5=self.md5, compressed=self.compressed,
                auth=self.auth_method,
            )
        )  # fmt: skip
        self.state = _D.ACK
