"""LocalCounters, the memory:// storage of the shared counters: counts, expiry, the bound."""

from __future__ import annotations

import threading
import time

import pytest

from smtp_proxy.counters import LocalCounters, get_many, incr_many, open_storage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_incr_answers_the_new_count_and_get_reads_it() -> None:
    counters = LocalCounters(clock=Clock())
    assert counters.incr("a", 60) == 1
    assert counters.incr("a", 60, amount=4) == 5
    assert counters.incr("a", 60, amount=-1) == 4
    assert counters.get("a") == 4
    assert counters.get("missing") == 0


def test_a_counter_expires_from_its_first_increment() -> None:
    clock = Clock()
    counters = LocalCounters(clock=clock)
    counters.incr("a", 60)
    clock.now += 59
    assert counters.incr("a", 60) == 2  # a later increment does not push the expiry back
    assert counters.get_expiry("a") == 1060.0
    clock.now += 1
    assert counters.get("a") == 0
    assert counters.incr("a", 60) == 1


def test_clear_and_reset() -> None:
    counters = LocalCounters(clock=Clock())
    counters.incr("a", 60)
    counters.incr("b", 60)
    counters.clear("a")
    assert counters.get("a") == 0 and counters.get("b") == 1
    assert counters.reset() == 1
    assert len(counters) == 0


def test_the_number_of_counters_is_bounded_least_recently_used_out() -> None:
    counters = LocalCounters(max_keys=3, clock=Clock())
    for key in "abc":
        counters.incr(key, 60)
    counters.incr("a", 60)  # a is now the most recently used
    counters.incr("d", 60)
    assert len(counters) == 3
    assert counters.get("b") == 0
    assert counters.get("a") == 2 and counters.get("d") == 1


def test_expired_counters_at_the_old_end_are_dropped_as_new_ones_come() -> None:
    clock = Clock()
    counters = LocalCounters(clock=clock)
    for i in range(100):
        counters.incr(f"old{i}", 10)
    clock.now += 11
    for i in range(60):
        counters.incr(f"new{i}", 10)
    # Each increment drops up to two expired counters: the 100 old ones are gone after 50.
    assert len(counters) == 60


def test_parallel_increments_are_not_lost() -> None:
    counters = LocalCounters()

    def work() -> None:
        for _ in range(1000):
            counters.incr("shared", 60)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counters.get("shared") == 8000


def test_open_storage_picks_local_counters_for_memory() -> None:
    assert isinstance(open_storage("memory://"), LocalCounters)


def test_bad_bound() -> None:
    with pytest.raises(ValueError):
        LocalCounters(max_keys=0)


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_get_many_and_incr_many_behave_as_get_and_incr(where: str, request: pytest.FixtureRequest) -> None:
    """The one-round-trip forms on Redis count like the storage's own calls (window-named keys)."""
    storage = LocalCounters() if where == "memory" else open_storage(request.getfixturevalue("redis_url"))
    assert incr_many(storage, [("a", 60, 1), ("b", 60, 5), ("a", 60, 2)]) == [1, 5, 3]
    assert get_many(storage, ["a", "b", "missing"]) == [3, 5, 0]
    assert storage.get("a") == 3
    assert 0 < storage.get_expiry("b") - time.time() <= 61  # a new counter gets its expiry
    assert incr_many(storage, [("b", 60, -1)]) == [4]
