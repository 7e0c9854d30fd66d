"""The worker's route cache on a real database: what it reuses, for how long, and what it reads again."""

from __future__ import annotations

import uuid

from sqlalchemy import update

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import Account
from smtp_proxy.db.session import Database
from smtp_proxy.delivery.routes import RouteCache
from tests.integration.test_storage import new_account, new_provider, new_rule


def deactivate(database: Database, *accounts: uuid.UUID) -> None:
    with database.transaction() as session:
        session.execute(update(Account).where(Account.id.in_(accounts)).values(active=False))


def test_routes_carry_the_rules_and_their_providers_opened(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    provider = new_provider(database, cipher, account.id, api_key="SG.secret")
    rule = new_rule(database, account.id, provider.id, "all", 3)
    (route,) = RouteCache(database, cipher).get(account.id)
    assert (route.rule.id, route.rule.priority, route.rule.provider_id) == (rule.id, 3, provider.id)
    assert route.target is not None and route.target.api_key == "SG.secret"
    assert route.provider_type == "sendgrid"


def test_an_account_is_reused_until_its_ttl_and_read_again_when_fresh(
    database: Database, cipher: Cipher
) -> None:
    account = new_account(database).account
    cached = RouteCache(database, cipher, ttl=3600)
    assert cached.active(account.id)
    deactivate(database, account.id)
    assert cached.active(account.id)  # within the TTL: the cached state
    assert cached.get(account.id, fresh=True) == []
    assert not cached.active(account.id)  # the fresh read replaced the cached state


def test_a_zero_ttl_reads_every_time(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    uncached = RouteCache(database, cipher, ttl=0)
    assert uncached.active(account.id)
    deactivate(database, account.id)
    assert not uncached.active(account.id)


def test_a_full_cache_drops_the_least_recently_used_account_only(database: Database, cipher: Cipher) -> None:
    first, second, third = (new_account(database, name).account for name in ("alice", "bob", "carol"))
    cached = RouteCache(database, cipher, ttl=3600, size=2)
    assert cached.active(first.id) and cached.active(second.id)
    deactivate(database, first.id, second.id)
    assert cached.active(third.id)  # the cache is full: the first account goes, not both
    assert cached.active(second.id)  # still cached
    assert not cached.active(first.id)  # read again
