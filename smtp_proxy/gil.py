"""The interpreter's switch interval: scaled with the SMTP session threads, short for the API.

A thread that waits for the GIL wakes once per switch interval to ask for it,
and each wake-up takes the GIL's mutex. When thousands of idle sessions end at
once (a client pool closing, a load balancer dropping its connections), all
their threads wait for the GIL together: each of N waiters wakes once per
interval, and contention on that one futex becomes all the process does. The
sessions then take many seconds to end, and a new client waits as long for its
greeting.

``GilPacing`` keeps waiters per interval bounded (``WAKEUPS_PER_SECOND``): the
interval stays at the default up to a few dozen sessions (so a busy listener
switches as often as before) and grows with the session count beyond that, so
such a herd ends quickly. The cost is that a thread running pure Python (say,
parsing a large message) is asked to yield less often while thousands of
sessions are open; any I/O still yields at once.

The API server wants the opposite end: waitress reads and writes every
connection in one I/O thread, which needs the GIL back after each poll while
the worker threads run Python. At the default interval it waits long enough to
cost the API both throughput and tail latency; ``API_INTERVAL`` gives them back.
The measurements are in the README's performance section.
"""

from __future__ import annotations

import sys
import threading

DEFAULT_INTERVAL = 0.005  # CPython's own default
API_INTERVAL = 0.002
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

    def set_base(self, base: float) -> None:
        """The interval while few session threads are open (the API server lowers it)."""
        with self._lock:
            self._base = base
            self._apply()

    def started(self) -> None:
        self._move(1)

    def ended(self) -> None:
        self._move(-1)

    def _move(self, delta: int) -> None:
        with self._lock:
            self._threads = max(0, self._threads + delta)
            self._apply()

    def _apply(self) -> None:
        interval = interval_for(self._threads, self._base)
        if interval != self._interval:
            sys.setswitchinterval(interval)
            self._interval = interval


PACING = GilPacing()
