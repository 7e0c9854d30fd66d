"""The worker's upkeep thread: queue depth metrics, the body purge, deactivated accounts' mail.

Every ``DEPTH_INTERVAL`` seconds it refreshes the queue depth and sweeps deactivated accounts'
waiting messages; every ``PURGE_INTERVAL`` it drops the bodies of messages finished more than
``delivery.retention`` ago. Several worker processes may run it at once: each statement is safe
to repeat, and the sweep takes a lock so that only one process writes the held lines.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from smtp_proxy.config import DeliveryConfig
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.delivery import metrics
from smtp_proxy.errors import DatabaseUnavailable
from smtp_proxy.storage import delivery_queue

log = logging.getLogger("smtp_proxy.delivery")

DEPTH_INTERVAL = 15.0
PURGE_INTERVAL = 600.0
PURGE_BATCH = 1000
HOLD_BATCH = 1000


class Housekeeping:
    """``run`` until ``stopping`` is set; each task can also be called on its own."""

    def __init__(
        self, database: Database, settings: Callable[[], DeliveryConfig], stopping: threading.Event
    ) -> None:
        self.database = database
        self._settings = settings
        self._stopping = stopping
        # Deactivated accounts whose waiting messages have their held line, as of their updated_at.
        self._swept: dict[uuid.UUID, datetime] = {}

    def run(self) -> None:
        next_purge = time.monotonic()
        while not self._stopping.is_set():
            self.refresh_depth()
            if time.monotonic() >= next_purge:
                self._swept.clear()  # a message requeued after its account's sweep gets its line now
                self.purge()
                next_purge = time.monotonic() + PURGE_INTERVAL
            self.sweep_held()
            self._stopping.wait(DEPTH_INTERVAL)

    def sweep_held(self) -> tuple[int, int]:
        """Deactivated accounts' waiting messages: fail those past max_age, write the held line on the rest.

        Each account is swept once after its deactivation (and again every ``PURGE_INTERVAL``, for
        a message that came back to the queue meanwhile), not at every pass: a held message gets
        one line, not one every few seconds. Returns (held, failed).
        """
        settings = self._settings()
        try:
            with self.database.read() as session:
                inactive = delivery_queue.inactive_accounts(session)
        except DatabaseUnavailable:
            return 0, 0
        self._swept = {account: at for account, at in self._swept.items() if inactive.get(account) == at}
        if not inactive:
            return 0, 0
        now = utcnow()
        gave_up = f"gave up: not delivered within delivery.max_age ({settings.max_age:g}s)"
        reason = f"{delivery_queue.HELD_TEXT}; {gave_up}"
        cutoff = now - timedelta(seconds=settings.max_age)
        failed = self._sweep(
            lambda session: delivery_queue.fail_held(session, list(inactive), cutoff, now, reason, HOLD_BATCH)
        )
        held = 0
        for account, changed_at in inactive.items():
            if account in self._swept or self._stopping.is_set():
                continue
            count = self._sweep(
                lambda session, a=account: delivery_queue.hold_waiting(session, a, now, HOLD_BATCH)
            )
            if count is None:
                break  # another process sweeps, or the database is away: next pass
            held += count
            self._swept[account] = changed_at
        if held or failed:
            log.info(
                "messages of deactivated accounts held or failed",
                extra={"event": "delivery.held_swept", "held": held, "failed": failed or 0},
            )
        metrics.HELD.inc(held)
        return held, failed or 0

    def _sweep(self, batch: Callable[[Any], int]) -> int | None:
        """Run one sweep in batches of HOLD_BATCH; None when another process has the sweep lock."""
        total = 0
        while not self._stopping.is_set():
            try:
                with self.database.transaction() as session:
                    if not delivery_queue.sweep_lock(session):
                        return None
                    count = batch(session)
            except DatabaseUnavailable:
                return None
            total += count
            if count < HOLD_BATCH:
                break
        return total

    def refresh_depth(self) -> None:
        """Set the queue depth gauges from the database (every worker reports the same depth)."""
        try:
            with self.database.read() as session:
                counts = delivery_queue.depth(session)
        except DatabaseUnavailable:
            return
        for status, count in counts.items():
            metrics.QUEUE_DEPTH.labels(status).set(count)

    def purge(self) -> int:
        """Drop the bodies of messages finished more than ``delivery.retention`` ago, in batches."""
        cutoff = utcnow() - timedelta(seconds=self._settings().retention)
        total = 0
        while not self._stopping.is_set():
            try:
                with self.database.transaction() as session:
                    purged = delivery_queue.purge_bodies(session, cutoff, PURGE_BATCH)
            except DatabaseUnavailable:
                break
            total += purged
            metrics.PURGED.inc(purged)
            if purged < PURGE_BATCH:
                break
        if total:
            log.info("bodies purged", extra={"event": "retention.purged", "messages": total})
        return total
