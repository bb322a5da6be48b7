"""The link state table: one enum, one transition table. Illegal transitions raise."""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["LINK_TRANSITIONS", "IllegalTransitionError", "LinkState", "check_link_transition"]


class LinkState(enum.StrEnum):
    IDLE = "idle"
    """Created, never started."""
    CONNECTING = "connecting"
    """Opening the channel (acquiring a slot, TCP/TLS connect)."""
    HANDSHAKING = "handshaking"
    """Channel open; the driver's handshake (hello/auth) is running."""
    CONNECTED = "connected"
    """Handshake complete; requests flow."""
    LOST = "lost"
    """The session ended (peer, network, liveness, send timeout). Cleanup runs once."""
    BACKOFF = "backoff"
    """Waiting before the next attempt; a wake signal skips the rest of the wait."""
    STOPPING = "stopping"
    """``stop()`` is tearing the link down."""
    STOPPED = "stopped"
    """Stopped by its owner. ``start()``/``connect()`` starts it again."""
    FAILED = "failed"
    """A terminal error (auth, configuration). ``start()``/``connect()`` tries again."""


_S = LinkState

LINK_TRANSITIONS: Final[dict[LinkState, frozenset[LinkState]]] = {
    _S.IDLE: frozenset({_S.CONNECTING, _S.STOPPING, _S.STOPPED}),
    _S.CONNECTING: frozenset({_S.HANDSHAKING, _S.BACKOFF, _S.FAILED, _S.STOPPING}),
    _S.HANDSHAKING: frozenset({_S.CONNECTED, _S.BACKOFF, _S.FAILED, _S.STOPPING}),
    _S.CONNECTED: frozenset({_S.LOST, _S.STOPPING}),
    _S.LOST: frozenset({_S.BACKOFF, _S.FAILED, _S.STOPPING}),
    _S.BACKOFF: frozenset({_S.CONNECTING, _S.STOPPING}),
    _S.STOPPING: frozenset({_S.STOPPED}),
    _S.STOPPED: frozenset({_S.CONNECTING, _S.STOPPING}),
    _S.FAILED: frozenset({_S.CONNECTING, _S.STOPPING}),
}


class IllegalTransitionError(RuntimeError):
    """A state machine was asked to make a transition its table does not allow (a bug)."""


def check_link_transition(old: LinkState, new: LinkState) -> LinkState:
    """Return ``new`` if ``old -> new`` is in the table, else raise IllegalTransitionError."""
    if new not in LINK_TRANSITIONS[old]:
        raise IllegalTransitionError(f"illegal link transition {old.value} -> {new.value}")
    return new
