"""Per-tenant sending limits: counters in the ``limits`` library's storage, windows on the clock.

``limits.storage`` is ``memory://`` (one process) or ``redis://host:port``, shared by every
listener, API and worker instance, so that several instances behind a balancer enforce one
limit. Each window is a fixed one aligned to the epoch (the minute, the hour, the UTC day), so
"try again in N seconds" and the usage endpoint need no stored expiry.

A message is checked before it is accepted (``retry_after`` at MAIL FROM,
``recipients_left`` at RCPT) and counted only once it was stored (``record``): nothing is
counted for a message that was refused. Two sessions of one account that check at the same
moment can both pass and overshoot a limit by what they send together; the next check sees
both. Counters are kept for every window whether or not it has a limit, so the usage endpoint
shows real counts and a limit set later applies to what was already sent.

When the storage does not answer, mail is not refused: the outage is logged and the message
goes through uncounted (the relay's job is to accept mail; a quota is a fairness measure).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from limits.storage import Storage

from smtp_proxy.config import SENDING_LIMITS, LimitsConfig

log = logging.getLogger("smtp_proxy.limits")

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

    def _key(self, account_id: uuid.UUID, name: str, now: float) -> tuple[str, int, float]:
        _what, seconds = WINDOWS[name]
        bucket = int(now // seconds)
        ends = (bucket + 1) * seconds
        return f"smtp-proxy/send/{account_id}/{name}/{bucket}", seconds, ends

    def retry_after(self, account_id: uuid.UUID, limits: Mapping[str, int | None]) -> int | None:
        """Seconds until one more message may be sent, or None when it may be sent now."""
        now = self._clock()
        wait = 0.0
        for name in ("messages_per_minute", "messages_per_hour", "messages_per_day"):
            limit = limits.get(name)
            if limit is None:
                continue
            key, _seconds, ends = self._key(account_id, name, now)
            if self._get(key) >= limit:
                wait = max(wait, ends - now)
        recipients = self.recipients_left(account_id, limits)
        if recipients is not None and recipients[0] <= 0:
            wait = max(wait, recipients[1])
        return max(1, math.ceil(wait)) if wait > 0 else None

    def recipients_left(
        self, account_id: uuid.UUID, limits: Mapping[str, int | None]
    ) -> tuple[int, int] | None:
        """(recipients left today, seconds until the day's window ends), or None without a limit."""
        limit = limits.get("recipients_per_day")
        if limit is None:
            return None
        now = self._clock()
        key, _seconds, ends = self._key(account_id, "recipients_per_day", now)
        return max(0, limit - self._get(key)), max(1, math.ceil(ends - now))

    def record(self, account_id: uuid.UUID, recipients: int) -> None:
        """Count one stored message with ``recipients`` recipients in every window."""
        now = self._clock()
        try:
            for name, (what, _seconds) in WINDOWS.items():
                key, seconds, ends = self._key(account_id, name, now)
                amount = recipients if what == "recipients" else 1
                self.storage.incr(key, max(1, math.ceil(ends - now)) + 1, amount=amount)
        except self.storage.base_exceptions as error:
            self._unavailable(error)

    def usage(self, account_id: uuid.UUID, limits: Mapping[str, int | None]) -> list[WindowUsage]:
        """Every window's count, limit and time to reset, for the usage endpoint."""
        now = self._clock()
        result = []
        for name in SENDING_LIMITS:
            key, _seconds, ends = self._key(account_id, name, now)
            result.append(WindowUsage(name, limits.get(name), self._get(key), max(1, math.ceil(ends - now))))
        return result

    def _get(self, key: str) -> int:
        try:
            return int(self.storage.get(key))
        except self.storage.base_exceptions as error:
            self._unavailable(error)
            return 0

    def _unavailable(self, error: Exception) -> None:
        log.warning(
            "limits storage unavailable; sending limits not enforced",
            extra={"event": "limits.storage_unavailable", "error_class": type(error).__name__},
        )
