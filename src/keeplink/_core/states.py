"""The link's states, by their old address: the table that decides them is
:mod:`keeplink._core.linkmachine`."""

from __future__ import annotations

from keeplink._core.linkmachine import (
    LINK_TRANSITIONS,
    IllegalTransitionError,
    LinkState,
    check_link_transition,
)

__all__ = ["LINK_TRANSITIONS", "IllegalTransitionError", "LinkState", "check_link_transition"]
