"""Where the shared counters live: ``limits.storage`` as a ``limits`` library storage.

``redis://`` (and the other schemes ``limits`` knows) is the library's own storage,
shared by every process and host that names it. ``memory://`` is ``LocalCounters``
below rather than the library's ``MemoryStorage``: that one walks every counter it
holds from a timer thread every 10 ms while counters are being added (84 ms a pass
with 100,000 counters), so a flood of distinct user names or client addresses
would cost a core. ``LocalCounters`` does O(1) work per call, expires counters
lazily and holds a bounded number of them, least recently used out.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from limits.storage import RedisStorage, Storage, storage_from_string

DEFAULT_MAX_KEYS = 200_000


def counting_address(ip: str | None) -> str:
    """The address a client is counted under: IPv4 as is, IPv6 by its /64.

    One IPv6 host can hold a whole /64, so counting its addresses one by one would
    count nothing. An IPv4-mapped IPv6 address counts as the IPv4 address.
    """
    if not ip:
        return "unknown"
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class LocalCounters(Storage):
    """Counters of this process for ``memory://``; the subset of ``Storage`` smtp-proxy uses."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [count, expires at]; least recently touched first.
        self._entries: OrderedDict[str, list[float]] = OrderedDict()

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount``; a counter that did not exist (or expired) starts now for ``expiry`` s."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[1] <= now:
                entry = [0, now + expiry]
                self._entries[key] = entry
            else:
                self._entries.move_to_end(key)
            entry[0] += amount
            self._trim(now)
            return int(entry[0])

    def get(self, key: str) -> int:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[1] <= self._clock():
                return 0
            return int(entry[0])

    def get_expiry(self, key: str) -> float:
        with self._lock:
            entry = self._entries.get(key)
            return entry[1] if entry is not None else self._clock()

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count

    def clear(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _trim(self, now: float) -> None:
        """Drop a few expired counters from the old end, then any beyond the bound; the caller locks."""
        for _ in range(2):
            if not self._entries:
                break
            oldest = next(iter(self._entries.values()))
            if oldest[1] > now:
                break
            self._entries.popitem(last=False)
        while len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)


def get_many(storage: Storage, keys: list[str]) -> list[int]:
    """Several counters in one round trip (MGET) where the storage is Redis."""
    if isinstance(storage, RedisStorage):
        values = storage.get_connection(True).mget([storage.prefixed_key(key) for key in keys])
        return [int(value or 0) for value in values]
    return [storage.get(key) for key in keys]


def incr_many(storage: Storage, items: list[tuple[str, int, int]]) -> list[int]:
    """Add to counters whose key names their window, in one round trip on Redis.

    For each (key, expiry, amount): the new count. On Redis a pipeline of INCRBY and
    EXPIRE, with the expiry set again on every call: that is only right for a counter whose
    key names its window and whose expiry is that window's end, as the sending limits' are
    (the ``limits`` storage's own script costs a round trip more in a pipeline, to check
    that the script is loaded).
    """
    if isinstance(storage, RedisStorage):
        pipeline = storage.get_connection().pipeline(transaction=False)
        for key, expiry, amount in items:
            name = storage.prefixed_key(key)
            pipeline.incrby(name, amount)
            pipeline.expire(name, expiry)
        results = pipeline.execute()
        return [int(value) for value in results[::2]]
    return [storage.incr(key, expiry, amount=amount) for key, expiry, amount in items]


def open_storage(uri: str) -> Storage:
    """The counters behind ``uri``: ``LocalCounters`` for memory://, else the ``limits`` storage."""
    if uri.startswith("memory://"):
        return LocalCounters()
    return storage_from_string(uri)
