"""ESPHome's native OTA protocol ("espota2"), sans-IO: the client that sends an image and
the device that receives it.

Bytes in, bytes and events out; nothing here awaits, reads a clock or touches a socket. A
caller connects to the device's OTA port (3232 on an ESP32, 8266 on an ESP8266), writes
:meth:`OtaClient.start`, then feeds every read to :meth:`OtaClient.receive_data` and writes
what each :class:`ClientStep` says. :class:`OtaDevice` is the other end, for simulators.

The exchange, as ESPHome's firmware and its reference uploader speak it::

    client → device                           device → client
    magic 6C 26 F7 5C 45                      00, protocol version (1 or 2)
    features (01 gzip, 02 SHA-256 auth,       40 (header ok) or 46 (gzip accepted), or for
      04 extended protocol)                     the extended protocol 48 + server flags
                                              41 (no password), or a challenge:
                                                01 + 32 hex (MD5, old firmware) or
                                                02 + 64 hex (SHA-256, current firmware)
    cnonce hex + hex(H(password+nonce+cnonce)) 41, or 82 (wrong password)
    [extended: OTA type 00] + size (4 bytes)  42 (flash prepared)
    MD5 of the payload, 32 hex                43
    the payload                               version 2: 47 per 8192 bytes received (and
                                                one for the tail)
                                              44 (all received), then 45 (verified, installed)
    00                                        (the device reboots)

Any error: the device writes one byte of 80..FF and closes. There is no resume: a session
that breaks starts again from byte 0. Once the device holds the whole image it verifies,
installs and reboots on its own, so a connection lost after that point does not say
whether the update took (:attr:`OtaClient.committed`).
"""

from __future__ import annotations

import enum
import gzip
import hashlib
import hmac
import secrets
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from keeplink._core.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    LinkBrokenError,
    ProtocolError,
    RejectedError,
)

__all__ = [
    "BLOCK_SIZE",
    "DATA_TIMEOUT_S",
    "DEVICE_ERRORS",
    "HANDSHAKE_TIMEOUT_S",
    "MAGIC",
    "Authenticated",
    "ChunkAcknowledged",
    "ClientEvent",
    "ClientState",
    "ClientStep",
    "DeviceAuth",
    "DeviceError",
    "DeviceEvent",
    "DeviceState",
    "DeviceStep",
    "FeaturesAgreed",
    "ImageProgress",
    "ImageReceived",
    "OtaClient",
    "OtaDevice",
    "OtaFault",
    "OtaRefusedError",
    "Response",
    "TransferStarted",
    "UpdateCompleted",
    "UpdateFailed",
    "UpdateStarted",
    "UpdateVerified",
    "VersionAgreed",
]

MAGIC: Final = bytes([0x6C, 0x26, 0xF7, 0x5C, 0x45])
BLOCK_SIZE: Final = 8192
"""The device acknowledges every 8192 bytes it received (protocol version 2), whatever
sizes the client writes; the reference uploader writes blocks of this size."""
HANDSHAKE_TIMEOUT_S: Final = 20.0
"""The device gives up on a client that has not finished the handshake in 20 s."""
DATA_TIMEOUT_S: Final = 105.0
"""The device gives up after 105 s without data (current firmware; it covers lwIP's
retransmit run for a lost chunk ack: 1.5 + 3 + 6 + 12 + 24 + 48 s)."""

FEATURE_COMPRESSION: Final = 0x01
FEATURE_SHA256_AUTH: Final = 0x02
FEATURE_EXTENDED: Final = 0x04
SERVER_COMPRESSION: Final = 0x01
SERVER_PARTITION_ACCESS: Final = 0x02
OTA_TYPE_APP: Final = 0x00
SUPPORTED_VERSIONS: Final = (1, 2)


