"""Bearer API keys: who is calling, and whether they may act as an admin.

The key's SHA-256 digest is looked up in the database; answers are cached for
a few seconds per process (a tenant tool makes bursts of calls), and the
entry is dropped at once when this process rotates the key or deactivates
the account. Another API instance sees such a change within the TTL.

Order of work for each request (``authenticate``), cheapest first:

1. no key, or a malformed one: counted against the client address
   (``api.unauthenticated_rate_limit``), then 401;
2. a key this process verified a moment ago: counted against the key
   (``api.rate_limit``);
3. a digest this process found unknown a moment ago (the negative cache):
   counted against the address, then 401, with no query;
4. otherwise, when the address is over its limit already, 429 with no query;
   else one query. An unknown key is remembered and counted against the
   address; a valid one is cached and counted against the key.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache
from flask import current_app, g, request

from smtp_proxy import crypto
from smtp_proxy.api.context import database
from smtp_proxy.api.errors import ApiError
from smtp_proxy.api.rate_limit import RateLimit
from smtp_proxy.counters import counting_address
from smtp_proxy.storage.audit import Actor
from smtp_proxy.storage.auth import find_key_holder

CACHE_TTL_SECONDS = 5.0
UNKNOWN_TTL_SECONDS = 5.0
CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Principal:
    """The account behind a request's API key."""

    id: uuid.UUID
    name: str
    is_admin: bool

    @property
    def actor(self) -> Actor:
        """The account as the audit log records it, with the address of the current request."""
        return Actor(self.name, self.id, request.remote_addr)


class KeyCache:
    """digest -> Principal for ``ttl`` seconds (active accounts only), and unknown digests for
    ``unknown_ttl``; each table holds at most ``size`` entries, least recently used out.

    cachetools' caches are not thread-safe: one lock guards both.
    """

    def __init__(
        self,
        ttl: float = CACHE_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        unknown_ttl: float = UNKNOWN_TTL_SECONDS,
        size: int = CACHE_SIZE,
    ) -> None:
        self._lock = threading.Lock()
        self._entries: TTLCache[str, Principal] = TTLCache(size, ttl, timer=clock)
        self._unknown: TTLCache[str, bool] = TTLCache(size, unknown_ttl, timer=clock)

    def get(self, digest: str) -> Principal | None:
        with self._lock:
            try:  # a hit is the common case: one lookup, where get() makes two
                return self._entries[digest]
            except KeyError:
                return None

    def put(self, digest: str, principal: Principal) -> None:
        with self._lock:
            self._entries[digest] = principal

    def is_unknown(self, digest: str) -> bool:
        """Whether this digest was found to belong to no active account a moment ago."""
        with self._lock:
            return digest in self._unknown

    def put_unknown(self, digest: str) -> None:
        with self._lock:
            self._unknown[digest] = True

    def forget_unknown(self, digest: str) -> None:
        """A reactivated account's key works here at once, not after ``unknown_ttl``."""
        with self._lock:
            self._unknown.pop(digest, None)

    def drop_account(self, account_id: uuid.UUID) -> None:
        # A scan, but only on a key rotation or a (de)activation, never per request.
        with self._lock:
            for digest in [d for d, p in self._entries.items() if p.id == account_id]:
                self._entries.pop(digest, None)  # del raises if it expired meanwhile

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries) + len(self._unknown)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": 'Bearer realm="smtp-proxy"'})


def bearer_key() -> str:
    """The API key from ``Authorization: Bearer <key>``; 401 when missing or malformed."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("an API key is required: Authorization: Bearer <key>")
    if len(key) > 256 or not key.isascii() or not key.isprintable():
        raise _unauthorized("the API key is not valid")
    return key


def authenticate() -> Principal:
    """Resolve the caller (see the module docstring for the order).

    401 for a missing, malformed or unknown key or a deactivated account; 429
    over the key's limit, or over the address's limit for requests without a
    valid key.
    """
    limiter: RateLimit = current_app.extensions["smtp_proxy.rate_limit"]
    cache: KeyCache = current_app.extensions["smtp_proxy.key_cache"]
    address = counting_address(request.remote_addr)
    try:
        key = bearer_key()
    except ApiError:
        limiter.hit_address(address)
        raise
    digest = crypto.api_key_digest(key)
    principal = cache.get(digest)
    if principal is None:
        if cache.is_unknown(digest):
            limiter.hit_address(address)
            raise _unauthorized("the API key is not valid")
        limiter.check_address(address)  # a flooding address gets its 429 without a query
        with database().autocommit() as connection:
            holder = find_key_holder(connection, digest)
        if holder is None:
            cache.put_unknown(digest)
            limiter.hit_address(address)
            raise _unauthorized("the API key is not valid")
        principal = Principal(holder.id, holder.name, holder.is_admin)
        cache.put(digest, principal)
    limiter.hit_key(digest)
    g.principal = principal
    return principal


def principal() -> Principal:
    return g.principal


def require_admin() -> Principal:
    caller = principal()
    if not caller.is_admin:
        raise ApiError(403, "this needs an admin account")
    return caller


def forget_account(account_id: uuid.UUID) -> None:
    """Drop cached keys of an account whose key was rotated or which was deactivated."""
    current_app.extensions["smtp_proxy.key_cache"].drop_account(account_id)
