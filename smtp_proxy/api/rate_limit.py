"""Requests per API key (per client address without one), with the ``limits`` library.

``api.rate_limit`` is a ``limits`` expression such as ``100/minute``; the
counts live in ``api.rate_limit_storage``: ``memory://`` per process, or
``redis://host:port`` shared by every API instance. Only /api/v1 is limited:
probes and /metrics never count.
"""

from __future__ import annotations

import math
import threading
import time

import limits
from flask import request
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from smtp_proxy import crypto
from smtp_proxy.api.errors import ApiError
from smtp_proxy.config import ApiConfig


class RateLimit:
    """A fixed window per key; over it, 429 with Retry-After (seconds to the window's end)."""

    def __init__(self, config: ApiConfig) -> None:
        self.item = limits.parse(config.rate_limit)
        self.local = _LocalWindows() if config.rate_limit_storage.startswith("memory://") else None
        self.shared = None
        if self.local is None:
            self.shared = FixedWindowRateLimiter(storage_from_string(config.rate_limit_storage))

    def check(self) -> None:
        key = _key()
        now = time.time()
        if self.local is not None:
            wait = self.local.hit(key, self.item.amount, self.item.get_expiry(), now)
        elif self.shared.hit(self.item, "smtp-proxy-api", key):  # type: ignore[union-attr]
            wait = None
        else:
            reset = self.shared.get_window_stats(self.item, "smtp-proxy-api", key).reset_time  # type: ignore[union-attr]
            wait = reset - now
        if wait is not None:
            retry_after = str(max(1, math.ceil(wait)))
            raise ApiError(429, "too many requests; retry later", headers={"Retry-After": retry_after})


class _LocalWindows:
    """Fixed windows counted in this process, for ``memory://``.

    ``limits``' own memory storage starts a timer thread to expire counts,
    again and again under load; here a window's count is simply replaced when
    the next window begins, and stale keys are dropped when there are many.
    """

    MAX_KEYS = 100_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[int, int]] = {}  # key -> (window number, hits)

    def hit(self, key: str, amount: int, seconds: int, now: float) -> float | None:
        """None when the hit is allowed, else the seconds until the window ends."""
        window = int(now // seconds)
        with self._lock:
            start, hits = self._windows.get(key, (window, 0))
            if start != window:
                hits = 0
            if hits >= amount:
                return (window + 1) * seconds - now
            if len(self._windows) >= self.MAX_KEYS and key not in self._windows:
                self._windows = {k: v for k, v in self._windows.items() if v[0] == window}
            self._windows[key] = (window, hits + 1)
        return None


def _key() -> str:
    """The API key's digest prefix (never the key), or the client address without a key."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() == "bearer" and key:
        return "key:" + crypto.api_key_digest(key)[:32]
    return "ip:" + (request.remote_addr or "unknown")
