"""Per-tenant sending limits: counters in the ``limits`` library's storage, windows on the clock.

``limits.storage`` is ``memory://`` (one process) or ``redis://host:port``, shared by every
listener, API and worker instance, so that several instances behind a balancer enforce one
limit. Each window is a fixed one aligned to the epoch (the minute, the hour, the UTC day), so
"try again in N seconds" and the usage endpoint need no stored expiry.

A message is checked before it is accepted (``check`` at MAIL FROM: may it go, and how
many recipients are left) and counted only once it was stored (``record``): nothing is
counted for a message that was refused. Two sessions of one account that check at the same
moment can both pass and overshoot a limit by what they send together; the next check sees
both. In a shared storage a process sends its counts every ``FLUSH_SECONDS`` from one
thread (a round trip per message on the session's thread cost a sixth of the listener's
throughput), so another instance sees them that much later. Counters are kept for every
window whether or not it has a limit, so the usage endpoint shows real counts and a limit
set later applies to what was already sent.

When the storage does not answer, mail is not refused: the outage is logged and the message
goes through uncounted (the relay's job is to accept mail; a quota is a fairness measure).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from limits.storage import Storage

from smtp_proxy.config import SENDING_LIMITS, LimitsConfig
from smtp_proxy.counters import LocalCounters, get_many, incr_many

log = logging.getLogger("smtp_proxy.limits")

# How long a stored message may wait before it is counted in a shared storage.
FLUSH_SECONDS = 0.05

# name -> (what is counted, window seconds)
WINDOWS: Mapping[str, tuple[str, int]] = {
    "messages_per_minute": ("messages", 60),
    "messages_per_hour": ("messages", 3600),
    "messages_per_day": ("messages", 86400),
    "recipients_per_day": ("recipients", 86400),
}
assert tuple(WINDOWS) == SENDING_LIMITS


def effective_limits(defaults: LimitsConfig, own: Mapping[str, Any] | None) -> dict[str, int | None]:
    """The limits in force for one account: its own where it names them (null = unlimited)."""
    own = own or {}
    return {name: own[name] if name in own else getattr(defaults, name) for name in SENDING_LIMITS}


@dataclass(frozen=True)
class LimitCheck:
    """What MAIL FROM needs to know of an account's counts."""

    wait: int | None  # seconds until one more message may go; None: it may go now
    window: str | None  # the window that refused (the one that resets last)
    recipients: tuple[int, int] | None  # (recipients left today, seconds to the day's end); None: no limit


@dataclass(frozen=True)
class WindowUsage:
    name: str
    limit: int | None
    used: int
    resets_in: int  # seconds until this window starts over


class SendingLimits:
    """Checks and counts one account's messages and recipients; safe to share between threads."""

    def __init__(self, storage: Storage, clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self._clock = clock
        # A shared storage is a round trip away: stored messages are counted by one thread,
        # FLUSH_SECONDS at a time, not on the session's thread. Until then this process's
        # own reads add what it has not sent yet.
        self._batched = not isinstance(storage, LocalCounters)
        self._lock = threading.Lock()
        self._pending: dict[str, list[int]] = {}  # key -> [expiry, amount]
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()

    def _key(self, account_id: uuid.UUID, name: str, now: float) -> tuple[str, int, float]:
        _what, seconds = WINDOWS[name]
        bucket = int(now // seconds)
        ends = (bucket + 1) * seconds
        return f"smtp-proxy/send/{account_id}/{name}/{bucket}", seconds, ends

    def check(self, account_id: uuid.UUID, limits: Mapping[str, int | None]) -> LimitCheck:
        """Whether one more message may go now, and the day's recipients left: one read of the counts."""
        now = self._clock()
        names = [name for name in SENDING_LIMITS if limits.get(name) is not None]
        if not names:
            return LimitCheck(None, None, None)
        keys = [self._key(account_id, name, now) for name in names]
        counts = self._get_many([key for key, _seconds, _ends in keys])
        wait, window, recipients = 0.0, None, None
        for name, (_key, _seconds, ends), count in zip(names, keys, counts, strict=True):
            limit = limits[name]
            assert limit is not None
            if name == "recipients_per_day":
                recipients = (max(0, limit - count), max(1, math.ceil(ends - now)))
            if count >= limit and ends - now > wait:
                # The window that resets last names the refusal: only then may mail go again.
                wait, window = ends - now, name
        return LimitCheck(max(1, math.ceil(wait)) if window else None, window, recipients)

    def retry_after(self, account_id: uuid.UUID, limits: Mapping[str, int | None]) -> int | None:
        """Seconds until one more message may be sent, or None when it may be sent now."""
        return self.check(account_id, limits).wait

    def recipients_left(
        self, account_id: uuid.UUID, limits: Mapping[str, int | None]
    ) -> tuple[int, int] | None:
        """(recipients left today, seconds until the day's window ends), or None without a limit."""
        return self.check(account_id, limits).recipients

    def record(self, account_id: uuid.UUID, recipients: int) -> None:
        """Count one stored message with ``recipients`` recipients in every window."""
        now = self._clock()
        items = []
        for name, (what, _seconds) in WINDOWS.items():
            key, _seconds, ends = self._key(account_id, name, now)
            items.append((key, max(1, math.ceil(ends - now)) + 1, recipients if what == "recipients" else 1))
        if not self._batched:
            self._send(items)
            return
        with self._lock:
            for key, expiry, amount in items:
                entry = self._pending.setdefault(key, [expiry, 0])
                entry[0] = max(entry[0], expiry)
                entry[1] += amount
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="limits-flush", daemon=True)
                self._flusher.start()

    def flush(self) -> None:
        """Send the counts not sent yet (the flushing thread does it every FLUSH_SECONDS)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if pending:
            self._send([(key, expiry, amount) for key, (expiry, amount) in pending.items()])

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self.flush()

    def _send(self, items: list[tuple[str, int, int]]) -> None:
        try:
            incr_many(self.storage, items)
        except self.storage.base_exceptions as error:
            self._unavailable(error)

    def usage(self, account_id: uuid.UUID, limits: Mapping[str, int | None]) -> list[WindowUsage]:
        """Every window's count, limit and time to reset, for the usage endpoint."""
        now = self._clock()
        keys = [self._key(account_id, name, now) for name in SENDING_LIMITS]
        counts = self._get_many([key for key, _seconds, _ends in keys])
        return [
            WindowUsage(name, limits.get(name), count, max(1, math.ceil(ends - now)))
            for name, (_key, _seconds, ends), count in zip(SENDING_LIMITS, keys, counts, strict=True)
        ]

    def _get_many(self, keys: list[str]) -> list[int]:
        try:
            counts = get_many(self.storage, keys)
        except self.storage.base_exceptions as error:
            self._unavailable(error)
            counts = [0] * len(keys)
        if self._pending:
            with self._lock:
                counts = [
                    count + self._pending.get(key, (0, 0))[1] for key, count in zip(keys, counts, strict=True)
                ]
        return counts

    def _unavailable(self, error: Exception) -> None:
        log.warning(
            "limits storage unavailable; sending limits not enforced",
            extra={"event": "limits.storage_unavailable", "error_class": type(error).__name__},
        )
