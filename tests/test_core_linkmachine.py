"""The link machine, sans-IO: every (state, trigger) pair, the attempt counter, the backoff
decision and the reset rule; and a check that nothing in the link assigns a state itself."""

from __future__ import annotations

import ast
import itertools
import pathlib

import pytest

from keeplink import Backoff, ErrorCode, IllegalTransitionError, LinkState
from keeplink._core.linkmachine import Action, LinkMachine, Trigger

S = LinkState
T = Trigger
A = Action

LIVE = (S.IDLE, S.CONNECTING, S.HANDSHAKING, S.CONNECTED, S.LOST, S.BACKOFF, S.FAILED)

# The specification, written out by hand: (state, trigger) -> (next state, actions), for an
# attempt that ended with a transient error. Every pair not here must be refused.
EXPECTED: dict[tuple[LinkState, Trigger], tuple[LinkState, set[Action]]] = {
    (S.IDLE, T.START): (S.CONNECTING, {A.SPAWN_SUPERVISOR}),
    (S.STOPPED, T.START): (S.CONNECTING, {A.SPAWN_SUPERVISOR}),
    (S.FAILED, T.START): (S.CONNECTING, {A.SPAWN_SUPERVISOR}),
    (S.CONNECTING, T.OPENED): (S.HANDSHAKING, {A.HANDSHAKE}),
    (S.HANDSHAKING, T.HANDSHAKE_DONE): (S.CONNECTED, {A.RUN_SESSION}),
    (S.CONNECTED, T.SESSION_ENDED): (S.LOST, {A.CLEAN_UP_SESSION}),
    (S.CONNECTING, T.ATTEMPT_ENDED): (S.BACKOFF, {A.WAIT_BACKOFF}),
    (S.HANDSHAKING, T.ATTEMPT_ENDED): (S.BACKOFF, {A.WAIT_BACKOFF}),
    (S.LOST, T.ATTEMPT_ENDED): (S.BACKOFF, {A.WAIT_BACKOFF}),
    (S.BACKOFF, T.BACKOFF_DONE): (S.CONNECTING, {A.CONNECT}),
    **{(state, T.STOP): (S.STOPPING, {A.CANCEL_SUPERVISOR}) for state in LIVE},
    (S.STOPPING, T.STOP): (S.STOPPING, set()),
    (S.STOPPED, T.STOP): (S.STOPPED, set()),
    (S.STOPPING, T.TORN_DOWN): (S.STOPPED, {A.CANCEL_REQUESTS}),
}

ALL_PAIRS = list(itertools.product(LinkState, Trigger))


@pytest.mark.parametrize(("state", "trigger"), ALL_PAIRS, ids=lambda x: x.value)
def test_every_pair_transitions_as_specified_or_is_refused(
    state: LinkState, trigger: Trigger
) -> None:
    machine = LinkMachine(Backoff(), state=state)
    machine.attempt = 2
    if (state, trigger) in EXPECTED:
        new, actions = EXPECTED[(state, trigger)]
        step = machine.handle(trigger, now=100.0, code=ErrorCode.CONNECTION_FAILED, draw=1.0)
        assert (step.old, step.new, set(step.actions)) == (state, new, actions)
        assert machine.state is new
        assert step.changed is (state is not new)
    else:
        with pytest.raises(IllegalTransitionError, match=f"{trigger.value!r}.*{state.value!r}"):
            machine.handle(trigger, now=100.0, code=ErrorCode.CONNECTION_FAILED, draw=1.0)
        assert machine.state is state  # a refusal changes nothing
        assert (machine.attempt, machine.retry_at, machine.failed_attempts) == (2, None, 0)


def test_the_table_covers_exactly_the_specification() -> None:
    from keeplink._core.linkmachine import TABLE

    assert set(TABLE) == set(EXPECTED)


@pytest.mark.parametrize("state", [S.CONNECTING, S.HANDSHAKING, S.LOST])
@pytest.mark.parametrize("code", [ErrorCode.AUTH_FAILED, ErrorCode.DEVICE_MISMATCH])
def test_a_terminal_error_gives_up(state: LinkState, code: ErrorCode) -> None:
    machine = LinkMachine(Backoff(), state=state)
    step = machine.handle(T.ATTEMPT_ENDED, now=5.0, code=code, draw=0.5)
    assert (step.new, step.actions, step.retry_at) == (S.FAILED, (A.GIVE_UP,), None)
    assert machine.retry_at is None


