"""A jsonline device simulator, for tests, demos and integration authors.

It is a real TCP (or TLS) server on loopback that speaks the reference protocol, with the
behaviours real devices have and real integrations trip over, all switchable at run time:
an auth token, the sequence width it echoes, answering pings or not, slow acks, lost acks,
state pushes, refusing ops, and sleeping (awake ``A`` seconds every ``S``, unreachable in
between). It keeps a log of every command it applied, honouring idempotency keys, so a test
can prove that each command was applied exactly once.

Ops: ``set`` (merge args into the state), ``get``, ``echo`` (ack with the args), ``slow``
(echo after ``args["delay_s"]`` seconds), ``noreply`` (never acked), ``fail`` (reject with
``args["code"]``), and the firmware ops ``ota.begin``/``ota.chunk``/``ota.end``.

Run one from a shell::

    python -m keeplink.testing.sim --port 7001 --device-id hall --token s3cret
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import logging
import signal
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keeplink._channel import CLOSING_ERRORS
from keeplink._clock import SystemClock, sleep_until
from keeplink._core.clock import Clock
from keeplink._core.errors import InvalidRequestError
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
    StatePush,
    Welcome,
    encode_frame,
)

__all__ = ["AppliedCommand", "DeviceSimulator", "SimStatistics", "main"]

_log = logging.getLogger("keeplink.sim")


@dataclass(frozen=True, slots=True)
class AppliedCommand:
    """One command the device applied (a duplicate idempotency key is not applied again)."""

    op: str
    args: Mapping[str, Any]
    key: str | None
    seq: int
    connection: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SimStatistics:
    connections_total: int
    connections_active: int
    max_concurrent: int
    auth_failures: int
    requests: int
    duplicates: int
    pings: int
    malformed: int
    asleep: bool
    acks_sent: int
    sessions_active: int
    """Connections past the handshake (welcomed) and not yet closed."""
    max_sessions: int
    max_outstanding: int
    """Most requests received but not yet answered at once (on one connection)."""


@dataclass(slots=True)
class _Ota:
    size: int
    sha256: str
    data: bytearray = field(default_factory=bytearray)


class DeviceSimulator:
    """A simulated jsonline device. Keyword-only configuration; attributes may be changed
    while it runs (``sim.answer_pings = False``, ``sim.token = "new"``…).

    ``sleepy=(awake_s, period_s)``: after :meth:`start` it is awake for ``awake_s`` seconds,
    then asleep (connections closed, new ones refused) until ``period_s`` has passed, and so
    on, on the injected ``clock``.
    """

    def __init__(
        self,
        *,
        device_id: str = "sim-1",
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        fw: str = "1.0.0",
        seq_bits: int = 32,
        answer_pings: bool = True,
        ack_delay_s: float = 0.0,
        drop_acks: bool = False,
        rssi: int | None = -61,
        push_interval_s: float | None = None,
        sleepy: tuple[float, float] | None = None,
        reject_ops: frozenset[str] = frozenset(),
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock | None = None,
    ) -> None:
        if seq_bits not in (8, 16, 32):
            raise InvalidRequestError(f"seq_bits must be 8, 16 or 32, got {seq_bits!r}")
        if sleepy is not None and not 0 < sleepy[0] < sleepy[1]:
            raise InvalidRequestError(
                f"sleepy must be (awake_s, period_s) with 0 < a < p: {sleepy}"
            )
        self.device_id = device_id
        self.token = token
        self.host = host
        self.port = port
        self.fw = fw
        self.seq_bits = seq_bits
        self.answer_pings = answer_pings
        self.ack_delay_s = ack_delay_s
        self.drop_acks = drop_acks
        self.drop_next_acks = 0
        """Apply the next N requests but send no ack for them (a lost ack), then answer
        again; the link stays up and keeps answering pings."""
        self.rssi = rssi
        self.push_interval_s = push_interval_s
        self.sleepy = sleepy
        self.reject_ops = set(reject_ops)
        self.ack_to_newest_connection = False
        """Send a delayed ack on the newest connection rather than the one the request came
        on, as a device (or cloud) does that answers after the client reconnected."""
        self.refuse_hello: tuple[str, str] | None = None
        """``(code, message)``: answer every hello with this error and close (a full hub)."""
        self.ssl_context = ssl_context
        self.clock: Clock = clock if clock is not None else SystemClock()

        self.state: dict[str, Any] = {}
        self.applied: list[AppliedCommand] = []
        self.received_keys: collections.Counter[str] = collections.Counter()
        """How many times each idempotency key arrived (applied or not)."""
        self._results_by_key: dict[str, dict[str, Any]] = {}
        self._ota: _Ota | None = None
        self.firmware_images: list[bytes] = []

        self._server: asyncio.Server | None = None
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving: set[asyncio.Task[None]] = set()
        self._schedule_task: asyncio.Task[None] | None = None
        self._asleep = False
        self._running = False
        self._conn_ids = 0
        self._active = 0
        self._max_concurrent = 0
        self._auth_failures = 0
        self._requests = 0
        self._duplicates = 0
        self._pings = 0
        self._malformed = 0
        self._acks_sent = 0
        self._sessions = 0
        self._max_sessions = 0
        self._outstanding: dict[int, int] = {}
        self._max_outstanding = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start listening (the first start picks a free port). Idempotent."""
        if self._running:
            return
        self._running = True
        await self._listen()
        if self.sleepy is not None:
            self._schedule_task = asyncio.get_running_loop().create_task(
                self._sleep_schedule(*self.sleepy), name=f"sim[{self.device_id}].sleepy"
            )
        if self.push_interval_s is not None:
            self._spawn(self._push_loop(self.push_interval_s), "push")

    async def stop(self) -> None:
        """Stop listening and close every connection; wait for all of its tasks."""
        self._running = False
        if self._schedule_task is not None:
            self._schedule_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._schedule_task
            self._schedule_task = None
        await self._unlisten()
        for writer in list(self._writers.values()):
            writer.transport.abort()
        # Connection handlers end on their own once their socket is closed (cancelling
        # them would make asyncio's stream callback log the cancellation); helpers are
        # cancelled.
        for task in self._tasks - self._serving:
            task.cancel()
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def restart(self) -> None:
        """Stop, then start again on the same port (a device reboot)."""
        await self.stop()
        self._asleep = False
        await self.start()

    async def __aenter__(self) -> DeviceSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def go_to_sleep(self) -> None:
        """Become unreachable: close connections, refuse new ones."""
        self._asleep = True
        await self._unlisten()
        self.drop_connections()

    async def wake_up(self) -> None:
        """Become reachable again on the same port."""
        self._asleep = False
        if self._running:
            await self._listen()

    def drop_connections(self) -> None:
        """Close every open connection (FIN), as a device rebooting would."""
        for writer in list(self._writers.values()):
            writer.close()

    async def _listen(self) -> None:
        if self._server is not None or self._asleep:
            return
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.ssl_context, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # Not wait_closed(): on 3.12+ it waits for every connection to finish.

    async def _sleep_schedule(self, awake_s: float, period_s: float) -> None:
        cycle_start = self.clock.now()
        while True:
            await sleep_until(self.clock, cycle_start + awake_s)
            await self.go_to_sleep()
            await sleep_until(self.clock, cycle_start + period_s)
            cycle_start += period_s
            await self.wake_up()

    def _spawn(self, coro: Any, role: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"sim[{self.device_id}].{role}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ observation

    @property
    def asleep(self) -> bool:
        return self._asleep

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def statistics(self) -> SimStatistics:
        return SimStatistics(
            connections_total=self._conn_ids,
            connections_active=self._active,
            max_concurrent=self._max_concurrent,
            auth_failures=self._auth_failures,
            requests=self._requests,
            duplicates=self._duplicates,
            pings=self._pings,
            malformed=self._malformed,
            asleep=self._asleep,
            acks_sent=self._acks_sent,
            sessions_active=self._sessions,
            max_sessions=self._max_sessions,
            max_outstanding=self._max_outstanding,
        )

    async def push_state(self, values: Mapping[str, Any]) -> int:
        """Send a ``state`` push to every connected client; returns how many got it."""
        self.state.update(values)
        data = encode_frame(StatePush(values=dict(values)))
        sent = 0
        for writer in list(self._writers.values()):
            if not writer.is_closing():
                writer.write(data)
                sent += 1
        return sent

    async def send_raw(self, data: bytes) -> int:
        """Write ``data`` as it is to every connected client (a device's babble: a line
        that is not a frame, a frame cut short); returns how many got it."""
        sent = 0
        for writer in list(self._writers.values()):
            if not writer.is_closing():
                writer.write(data)
                sent += 1
        return sent

    async def _push_loop(self, interval: float) -> None:
        n = 0
        while True:
            await sleep_until(self.clock, self.clock.now() + interval)
            n += 1
            await self.push_state({"tick": n})

    # ------------------------------------------------------------------ connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            self._serving.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(self._serving.discard)
        self._conn_ids += 1
        conn = self._conn_ids
        self._writers[conn] = writer
        self._active += 1
        self._max_concurrent = max(self._max_concurrent, self._active)
        try:
            await self._session(conn, reader, writer)
        except CLOSING_ERRORS:
            pass  # the client went away: what a dying socket raises means nothing here
        finally:
            self._active -= 1
            self._writers.pop(conn, None)
            writer.close()
            with contextlib.suppress(*CLOSING_ERRORS):
                await writer.wait_closed()

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
        except _Refused as exc:
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
            raise _Refused(str(args.get("code", "rejected")), str(args.get("msg", "told to fail")))
        if req.op == "ota.begin":
            return self._ota_begin(args)
        if req.op == "ota.chunk":
            return self._ota_chunk(args)
        if req.op == "ota.end":
            return self._ota_end()
        raise _Refused("rejected", f"unknown op {req.op!r}")

    # Firmware transfer: bytes already held survive a dropped connection.

    def _ota_begin(self, args: Mapping[str, Any]) -> dict[str, Any]:
        size, digest = args.get("size"), args.get("sha256")
        if not isinstance(size, int) or size < 0 or not isinstance(digest, str):
            raise _Refused("invalid_request", "ota.begin needs size (int) and sha256 (str)")
        if self._ota is None or (self._ota.size, self._ota.sha256) != (size, digest):
            self._ota = _Ota(size=size, sha256=digest)
        return {"offset": len(self._ota.data)}

    def _ota_chunk(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if self._ota is None:
            raise _Refused("invalid_request", "ota.chunk before ota.begin")
        offset, data = args.get("offset"), args.get("data")
        if not isinstance(offset, int) or not isinstance(data, str):
            raise _Refused("invalid_request", "ota.chunk needs offset (int) and data (base64)")
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise _Refused("invalid_request", f"ota.chunk data is not base64: {exc}") from exc
        held = len(self._ota.data)
        if offset > held:
            raise _Refused("invalid_request", f"ota.chunk offset {offset} beyond held {held}")
        if offset + len(raw) > self._ota.size:
            raise _Refused("invalid_request", "ota.chunk past the announced size")
        del self._ota.data[offset:]
        self._ota.data += raw
        return {"offset": len(self._ota.data)}

    def _ota_end(self) -> dict[str, Any]:
        ota = self._ota
        if ota is None:
            raise _Refused("invalid_request", "ota.end before ota.begin")
        if len(ota.data) != ota.size or hashlib.sha256(ota.data).hexdigest() != ota.sha256:
            self._ota = None
            raise _Refused("checksum_mismatch", "image hash does not match")
        self.firmware_images.append(bytes(ota.data))
        self._ota = None
        return {"installed": True, "size": ota.size}


class _Refused(Exception):
    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keeplink sim", description="Run a simulated jsonline device on loopback."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--device-id", default="sim-1")
    parser.add_argument("--token", default=None)
    parser.add_argument("--seq-bits", type=int, choices=(8, 16, 32), default=32)
    parser.add_argument("--no-pong", action="store_true", help="never answer pings")
    parser.add_argument("--ack-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--drop-acks", action="store_true")
    parser.add_argument("--push-interval", type=float, default=None, metavar="SECONDS")
    parser.add_argument(
        "--sleepy", nargs=2, type=float, default=None, metavar=("AWAKE_S", "PERIOD_S")
    )
    return parser


async def _run(args: argparse.Namespace) -> None:
    sim = DeviceSimulator(
        device_id=args.device_id,
        token=args.token,
        host=args.host,
        port=args.port,
        seq_bits=args.seq_bits,
        answer_pings=not args.no_pong,
        ack_delay_s=args.ack_delay,
        drop_acks=args.drop_acks,
        push_interval_s=args.push_interval,
        sleepy=tuple(args.sleepy) if args.sleepy else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        print(f"keeplink sim {sim.device_id} listening on {sim.host}:{sim.port}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
