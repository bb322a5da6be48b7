"""The link machine: the one table that decides a link's state.

Sans-IO, in the manner of h11's state module: the async side tells the machine what
happened (a :class:`Trigger`), the machine looks ``(state, trigger)`` up in :data:`TABLE`,
changes its state and returns a :class:`Transition` naming the actions to take. Nothing else
assigns a link's state. A pair that is not in the table is refused with
:class:`IllegalTransitionError` and changes nothing: it is a bug in the caller.

The machine also holds what the decisions need: the attempt counter (failed attempts since
the last completed handshake), the backoff decision after an attempt ends, the reset rule
(the counter goes back to 0 on a completed handshake or a fresh start, never on a bare TCP
connect) and the counts of connects, disconnects and failed attempts. Time and the jitter
draw are passed in; the machine never reads a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal

from keeplink._core.backoff import Backoff
from keeplink._core.errors import ErrorCode, error_class_of

__all__ = [
    "LINK_TRANSITIONS",
    "TABLE",
    "Action",
    "IllegalTransitionError",
    "LinkMachine",
    "LinkState",
    "Rule",
    "Transition",
    "Trigger",
    "check_link_transition",
]


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


class IllegalTransitionError(RuntimeError):
    """A state machine was asked to make a transition its table does not allow (a bug)."""


class Trigger(enum.Enum):
    """What happened to a link, as its async side reports it."""

    START = "start"
    """``start()`` or ``connect()`` on a link that is not running."""
    OPENED = "opened"
    """The channel is open (slot held, TCP/TLS connected)."""
    HANDSHAKE_DONE = "handshake_done"
    """The driver's handshake completed: a session."""
    SESSION_ENDED = "session_ended"
    """The session's channel closed, for whatever reason (the one disconnect path)."""
    ATTEMPT_ENDED = "attempt_ended"
    """An attempt is over (failed to connect, failed its handshake, or its session was
    lost), with the error code that ended it: decide when to try again."""
    BACKOFF_DONE = "backoff_done"
    """The backoff wait is over (its time came, or a wake signal cut it short)."""
    STOP = "stop"
    """``stop()`` / ``stop_soon()``."""
    TORN_DOWN = "torn_down"
    """The supervisor is gone after a stop: nothing of the link is left running."""


class Action(enum.Enum):
    """What the async side does after a transition."""

    SPAWN_SUPERVISOR = "spawn_supervisor"
    """Start the supervisor task; it opens the channel."""
    HANDSHAKE = "handshake"
    """Run the driver's handshake on the open channel (the supervisor's next step)."""
    RUN_SESSION = "run_session"
    """Start the session's reader and keepalive; requests may flow (its next step)."""
    CLEAN_UP_SESSION = "clean_up_session"
    """Once: end the requests bound to the session (``fail_on_drop``), count, log."""
    WAIT_BACKOFF = "wait_backoff"
    """Wait until ``retry_at`` (a wake signal cuts it short)."""
    CONNECT = "connect"
    """Open the channel again (the supervisor's next step)."""
    GIVE_UP = "give_up"
    """A terminal error: report it and end supervising (until ``start()``/``connect()``)."""
    CANCEL_SUPERVISOR = "cancel_supervisor"
    """Cancel the supervisor, or tear down at once if none is running."""
    CANCEL_REQUESTS = "cancel_requests"
    """Resolve every request still in flight as cancelled."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: the next state and the actions.

    ``retry`` rows decide with the backoff: ``then`` (``backoff``, with ``WAIT_BACKOFF``)
    unless the backoff says stop retrying, and then ``failed`` with ``GIVE_UP``.
    """

    then: LinkState
    actions: tuple[Action, ...] = ()
    retry: bool = False
    reset_attempts: bool = False
    count: Literal["connects", "disconnects", "failed_attempts"] | None = None
    """Which of the machine's counters the transition adds one to."""


_S = LinkState
_T = Trigger
_A = Action

_START: Final = Rule(_S.CONNECTING, (_A.SPAWN_SUPERVISOR,), reset_attempts=True)
_RETRY: Final = Rule(_S.BACKOFF, (_A.WAIT_BACKOFF,), retry=True, count="failed_attempts")
_STOP: Final = Rule(_S.STOPPING, (_A.CANCEL_SUPERVISOR,))