def test_a_terminal_error_with_a_slow_retry_waits_that_long() -> None:
    machine = LinkMachine(Backoff(terminal_retry_s=300), state=S.HANDSHAKING)
    step = machine.handle(T.ATTEMPT_ENDED, now=10.0, code=ErrorCode.AUTH_FAILED, draw=0.0)
    assert (step.new, step.actions, step.retry_at) == (S.BACKOFF, (A.WAIT_BACKOFF,), 310.0)


def test_error_classes_shape_the_wait() -> None:
    backoff = Backoff(exhausted_s=45, cap_s=120)
    for code, wait in [
        (ErrorCode.OUT_OF_CONNECTION_SLOTS, 45.0),
        (ErrorCode.DEVICE_UNAVAILABLE, 120.0),
        (ErrorCode.CONNECTION_FAILED, 1.0),
    ]:
        machine = LinkMachine(backoff, state=S.CONNECTING)
        assert machine.handle(T.ATTEMPT_ENDED, now=0.0, code=code, draw=1.0).retry_at == wait


def test_failed_attempts_grow_the_wait_until_a_completed_handshake_resets_it() -> None:
    machine = LinkMachine(Backoff(), state=S.IDLE)
    machine.handle(T.START)
    waits = []
    now = 0.0
    for n in range(8):
        if n % 2:  # every other attempt gets as far as an open channel: no reset for that
            machine.handle(T.OPENED)
        step = machine.handle(T.ATTEMPT_ENDED, now=now, code=ErrorCode.CONNECTION_FAILED, draw=1)
        assert step.retry_at is not None and machine.retry_at == step.retry_at
        waits.append(step.retry_at - now)
        now = step.retry_at
        machine.handle(T.BACKOFF_DONE, now=now)
        assert machine.retry_at is None
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
    assert (machine.attempt, machine.failed_attempts) == (8, 8)

    machine.handle(T.OPENED)
    step = machine.handle(T.HANDSHAKE_DONE)
    assert step.attempt == machine.attempt == 0  # the reset rule
    assert machine.connects == 1
    machine.handle(T.SESSION_ENDED)
    assert machine.disconnects == 1
    step = machine.handle(T.ATTEMPT_ENDED, now=now, code=ErrorCode.CONNECTION_FAILED, draw=1)
    assert step.retry_at == now + 1  # after a session that was up: from 0 ... initial_s
    assert machine.failed_attempts == 8  # a lost session is not a failed attempt
    assert machine.attempt == 1


def test_a_start_resets_the_attempts() -> None:
    machine = LinkMachine(Backoff(), state=S.CONNECTING)
    for _ in range(3):
        machine.handle(T.ATTEMPT_ENDED, code=ErrorCode.CONNECTION_FAILED)
        machine.handle(T.BACKOFF_DONE)
    machine.handle(T.STOP)
    machine.handle(T.TORN_DOWN)
    assert machine.attempt == 3
    assert machine.handle(T.START).attempt == 0


def test_an_attempt_ending_without_a_reason_is_refused() -> None:
    machine = LinkMachine(Backoff(), state=S.CONNECTING)
    with pytest.raises(ValueError, match="error code"):
        machine.handle(T.ATTEMPT_ENDED)
    assert (machine.state, machine.attempt) == (S.CONNECTING, 0)


# ---------------------------------------------------------------------- the one table decides

LINK_SOURCES = sorted(
    path
    for path in (pathlib.Path(__file__).parent.parent / "src" / "keeplink").rglob("*.py")
    if any(part.startswith("_link") for part in path.parts)
)


def test_the_link_modules_are_where_they_are_looked_for() -> None:
    assert len(LINK_SOURCES) >= 5  # a rename must not make the check below vacuous


@pytest.mark.parametrize("path", LINK_SOURCES, ids=lambda p: p.name)
def test_nothing_in_the_link_assigns_a_state_outside_the_machine(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Attribute) and sub.attr in {"state", "_state"}:
                    found.append(f"line {node.lineno}: assigns .{sub.attr}")
        if isinstance(node, ast.Name) and node.id == "check_link_transition":
            found.append(f"line {node.lineno}: checks a transition of its own")
    assert found == []
