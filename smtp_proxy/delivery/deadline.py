"""Deadlines for whole provider attempts, which socket timeouts alone cannot give.

A socket timeout bounds one read or one write. A hostile or broken SMTP server (and a tenant
chooses the host) can answer one byte, or one continuation line, just inside every timeout and
hold a delivery thread, and the message's lease, for as long as it likes; a few such providers
would stop the worker for every tenant. So each attempt registers its deadline here, and one
daemon thread shuts the attempt's socket down when the deadline passes: the blocked read or write
fails at once, whatever smtplib or ssl was in the middle of.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("smtp_proxy.delivery")

# Cancelled entries stay in the heap until they reach its top; past this many, it is rebuilt.
_COMPACT_AFTER = 1024


class Watchdog:
    """Runs each registered callback once its deadline (time.monotonic) passes, unless cancelled."""

    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._live: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, expire: Callable[[], None]) -> int:
        """Call expire() from the watchdog thread at deadline; returns a token for ``cancel``."""
        with self._wake:
            token = next(self._tokens)
            heapq.heappush(self._heap, (deadline, token, expire))
            self._live.add(token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="delivery-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][1] == token:  # sooner than whatever the thread is waiting for
                self._wake.notify()
        return token

    def cancel(self, token: int) -> None:
        """The attempt ended in time; its callback will not run."""
        with self._wake:
            self._live.discard(token)
            if len(self._heap) > _COMPACT_AFTER and len(self._heap) > 4 * len(self._live):
                self._heap = [entry for entry in self._heap if entry[1] in self._live]
                heapq.heapify(self._heap)

    @property
    def pending(self) -> int:
        """Callbacks still to run (for tests and metrics)."""
        with self._wake:
            return len(self._live)

    def _next_due(self) -> Callable[[], None]:
        with self._wake:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                deadline, token, expire = self._heap[0]
                delay = deadline - time.monotonic()
                if delay <= 0:
                    heapq.heappop(self._heap)
                    self._live.discard(token)
                    return expire
                self._wake.wait(delay)

    def _run(self) -> None:
        while True:
            expire = self._next_due()
            try:
                expire()
            except Exception:  # a bug in one callback must not end every later deadline
                log.exception("deadline callback failed", extra={"event": "delivery.deadline_error"})


WATCHDOG = Watchdog()
