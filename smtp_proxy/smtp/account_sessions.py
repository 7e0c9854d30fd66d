"""Concurrent authenticated sessions per account, for ``smtp.max_connections_per_account``.

``AccountSessions`` counts the sessions of one process. With ``limits.storage`` on
Redis, ``SharedAccountSessions`` counts those of every process and host that names
it: each session holds a lease, a member of the account's sorted set scored with
its expiry, which its process renews while the session lasts. A process killed
with its sessions open cannot give their slots back; their leases simply run out
(``LEASE_SECONDS``), so an account is never locked out by a crash for longer.
While Redis does not answer, the process counts its own sessions, as the AUTH
throttle does, and logs it once.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import uuid
from collections import defaultdict

log = logging.getLogger("smtp_proxy.smtp")

LEASE_SECONDS = 60.0
RENEW_SECONDS = LEASE_SECONDS / 3
KEY_PREFIX = "smtp-proxy:sessions:"

# Take a slot if fewer than the limit are held (expired leases do not count). Redis's clock
# scores every lease, so the hosts' clocks need not agree.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 2))
return 1
"""
# Extend the leases still held (XX: a member that expired and was removed stays removed).
_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 2))
return 1
"""
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


class AccountSessions:
    """The sessions of this process, per account."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[uuid.UUID, int] = {}

    def acquire(self, account_id: uuid.UUID, limit: int) -> bool:
        with self._lock:
            count = self._counts.get(account_id, 0)
            if count >= limit:
                return False
            self._counts[account_id] = count + 1
            return True

    def release(self, account_id: uuid.UUID) -> None:
        with self._lock:
            count = self._counts.get(account_id, 0) - 1
            if count > 0:
                self._counts[account_id] = count
            else:
                self._counts.pop(account_id, None)

    def count(self, account_id: uuid.UUID) -> int:
        """The account's open sessions now."""
        with self._lock:
            return self._counts.get(account_id, 0)

    def close(self) -> None:
        """Nothing to stop: the counts live in this object."""


class SharedAccountSessions(AccountSessions):
    """Every process's sessions, per account, as leases in Redis (``redis`` is a redis-py client)."""

    def __init__(self, redis: object, lease: float = LEASE_SECONDS, renew_every: float | None = None) -> None:
        super().__init__()  # the fallback counts while Redis does not answer
        self._redis = redis
        self._lease = lease
        self._acquire = redis.register_script(_ACQUIRE)  # type: ignore[attr-defined]
        self._renew = redis.register_script(_RENEW)  # type: ignore[attr-defined]
        self._count = redis.register_script(_COUNT)  # type: ignore[attr-defined]
        self._token = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self._serial = itertools.count()
        self._held: dict[uuid.UUID, list[str]] = defaultdict(list)  # leases in Redis
        self._local: dict[uuid.UUID, int] = defaultdict(int)  # sessions admitted while degraded
        self._degraded = False
        self._stop = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_loop, args=(renew_every or lease / 3,), name="session-leases", daemon=True
        )
        self._renewer.start()

    def acquire(self, account_id: uuid.UUID, limit: int) -> bool:
        member = f"{self._token}:{next(self._serial)}"
        try:
            taken = bool(self._acquire(keys=[_key(account_id)], args=[member, limit, self._lease]))
        except Exception as error:  # noqa: BLE001 - any client or server error: count here instead
            self._unavailable(error)
            if not super().acquire(account_id, limit):
                return False
            with self._lock:
                self._local[account_id] += 1
            return True
        self._recovered()
        if taken:
            with self._lock:
                self._held[account_id].append(member)
        return taken

    def release(self, account_id: uuid.UUID) -> None:
        with self._lock:
            if self._local.get(account_id):
                self._local[account_id] -= 1
                if not self._local[account_id]:
                    del self._local[account_id]
                member = None
            else:
                members = self._held.get(account_id)
                member = members.pop() if members else None
                if members == []:
                    del self._held[account_id]
        if member is None:
            super().release(account_id)
            return
        try:
            self._redis.zrem(_key(account_id), member)  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - the lease runs out by itself
            self._unavailable(error)

    def count(self, account_id: uuid.UUID) -> int:
        """The account's open sessions in every process (this process's own while degraded)."""
        try:
            return int(self._count(keys=[_key(account_id)]))
        except Exception as error:  # noqa: BLE001
            self._unavailable(error)
            return super().count(account_id)

    def close(self) -> None:
        self._stop.set()
        self._renewer.join(timeout=5)

    def _renew_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                held = {account: list(members) for account, members in self._held.items() if members}
            for account_id, members in held.items():
                try:
                    self._renew(keys=[_key(account_id)], args=[self._lease, *members])
                except Exception as error:  # noqa: BLE001 - next round; the lease is longer than two rounds
                    self._unavailable(error)
                    break

    def _unavailable(self, error: Exception) -> None:
        if not self._degraded:
            self._degraded = True
            log.warning(
                "session counts storage unavailable; counting this process's sessions until it answers",
                extra={"event": "smtp.account_sessions_degraded", "error_class": type(error).__name__},
            )

    def _recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info(
                "session counts storage answers again", extra={"event": "smtp.account_sessions_recovered"}
            )


def _key(account_id: uuid.UUID) -> str:
    return f"{KEY_PREFIX}{account_id}"
