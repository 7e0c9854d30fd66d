"""SMTP AUTH verification for the threaded listener, and the defences around it.

Imports storage, crypto, the db session type and the standard library; no
socket, no protocol. Every piece exists because bcrypt is deliberately slow
(the cost factor sets how slow) and runs on the session's own thread:

* ``CredentialVerifier`` looks the credential and its account up on every attempt
  (one small query), so a password change, a disabled or deleted credential or a
  deactivation takes effect at once. A credential limited to some networks
  (``allowed_ips``) fails from anywhere else exactly as a wrong password does (535,
  counted, a bcrypt check against the dummy hash), and the log line says why.
* A verified-credential cache answers a repeat login without bcrypt. A client
  that opens a connection per message would otherwise pay a bcrypt check of
  CPU each time. Entries are keyed by the user name and an HMAC of the password under
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
* ``AuthThrottle`` counts every attempt per client address (IPv6 by /64) and
  per user name before it is judged, in the shared ``limits`` storage, and
  refuses past a limit without running bcrypt; ``authenticate`` is that order
  (count, decide, verify), which holds however many connections guess at once.
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
import ipaddress
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from limits.storage import Storage

from smtp_proxy import crypto
from smtp_proxy.counters import LocalCounters, counting_address, get_many
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.errors import DatabaseUnavailable
from smtp_proxy.proxy_protocol import client_address
from smtp_proxy.storage.auth import Login, find_login
from smtp_proxy.storage.credentials import LAST_USED_RESOLUTION, touch_last_used

# Enough for every account that submits regularly; a miss only costs one bcrypt check.
CACHE_MAX_ENTRIES = 10_000
DEFAULT_DUMMY_COST = 12
# While the shared throttle storage is down, how often to ask whether it is back.
STORAGE_PROBE_SECONDS = 5.0
# How long a shared read that found an address and a user name under their limits is reused.
CLEAR_SECONDS = 1.0
CLEAR_ENTRIES = 10_000

log = logging.getLogger("smtp_proxy.smtp")


@dataclass(frozen=True)
class AuthenticatedAccount:
    """What the session needs once it is an account's: who, which sender domains it may use,
    whether the core checks the message's From:/Sender: addresses against them, and how it
    got there: the credential it logged in with, or None for a relay network's client."""

    id: uuid.UUID
    name: str
    allowed_domains: tuple[str, ...]
    header_from_check: bool = True
    credential_id: uuid.UUID | None = None
    username: str | None = None  # the credential's user name

    @property
    def auth(self) -> str:
        """How the session became the account's: "password" (SMTP AUTH) or "network" (relay)."""
        return "password" if self.credential_id is not None else "network"


@dataclass(frozen=True)
class _CacheEntry:
    password_hash: str
    expires: float


