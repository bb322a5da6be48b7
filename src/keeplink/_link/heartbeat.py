"""Heartbeat and liveness: one timer per session, re-armed after every decision.

What the timer does when it fires is decided by :func:`keeplink._core.keepalive.keepalive_step`
(sans-IO): send a heartbeat, declare the peer dead, or sleep until the next due time. A frame
from the peer in the interval makes the heartbeat unnecessary (traffic is proof of life), so
none is sent; frames arriving never touch the timer: it looks at ``last_rx`` when it fires.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

from keeplink._clock import sleep_until
from keeplink._core.clock import Clock
from keeplink._core.errors import ErrorCode, KeeplinkError, LinkBrokenError
from keeplink._core.keepalive import Keepalive, keepalive_step
from keeplink._driver import Driver, HeartbeatReply
from keeplink._link.stats import Counters

if TYPE_CHECKING:
    from keeplink._link.session import Session

__all__ = ["LIVENESS_RATIO", "Heartbeat"]

LIVENESS_RATIO: Final = 3
"""Silence limit in heartbeat intervals: two lost pings are noise, three are a dead peer."""

_log = logging.getLogger("keeplink.link")


class Heartbeat:
    """A link's keepalive policy and what it has learned about the peer."""

    __slots__ = ("_clock", "_counters", "_driver", "_name", "explicit", "interval",
                 "limit", "peer_answers")  # fmt: skip

    def __init__(
        self,
        *,
        name: str,
        driver: Driver[Any],
        clock: Clock,
        counters: Counters,
        interval: float | None,
        limit: float | None,
        explicit: bool,
    ) -> None:
        self._name = name
        self._driver = driver
        self._clock = clock
        self._counters = counters
        self.interval = interval
        """Heartbeat interval in seconds, or None: no heartbeats."""
        self.limit = limit
        """Liveness limit in seconds, or None: silence is never death."""
        self.explicit = explicit
        """``liveness_s`` was given: the limit applies whatever the peer does."""
        self.peer_answers = driver.heartbeat_reply is HeartbeatReply.EXPECTED

    @property
    def needed(self) -> bool:
        """Whether a session needs the timer at all."""
        pings = self.interval is not None and self._driver.heartbeat_frame() is not None
        return pings or self.limit is not None

    def answered(self) -> None:
        """The peer answered a heartbeat: for a MAYBE peer, the limit applies from now on."""
        if not self.peer_answers:
            _log.debug("link %r: peer answers heartbeats; liveness applies", self._name)
        self.peer_answers = True

    async def run(self, session: Session[Any]) -> None:
        """The session's timer. Ends only after closing the channel (the liveness limit) or
        after a heartbeat failed to go out (the send path has closed the channel)."""
        frame = self._driver.heartbeat_frame() if self.interval is not None else None
        interval = self.interval if frame is not None else None
        clock = self._clock
        while True:
            now = clock.now()
            step = keepalive_step(
                now=now,
                last_rx=session.last_rx,
                last_ping=session.last_ping,
                interval=interval,
                limit=self.limit,
                limit_applies=self.explicit or self.peer_answers,
            )
            if step.verdict is Keepalive.DEAD:
                session.break_(
                    LinkBrokenError(
                        f"no frame from the peer for {self.limit:g}s (liveness limit)",
                        code=ErrorCode.TIMEOUT,
                    )
                )
                return
            if step.verdict is Keepalive.PING:
                session.last_ping = now
                try:
                    await session.send(frame)
                except KeeplinkError as exc:
                    _log.debug("link %r: heartbeat send failed: %s", self._name, exc)
                    return
                self._counters.heartbeats_sent += 1
                continue
            if step.next_at is None:
                await asyncio.get_running_loop().create_future()  # nothing is ever due
            else:
                await sleep_until(clock, step.next_at)
