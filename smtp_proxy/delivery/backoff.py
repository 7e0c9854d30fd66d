"""When to try a deferred message again, and when to give up. Pure arithmetic."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import NamedTuple

from smtp_proxy.config import DeliveryConfig

# A retry comes between 80% and 100% of its nominal delay, so that messages
# deferred together (a provider's outage) do not all come back in the same second.
JITTER = 0.2


def retry_delay(attempts: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before the next try after ``attempts`` tries: base * 2^(attempts-1), capped, jittered."""
    nominal = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 62))
    return nominal * (1.0 - JITTER * rng.random())


class Retry(NamedTuple):
    at: datetime | None  # None: give up
    reason: str


def next_try(
    attempts: int, created_at: datetime, now: datetime, settings: DeliveryConfig, rng: random.Random
) -> Retry:
    """The next try of a message deferred after ``attempts`` tries, or why it is failed instead."""
    if attempts >= settings.max_attempts:
        return Retry(None, f"gave up after {attempts} attempts")
    at = now + timedelta(seconds=retry_delay(attempts, settings.retry_base, settings.retry_max, rng))
    if at - created_at > timedelta(seconds=settings.max_age):
        return Retry(None, f"gave up: not delivered within delivery.max_age ({settings.max_age:g}s)")
    return Retry(at, "")
