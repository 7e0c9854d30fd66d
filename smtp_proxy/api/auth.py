"""Bearer API keys: who is calling, and whether they may act as an admin.

The key's SHA-256 digest is looked up in the database; answers are cached for
a few seconds per process (a tenant tool makes bursts of calls), and the
entry is dropped at once when this process rotates the key or deactivates
the account. Another API instance sees such a change within the TTL.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from flask import current_app, g, request

from smtp_proxy import crypto
from smtp_proxy.api.context import database
from smtp_proxy.api.errors import ApiError
from smtp_proxy.storage.audit import Actor
from smtp_proxy.storage.auth import find_key_holder

CACHE_TTL_SECONDS = 5.0
CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Principal:
    """The account behind a request's API key."""

    id: uuid.UUID
    name: str
    is_admin: bool

    @property
    def actor(self) -> Actor:
        return Actor(self.name, self.id)


class KeyCache:
    """digest -> Principal for CACHE_TTL_SECONDS; only active accounts are cached."""

    def __init__(self, ttl: float = CACHE_TTL_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, digest: str) -> Principal | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._entries[digest]
                return None
            return entry[0]

    def put(self, digest: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) >= CACHE_SIZE:
                self._entries.clear()
            self._entries[digest] = (principal, self._clock() + self._ttl)

    def drop_account(self, account_id: uuid.UUID) -> None:
        with self._lock:
            for digest in [d for d, (p, _) in self._entries.items() if p.id == account_id]:
                del self._entries[digest]


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
    """Resolve the caller (cached); 401 for an unknown key or a deactivated account."""
    digest = crypto.api_key_digest(bearer_key())
    cache: KeyCache = current_app.extensions["smtp_proxy.key_cache"]
    principal = cache.get(digest)
    if principal is None:
        with database().autocommit() as connection:
            holder = find_key_holder(connection, digest)
        if holder is None:
            raise _unauthorized("the API key is not valid")
        principal = Principal(holder.id, holder.name, holder.is_admin)
        cache.put(digest, principal)
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
