"""The watchdog that ends provider attempts at their deadline: order, cancellation, its own upkeep."""

from __future__ import annotations

import threading
import time

from smtp_proxy.delivery.deadline import Watchdog
from tests.waiting import wait_for


def test_callbacks_run_at_their_deadlines_in_deadline_order() -> None:
    watchdog = Watchdog()
    fired: list[tuple[str, float]] = []
    start = time.monotonic()
    for name, delay in (("late", 0.30), ("early", 0.10), ("middle", 0.20)):
        watchdog.watch(start + delay, lambda name=name: fired.append((name, time.monotonic() - start)))
    wait_for(lambda: len(fired) == 3, "three deadlines fired")
    assert [name for name, _ in fired] == ["early", "middle", "late"]
    for (_, at), due in zip(fired, (0.10, 0.20, 0.30), strict=True):
        assert due <= at < due + 0.5
    assert watchdog.pending == 0


def test_a_sooner_deadline_wakes_the_thread_that_waits_for_a_later_one() -> None:
    watchdog = Watchdog()
    fired = threading.Event()
    watchdog.watch(time.monotonic() + 60, lambda: None)
    wait_for(lambda: len(watchdog._wake._waiters) == 1, "the thread asleep towards the 60 s deadline")
    started = time.monotonic()
    watchdog.watch(started + 0.05, fired.set)
    assert fired.wait(2.0)
    assert time.monotonic() - started < 1.0


def test_a_cancelled_callback_never_runs() -> None:
    watchdog = Watchdog()
    fired: list[str] = []
    token = watchdog.watch(time.monotonic() + 0.1, lambda: fired.append("cancelled"))
    watchdog.watch(time.monotonic() + 0.2, lambda: fired.append("kept"))
    watchdog.cancel(token)
    wait_for(lambda: "kept" in fired, "the kept deadline")
    # One thread runs callbacks in deadline order: the cancelled one would have run first.
    assert fired == ["kept"]


def test_a_failing_callback_does_not_stop_later_ones() -> None:
    watchdog = Watchdog()
    fired = threading.Event()

    def broken() -> None:
        raise RuntimeError("bug")

    watchdog.watch(time.monotonic() + 0.05, broken)
    watchdog.watch(time.monotonic() + 0.1, fired.set)
    assert fired.wait(2.0)


def test_cancelled_entries_do_not_pile_up() -> None:
    """Attempts that end in time (nearly all of them) leave nothing behind for long."""
    watchdog = Watchdog()
    far = time.monotonic() + 3600
    for _ in range(20_000):
        watchdog.cancel(watchdog.watch(far, lambda: None))
    assert watchdog.pending == 0
    assert len(watchdog._heap) <= 4 * 1024