@dataclass
class _Flight:
    """One bcrypt check in progress; later callers with the same key wait for it."""

    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    refused: str | None = None  # the throttle refused the leader: "ip" or "user"
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

    def verify(
        self, username: str, password: str, client_ip: str | None = None
    ) -> AuthenticatedAccount | None:
        """The account when the credentials are right and it is active, else None (no throttle).

        Blocks for up to one bcrypt check plus one query. Raises
        ``DatabaseUnavailable`` when the database does not answer.
        """
        return self.check(username, password, client_ip=client_ip).account

    def check(
        self, username: str, password: str, gate: _Gate | None = None, *, client_ip: str | None = None
    ) -> AuthResult:
        """Verify under a throttle ``gate``: count each distinct guess, then decide, then bcrypt.

        Where the gate counts decides what parallel logins cost: a verified credential
        from the cache counts nothing (it is refused only while the address or the user
        name is already over its limit, so the cache is no faster oracle than bcrypt);
        connections offering the same credentials at once share one bcrypt check and one
        count (a mailer opening twenty connections makes one guess, not twenty); every
        other attempt, an unknown user's too, is counted before its check. ``client_ip``
        is checked against the credential's ``allowed_ips`` (None: not checked). Raises
        ``DatabaseUnavailable`` when the database does not answer; nothing was counted then.
        """
        with self._database.autocommit() as session:
            login = find_login(session, username)
        failure = None
        if login is None or not login.active:
            failure = "invalid_credentials"
        elif client_ip is not None and not ip_allowed(client_ip, login.allowed_ips):
            failure = "ip_not_allowed"
        if login is None or failure is not None:
            # The same cost and answer as a wrong password: no oracle for names or restrictions.
            refused = gate.begin() if gate is not None else None
            if refused is not None:
                return AuthResult(None, f"throttled_{refused}")
            self._bcrypt(password, self._dummy_hash)
            if gate is not None:
                gate.failed()
            return AuthResult(None, failure)
        key: _Key = (login.username, self._mac(password))
        if self._cached(key, login):
            refused = gate.over() if gate is not None else None
            if refused is not None:
                return AuthResult(None, f"throttled_{refused}")
            return AuthResult(self._succeeded(login), None)
        flight = self._single_flight(key, password, login.password_hash, gate)
        if flight.refused is not None:
            return AuthResult(None, f"throttled_{flight.refused}")
        if not flight.ok:
            return AuthResult(None, "invalid_credentials")
        return AuthResult(self._succeeded(login), None)

    def _succeeded(self, login: Login) -> AuthenticatedAccount:
        """The session's account; the credential's ``last_used_at`` is written at most once a minute."""
        if login.last_used_at is None or login.last_used_at < utcnow() - LAST_USED_RESOLUTION:
            try:
                with self._database.transaction() as session:
                    touch_last_used(session, login.credential_id)
            except DatabaseUnavailable:
                # A bookkeeping write: the login itself stands, and the next one writes it.
                log.info(
                    "last_used_at not written: the database is unavailable",
                    extra={"event": "smtp.last_used_unwritten", "username": login.username},
                )
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

    def _single_flight(self, key: _Key, password: str, password_hash: str, gate: _Gate | None) -> _Flight:
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
            return flight
        try:
            flight.refused = gate.begin() if gate is not None else None
            if flight.refused is None:
                flight.ok = self._bcrypt(password, password_hash)
                if gate is not None:
                    gate.succeeded() if flight.ok else gate.failed()
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                if flight.ok:
                    self._remember(key, password_hash)
                del self._flights[flight_key]
            flight.done.set()
        return flight

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
    return AuthenticatedAccount(
        id=login.id,
        name=login.name,
        allowed_domains=tuple(login.allowed_domains),
        header_from_check=not login.allow_any_header_from,
        credential_id=login.credential_id,
        username=login.username,
    )


