"""A short seeded chaos soak (bench/chaos.py) ends with every gated count at zero: no dead
supervisor, no leaked task, no unresolved request, no lost command, no command applied twice
(and no hung operation, no misrouted reply)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the root there
    sys.path.insert(0, _ROOT)

from bench.chaos import soak  # noqa: E402

CYCLES = 100
LINKS = 4
SEED = 20240611


@pytest.mark.slow
async def test_short_chaos_soak_ends_with_the_five_zeros() -> None:
    report = await soak(cycles=CYCLES, seed=SEED, links=LINKS)

    summary = report.table()
    assert report.dead_supervisors == 0, summary
    assert report.leaked_tasks == 0, summary
    assert report.unresolved_requests == 0, summary
    assert report.lost_commands == 0, summary
    assert report.double_applied == 0, summary
    assert report.hung_operations == 0, summary
    assert report.misrouted_replies == 0, summary
    assert report.ok, summary
    # The soak did what it says: faults of every kind, requests and commands.
    assert report.requests > 0, summary
    assert report.commands > 0, summary
    assert sum(report.request_outcomes.values()) == report.requests, summary
    assert sum(report.command_states.values()) == report.commands, summary
    assert len(report.faults) >= 10, summary
