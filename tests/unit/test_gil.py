"""The switch interval follows the number of session threads (smtp_proxy/gil.py)."""

from __future__ import annotations

import sys

import pytest

from smtp_proxy import gil


@pytest.fixture
def restore_interval():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_a_busy_listener_keeps_the_default_interval() -> None:
    for threads in (0, 1, 50):
        assert gil.interval_for(threads) == gil.DEFAULT_INTERVAL


def test_the_interval_bounds_wakeups_per_second_and_is_capped() -> None:
    assert gil.interval_for(5_000) == pytest.approx(0.5)
    assert gil.interval_for(10_000) == pytest.approx(1.0)
    assert gil.interval_for(1_000_000) == gil.MAX_INTERVAL
    for threads in (100, 1_000, 5_000):
        assert threads / gil.interval_for(threads) <= gil.WAKEUPS_PER_SECOND * 1.01


def test_the_interval_moves_in_steps() -> None:
    values = {gil.interval_for(threads) for threads in range(1_000, 1_010)}
    assert len(values) <= 2


def test_pacing_sets_the_interval_as_threads_start_and_end(restore_interval) -> None:
    pacing = gil.GilPacing()
    for _ in range(2_000):
        pacing.started()
    assert pacing.threads == 2_000
    assert sys.getswitchinterval() == pytest.approx(0.2)
    for _ in range(2_000):
        pacing.ended()
    assert sys.getswitchinterval() == pytest.approx(gil.DEFAULT_INTERVAL)
    pacing.ended()  # an unbalanced end never goes below zero
    assert pacing.threads == 0


def test_a_custom_base_is_the_floor(restore_interval) -> None:
    pacing = gil.GilPacing(base=0.01)
    pacing.started()
    assert sys.getswitchinterval() == pytest.approx(0.01)


def test_set_base_lowers_the_interval_at_once_and_sessions_still_scale_it(restore_interval) -> None:
    pacing = gil.GilPacing()
    pacing.set_base(gil.API_INTERVAL)
    assert sys.getswitchinterval() == pytest.approx(gil.API_INTERVAL)
    for _ in range(1_000):
        pacing.started()
    assert sys.getswitchinterval() == pytest.approx(0.1)