class Response(enum.IntEnum):
    """The device's one-byte answers (ESPHome's ``OTAResponseTypes``)."""

    OK = 0x00
    REQUEST_AUTH = 0x01
    REQUEST_SHA256_AUTH = 0x02
    HEADER_OK = 0x40
    AUTH_OK = 0x41
    UPDATE_PREPARE_OK = 0x42
    BIN_MD5_OK = 0x43
    RECEIVE_OK = 0x44
    UPDATE_END_OK = 0x45
    SUPPORTS_COMPRESSION = 0x46
    CHUNK_OK = 0x47
    FEATURE_FLAGS = 0x48
    ERROR_MAGIC = 0x80
    ERROR_UPDATE_PREPARE = 0x81
    ERROR_AUTH_INVALID = 0x82
    ERROR_WRITING_FLASH = 0x83
    ERROR_UPDATE_END = 0x84
    ERROR_INVALID_BOOTSTRAPPING = 0x85
    ERROR_WRONG_CURRENT_FLASH_CONFIG = 0x86
    ERROR_WRONG_NEW_FLASH_CONFIG = 0x87
    ERROR_ESP8266_NOT_ENOUGH_SPACE = 0x88
    ERROR_ESP32_NOT_ENOUGH_SPACE = 0x89
    ERROR_NO_UPDATE_PARTITION = 0x8A
    ERROR_MD5_MISMATCH = 0x8B
    ERROR_RP2040_NOT_ENOUGH_SPACE = 0x8C
    ERROR_SIGNATURE_INVALID = 0x8D
    ERROR_UNSUPPORTED_OTA_TYPE = 0x8E
    ERROR_PARTITION_TABLE_VERIFY = 0x8F
    ERROR_PARTITION_TABLE_UPDATE = 0x90
    ERROR_BOOTLOADER_VERIFY = 0x91
    ERROR_BOOTLOADER_UPDATE = 0x92
    ERROR_VERSION_DOWNGRADE = 0x93
    ERROR_ENCRYPTION_REQUIRED = 0x94
    ERROR_UNKNOWN = 0xFF


# ---------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class DeviceError:
    """What an error byte from the device means."""

    wire_code: str
    """The code it travels under (an ErrorCode value where one fits, else its own word)."""
    retryable: bool
    """Whether sending the image again may succeed without a person doing something."""
    message: str


DEVICE_ERRORS: Final[Mapping[int, DeviceError]] = {
    Response.ERROR_MAGIC: DeviceError(
        "protocol_error", False, "the device did not recognise the OTA magic bytes"
    ),
    Response.ERROR_UPDATE_PREPARE: DeviceError(
        "update_prepare_failed", False,
        "the device could not prepare its flash (is the image too big? restart the device)",
    ),
    Response.ERROR_AUTH_INVALID: DeviceError(
        "auth_failed", False, "the device refused the OTA password"
    ),
    Response.ERROR_WRITING_FLASH: DeviceError(
        "flash_write_failed", True, "the device failed to write the image to flash"
    ),
    Response.ERROR_UPDATE_END: DeviceError(
        "update_end_failed", True, "the device could not finish the update"
    ),
    Response.ERROR_INVALID_BOOTSTRAPPING: DeviceError(
        "invalid_bootstrapping", False,
        "the device needs a manual reset after its first serial flash",
    ),
    Response.ERROR_WRONG_CURRENT_FLASH_CONFIG: DeviceError(
        "wrong_current_flash_config", False,
        "the running firmware was built for another flash size; flash over USB",
    ),
    Response.ERROR_WRONG_NEW_FLASH_CONFIG: DeviceError(
        "wrong_new_flash_config", False,
        "the image was built for a flash size this device does not have",
    ),
    Response.ERROR_ESP8266_NOT_ENOUGH_SPACE: DeviceError(
        "not_enough_space", False, "the ESP8266 has no room for the image"
    ),
    Response.ERROR_ESP32_NOT_ENOUGH_SPACE: DeviceError(
        "not_enough_space", False, "the ESP32's OTA partition is too small for the image"
    ),
    Response.ERROR_NO_UPDATE_PARTITION: DeviceError(
        "no_update_partition", False, "the device has no OTA partition"
    ),
    Response.ERROR_MD5_MISMATCH: DeviceError(
        "checksum_mismatch", True, "the image the device received does not match its MD5"
    ),
    Response.ERROR_RP2040_NOT_ENOUGH_SPACE: DeviceError(
        "not_enough_space", False, "the RP2040 has no room for the image"
    ),
    Response.ERROR_SIGNATURE_INVALID: DeviceError(
        "signature_invalid", False, "the device refused the image's signature"
    ),
    Response.ERROR_UNSUPPORTED_OTA_TYPE: DeviceError(
        "unsupported_ota_type", False, "the device does not support this kind of update"
    ),
    Response.ERROR_PARTITION_TABLE_VERIFY: DeviceError(
        "partition_table_verify_failed", True, "the partition table could not be verified"
    ),
    Response.ERROR_PARTITION_TABLE_UPDATE: DeviceError(
        "partition_table_update_failed", False, "updating the partition table failed"
    ),
    Response.ERROR_BOOTLOADER_VERIFY: DeviceError(
        "bootloader_verify_failed", True, "the bootloader could not be verified"
    ),
    Response.ERROR_BOOTLOADER_UPDATE: DeviceError(
        "bootloader_update_failed", False, "updating the bootloader failed"
    ),
    Response.ERROR_VERSION_DOWNGRADE: DeviceError(
        "version_downgrade", False,
        "the device refuses an image that is not newer than the one it runs",
    ),
    Response.ERROR_ENCRYPTION_REQUIRED: DeviceError(
        "encryption_required", False, "the device accepts only encrypted OTA sessions"
    ),
    Response.ERROR_UNKNOWN: DeviceError(
        "device_error", True, "the device failed the update (unknown error)"
    ),
}  # fmt: skip
"""Every error byte the firmware sends. Retryable ones are worth a new upload within
bounds (a glitch in flash or on the way); the rest need a person or another image."""