TABLE: Final[dict[tuple[LinkState, Trigger], Rule]] = {
    (_S.IDLE, _T.START): _START,
    (_S.STOPPED, _T.START): _START,
    (_S.FAILED, _T.START): _START,
    (_S.CONNECTING, _T.OPENED): Rule(_S.HANDSHAKING, (_A.HANDSHAKE,)),
    # The reset rule: only a completed handshake (or a fresh start) resets the attempts.
    (_S.HANDSHAKING, _T.HANDSHAKE_DONE): Rule(
        _S.CONNECTED, (_A.RUN_SESSION,), reset_attempts=True, count="connects"
    ),
    (_S.CONNECTED, _T.SESSION_ENDED): Rule(_S.LOST, (_A.CLEAN_UP_SESSION,), count="disconnects"),
    (_S.CONNECTING, _T.ATTEMPT_ENDED): _RETRY,
    (_S.HANDSHAKING, _T.ATTEMPT_ENDED): _RETRY,
    # A lost session is no failed attempt: it was up. The counter was reset by its handshake,
    # so the next delay is drawn from 0 ... initial_s.
    (_S.LOST, _T.ATTEMPT_ENDED): Rule(_S.BACKOFF, (_A.WAIT_BACKOFF,), retry=True),
    (_S.BACKOFF, _T.BACKOFF_DONE): Rule(_S.CONNECTING, (_A.CONNECT,)),
    (_S.IDLE, _T.STOP): _STOP,
    (_S.CONNECTING, _T.STOP): _STOP,
    (_S.HANDSHAKING, _T.STOP): _STOP,
    (_S.CONNECTED, _T.STOP): _STOP,
    (_S.LOST, _T.STOP): _STOP,
    (_S.BACKOFF, _T.STOP): _STOP,
    (_S.FAILED, _T.STOP): _STOP,
    # stop() is idempotent: a second one changes nothing and does nothing.
    (_S.STOPPING, _T.STOP): Rule(_S.STOPPING),
    (_S.STOPPED, _T.STOP): Rule(_S.STOPPED),
    (_S.STOPPING, _T.TORN_DOWN): Rule(_S.STOPPED, (_A.CANCEL_REQUESTS,)),
}
"""``(state, trigger) -> rule``. Every pair not listed is refused."""


def _targets(rule: Rule) -> frozenset[LinkState]:
    return frozenset({rule.then, _S.FAILED}) if rule.retry else frozenset({rule.then})


LINK_TRANSITIONS: Final[dict[LinkState, frozenset[LinkState]]] = {
    state: frozenset(
        target
        for (old, _), rule in TABLE.items()
        if old is state
        for target in _targets(rule)
        if target is not state
    )
    for state in LinkState
}
"""Which states may follow which: derived from :data:`TABLE` (for checking event streams)."""


def check_link_transition(old: LinkState, new: LinkState) -> LinkState:
    """Return ``new`` if some trigger takes ``old`` to ``new``, else raise
    IllegalTransitionError."""
    if new not in LINK_TRANSITIONS[old]:
        raise IllegalTransitionError(f"illegal link transition {old.value} -> {new.value}")
    return new


@dataclass(frozen=True, slots=True)
class Transition:
    """What one trigger did: the states, the actions, and the numbers behind a decision."""

    trigger: Trigger
    old: LinkState
    new: LinkState
    actions: tuple[Action, ...]
    attempt: int
    """The attempt counter after the transition."""
    retry_at: float | None = None
    """For ``WAIT_BACKOFF``: when to try again, on the caller's clock."""

    @property
    def changed(self) -> bool:
        return self.old is not self.new


class LinkMachine:
    """A link's state and the numbers its decisions need. Only :meth:`handle` changes them."""

    __slots__ = ("_state", "attempt", "backoff", "connects", "disconnects", "failed_attempts",
                 "retry_at")  # fmt: skip

    def __init__(self, backoff: Backoff, *, state: LinkState = _S.IDLE) -> None:
        self.backoff = backoff
        self._state = state
        self.attempt = 0
        """Failed attempts since the last completed handshake (or start)."""
        self.retry_at: float | None = None
        """When the backoff wait ends; set only in ``backoff``."""
        self.connects = 0
        self.disconnects = 0
        self.failed_attempts = 0

    @property
    def state(self) -> LinkState:
        return self._state

    def handle(
        self,
        trigger: Trigger,
        *,
        now: float = 0.0,
        code: ErrorCode | None = None,
        draw: float = 0.0,
    ) -> Transition:
        """Apply ``trigger``; return the transition. ``ATTEMPT_ENDED`` needs ``code`` (why
        it ended), ``now`` and ``draw`` (a uniform random number in [0, 1] for the jitter).

        Raises IllegalTransitionError if the table has no row for ``(state, trigger)``, and
        ValueError if ``ATTEMPT_ENDED`` comes without a code; the machine is unchanged then.
        """
        old = self._state
        rule = TABLE.get((old, trigger))
        if rule is None:
            raise IllegalTransitionError(
                f"link machine: {trigger.value!r} is not allowed in state {old.value!r}"
            )
        new, actions, retry_at = rule.then, rule.actions, None
        if rule.retry:
            if code is None:
                raise ValueError(f"{trigger.value!r} needs the error code that ended the attempt")
            delay = self.backoff.delay(self.attempt, error_class_of(code), draw)
            self.attempt += 1
            if delay is None:
                new, actions = _S.FAILED, (_A.GIVE_UP,)
            else:
                retry_at = now + delay
        if rule.reset_attempts:
            self.attempt = 0
        if rule.count == "connects":
            self.connects += 1
        elif rule.count == "disconnects":
            self.disconnects += 1
        elif rule.count == "failed_attempts":
            self.failed_attempts += 1
        self.retry_at = retry_at if new is _S.BACKOFF else None
        self._state = new
        return Transition(trigger, old, new, actions, self.attempt, retry_at)
