"""The reference protocol as the simulated device speaks it on one connection: the hello,
pings, requests and their acks (slow, lost or refused as configured), and the ops."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from keeplink._clock import sleep_until
from keeplink._core.clock import Clock
from keeplink._core.jsonline import (
    Ack,
    ErrorFrame,
    Frame,
    Hello,
    JsonLineDecoder,
    Malformed,
    Ping,
    Pong,
    Req,
    Welcome,
    encode_frame,
)
from keeplink.testing.sim._ota import OtaReceiver
from keeplink.testing.sim._records import AppliedCommand, Refused


class SessionHandling:
    """The protocol half of :class:`~keeplink.testing.DeviceSimulator`: it reads the
    simulator's settings at every frame, so a change takes effect at once."""

    device_id: str
    token: str | None
    fw: str
    seq_bits: int
    answer_pings: bool
    ack_delay_s: float
    drop_acks: bool
    drop_next_acks: int
    rssi: int | None
    reject_ops: set[str]
    ack_to_newest_connection: bool
    refuse_hello: tuple[str, str] | None
    clock: Clock
    state: dict[str, Any]
    applied: list[AppliedCommand]
    received_keys: collections.Counter[str]
    firmware_images: list[bytes]
    _results_by_key: dict[str, dict[str, Any]]
    _ota: OtaReceiver
    _writers: dict[int, asyncio.StreamWriter]
    _auth_failures: int
    _requests: int
    _duplicates: int
    _pings: int
    _malformed: int
    _acks_sent: int
    _sessions: int
    _max_sessions: int
    _outstanding: dict[int, int]
    _max_outstanding: int

    if TYPE_CHECKING:

        def _spawn(self, coro: Coroutine[Any, Any, None], role: str) -> None: ...

    async def _session(
        self, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        welcomed = [False]
        try:
            await self._converse(conn, reader, writer, welcomed)
        finally:
            if welcomed[0]:
                self._sessions -= 1

    async def _converse(
        self,
        conn: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        welcomed: list[bool],
    ) -> None:
        decoder = JsonLineDecoder()
        authed = False
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for item in decoder.feed(data):
                if isinstance(item, Malformed):
                    self._malformed += 1
                    continue
                if not authed:
                    if not isinstance(item, Hello):
                        self._send(writer, ErrorFrame("protocol_error", "expected hello"))
                        return
                    if self.refuse_hello is not None:
                        self._send(writer, ErrorFrame(*self.refuse_hello))
                        await writer.drain()
                        return
                    if self.token is not None and item.token != self.token:
                        self._auth_failures += 1
                        self._send(writer, ErrorFrame("auth_failed", "invalid token"))
                        await writer.drain()
                        return
                    authed = True
                    welcomed[0] = True
                    self._sessions += 1
                    self._max_sessions = max(self._max_sessions, self._sessions)
                    self._send(writer, Welcome(device=self.device_id, fw=self.fw))
                    continue
                self._handle(conn, writer, item)
            await writer.drain()

    def _send(self, writer: asyncio.StreamWriter, frame: Frame) -> None:
        if not writer.is_closing():
            writer.write(encode_frame(frame))

    def _handle(self, conn: int, writer: asyncio.StreamWriter, frame: Frame) -> None:
        if isinstance(frame, Ping):
            self._pings += 1
            if self.answer_pings:
                self._send(writer, Pong())
            return
        if not isinstance(frame, Req):
            return  # acks, pongs, pushes from a client: ignore, as a device would
        self._requests += 1
        ack = self._execute(conn, frame)
        if self.drop_next_acks > 0:
            self.drop_next_acks -= 1
            return
        if self.drop_acks or frame.op == "noreply":
            return
        delay = self.ack_delay_s
        if frame.op == "slow" and isinstance(frame.args.get("delay_s"), int | float):
            delay = float(frame.args["delay_s"])
        self._outstanding[conn] = self._outstanding.get(conn, 0) + 1
        self._max_outstanding = max(self._max_outstanding, self._outstanding[conn])
        if delay > 0:
            self._spawn(self._delayed(conn, writer, ack, delay), "ack")
        else:
            self._send_ack(conn, writer, ack)

    async def _delayed(
        self, conn: int, writer: asyncio.StreamWriter, ack: Ack, delay: float
    ) -> None:
        await sleep_until(self.clock, self.clock.now() + delay)
        if self.ack_to_newest_connection and self._writers:
            writer = self._writers[max(self._writers)]
        self._send_ack(conn, writer, ack)

    def _send_ack(self, conn: int, writer: asyncio.StreamWriter, ack: Ack) -> None:
        self._outstanding[conn] -= 1
        if not writer.is_closing():
            writer.write(encode_frame(ack))
            self._acks_sent += 1

    def _ack(self, seq: int, result: Mapping[str, Any]) -> Ack:
        extra = {"rssi": self.rssi} if self.rssi is not None else {}
        return Ack(seq=seq % (1 << self.seq_bits), ok=True, result=dict(result), extra=extra)

    def _reject(self, seq: int, code: str, msg: str) -> Ack:
        return Ack(seq=seq % (1 << self.seq_bits), ok=False, code=code, msg=msg)

    def _execute(self, conn: int, req: Req) -> Ack:
        if req.key is not None:
            self.received_keys[req.key] += 1
        if req.key is not None and req.key in self._results_by_key:
            self._duplicates += 1
            return self._ack(req.seq, self._results_by_key[req.key])
        if req.op in self.reject_ops:
            return self._reject(req.seq, "rejected", f"{req.op} refused by device")
        try:
            result = self._apply(req)
        except Refused as exc:
            return self._reject(req.seq, exc.code, exc.msg)
        self.applied.append(AppliedCommand(req.op, dict(req.args), req.key, req.seq, conn))
        if req.key is not None:
            self._results_by_key[req.key] = result
        return self._ack(req.seq, result)

    def _apply(self, req: Req) -> dict[str, Any]:
        args = req.args
        if req.op == "set":
            self.state.update(args)
            return {"state": dict(self.state)}
        if req.op == "get":
            return {"state": dict(self.state)}
        if req.op in ("echo", "slow", "noreply"):
            return dict(args)
        if req.op == "fail":
            raise Refused(str(args.get("code", "rejected")), str(args.get("msg", "told to fail")))
        if req.op == "ota.begin":
            return self._ota.begin(args)
        if req.op == "ota.chunk":
            return self._ota.chunk(args)
        if req.op == "ota.end":
            result, image = self._ota.end()
            self.firmware_images.append(image)
            return result
        raise Refused("rejected", f"unknown op {req.op!r}")