class OtaRefusedError(RejectedError):
    """The device answered with an error byte (other than a wrong password or bad magic).

    ``response`` is the byte, ``retryable`` whether a new upload may succeed; ``wire_code``
    is the :data:`DEVICE_ERRORS` word for it (``checksum_mismatch`` has that ErrorCode).
    """

    def __init__(self, response: int, spec: DeviceError, *, stage: str) -> None:
        code = ErrorCode.CHECKSUM_MISMATCH if spec.wire_code == "checksum_mismatch" else None
        super().__init__(
            f"{spec.message} (0x{response:02X}, {stage})",
            code=code if code is not None else ErrorCode.REJECTED,
            wire_code=spec.wire_code,
        )
        self.response = response
        self.retryable = spec.retryable


def error_for(response: int, stage: str) -> AuthError | ProtocolError | OtaRefusedError:
    """The typed error for an error byte from the device (``stage``: what we waited for)."""
    spec = DEVICE_ERRORS.get(response)
    if response == Response.ERROR_AUTH_INVALID:
        assert spec is not None
        return AuthError(f"{spec.message} (0x82, {stage})")
    if response == Response.ERROR_MAGIC:
        assert spec is not None
        return ProtocolError(f"{spec.message} (0x80, {stage})")
    if spec is None:
        spec = DeviceError(f"device_error_0x{response:02x}", False, "the device failed the update")
    return OtaRefusedError(response, spec, stage=stage)


# ---------------------------------------------------------------------- client

Buffer: TypeAlias = bytes | memoryview


class ClientState(enum.Enum):
    IDLE = "idle"
    HELLO = "hello"  # magic sent; waiting for 00
    VERSION = "version"  # waiting for the version byte
    FEATURES = "features"  # features sent; waiting for the feature ack
    FLAGS = "flags"  # extended protocol: waiting for the server's flag byte
    AUTH = "auth"  # waiting for 41 or a challenge
    NONCE = "nonce"  # reading the challenge's nonce
    AUTH_RESULT = "auth_result"  # answer sent; waiting for 41
    SIZE = "size"  # size sent; waiting for 42
    CHECKSUM = "checksum"  # MD5 sent; waiting for 43
    DATA = "data"  # sending the payload; counting 47s
    VERIFY = "verify"  # all acknowledged; waiting for 44 and 45
    DONE = "done"
    FAILED = "failed"


_C = ClientState
_R = Response

CLIENT_TABLE: Final[Mapping[ClientState, Mapping[Response, ClientState]]] = {
    _C.HELLO: {_R.OK: _C.VERSION},
    _C.FEATURES: {
        _R.HEADER_OK: _C.AUTH,
        _R.SUPPORTS_COMPRESSION: _C.AUTH,
        _R.FEATURE_FLAGS: _C.FLAGS,
    },
    _C.AUTH: {
        _R.AUTH_OK: _C.SIZE,
        _R.REQUEST_AUTH: _C.NONCE,
        _R.REQUEST_SHA256_AUTH: _C.NONCE,
    },
    _C.AUTH_RESULT: {_R.AUTH_OK: _C.SIZE},
    _C.SIZE: {_R.UPDATE_PREPARE_OK: _C.CHECKSUM},
    _C.CHECKSUM: {_R.BIN_MD5_OK: _C.DATA},
    _C.DATA: {_R.CHUNK_OK: _C.DATA, _R.RECEIVE_OK: _C.VERIFY},
    _C.VERIFY: {_R.UPDATE_END_OK: _C.DONE},
}
"""The client's one table: in each state that waits for a response byte, the bytes that
are accepted and the state each leads to. Any other byte of 80..FF is the device's error;
anything else is a protocol error. (VERSION, FLAGS and NONCE read raw bytes instead.)"""

