"""SMTP AUTH verification for the threaded listener, and the defences around it.

Imports storage, crypto, the db session type and the standard library; no
socket, no protocol. Every piece exists because bcrypt is deliberately slow
(about 0.2 s at cost 12) and runs on the session's own thread:

* ``CredentialVerifier`` looks the account up on every attempt (one small
  query), so a password change or a deactivation takes effect at once.
* A verified-credential cache answers a repeat login without bcrypt. A client
  that opens a connection per message would otherwise pay 0.2 s of CPU each
  time. Entries are keyed by the account name and an HMAC of the password under
  a secret made per process. The password is never kept, and a leaked memory
  image gives no offline oracle. A hit also needs the stored hash to equal the
  one that was verified.
* Single-flight: concurrent attempts with the same credentials (a client
  opening ten connections at once) run bcrypt once and share the answer.
* A bounded bcrypt pool (a semaphore, as bcrypt releases the GIL) caps how many
  checks run at once. A flood of AUTH attempts then cannot take every core
  from sessions that are already authenticated.
* An unknown, deactivated or impossible user name still costs one bcrypt check
  against a dummy hash, so response time does not tell which accounts exist.
* ``AuthThrottle`` slows and then refuses a client IP after repeated failures,
  which makes online guessing slow without an outside tool.
* ``log_auth_failure`` writes one stable JSON shape for outside tools. For
  fail2ban, with the JSON log on stdout (journald) or in a file::

      [Definition]
      failregex = ^\\{.*"message": "SMTP AUTH failed".*"event": "smtp\\.auth_failed", "client_ip": "<HOST>"

  fail2ban finds the ISO 8601 ``timestamp`` without a ``datepattern``. The
  user name comes after ``client_ip`` and is JSON-escaped, so a name the client
  chose cannot put a second, unescaped ``"client_ip": "..."`` into the line.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from smtp_proxy import crypto
from smtp_proxy.db.session import Database
from smtp_proxy.storage.auth import Login, find_login

# Enough for every account that submits regularly; a miss only costs one bcrypt check.
CACHE_MAX_ENTRIES = 10_000
DEFAULT_DUMMY_COST = 12


@dataclass(frozen=True)
class AuthenticatedAccount:
    """What the session needs after AUTH: who, and which sender domains it may use."""

    id: uuid.UUID
    name: str
    allowed_domains: tuple[str, ...]


@dataclass(frozen=True)
class _CacheEntry:
    password_hash: str
    expires: float


@dataclass
class _Flight:
    """One bcrypt check in progress; later callers with the same key wait for it."""

    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    error: BaseException | None = None


_Key = tuple[str, bytes]


class CredentialVerifier:
    """Checks SMTP AUTH credentials against the accounts table; safe to share between threads."""

    def __init__(
        self,
        database: Database,
        *,
        cache_ttl: float = 300.0,
        bcrypt_slots: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        dummy_cost: int = DEFAULT_DUMMY_COST,
        cache_size: int = CACHE_MAX_ENTRIES,
    ) -> None:
        slots = bcrypt_slots if bcrypt_slots is not None else (os.cpu_count() or 2)
        if slots < 1:
            raise ValueError("bcrypt_slots must be at least 1")
        if cache_ttl < 0 or cache_size < 0:
            raise ValueError("cache_ttl and cache_size must not be negative")
        self._database = database
        self._ttl = cache_ttl
        self._cache_size = cache_size
        self._clock = clock
        self._secret = os.urandom(32)
        self._slots = threading.BoundedSemaphore(slots)
        # One lock guards both the cache and the flights; it is never held during bcrypt or I/O.
        self._lock = threading.Lock()
        self._cache: OrderedDict[_Key, _CacheEntry] = OrderedDict()
        self._flights: dict[tuple[str, bytes, str], _Flight] = {}
        # Same cost as the stored hashes, so an unknown user takes as long as a known one.
        self._dummy_hash = crypto.hash_password(crypto.generate_password(), dummy_cost)

    def verify(self, username: str, password: str) -> AuthenticatedAccount | None:
        """The account when the credentials are right and it is active, else None.

        Blocks for up to one bcrypt check plus one query. Raises
        ``DatabaseUnavailable`` when the database does not answer.
        """
        with self._database.autocommit() as session:
            login = find_login(session, username)
        if login is None or not login.active:
            self._bcrypt(password, self._dummy_hash)
            return None
        key: _Key = (login.name, self._mac(password))
        if self._cached(key, login):
            return _account(login)
        if not self._single_flight(key, password, login.password_hash):
            return None
        return _account(login)

    def _check_hash(self, password: str, password_hash: str) -> bool:
        """The bcrypt step itself; a seam for tests that count or time it."""
        try:
            return crypto.verify_password(password, password_hash)
        except UnicodeEncodeError:
            # A lone surrogate cannot be in any stored password (hash_password encodes strictly).
            return False

    def _bcrypt(self, password: str, password_hash: str) -> bool:
        with self._slots:
            return self._check_hash(password, password_hash)

    def _mac(self, password: str) -> bytes:
        raw = password.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, raw, hashlib.sha256).digest()

    def _cached(self, key: _Key, login: Login) -> bool:
        now = self._clock()
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return False
            if now >= entry.expires or entry.password_hash != login.password_hash:
                del self._cache[key]
                return False
            return True

    def _single_flight(self, key: _Key, password: str, password_hash: str) -> bool:
        # The hash is part of the flight key: a caller that already sees a new
        # password hash must not take the answer computed for the old one.
        flight_key = (*key, password_hash)
        with self._lock:
            flight = self._flights.get(flight_key)
            leader = flight is None
            if flight is None:
                flight = self._flights[flight_key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.ok
        try:
            flight.ok = self._bcrypt(password, password_hash)
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                if flight.ok:
                    self._remember(key, password_hash)
                del self._flights[flight_key]
            flight.done.set()
        return flight.ok

    def _remember(self, key: _Key, password_hash: str) -> None:
        """Store a verified credential; the caller holds the lock."""
        if self._ttl <= 0 or self._cache_size == 0:
            return
        self._cache.pop(key, None)
        # Every entry has the same lifetime, so insertion order is expiry order.
        self._cache[key] = _CacheEntry(password_hash, self._clock() + self._ttl)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _account(login: Login) -> AuthenticatedAccount:
    # Built from this attempt's lookup, so a change of allowed domains also applies at once.
    return AuthenticatedAccount(id=login.id, name=login.name, allowed_domains=tuple(login.allowed_domains))


@dataclass
class _Failures:
    times: list[float]
    refused_until: float = 0.0


class AuthThrottle:
    """Per client IP: a growing delay after failed AUTH, then a temporary refusal.

    Callers may pass an IPv6 client's /64 prefix as ``ip``, since one host can hold a whole /64.
    """

    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        max_delay: float = 5.0,
        refuse_after: int = 10,
        window: float = 900.0,
        refuse_for: float = 300.0,
        max_tracked: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refuse_after < 1 or max_tracked < 1:
            raise ValueError("refuse_after and max_tracked must be at least 1")
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.refuse_after = refuse_after
        self.window = window
        self.refuse_for = refuse_for
        self.max_tracked = max_tracked
        self._clock = clock
        self._lock = threading.Lock()
        # Least recently failed first, so the bound drops the IPs that stopped trying.
        self._ips: OrderedDict[str, _Failures] = OrderedDict()

    def delay_for(self, ip: str) -> float:
        """Seconds to wait before answering this IP's next AUTH: 0 without recent failures."""
        now = self._clock()
        with self._lock:
            count = len(self._recent(ip, now))
        if count == 0:
            return 0.0
        # Capping the exponent first keeps 2**n finite for a long run of failures.
        return min(self.base_delay * 2.0 ** min(count - 1, 64), self.max_delay)

    def refused(self, ip: str) -> bool:
        """True while this IP is locked out after ``refuse_after`` failures within ``window``."""
        now = self._clock()
        with self._lock:
            record = self._ips.get(ip)
            return record is not None and now < record.refused_until

    def failure(self, ip: str) -> None:
        now = self._clock()
        with self._lock:
            times = self._recent(ip, now)
            record = self._ips.pop(ip, None) or _Failures([])
            # Only the last refuse_after failures matter, which bounds memory per IP.
            record.times = [*times, now][-self.refuse_after :]
            if len(record.times) >= self.refuse_after:
                record.refused_until = now + self.refuse_for
            self._ips[ip] = record
            self._prune(now)

    def success(self, ip: str) -> None:
        """A successful AUTH clears the IP's failures."""
        with self._lock:
            self._ips.pop(ip, None)

    def tracked(self) -> int:
        """How many IPs are held in memory (for tests and a gauge)."""
        with self._lock:
            return len(self._ips)

    def _recent(self, ip: str, now: float) -> list[float]:
        """The IP's failures within the window; the caller holds the lock."""
        record = self._ips.get(ip)
        if record is None:
            return []
        record.times = [t for t in record.times if now - t < self.window]
        if not record.times and now >= record.refused_until:
            del self._ips[ip]
        return record.times

    def _prune(self, now: float) -> None:
        """Drop forgotten IPs from the old end, then the oldest beyond ``max_tracked``."""
        while self._ips:
            ip, record = next(iter(self._ips.items()))
            last = record.times[-1] if record.times else -math.inf
            if now - last < self.window or now < record.refused_until:
                break
            del self._ips[ip]
        while len(self._ips) > self.max_tracked:
            self._ips.popitem(last=False)


def log_auth_failure(
    logger: logging.Logger, *, client_ip: str, username: str, mechanism: str, reason: str
) -> None:
    """One WARNING line of a stable shape per failed AUTH; never the password."""
    logger.warning(
        "SMTP AUTH failed",
        extra={
            "event": "smtp.auth_failed",
            "client_ip": client_ip,
            "username": username,
            "mechanism": mechanism,
            "reason": reason,
        },
    )
