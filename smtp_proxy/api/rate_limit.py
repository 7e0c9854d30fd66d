"""API rate limits, with the ``limits`` library: per verified key, and per address without one.

``api.rate_limit`` (e.g. ``100/minute``) counts the requests of each API key
that was verified; ``api.unauthenticated_rate_limit`` (``60/minute``) counts,
per client address, the requests that came without a valid key (none, a
malformed one, an unknown one). auth.py checks the address limit before it
looks a key up, so a flood of made-up keys costs no database query once the
address is over its limit. IPv6 clients are counted per /64, which one client
usually holds whole.

The counts live in ``Config.api_rate_limit_storage``: ``memory://`` per
process, or ``redis://host:port`` shared by every API instance (both limits).
Only /api/v1 is limited: probes and /metrics never count.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import limits
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from smtp_proxy.api.errors import ApiError
from smtp_proxy.config import Config

log = logging.getLogger("smtp_proxy.api")

_NAMESPACE = "smtp-proxy-api"


class RateLimit:
    """Fixed windows; over a limit, 429 with Retry-After (seconds to the window's end)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.per_key = limits.parse(config.api.rate_limit)
        self.per_address = limits.parse(config.api.unauthenticated_rate_limit)
        self._clock = clock
        uri = config.api_rate_limit_storage
        self._shared: FixedWindowRateLimiter | None = None
        self._local: dict[str, _LocalWindows] = {}
        if uri.startswith("memory://"):
            # One table per limit: a flood of addresses cannot push out the keys' counts.
            self._local = {"key": _LocalWindows(), "ip": _LocalWindows()}
        else:
            self._shared = FixedWindowRateLimiter(storage_from_string(uri))

    def hit_key(self, digest: str) -> None:
        """Count one request of a verified key; 429 over ``api.rate_limit``."""
        self._hit("key", digest[:32], self.per_key)

    def hit_address(self, address: str) -> None:
        """Count one request without a valid key from ``address``; 429 over the limit."""
        self._hit("ip", address, self.per_address)

    def check_address(self, address: str) -> None:
        """429 when ``address`` is over its limit already; counts nothing."""
        wait = self._wait("ip", address, self.per_address, count=False)
        if wait is not None:
            raise _too_many(wait)

    def _hit(self, kind: str, key: str, item: limits.RateLimitItem) -> None:
        wait = self._wait(kind, key, item, count=True)
        if wait is not None:
            raise _too_many(wait)

    def _wait(self, kind: str, key: str, item: limits.RateLimitItem, *, count: bool) -> float | None:
        """None when the request may go on, else the seconds until the window ends."""
        now = self._clock()
        if self._shared is None:
            return self._local[kind].hit(key, item.amount, item.get_expiry(), now, count=count)
        shared = self._shared
        try:
            allowed = (
                shared.hit(item, _NAMESPACE, f"{kind}:{key}")
                if count
                else shared.test(item, _NAMESPACE, f"{kind}:{key}")
            )
            if allowed:
                return None
            return shared.get_window_stats(item, _NAMESPACE, f"{kind}:{key}").reset_time - now
        except shared.storage.base_exceptions as error:
            # As with sending limits: a counter outage is logged, and the API keeps answering.
            log.warning(
                "rate limit storage unavailable; API rate limits not enforced",
                extra={"event": "api.rate_limit_unavailable", "error_class": type(error).__name__},
            )
            return None


def _too_many(wait: float) -> ApiError:
    retry_after = str(max(1, math.ceil(wait)))
    return ApiError(429, "too many requests; retry later", headers={"Retry-After": retry_after})


class _LocalWindows:
    """Fixed windows counted in this process, for ``memory://``; O(1) per hit, at most MAX_KEYS.

    ``limits``' own memory storage starts a timer thread to expire counts, again
    and again under load. Here a key's count is replaced when its next window
    begins, and past MAX_KEYS the least recently used key is dropped (its count
    starts over if it comes back).
    """

    MAX_KEYS = 100_000

    def __init__(self, max_keys: int | None = None) -> None:
        self._max_keys = max_keys or self.MAX_KEYS
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (window, hits)

    def hit(self, key: str, amount: int, seconds: int, now: float, *, count: bool = True) -> float | None:
        """None when the hit is allowed (and counted, with ``count``), else the seconds left."""
        window = int(now // seconds)
        with self._lock:
            start, hits = self._windows.get(key, (window, 0))
            if start != window:
                hits = 0
            if hits >= amount:
                if key in self._windows:
                    self._windows.move_to_end(key)
                return (window + 1) * seconds - now
            if count:
                self._windows[key] = (window, hits + 1)
                self._windows.move_to_end(key)
                if len(self._windows) > self._max_keys:
                    self._windows.popitem(last=False)
        return None

    def __len__(self) -> int:
        return len(self._windows)