_WAITING_FOR: Final[Mapping[ClientState, str]] = {
    _C.IDLE: "the start",
    _C.HELLO: "the answer to the magic bytes",
    _C.VERSION: "the protocol version",
    _C.FEATURES: "the feature answer",
    _C.FLAGS: "the feature flags",
    _C.AUTH: "the authentication request",
    _C.NONCE: "the authentication nonce",
    _C.AUTH_RESULT: "the authentication result",
    _C.SIZE: "the flash preparation",
    _C.CHECKSUM: "the checksum answer",
    _C.DATA: "chunk acknowledgements",
    _C.VERIFY: "the verification",
    _C.DONE: "nothing",
    _C.FAILED: "nothing",
}

_AUTH_METHODS: Final[Mapping[Response, tuple[str, int]]] = {
    _R.REQUEST_AUTH: ("md5", 32),
    _R.REQUEST_SHA256_AUTH: ("sha256", 64),
}


@dataclass(frozen=True, slots=True)
class VersionAgreed:
    version: int


@dataclass(frozen=True, slots=True)
class FeaturesAgreed:
    compression: bool
    """The device takes a gzip payload (and the client has one)."""
    extended: bool
    flags: int
    """The server's feature flags (extended protocol), else 0."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    method: str | None
    """``"sha256"``, ``"md5"``, or None when the device asked for no password."""


@dataclass(frozen=True, slots=True)
class TransferStarted:
    size: int
    """Payload bytes (the gzip file when compressed)."""
    md5: str
    compressed: bool


@dataclass(frozen=True, slots=True)
class ChunkAcknowledged:
    acked: int
    """Payload bytes the device confirmed so far."""
    size: int


@dataclass(frozen=True, slots=True)
class ImageReceived:
    """44: the device holds the whole payload and now verifies and installs it."""

    size: int


@dataclass(frozen=True, slots=True)
class UpdateVerified:
    """45: the device verified and installed the image; it reboots into it now."""

    size: int


ClientEvent: TypeAlias = (
    VersionAgreed
    | FeaturesAgreed
    | Authenticated
    | TransferStarted
    | ChunkAcknowledged
    | ImageReceived
    | UpdateVerified
)


@dataclass(frozen=True, slots=True)
class ClientStep:
    send: tuple[Buffer, ...]
    """Write these, in order (payload chunks are views of the image: no copies)."""
    events: tuple[ClientEvent, ...]


def _random_hex(length: int) -> str:
    return secrets.token_hex(length // 2)


class OtaClient:
    """The uploader's side of one OTA session. Keyword-only config.

    ``image``: the firmware. ``compressed``: the same image gzipped, sent instead when the
    device says it takes gzip (the MD5 is then of the gzip file, as the device checks it).
    ``window``: device blocks (8192 bytes) in flight before an acknowledgement is needed;
    the reference uploader waits for each (1), which costs a round trip per block; 2 keeps
    the pipe full and still lets progress follow what the device really has. Version 1
    devices do not acknowledge blocks: the whole payload is handed out at once and TCP's
    flow control paces it. ``cnonce``: makes the client's nonce (for tests).

    :meth:`receive_data` raises :class:`AuthError` (wrong or missing password, or an MD5
    challenge with ``allow_md5=False``), :class:`ProtocolError` (unexpected bytes, an
    unsupported version, the device's "bad magic"), :class:`OtaRefusedError` (any other
    error byte) and :class:`LinkBrokenError` (the connection ended early). After an error
    the client is FAILED and ignores further input.
    """

    def __init__(
        self,
        image: bytes,
        *,
        password: str | None = None,
        compressed: bytes | None = None,
        window: int = 2,
        allow_md5: bool = True,
        cnonce: Callable[[int], str] = _random_hex,
    ) -> None:
        if not 1 <= window <= 64:
            raise ConfigError(f"espota: window must be 1..64, got {window!r}")
        if len(image) >= 1 << 32 or (compressed is not None and len(compressed) >= 1 << 32):
            raise ConfigError("espota: an image must be smaller than 4 GiB")
        self.image = image
        self.compressed = compressed
        self.password = password
        self.window = window
        self.allow_md5 = allow_md5
        self._cnonce = cnonce
        self.state = ClientState.IDLE
        self.version = 0
        self.extended = False
        self.flags = 0
        self.auth_method: str | None = None
        self.payload: bytes = image
        self.md5 = ""
        """Of the payload, once it is announced."""
        self.sent = 0
        """Payload bytes handed out to be written."""
        self.acked = 0
        """Payload bytes the device acknowledged (version 2)."""
        self._acks = 0
        self._in_data = False
        self._nonce_len = 0
        self._buf = bytearray()
        self._send: list[Buffer] = []
        self._events: list[ClientEvent] = []

    # -- inspection

    @property
    def done(self) -> bool:
        return self.state is ClientState.DONE

    @property
    def committed(self) -> bool:
        """The device may hold (and be installing) the whole image: a loss of the
        connection now (also once the client is FAILED by it) does not say whether the
        update took."""
        return self._in_data and self.sent >= len(self.payload) and self.state is not _C.DONE

    @property
    def waiting_for(self) -> str:
        return _WAITING_FOR[self.state]

    @property
    def in_data_phase(self) -> bool:
        """Past the handshake: the device's long data timeout applies."""
        return self.state in (_C.SIZE, _C.CHECKSUM, _C.DATA, _C.VERIFY)

    # -- driving

    def start(self) -> bytes:
        """The first bytes to write. Raises ProtocolError if called twice."""
        if self.state is not ClientState.IDLE:
            raise ProtocolError(f"espota: start() in state {self.state.value}")
        self.state = ClientState.HELLO
        return MAGIC

    def receive_data(self, data: bytes) -> ClientStep:
        """Feed what was read; ``b""`` means the device closed the connection."""
        if self.state in (_C.DONE, _C.FAILED):
            return ClientStep((), ())
        if self.state is _C.IDLE:
            raise ProtocolError("espota: receive_data() before start()")
        try:  # whatever goes wrong leaves the client FAILED; the error goes to the caller
            if not data:
                raise self._closed_error()
            self._buf += data
            while self._buf and self.state not in (_C.DONE, _C.FAILED):
                if not self._step():
                    break
        except Exception:
            self.state = _C.FAILED
            self._buf.clear()
            self._send.clear()
            self._events.clear()
            raise
        step = ClientStep(tuple(self._send), tuple(self._events))
        self._send.clear()
        self._events.clear()
        return step

    def _closed_error(self) -> LinkBrokenError:
        if self.committed:
            return LinkBrokenError(
                f"espota: the device closed the connection while we waited for "
                f"{self.waiting_for}, after it had the whole image: it may have installed it"
            )
        return LinkBrokenError(
            f"espota: the device closed the connection while we waited for {self.waiting_for}"
        )

    def _step(self) -> bool:
        """Consume what the current state needs; False when more bytes must come first."""
        state = self.state
        if state is _C.VERSION:
            self._on_version(self._take(1)[0])
            return True
        if state is _C.FLAGS:
            self._on_flags(self._take(1)[0])
            return True
        if state is _C.NONCE:
            if len(self._buf) < self._nonce_len:
                return False
            self._on_nonce(self._take(self._nonce_len))
            return True
        byte = self._take(1)[0]
        try:
            response: Response | None = _R(byte)
        except ValueError:
            response = None
        nxt = CLIENT_TABLE.get(state, {}).get(response) if response is not None else None
        if nxt is None or response is None:
            if byte >= 0x80:
                raise error_for(byte, f"while waiting for {self.waiting_for}")
            raise ProtocolError(
                f"espota: unexpected byte 0x{byte:02X} while waiting for {self.waiting_for}"
            )
        self._on_response(state, response, nxt)
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _on_version(self, version: int) -> None:
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                f"espota: the device speaks OTA protocol version {version}; "
                f"keeplink speaks {', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        self.version = version
        self._events.append(VersionAgreed(version))
        features = FEATURE_SHA256_AUTH | FEATURE_EXTENDED
        if self.compressed is not None:
            features |= FEATURE_COMPRESSION
        self._send.append(bytes([features]))
        self.state = _C.FEATURES

    def _on_flags(self, flags: int) -> None:
        self.flags = flags
        self._agree(compression=bool(flags & SERVER_COMPRESSION))

    def _agree(self, *, compression: bool) -> None:
        if compression and self.compressed is None:
            raise ProtocolError("espota: the device chose gzip, which the client did not offer")
        if compression and self.compressed is not None:
            self.payload = self.compressed
        self._events.append(
            FeaturesAgreed(compression=compression, extended=self.extended, flags=self.flags)
        )
        self.state = _C.AUTH

    def _on_response(self, state: ClientState, response: Response, nxt: ClientState) -> None:
        if state is _C.FEATURES:
            self.extended = response is _R.FEATURE_FLAGS
            if not self.extended:
                self._agree(compression=response is _R.SUPPORTS_COMPRESSION)
            else:
                self.state = nxt
            return
        if state is _C.AUTH and response is not _R.AUTH_OK:
            method, length = _AUTH_METHODS[response]
            if self.password is None:
                raise AuthError("espota: the device asks for an OTA password; none is configured")
            if method == "md5" and not self.allow_md5:
                raise AuthError(
                    "espota: the device offers only MD5 authentication (old firmware), "
                    "and allow_md5 is off"
                )
            self.auth_method = method
            self._nonce_len = length
            self.state = nxt
            return
        if response is _R.AUTH_OK:
            self._events.append(Authenticated(self.auth_method))
            head = bytes([OTA_TYPE_APP]) if self.extended else b""
            self._send.append(head + len(self.payload).to_bytes(4, "big"))
        elif state is _C.SIZE:
            self.md5 = hashlib.md5(self.payload).hexdigest()
            self._send.append(self.md5.encode("ascii"))
        elif state is _C.CHECKSUM:
            self._events.append(
                TransferStarted(
                    size=len(self.payload), md5=self.md5, compressed=self.payload is not self.image
                )
            )
            self.state = nxt
            self._in_data = True
            self._fill()
            return
        elif response is _R.CHUNK_OK:
            self._on_chunk_ok()
        elif response is _R.RECEIVE_OK:
            self._on_receive_ok()
        elif response is _R.UPDATE_END_OK:
            self._events.append(UpdateVerified(len(self.payload)))
            self._send.append(bytes([_R.OK]))
        self.state = nxt

    def _expected_acks(self) -> int:
        return -(-len(self.payload) // BLOCK_SIZE)

    def _on_chunk_ok(self) -> None:
        if self.version < 2 or self._acks >= self._expected_acks():
            raise ProtocolError("espota: the device acknowledged more blocks than were sent")
        self._acks += 1
        self.acked = min(self._acks * BLOCK_SIZE, len(self.payload))
        if self.acked > self.sent:
            raise ProtocolError("espota: the device acknowledged a block not yet sent")
        self._events.append(ChunkAcknowledged(self.acked, len(self.payload)))
        self._fill()

    def _on_receive_ok(self) -> None:
        size = len(self.payload)
        if self.sent < size or (self.version >= 2 and self._acks < self._expected_acks()):
            raise ProtocolError(
                f"espota: the device said it had the whole image after {self.acked} "
                f"acknowledged of {size} bytes"
            )
        self.acked = size
        self._events.append(ImageReceived(size))

    def _fill(self) -> None:
        """Hand out payload chunks while the window allows."""
        size = len(self.payload)
        view = memoryview(self.payload)
        # Version 1 acknowledges nothing: hand it all out, TCP paces it.
        limit = size if self.version < 2 else min(size, self.acked + self.window * BLOCK_SIZE)
        while self.sent < limit:
            end = min(self.sent + BLOCK_SIZE, limit)
            self._send.append(view[self.sent : end])
            self.sent = end

    def _on_nonce(self, nonce: bytes) -> None:
        try:
            text = nonce.decode("ascii")
            int(text, 16)
        except ValueError:
            raise ProtocolError(f"espota: the device's nonce is not hex: {nonce!r:.80}") from None
        cnonce = self._cnonce(self._nonce_len)
        if len(cnonce) != self._nonce_len:
            raise ConfigError(f"espota: a cnonce must have {self._nonce_len} hex digits")
        assert self.password is not None
        assert self.auth_method is not None
        answer = _auth_answer(self.auth_method, self.password, text, cnonce)
        self._send.append((cnonce + answer).encode("ascii"))
        self.state = _C.AUTH_RESULT


def _auth_answer(method: str, password: str, nonce: str, cnonce: str) -> str:
    hasher = hashlib.sha256() if method == "sha256" else hashlib.md5()
    hasher.update(password.encode("utf-8"))
    hasher.update(nonce.encode("ascii"))
    hasher.update(cnonce.encode("ascii"))
    return hasher.hexdigest()


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
        nonce: Callable[[int], str] = _random_hex,
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
            expected = _auth_answer(
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
