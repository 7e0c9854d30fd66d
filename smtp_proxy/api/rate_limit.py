"""API rate limits, with the ``limits`` library: per verified key, and per address without one.

``api.rate_limit`` (e.g. ``100/minute``) counts the requests of each API key
that was verified; ``api.unauthenticated_rate_limit`` (``60/minute``) counts,
per client address, the requests that came without a valid key (none, a
malformed one, an unknown one). auth.py checks the address limit before it
looks a key up, so a flood of made-up keys costs no database query once the
address is over its limit. IPv6 clients are counted per /64, which one client
usually holds whole.

The counts live in ``Config.api_rate_limit_storage``: ``memory://`` per
process (``counters.LocalCounters``: O(1) a request, bounded), or
``redis://host:port`` shared by every API instance (both limits).
Only /api/v1 is limited: probes and /metrics never count.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import limits

from smtp_proxy.api.errors import ApiError
from smtp_proxy.config import Config
from smtp_proxy.counters import LocalCounters, open_storage

log = logging.getLogger("smtp_proxy.api")

_NAMESPACE = "smtp-proxy-api"


class RateLimit:
    """Fixed windows aligned to the clock; over a limit, 429 with Retry-After (to the window's end)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.per_key = limits.parse(config.api.rate_limit)
        self.per_address = limits.parse(config.api.unauthenticated_rate_limit)
        self._clock = clock
        uri = config.api_rate_limit_storage
        if uri.startswith("memory://"):
            # One table per limit: a flood of addresses cannot push out the keys' counts.
            self._storage = {"key": LocalCounters(clock=clock), "ip": LocalCounters(clock=clock)}
        else:
            shared = open_storage(uri)
            self._storage = {"key": shared, "ip": shared}

    def hit_key(self, digest: str) -> None:
        """Count one request of a verified key; 429 over ``api.rate_limit``."""
        self._check("key", digest[:32], self.per_key, count=True)

    def hit_address(self, address: str) -> None:
        """Count one request without a valid key from ``address``; 429 over the limit."""
        self._check("ip", address, self.per_address, count=True)

    def check_address(self, address: str) -> None:
        """429 when ``address`` is over its limit already; counts nothing."""
        self._check("ip", address, self.per_address, count=False)

    def _check(self, kind: str, key: str, item: limits.RateLimitItem, *, count: bool) -> None:
        now = self._clock()
        seconds = item.get_expiry()
        window = int(now // seconds)
        left = (window + 1) * seconds - now
        name = f"{_NAMESPACE}/{kind}/{key}/{item.amount}/{seconds}/{window}"
        storage = self._storage[kind]
        try:
            # incr answers the new count atomically (in Redis too): count, then decide.
            over = (
                storage.incr(name, math.ceil(left) + 1) > item.amount
                if count
                else storage.get(name) >= item.amount
            )
        except storage.base_exceptions as error:
            # As with sending limits: a counter outage is logged, and the API keeps answering.
            log.warning(
                "rate limit storage unavailable; API rate limits not enforced",
                extra={"event": "api.rate_limit_unavailable", "error_class": type(error).__name__},
            )
            return
        if over:
            raise ApiError(
                429, "too many requests; retry later", headers={"Retry-After": str(max(1, math.ceil(left)))}
            )
