"""The retry schedule: exponential from retry_base, capped, jittered down, bounded by attempts and age."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from smtp_proxy.config import config_from_dict
from smtp_proxy.delivery.backoff import JITTER, next_try, retry_delay

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def settings(**delivery: object):
    return config_from_dict({"delivery": delivery}, env={}).delivery


class Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_nominal_schedule_doubles_from_the_base_up_to_the_cap() -> None:
    no_jitter = Fixed(0.0)
    delays = [retry_delay(n, 60, 3600, no_jitter) for n in range(1, 10)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


def test_jitter_only_shortens_and_by_at_most_the_jitter_share() -> None:
    assert retry_delay(3, 60, 3600, Fixed(0.999999)) == pytest.approx(240 * (1 - JITTER), rel=1e-5)
    rng = random.Random(1)
    samples = [retry_delay(20, 60, 3600, rng) for _ in range(1000)]
    assert all(3600 * (1 - JITTER) <= s <= 3600 for s in samples)
    assert len({round(s, 3) for s in samples}) > 900  # spread, not one value


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert retry_delay(10_000, 60, 3600, Fixed(0.0)) == 3600


def test_next_try_is_scheduled_from_now() -> None:
    retry = next_try(1, NOW - timedelta(minutes=1), NOW, settings(), Fixed(0.0))
    assert retry.at == NOW + timedelta(seconds=60)


def test_gives_up_after_max_attempts() -> None:
    retry = next_try(30, NOW, NOW, settings(max_attempts=30), Fixed(0.0))
    assert retry.at is None and "30 attempts" in retry.reason
    assert next_try(29, NOW, NOW, settings(max_attempts=30), Fixed(0.0)).at is not None


def test_gives_up_when_the_next_try_would_pass_max_age() -> None:
    created = NOW - timedelta(days=5) + timedelta(minutes=30)
    retry = next_try(10, created, NOW, settings(), Fixed(0.0))  # next try in 1h, past 5 days
    assert retry.at is None and "max_age" in retry.reason
    assert next_try(1, created, NOW, settings(), Fixed(0.0)).at == NOW + timedelta(minutes=1)
