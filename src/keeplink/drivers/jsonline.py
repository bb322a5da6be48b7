"""The jsonline reference driver: newline-delimited JSON over TCP or TLS.

    driver = JsonLineDriver(host="127.0.0.1", port=7001, token="s3cret")
    async with Link(driver, name="hall-thermostat") as link:
        await link.wait_connected()
        outcome = await link.request("set", {"target": 21.5}, timeout=5)

Identity: pass ``device_id`` and the session is refused with :class:`DeviceMismatchError`
(code ``device_mismatch``, terminal like an auth failure) when the device's welcome names
another device, before any request is sent: a reused address or a swapped device never
gets another device's commands.

State pushes (``{"t":"state","values":{...}}``) arrive as :class:`~keeplink.FrameReceived`
events whose ``frame`` is a :class:`StatePush` (also ``keeplink.StatePush``)::

    link.subscribe(lambda e: isinstance(e, FrameReceived) and isinstance(e.frame, StatePush)
                   and print(e.frame.values))

TLS: pass an :class:`ssl.SSLContext` (for client certificates, load them into the context
with ``load_cert_chain``). Heartbeats are ``{"t":"ping"}``, fire and forget; a device may
answer ``pong`` or nothing, so its silence only counts once it has answered one.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any, Final

from keeplink._channel import open_stream_channel
from keeplink._core.classify import error_from_code
from keeplink._core.correlation import SEQUENCE_WIDTHS
from keeplink._core.errors import (
    ConfigError,
    DeviceMismatchError,
    ProtocolError,
)
from keeplink._core.jsonline import (
    MAX_LINE,
    Ack,
    ErrorFrame,
    Frame,
    Hello,
    JsonLineDecoder,
    Malformed,
    Ping,
    Pong,
    Req,
    StatePush,
    Welcome,
    encode_frame,
    encoded_request,
    renumbered_request,
)
from keeplink._core.requests import check_request
from keeplink._driver import Channel, FrameChannel, HeartbeatReply, Reply, SessionInfo

__all__ = ["JsonLineCodec", "JsonLineDriver", "StatePush"]

SEQ_WIDTHS: Final = SEQUENCE_WIDTHS  # the widths the correlator takes
_SHOWN_ID: Final = 64  # characters of a peer's claimed id put in a message: enough to spot it


class JsonLineCodec:
    """The jsonline :class:`~keeplink.Codec`: one decoder per channel, stateless encoding."""

    __slots__ = ("_decoder", "max_line")

    def __init__(self, *, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._decoder = JsonLineDecoder(max_line=max_line)

    def feed(self, data: bytes) -> list[Frame | Malformed]:
        return self._decoder.feed(data)

    def encode(self, frame: Frame) -> bytes:
        return encode_frame(frame, max_line=self.max_line)


class JsonLineDriver:
    """Speaks jsonline to one device. Keyword-only configuration, checked at construction.

    ``device_id``: the id the device must name in its welcome (``None``: not checked).

    Raises :class:`ConfigError` for a bad port, sequence width, in-flight limit or an empty
    ``device_id``.
    """

    name = "jsonline"
    heartbeat_reply = HeartbeatReply.MAYBE

    def __init__(
        self,
        *,
        host: str,
        port: int,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        seq_bits: int = 32,
        max_in_flight: int = 64,
        heartbeat: bool = True,
        device_id: str | None = None,
    ) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"jsonline: port must be 1..65535, got {port!r}")
        if seq_bits not in SEQ_WIDTHS:
            raise ConfigError(f"jsonline: seq_bits must be one of {SEQ_WIDTHS}, got {seq_bits!r}")
        if not isinstance(max_in_flight, int) or not 1 <= max_in_flight <= 2**seq_bits:
            raise ConfigError(
                f"jsonline: max_in_flight must be 1..{2**seq_bits}, got {max_in_flight!r}"
            )
        if device_id is not None and (not isinstance(device_id, str) or not device_id):
            raise ConfigError(f"jsonline: device_id must be a non-empty string, got {device_id!r}")
        self.host = host
        self.port = port
        self.device_id = device_id
        self.token = token
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.seq_bits = seq_bits
        self.max_in_flight = max_in_flight
        self._heartbeat = heartbeat

    def __repr__(self) -> str:
        tls = " tls" if self.ssl_context is not None else ""
        return f"JsonLineDriver({self.host}:{self.port}{tls})"

    @property
    def address(self) -> str:
        """Where the device is, as messages name it."""
        return f"{self.host}:{self.port}"

    async def open(self) -> Channel[Frame]:
        """Open the TCP (or TLS) connection. Raises LinkBrokenError, or AuthError for a
        certificate that does not verify; the OS error is ``__cause__``."""
        return await open_stream_channel(
            self.host,
            self.port,
            JsonLineCodec(),
            ssl_context=self.ssl_context,
            server_hostname=self.server_hostname,
        )

    async def handshake(self, channel: FrameChannel[Frame]) -> SessionInfo:
        """Send ``hello``; wait for ``welcome``. An ``error`` frame becomes its typed error
        (``auth_failed`` → AuthError). Other frames before the welcome are ignored. A welcome
        that names another device than ``device_id`` raises DeviceMismatchError."""
        await channel.send(Hello(token=self.token))
        while True:
            frame = await channel.receive()
            if isinstance(frame, Welcome):
                if self.device_id is not None and frame.device != self.device_id:
                    claimed = frame.device[:_SHOWN_ID]
                    more = "…" if len(frame.device) > _SHOWN_ID else ""
                    raise DeviceMismatchError(
                        f"the device at {self.address} says it is {claimed!r}{more}, "
                        f"not {self.device_id!r}; session refused, nothing sent"
                    )
                return SessionInfo(device_id=frame.device, firmware=frame.fw, extra={"v": frame.v})
            if isinstance(frame, ErrorFrame):
                raise error_from_code(frame.code, frame.msg or f"peer refused: {frame.code}")
            if isinstance(frame, Hello | Req):
                raise ProtocolError(f"unexpected {type(frame).__name__} frame during handshake")

    def heartbeat_frame(self) -> Frame | None:
        return Ping() if self._heartbeat else None

    def is_heartbeat_reply(self, frame: Frame) -> bool:
        return isinstance(frame, Pong)

    def build_request(self, seq: int, op: str, args: Mapping[str, Any], key: str | None) -> Frame:
        check_request(op, args, key)
        # Encoded once, here: a value JSON cannot carry fails now, before anything is sent.
        return encoded_request(seq, op, dict(args), key, max_line=MAX_LINE)

    def renumber_request(self, frame: Frame, seq: int) -> Frame:
        """A request :meth:`build_request` made, under another sequence number: the same
        line but for the number, with no second check or encoding of its arguments."""
        if not isinstance(frame, Req):
            raise TypeError(f"not a request: {frame!r}")
        return renumbered_request(frame, seq, max_line=MAX_LINE)

    def match_reply(self, frame: Frame) -> Reply | None:
        if not isinstance(frame, Ack):
            return None
        return Reply(
            seq=frame.seq,
            ok=frame.ok,
            result=frame.result if frame.result is not None else {},
            code=frame.code,
            message=frame.msg,
            side=frame.extra,
        )
