"""An in-memory driver and a peer a test scripts: a :class:`~keeplink.Link` with no sockets.

    peer = ScriptedPeer(device_id="hall", token="s3cret")
    link = Link(ScriptedDriver(peer, token="s3cret"), name="hall", clock=clock)
    async with link:
        await link.wait_connected()
        pending = asyncio.ensure_future(link.request("set", {"on": True}, timeout=5))
        request = await peer.next_request()     # what the link sent
        peer.ack(request, {"on": True})         # or peer.reject(...), or nothing at all
        outcome = await pending                  # Acknowledged(result={"on": True})

The peer speaks jsonline frames (:mod:`keeplink.drivers.jsonline`'s ``Hello``, ``Welcome``,
``Req``, ``Ack``…) as Python objects: nothing is encoded, nothing touches the network, and
nothing in it waits on time, so a :class:`~keeplink.VirtualClock` drives every timeout,
heartbeat and backoff of the link exactly. What the peer does is switched by its attributes,
at any moment: ``refuse_connections``, ``refuse_hello``, ``token``, ``silent``,
``answer_pings``, ``auto_ack``; and by its methods: :meth:`ScriptedPeer.ack`,
:meth:`~ScriptedPeer.reject`, :meth:`~ScriptedPeer.push`, :meth:`~ScriptedPeer.send`,
:meth:`~ScriptedPeer.drop`.

:class:`MemoryChannel` is the link's end of one such connection, a
:class:`~keeplink.Channel` for the tests of a driver of your own.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from keeplink._core.errors import LinkBrokenError
from keeplink._core.jsonline import (
    Ack,
    ErrorFrame,
    Frame,
    Hello,
    Malformed,
    Ping,
    Pong,
    Req,
    StatePush,
    Welcome,
)
from keeplink.drivers.jsonline import JsonLineDriver

__all__ = ["MemoryChannel", "PeerRequest", "ScriptedDriver", "ScriptedPeer"]

F = TypeVar("F")


class MemoryChannel(Generic[F]):
    """The link's end of an in-memory connection: a :class:`~keeplink.Channel`.

    Every frame the link sends goes to ``on_send`` at once, synchronously. The other end
    calls :meth:`feed` to deliver a frame (or a :class:`~keeplink.Malformed` item) and
    :meth:`end` to close the connection; ``receive`` hands out what was fed, in order, then
    raises :class:`~keeplink.LinkBrokenError`. ``on_close`` is called once, when the link
    closes its end.
    """

    def __init__(
        self,
        on_send: Callable[[F], None],
        *,
        on_close: Callable[[], None] | None = None,
        peer: str = "memory",
    ) -> None:
        self.peer = peer
        self._on_send = on_send
        self._on_close = on_close
        self._queue: collections.deque[F | Malformed] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended: LinkBrokenError | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once either end closed the connection."""
        return self._closed or self._ended is not None

    # ---------------------------------------------------------------- the link's side

    async def receive(self) -> F | Malformed:
        while not self._queue:
            if self._ended is not None:
                raise self._ended
            if self._closed:
                raise LinkBrokenError(f"channel to {self.peer} is closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def send(self, frame: F) -> None:
        if self._ended is not None:
            raise self._ended
        if self._closed:
            raise LinkBrokenError(f"channel to {self.peer} is closed")
        self._on_send(frame)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake()
            if self._on_close is not None:
                self._on_close()

    async def wait_closed(self) -> None:
        return None

    # ---------------------------------------------------------------- the other side

    def feed(self, item: F | Malformed) -> bool:
        """Deliver ``item`` to the link; False (nothing delivered) if the channel closed."""
        if self.closed:
            return False
        self._queue.append(item)
        self._wake()
        return True

    def end(self, message: str | None = None) -> None:
        """Close the connection from the other side: once the link has read what was fed,
        its ``receive`` raises ``LinkBrokenError(message)``."""
        if self._ended is None:
            self._ended = LinkBrokenError(message or f"{self.peer} closed the connection")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRequest:
    """A request as the peer received it; ``connection`` is the connection's number (from 1)."""

    seq: int
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None
    connection: int


class ScriptedPeer:
    """A jsonline device in memory, scripted by the test. Keyword-only configuration; every
    attribute can be changed at any moment.

    - ``device_id``, ``fw``: what its ``welcome`` says.
    - ``token``: the token a ``hello`` must carry (``None``: any); another one is answered
      with an ``auth_failed`` error and the connection closed.
    - ``refuse_hello``: ``(code, message)``: answer every ``hello`` with that error, close.
    - ``refuse_connections``: connecting fails, as with nothing listening.
    - ``silent``: swallow every frame and answer nothing, closing nothing: a hung device.
    - ``answer_pings``: answer ``ping`` with ``pong``.
    - ``auto_ack``: acknowledge every request at once with an empty result; otherwise each
      waits for :meth:`next_request` and the test's :meth:`ack`, :meth:`reject` (or nothing).

    It records ``requests`` (every request received), ``connections`` (opened) and
    ``sessions`` (welcomes sent).
    """

    def __init__(
        self,
        *,
        device_id: str = "scripted-1",
        fw: str | None = "1.0.0",
        token: str | None = None,
        refuse_hello: tuple[str, str] | None = None,
        refuse_connections: bool = False,
        silent: bool = False,
        answer_pings: bool = True,
        auto_ack: bool = False,
    ) -> None:
        self.device_id = device_id
        self.fw = fw
        self.token = token
        self.refuse_hello = refuse_hello
        self.refuse_connections = refuse_connections
        self.silent = silent
        self.answer_pings = answer_pings
        self.auto_ack = auto_ack
        self.requests: list[PeerRequest] = []
        self.connections = 0
        self.sessions = 0
        self._channel: MemoryChannel[Frame] | None = None
        self._pending: collections.deque[PeerRequest] = collections.deque()
        self._arrived: asyncio.Event | None = None

    @property
    def connected(self) -> bool:
        """True while a connection is open (welcomed or not)."""
        return self._channel is not None and not self._channel.closed

    def open(self) -> MemoryChannel[Frame]:
        """A new connection, the link's end of it (what :class:`ScriptedDriver` opens)."""
        if self.refuse_connections:
            raise LinkBrokenError(f"connection to {self.device_id} refused")
        self.connections += 1
        number = self.connections
        channel: MemoryChannel[Frame] = MemoryChannel(
            lambda frame: self._on_frame(number, frame),
            on_close=lambda: self._on_close(number),
            peer=f"{self.device_id}#{number}",
        )
        if self._channel is not None:
            self._channel.end()  # one connection at a time, as a small device keeps
        self._channel = channel
        return channel

    # ---------------------------------------------------------------- the script

    async def next_request(self) -> PeerRequest:
        """The next request not acknowledged automatically, waiting for one to arrive."""
        while not self._pending:
            self._arrived = self._arrived or asyncio.Event()
            self._arrived.clear()
            await self._arrived.wait()
        return self._pending.popleft()

    def ack(
        self,
        request: PeerRequest,
        result: Mapping[str, Any] | None = None,
        *,
        side: Mapping[str, Any] | None = None,
    ) -> bool:
        """Acknowledge ``request`` with ``result`` (and side data such as ``{"rssi": -61}``).
        False if the connection it came on is gone: the ack is lost, as on a real network."""
        ack = Ack(seq=request.seq, ok=True, result=dict(result or {}), extra=dict(side or {}))
        return self._reply(request, ack)

    def reject(self, request: PeerRequest, code: str = "rejected", message: str = "") -> bool:
        """Refuse ``request`` with the device's ``code``; False if its connection is gone."""
        return self._reply(request, Ack(seq=request.seq, ok=False, code=code, msg=message))

    def push(self, values: Mapping[str, Any]) -> bool:
        """Send a state push on the current connection; False if there is none."""
        return self.send(StatePush(values=dict(values)))

    def send(self, frame: Frame | Malformed) -> bool:
        """Send any frame (or a ``Malformed`` item) on the current connection."""
        return self._channel is not None and self._channel.feed(frame)

    def drop(self) -> bool:
        """Close the current connection, as a device that reboots; False if there is none."""
        channel, self._channel = self._channel, None
        if channel is None or channel.closed:
            return False
        channel.end(f"{self.device_id} closed the connection")
        return True

    # ---------------------------------------------------------------- the protocol

    def _current(self, number: int) -> MemoryChannel[Frame] | None:
        channel = self._channel
        if channel is None or channel.closed or number != self.connections:
            return None
        return channel

    def _reply(self, request: PeerRequest, ack: Ack) -> bool:
        channel = self._current(request.connection)
        return channel is not None and channel.feed(ack)

    def _on_close(self, number: int) -> None:
        if number == self.connections:
            self._channel = None

    def _on_frame(self, number: int, frame: Frame) -> None:
        channel = self._current(number)
        if channel is None or self.silent:
            return
        if isinstance(frame, Hello):
            refusal = self.refuse_hello
            if refusal is None and self.token is not None and frame.token != self.token:
                refusal = ("auth_failed", "bad token")
            if refusal is not None:
                channel.feed(ErrorFrame(code=refusal[0], msg=refusal[1]))
                channel.end(f"{self.device_id} refused the hello: {refusal[0]}")
                return
            self.sessions += 1
            channel.feed(Welcome(device=self.device_id, fw=self.fw))
        elif isinstance(frame, Ping):
            if self.answer_pings:
                channel.feed(Pong())
        elif isinstance(frame, Req):
            request = PeerRequest(
                seq=frame.seq, op=frame.op, args=dict(frame.args), key=frame.key, connection=number
            )
            self.requests.append(request)
            if self.auto_ack:
                self.ack(request)
                return
            self._pending.append(request)
            if self._arrived is not None:
                self._arrived.set()


class ScriptedDriver(JsonLineDriver):
    """The :class:`~keeplink.Driver` of a :class:`ScriptedPeer`: the jsonline driver itself
    (its handshake, identity check, requests and heartbeats), over :class:`MemoryChannel`
    connections to that peer instead of sockets.

    ``token`` goes in the ``hello``; ``device_id``, when given, is the id the peer's
    ``welcome`` must name (``device_mismatch`` otherwise); ``heartbeat`` false sends no
    pings. Raises :class:`~keeplink.ConfigError` for a bad sequence width or in-flight
    limit.
    """

    name = "scripted"

    def __init__(
        self,
        peer: ScriptedPeer,
        *,
        token: str | None = None,
        seq_bits: int = 32,
        max_in_flight: int = 64,
        heartbeat: bool = True,
        device_id: str | None = None,
    ) -> None:
        super().__init__(
            host="memory",
            port=1,  # no socket: open() gives a MemoryChannel to the peer
            token=token,
            seq_bits=seq_bits,
            max_in_flight=max_in_flight,
            heartbeat=heartbeat,
            device_id=device_id,
        )
        self.peer = peer

    def __repr__(self) -> str:
        return f"ScriptedDriver({self.peer.device_id})"

    @property
    def address(self) -> str:
        return f"scripted peer {self.peer.device_id!r}"

    async def open(self) -> MemoryChannel[Frame]:
        return self.peer.open()
