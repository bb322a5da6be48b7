"""The link state table: every legal transition passes, every other one raises."""

from __future__ import annotations

import itertools

import pytest

from keeplink import IllegalTransitionError, LinkState
from keeplink._core.states import LINK_TRANSITIONS, check_link_transition

S = LinkState


def test_every_state_has_a_row() -> None:
    assert set(LINK_TRANSITIONS) == set(LinkState)


def test_the_designed_lifecycle_is_legal() -> None:
    path = [S.IDLE, S.CONNECTING, S.HANDSHAKING, S.CONNECTED, S.LOST, S.BACKOFF, S.CONNECTING,
            S.BACKOFF, S.CONNECTING, S.HANDSHAKING, S.FAILED, S.CONNECTING, S.STOPPING,
            S.STOPPED, S.CONNECTING]  # fmt: skip
    for old, new in itertools.pairwise(path):
        assert check_link_transition(old, new) is new


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.IDLE, S.CONNECTED),
        (S.CONNECTING, S.CONNECTED),  # never connected without a handshake
        (S.CONNECTED, S.BACKOFF),  # a session always ends through LOST
        (S.STOPPED, S.CONNECTED),
        (S.STOPPING, S.CONNECTING),  # nothing restarts a link while it stops
        (S.BACKOFF, S.FAILED),
    ],
)
def test_illegal_transitions_raise(old: LinkState, new: LinkState) -> None:
    with pytest.raises(IllegalTransitionError, match=f"{old.value} -> {new.value}"):
        check_link_transition(old, new)


def test_stopping_is_reachable_from_every_live_state() -> None:
    for state in LinkState:
        if state not in (S.STOPPING, S.STOPPED):
            assert S.STOPPING in LINK_TRANSITIONS[state], state
