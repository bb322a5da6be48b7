"""The simulated device's server side: configuration, listening, sleeping and waking,
connections, and what a test observes; the protocol itself is in ``_session``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Coroutine, Mapping
from typing import Any

from keeplink._channel import CLOSING_ERRORS
from keeplink._clock import SystemClock, sleep_until
from keeplink._core.clock import Clock
from keeplink._core.errors import InvalidRequestError
from keeplink._core.jsonline import StatePush, encode_frame
from keeplink.testing._ports import free_port
from keeplink.testing.sim._ota import OtaReceiver
from keeplink.testing.sim._records import AppliedCommand, SimStatistics
from keeplink.testing.sim._session import SessionHandling


class DeviceSimulator(SessionHandling):
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
        self._ota = OtaReceiver()
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
        if self.port == 0 and self.host == "127.0.0.1":
            self.port = free_port()  # it may sleep or restart on it: see free_port
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

    def _spawn(self, coro: Coroutine[Any, Any, None], role: str) -> None:
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
