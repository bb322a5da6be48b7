"""Heartbeat and liveness as one decision: what a session's keepalive timer does when it fires.

Sans-IO: the times are passed in. The async side keeps one timer per session, asks
:func:`keepalive_step` what to do and when to fire next, does it, and re-arms.

Traffic is proof of life: a frame that arrived from the peer in the last interval makes a
heartbeat pointless, so none is sent; the next one is due an interval after the later of the
last frame in and the last heartbeat out. (A frame *we* sent proves nothing about the peer,
so it does not count.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Keepalive", "KeepaliveStep", "keepalive_step"]


class Keepalive(enum.Enum):
    WAIT = "wait"
    """Nothing to do yet: fire again at ``next_at``."""
    PING = "ping"
    """Send a heartbeat now, then ask again."""
    DEAD = "dead"
    """The peer has been silent past the liveness limit: end the session."""


@dataclass(frozen=True, slots=True)
class KeepaliveStep:
    verdict: Keepalive
    next_at: float | None
    """When to fire next (``None`` with ``DEAD``, or when nothing will ever be due)."""


def keepalive_step(
    *,
    now: float,
    last_rx: float,
    last_ping: float,
    interval: float | None,
    limit: float | None,
    limit_applies: bool,
) -> KeepaliveStep:
    """Decide for a session whose last frame arrived at ``last_rx`` and whose last heartbeat
    (or its start) was at ``last_ping``.

    ``interval`` is the heartbeat interval (``None``: no heartbeats). ``limit`` is the
    liveness limit, enforced only while ``limit_applies``; while it does not (a peer that
    may not answer heartbeats, and has not yet), the timer still fires every ``interval``
    (or ``limit``) so that a peer that starts answering is noticed.
    """
    if limit is not None and limit_applies and now >= last_rx + limit:
        return KeepaliveStep(Keepalive.DEAD, None)
    due: list[float] = []
    if interval is not None:
        ping_at = max(last_rx, last_ping) + interval
        if now >= ping_at:
            return KeepaliveStep(Keepalive.PING, None)
        due.append(ping_at)
    if limit is not None:
        if limit_applies:
            due.append(last_rx + limit)
        elif interval is None:
            due.append(now + limit)  # look again: the limit may apply by then
    return KeepaliveStep(Keepalive.WAIT, min(due) if due else None)
