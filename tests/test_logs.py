"""The first failure of a kind is logged loud, its repeats quietly, until it recovers."""

from __future__ import annotations

from keeplink._logs import Repeats


def test_each_kind_is_loud_once_until_recovered() -> None:
    seen: Repeats[str] = Repeats()
    assert [seen.first(k) for k in ("timeout", "timeout", "refused", "timeout")] == [
        True,
        False,
        True,
        False,
    ]
    assert seen.recovered()
    assert not seen.recovered()  # nothing left to recover from
    assert seen.first("timeout")


def test_latest_only_is_loud_again_on_every_change() -> None:
    seen: Repeats[str] = Repeats(latest_only=True)
    assert [seen.first(k) for k in ("timeout", "timeout", "refused", "timeout")] == [
        True,
        False,
        True,
        True,
    ]


def test_a_noted_kind_is_a_repeat() -> None:
    seen: Repeats[str] = Repeats(latest_only=True)
    seen.note("connection_failed")  # logged by the caller some other way
    assert not seen.first("connection_failed")
    assert seen.recovered()
