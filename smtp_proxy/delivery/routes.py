"""Each account's routes (its rules and their providers, secrets opened) and whether it is active.

Read from the database at most every ``ROUTES_TTL`` seconds per account and shared by the delivery
threads; an account's rules change rarely, its messages come in bursts.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import NamedTuple

from cachetools import TTLCache

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.delivery import routing
from smtp_proxy.delivery.outcome import Target
from smtp_proxy.errors import DecryptionError
from smtp_proxy.storage import delivery_queue
from smtp_proxy.storage.providers import provider_secrets

log = logging.getLogger("smtp_proxy.delivery")

# How long an account's rules and providers are reused before they are read again.
ROUTES_TTL = 5.0
# Accounts kept at once; past it the least recently used goes first, the others stay cached.
ROUTES_CACHED = 10_000


class Route(NamedTuple):
    rule: routing.Rule
    target: Target | None  # None: its secrets cannot be opened
    provider_type: str


class _Account(NamedTuple):
    active: bool
    routes: list[Route]


class RouteCache:
    """Each account's usable routes and whether it is active, read at most every ``ttl`` seconds."""

    def __init__(
        self, database: Database, cipher: Cipher, ttl: float = ROUTES_TTL, size: int = ROUTES_CACHED
    ) -> None:
        self.database, self.cipher = database, cipher
        self._accounts: TTLCache[uuid.UUID, _Account] = TTLCache(size, ttl, timer=time.monotonic)
        self._lock = threading.Lock()  # TTLCache is not thread-safe

    def get(self, account_id: uuid.UUID, *, fresh: bool = False) -> list[Route]:
        """The account's routes; ``fresh`` reads them again whatever the cache holds."""
        return self._account(account_id, fresh).routes

    def active(self, account_id: uuid.UUID) -> bool:
        """Whether the account is active (False once it is deactivated or gone)."""
        return self._account(account_id, False).active

    def _account(self, account_id: uuid.UUID, fresh: bool) -> _Account:
        if not fresh:
            with self._lock:
                cached = self._accounts.get(account_id)
            if cached is not None:
                return cached
        with self.database.read() as session:
            active = delivery_queue.account_active(session, account_id)
            rows = delivery_queue.routes(session, account_id)
        account = _Account(active, [self._route(row) for row in rows])
        with self._lock:
            self._accounts[account_id] = account
        return account

    def _route(self, row: delivery_queue.Route) -> Route:
        provider = row.provider
        rule = routing.Rule(row.rule_id, row.priority, row.conditions, provider.id)
        try:
            secrets = provider_secrets(self.cipher, provider)
        except DecryptionError:
            log.error(
                "provider secrets cannot be opened",
                extra={"event": "delivery.provider_secrets_unreadable", "provider_id": str(provider.id)},
            )
            return Route(rule, None, str(provider.provider_type))
        target = Target(
            id=provider.id,
            name=provider.name,
            provider_type=provider.provider_type,
            settings=dict(provider.settings or {}),
            smtp_config=dict(provider.smtp_config) if provider.smtp_config else None,
            api_key=secrets.api_key,
            smtp_password=secrets.smtp_password,
        )
        return Route(rule, target, str(provider.provider_type))
