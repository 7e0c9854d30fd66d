"""InFlightBudget: the listener-wide bound on message bytes held in memory."""

from __future__ import annotations

import threading

import pytest

from smtp_proxy.smtp.budget import InFlightBudget


def test_take_within_the_limit_is_held() -> None:
    budget = InFlightBudget(100)
    assert budget.take(60)
    assert budget.take(40)  # an exact fit
    assert budget.held == 100
    assert budget.limit == 100


def test_take_over_the_limit_takes_nothing() -> None:
    budget = InFlightBudget(100)
    assert budget.take(60)
    assert not budget.take(41)
    assert budget.held == 60


def test_give_makes_room_again() -> None:
    budget = InFlightBudget(100)
    budget.take(100)
    budget.give(30)
    assert budget.held == 70
    assert budget.take(30)


def test_giving_back_more_than_held_stops_at_zero() -> None:
    budget = InFlightBudget(100)
    budget.take(10)
    budget.give(50)
    assert budget.held == 0
    assert not budget.take(101)


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_byte_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        InFlightBudget(limit)


def test_concurrent_takes_never_exceed_the_limit() -> None:
    budget = InFlightBudget(5_000)
    barrier = threading.Barrier(8)
    granted = [0] * 8

    def worker(index: int) -> None:
        barrier.wait()
        for _ in range(1_000):
            if budget.take(1):
                granted[index] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 5_000
    assert budget.held == 5_000


def test_concurrent_take_and_give_balance_to_zero() -> None:
    budget = InFlightBudget(1_000_000)
    barrier = threading.Barrier(8)
    refused: list[int] = []

    def worker() -> None:
        barrier.wait()
        for _ in range(2_000):
            if not budget.take(7):
                refused.append(7)
            budget.give(7)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused == []
    assert budget.held == 0


def test_a_new_limit_applies_to_the_bytes_already_held() -> None:
    """A config reload resizes the one budget every session shares; nothing held is forgotten."""
    budget = InFlightBudget(100)
    assert budget.take(80)
    budget.limit = 50
    assert not budget.take(1)
    budget.give(40)
    assert budget.take(10) and budget.held == 50
    with pytest.raises(ValueError):
        budget.limit = 0