def ip_allowed(client_ip: str, networks: list[str]) -> bool:
    """Whether the client's address is in one of ``networks`` (CIDRs); an empty list allows all."""
    if not networks:
        return True
    address = client_address(client_ip)
    if address is None:
        return False
    for network in networks:
        try:
            if address in ipaddress.ip_network(network):
                return True
        except ValueError:
            continue
    return False


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH attempt, already counted: whether it may be judged, and what to give back."""

    refused: str | None  # None: check the password; "ip" or "user": 454 without a check
    ip_key: str
    user_keys: tuple[str, str]  # this window's and the previous one's


class AuthThrottle:
    """Counts every AUTH attempt per client address and per user name, then decides.

    The counters live in the ``limits`` library's storage (``limits.storage``), so several
    listener processes or hosts share them through Redis. ``begin`` increments a counter
    before it compares it with its limit (``Storage.incr`` answers the new count
    atomically, in Redis too): first the address's, then the user name's. N connections
    guessing at once therefore get N distinct counts, and at most ``per_ip`` of them are
    judged; the rest are refused without bcrypt. An attempt the address's count refuses
    leaves the user name's counter alone, so a flood from one address leaves no key for
    each name it tries. A refused attempt gives its increments back (a refusal is not a
    guess); a failed one keeps them; a success clears the user name's counter and gives
    back only its own increment of the address's, which otherwise decays with time alone.

    Windows are sliding, approximated from two fixed ones (this window's count plus the
    previous window's, weighted by the part of it still inside the sliding window).

    No delay is added before answering: the counts already bound the guesses, and a sleep
    would only hold session threads and slow a legitimate client's parallel logins.

    When the shared storage does not answer, the attempt is counted in a storage of this
    process instead, so a Redis outage weakens the throttle to one per process rather than
    switching it off.
    """

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        per_ip: int = 10,
        per_user: int = 10,
        window: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage if storage is not None else LocalCounters()
        self._fallback: Storage | None = None  # made on the first failure of the shared storage
        self._clock = clock
        self._degraded = False
        self._next_probe = 0.0
        # Shared storage only: (address key, user key) -> until when a read found both under
        # their limits. A verified login that reconnects for every message then costs no round
        # trip; any guess this process counts (refused or wrong) forgets all of it, so a
        # guesser's first miss here ends the shortcut. Across processes the read may be up to
        # CLEAR_SECONDS old: at most one cached (correct) login per process passes just after
        # another process saw the limit reached.
        self._remote = not isinstance(self.storage, LocalCounters)
        self._clear: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._clear_lock = threading.Lock()
        self.configure(per_ip=per_ip, per_user=per_user, window=window)

    def configure(self, *, per_ip: int, per_user: int, window: float) -> None:
        """Set the limits (the listener calls it with the live config before each attempt)."""
        if per_ip < 1 or per_user < 1 or window <= 0:
            raise ValueError("per_ip and per_user must be at least 1, window positive")
        self.per_ip, self.per_user, self.window = per_ip, per_user, window

    def _keys(self, ip: str, username: str) -> tuple[float, str, str, str, str]:
        """The weight of the previous window, and this and the previous window's keys."""
        now = self._clock()
        window = self.window
        bucket = int(now // window)
        # The part of the previous fixed window that still lies inside the sliding one.
        weight = 1.0 - (now - bucket * window) / window
        user = hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        address = counting_address(ip)
        return (
            weight,
            f"smtp-proxy/auth/ip/{address}/{window:g}/{bucket}",
            f"smtp-proxy/auth/ip/{address}/{window:g}/{bucket - 1}",
            f"smtp-proxy/auth/user/{user}/{window:g}/{bucket}",
            f"smtp-proxy/auth/user/{user}/{window:g}/{bucket - 1}",
        )

    def over(self, ip: str, username: str) -> str | None:
        """Which count ("ip" or "user") already reached its limit, or None; counts nothing."""
        weight, ip_key, ip_prev, user_key, user_prev = self._keys(ip, username)
        pair = (ip_key, user_key)
        now = time.monotonic()
        if self._remote:
            with self._clear_lock:
                until = self._clear.get(pair)
            if until is not None and now < until:
                return None
        storage = self._storage()
        try:
            ip_now, ip_before, user_now, user_before = get_many(
                storage, [ip_key, ip_prev, user_key, user_prev]
            )
        except storage.base_exceptions as error:
            self._unavailable(error)
            return None
        if ip_now + math.floor(max(0, ip_before) * weight) >= self.per_ip:
            return "ip"
        if user_now + math.floor(max(0, user_before) * weight) >= self.per_user:
            return "user"
        if self._remote:
            with self._clear_lock:
                self._clear[pair] = now + CLEAR_SECONDS
                self._clear.move_to_end(pair)
                while len(self._clear) > CLEAR_ENTRIES:
                    self._clear.popitem(last=False)
        return None

    def _forget_clear(self) -> None:
        if self._remote and self._clear:
            with self._clear_lock:
                self._clear.clear()

    def begin(self, ip: str, username: str) -> AuthAttempt:
        """Count this attempt, then decide whether its password may be checked."""
        weight, ip_key, ip_prev, user_key, user_prev = self._keys(ip, username)
        expiry = math.ceil(2 * self.window) + 1
        storage = self._storage()
        refused = None
        counted_user = False
        try:
            ip_count = storage.incr(ip_key, expiry) + self._weighted(storage, ip_prev, weight)
            if ip_count > self.per_ip:
                # Refused by the address's count alone: the user name's counter is not touched,
                # so a flood from one address leaves no key for each name it tries.
                refused = "ip"
            else:
                counted_user = True
                user_count = storage.incr(user_key, expiry) + self._weighted(storage, user_prev, weight)
                if user_count > self.per_user:
                    refused = "user"
        except storage.base_exceptions as error:
            if storage is self._fallback:
                raise
            self._unavailable(error)
            return self.begin(ip, username)
        attempt = AuthAttempt(refused, ip_key, (user_key, user_prev))
        if refused is not None:
            self._forget_clear()
            self._give_back(attempt, user=counted_user)
        return attempt

    @staticmethod
    def _weighted(storage: Storage, key: str, weight: float) -> int:
        """The previous window's count, as much of it as still lies inside the sliding window."""
        return math.floor(max(0, storage.get(key)) * weight)

    def failed(self, attempt: AuthAttempt) -> None:
        """A wrong password: the attempt's increments stay counted."""
        self._forget_clear()

    def succeeded(self, attempt: AuthAttempt) -> None:
        """Clear the user name's counter; give back this attempt's own increment of the address's."""
        storage = self._storage()
        try:
            for key in attempt.user_keys:
                storage.clear(key)
        except storage.base_exceptions as error:
            self._unavailable(error)
        self._give_back(attempt, user=False)

    def _give_back(self, attempt: AuthAttempt, *, user: bool) -> None:
        storage = self._storage()
        expiry = math.ceil(2 * self.window) + 1
        try:
            storage.incr(attempt.ip_key, expiry, amount=-1)
            if user:
                storage.incr(attempt.user_keys[0], expiry, amount=-1)
        except storage.base_exceptions as error:
            self._unavailable(error)

    def _storage(self) -> Storage:
        """The shared storage; while it is down, this process's, asking again every few seconds."""
        if not self._degraded or self._fallback is None:
            return self.storage
        now = time.monotonic()
        if now < self._next_probe:
            return self._fallback
        self._next_probe = now + STORAGE_PROBE_SECONDS
        try:
            answers = bool(self.storage.check())
        except Exception:  # noqa: BLE001 - whatever the ping raises, the storage is still down
            answers = False
        if not answers:
            return self._fallback
        self._degraded = False
        log.info("AUTH throttle storage answers again", extra={"event": "smtp.auth_throttle_recovered"})
        return self.storage

    def _unavailable(self, error: Exception) -> None:
        if not self._degraded:
            if self._fallback is None:
                self._fallback = LocalCounters()
            self._degraded = True
            self._next_probe = time.monotonic() + STORAGE_PROBE_SECONDS
            log.warning(
                "AUTH throttle storage unavailable; counting in this process until it answers",
                extra={"event": "smtp.auth_throttle_degraded", "error_class": type(error).__name__},
            )


@dataclass(frozen=True)
class AuthResult:
    account: AuthenticatedAccount | None
    # None, or "throttled_ip", "throttled_user", "invalid_credentials", "ip_not_allowed",
    # "database_unavailable"
    failure: str | None


class _Gate:
    """One AUTH attempt's view of the throttle: count it (once), or only look, then settle it."""

    __slots__ = ("_throttle", "_ip", "_username", "_attempt")

    def __init__(self, throttle: AuthThrottle, ip: str, username: str) -> None:
        self._throttle, self._ip, self._username = throttle, ip, username
        self._attempt: AuthAttempt | None = None

    def over(self) -> str | None:
        """Whether the address or the user name is already over its limit, counting nothing."""
        return self._throttle.over(self._ip, self._username)

    def begin(self) -> str | None:
        """Count this guess; "ip" or "user" when it is refused without a check."""
        self._attempt = self._throttle.begin(self._ip, self._username)
        return self._attempt.refused

    def failed(self) -> None:
        if self._attempt is not None:
            self._throttle.failed(self._attempt)

    def succeeded(self) -> None:
        if self._attempt is not None:
            self._throttle.succeeded(self._attempt)


def authenticate(
    verifier: CredentialVerifier,
    throttle: AuthThrottle,
    *,
    client_ip: str,
    username: str,
    password: str,
    header_from_check: bool = True,
) -> AuthResult:
    """One AUTH attempt in the order that holds under parallel guessing: count, decide, then verify.

    ``header_from_check`` is ``smtp.header_from_check``; an account exempt from it
    (``allow_any_header_from``) is exempt either way. Raises nothing for a database
    outage: that is the ``database_unavailable`` failure, and the attempt is not
    counted, since no password was checked.
    """
    try:
        result = verifier.check(username, password, _Gate(throttle, client_ip, username), client_ip=client_ip)
    except DatabaseUnavailable:
        return AuthResult(None, "database_unavailable")
    account = result.account
    if account is not None and not header_from_check and account.header_from_check:
        return AuthResult(replace(account, header_from_check=False), None)
    return result


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
