"""Heartbeat and liveness as one decision, sans-IO: when to ping, when the peer is dead."""

from __future__ import annotations

import pytest

from keeplink._core.keepalive import Keepalive, KeepaliveStep, keepalive_step

K = Keepalive


def step(now: float, last_rx: float = 0.0, last_ping: float = 0.0, **kw: object) -> KeepaliveStep:
    kw.setdefault("interval", 30.0)
    kw.setdefault("limit", 90.0)
    kw.setdefault("limit_applies", True)
    return keepalive_step(now=now, last_rx=last_rx, last_ping=last_ping, **kw)  # type: ignore[arg-type]


def test_a_quiet_session_pings_every_interval() -> None:
    assert step(29.9) == KeepaliveStep(K.WAIT, 30.0)
    assert step(30.0) == KeepaliveStep(K.PING, None)
    assert step(30.0, last_ping=30.0) == KeepaliveStep(K.WAIT, 60.0)


def test_a_frame_from_the_peer_in_the_interval_makes_the_ping_unnecessary() -> None:
    assert step(30.0, last_rx=20.0) == KeepaliveStep(K.WAIT, 50.0)
    assert step(50.0, last_rx=20.0) == KeepaliveStep(K.PING, None)


def test_silence_past_the_limit_is_death_when_the_limit_applies() -> None:
    assert step(89.9, last_ping=60.0) == KeepaliveStep(K.WAIT, 90.0)
    assert step(90.0, last_ping=60.0) == KeepaliveStep(K.DEAD, None)
    assert step(90.0, last_ping=90.0, limit_applies=False) == KeepaliveStep(K.WAIT, 120.0)


@pytest.mark.parametrize(("applies", "expected"), [(True, 90.0), (False, 190.0)])
def test_without_heartbeats_the_limit_alone_sets_the_time(applies: bool, expected: float) -> None:
    # Not applying yet: look again a limit later (the peer may start answering).
    assert step(100.0 if not applies else 0.0, interval=None, limit_applies=applies) == (
        KeepaliveStep(K.WAIT, expected)
    )


def test_with_neither_nothing_is_ever_due() -> None:
    assert step(5.0, interval=None, limit=None) == KeepaliveStep(K.WAIT, None)
