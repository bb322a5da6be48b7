"""The espota2 uploader: sends one image to a device, as a table of states."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from keeplink._core.errors import (
    AuthError,
    ConfigError,
    LinkBrokenError,
    ProtocolError,
)
from keeplink._core.espota._wire import (
    BLOCK_SIZE,
    FEATURE_COMPRESSION,
    FEATURE_EXTENDED,
    FEATURE_SHA256_AUTH,
    MAGIC,
    OTA_TYPE_APP,
    SERVER_COMPRESSION,
    SUPPORTED_VERSIONS,
    Response,
    auth_answer,
    error_for,
    random_hex,
)

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
        cnonce: Callable[[int], str] = random_hex,
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
        answer = auth_answer(self.auth_method, self.password, text, cnonce)
        self._send.append((cnonce + answer).encode("ascii"))
        self.state = _C.AUTH_RESULT
