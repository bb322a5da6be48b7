"""The backoff policy, sans-IO: exact schedules, the cap, jitter bounds, error classes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keeplink import Backoff, ConfigError, ErrorClass


def test_default_schedule_doubles_from_one_second_to_a_sixty_second_cap() -> None:
    policy = Backoff(jitter=False)
    delays = [policy.delay(n, ErrorClass.TRANSIENT, 0.5) for n in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_cloud_override_five_seconds_to_three_hundred() -> None:
    policy = Backoff(initial_s=5, cap_s=300)
    assert [policy.ceiling(n) for n in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]


def test_full_jitter_is_the_draw_times_the_ceiling() -> None:
    policy = Backoff()
    assert policy.delay(3, ErrorClass.TRANSIENT, 0.0) == 0.0
    assert policy.delay(3, ErrorClass.TRANSIENT, 0.25) == 2.0
    assert policy.delay(3, ErrorClass.TRANSIENT, 1.0) == 8.0


def test_error_classes_shape_the_delay() -> None:
    policy = Backoff(exhausted_s=45, cap_s=120)
    assert policy.delay(0, ErrorClass.RESOURCE_EXHAUSTED, 0.1) == 45
    assert policy.delay(0, ErrorClass.ABSENT, 0.1) == 120
    assert policy.delay(0, ErrorClass.TERMINAL, 0.1) is None
    assert Backoff(terminal_retry_s=600).delay(7, ErrorClass.TERMINAL, 0.1) == 600


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert Backoff().ceiling(10_000) == 60


@given(
    attempt=st.integers(min_value=0, max_value=500),
    draw=st.floats(min_value=0, max_value=1),
    initial=st.floats(min_value=0.01, max_value=100),
    factor=st.floats(min_value=1, max_value=10),
    extra=st.floats(min_value=0, max_value=1000),
)
def test_delay_is_within_zero_and_the_capped_ceiling(
    attempt: int, draw: float, initial: float, factor: float, extra: float
) -> None:
    policy = Backoff(initial_s=initial, factor=factor, cap_s=initial + extra)
    delay = policy.delay(attempt, ErrorClass.TRANSIENT, draw)
    assert delay is not None
    assert 0 <= delay <= policy.cap_s
    assert policy.ceiling(attempt) <= policy.ceiling(attempt + 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_s": 0},
        {"factor": 0.5},
        {"initial_s": 10, "cap_s": 5},
        {"exhausted_s": -1},
        {"terminal_retry_s": 0},
    ],
)
def test_nonsense_configuration_is_a_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as info:
        Backoff(**kwargs)
    assert info.value.code == "config_error"


def test_draw_outside_unit_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match="draw"):
        Backoff().delay(0, ErrorClass.TRANSIENT, 1.5)
