"""The interpreter's switch interval, scaled with the number of session threads.

A thread that waits for the GIL wakes once per switch interval to ask for it,
and each wake-up takes the GIL's mutex. When thousands of idle sessions end at
once (a client pool closing, a load balancer dropping its connections), all
their threads wait for the GIL together: at CPython's default of 5 ms, 5,000
waiters make a million wake-ups a second, and contention on that one futex
becomes all the process does. Measured on 2 cores, 5,000 sessions then took
13-38 s to end, and a new client waited as long for its greeting.

``GilPacing`` keeps waiters per interval bounded (``WAKEUPS_PER_SECOND``): the
interval stays at the default up to a few dozen sessions (so a busy listener
switches as often as before) and grows with the session count beyond that; the
same 5,000 sessions then end in under a second. The cost is that a thread
running pure Python (say, parsing a large message) is asked to yield less
often while thousands of sessions are open; any I/O still yields at once.
"""

from __future__ import annotations

import sys
import threading

DEFAULT_INTERVAL = 0.005  # CPython's own default
MAX_INTERVAL = 1.0
WAKEUPS_PER_SECOND = 10_000
STEP = 0.001  # the interval moves in steps, so it is not reset on every session


def interval_for(threads: int, base: float = DEFAULT_INTERVAL) -> float:
    """The switch interval for ``threads`` session threads that might all wait at once."""
    wanted = round(threads / WAKEUPS_PER_SECOND / STEP) * STEP
    return min(MAX_INTERVAL, max(base, wanted))


class GilPacing:
    """Counts session threads across every listener in the process and sets the interval."""

    def __init__(self, base: float = DEFAULT_INTERVAL) -> None:
        self._lock = threading.Lock()
        self._threads = 0
        self._base = base
        self._interval: float | None = None

    @property
    def threads(self) -> int:
        return self._threads

    def started(self) -> None:
        self._move(1)

    def ended(self) -> None:
        self._move(-1)

    def _move(self, delta: int) -> None:
        with self._lock:
            self._threads = max(0, self._threads + delta)
            interval = interval_for(self._threads, self._base)
            if interval != self._interval:
                sys.setswitchinterval(interval)
                self._interval = interval


PACING = GilPacing()
