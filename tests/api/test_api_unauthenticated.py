"""The API before authentication: requests without a valid key are limited per client address
before any database lookup, unknown keys are remembered, and only verified keys have a key limit.

Counts of SQL statements come from SQLAlchemy's before_cursor_execute on both engines. The
limiters read a frozen clock, so that no window ends in the middle of a test.
"""

from __future__ import annotations

import secrets
import uuid

import pytest

from smtp_proxy.api.auth import KeyCache, Principal
from smtp_proxy.api.errors import ApiError
from smtp_proxy.api.rate_limit import RateLimit
from smtp_proxy.counters import LocalCounters, counting_address
from tests.api.checks import assert_error
from tests.api.conftest import AppUnderTest

PROVIDERS = "/api/v1/providers"
NOW = 1_800_000_015.0  # 15 s into a minute


def frozen(app: AppUnderTest) -> RateLimit:
    """Give the app a limiter on its own config whose clock stands still at NOW."""
    limiter = RateLimit(app.config, clock=lambda: NOW)
    app.app.extensions["smtp_proxy.rate_limit"] = limiter
    return limiter


def random_key() -> str:
    return secrets.token_hex(32)


def assert_limited(reply) -> int:
    assert_error(reply, 429, "rate_limited")
    retry_after = int(reply.headers["Retry-After"])
    assert retry_after == 45  # the rest of the minute
    return retry_after


def test_random_keys_from_one_address_get_429_after_the_limit_without_queries(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(pg_url, api={"unauthenticated_rate_limit": "5/minute"})
    frozen(app)
    assert app.call("GET", PROVIDERS, app.admin_key, address="198.51.100.7").status_code == 200  # cached
    queries = app.queries()
    try:
        for _ in range(5):
            before = queries.count
            assert_error(
                app.call("GET", PROVIDERS, random_key(), address="198.51.100.7"), 401, "unauthorized"
            )
            assert queries.count == before + 1  # one lookup of an unknown digest
        before = queries.count
        for _ in range(50):
            assert_limited(app.call("GET", PROVIDERS, random_key(), address="198.51.100.7"))
        assert_limited(app.call("POST", PROVIDERS, random_key(), address="198.51.100.7", body={}))
        assert queries.count == before  # not one query for the requests over the limit

        # Another address has a budget of its own; the cached admin key is still served.
        assert_error(app.call("GET", PROVIDERS, random_key(), address="198.51.100.8"), 401, "unauthorized")
        assert app.call("GET", PROVIDERS, app.admin_key, address="198.51.100.7").status_code == 200
    finally:
        queries.close()


def test_a_repeated_unknown_key_costs_one_query_and_still_counts(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(pg_url, api={"unauthenticated_rate_limit": "8/minute"})
    frozen(app)
    bad = random_key()
    queries = app.queries()
    try:
        for _ in range(8):
            assert_error(app.call("GET", PROVIDERS, bad), 401, "unauthorized")
        assert queries.count == 1
        assert_limited(app.call("GET", PROVIDERS, bad))  # remembered, but counted against the address
        assert queries.count == 1
    finally:
        queries.close()


def test_missing_and_malformed_keys_count_against_the_address_without_queries(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(pg_url, api={"unauthenticated_rate_limit": "3/minute"})
    frozen(app)
    queries = app.queries()
    try:
        malformed = [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer " + "k" * 300}]
        for headers in malformed:
            assert_error(app.call("GET", PROVIDERS, headers=headers), 401, "unauthorized")
        assert_limited(app.call("GET", PROVIDERS))
        assert queries.count == 0
    finally:
        queries.close()
    # The public document and the probes are never limited.
    assert app.call("GET", "/api/v1/openapi.json").status_code == 200
    assert app.call("GET", "/healthz").status_code == 200


def test_the_key_limit_counts_verified_keys_only(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(
        pg_url, api={"rate_limit": "3/minute", "unauthenticated_rate_limit": "1000/minute"}
    )
    frozen(app)
    tenant = app.tenant()
    bad = random_key()
    # An unknown key is never "over its limit": it is 401 each time, never 429.
    for _ in range(10):
        assert_error(app.call("GET", PROVIDERS, bad), 401, "unauthorized")
    for _ in range(3):
        assert app.call("GET", PROVIDERS, tenant["api_key"]).status_code == 200
    assert_limited(app.call("GET", PROVIDERS, tenant["api_key"]))
    # Its budget spent, from any address; the admin's key has its own.
    assert_limited(app.call("GET", PROVIDERS, tenant["api_key"], address="203.0.113.99"))
    assert app.call("GET", PROVIDERS, app.admin_key).status_code == 200


def test_a_valid_key_not_yet_cached_waits_behind_its_flooding_address(make_app, pg_url: str) -> None:
    """Over its limit, an address gets 429 before any lookup, a valid key included, unless this
    process verified that key a moment ago; other addresses are served."""
    app: AppUnderTest = make_app(pg_url, api={"unauthenticated_rate_limit": "2/minute"})
    frozen(app)
    tenant = app.tenant()
    app.app.extensions["smtp_proxy.key_cache"] = KeyCache()  # the tenant's creation cached nothing of it
    for _ in range(2):
        assert_error(app.call("GET", PROVIDERS, random_key(), address="192.0.2.50"), 401, "unauthorized")
    assert_limited(app.call("GET", PROVIDERS, tenant["api_key"], address="192.0.2.50"))
    assert app.call("GET", PROVIDERS, tenant["api_key"], address="192.0.2.51").status_code == 200
    assert (
        app.call("GET", PROVIDERS, tenant["api_key"], address="192.0.2.50").status_code == 200
    )  # now cached


def test_ipv6_clients_are_counted_per_64(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(pg_url, api={"unauthenticated_rate_limit": "2/minute"})
    frozen(app)
    assert_error(app.call("GET", PROVIDERS, address="2001:db8:1:2::1"), 401, "unauthorized")
    assert_error(app.call("GET", PROVIDERS, address="2001:db8:1:2:ffff::9"), 401, "unauthorized")
    assert_limited(app.call("GET", PROVIDERS, address="2001:db8:1:2::abcd"))
    assert_error(app.call("GET", PROVIDERS, address="2001:db8:1:3::1"), 401, "unauthorized")


def test_client_address_groups_ipv6_by_64() -> None:
    assert counting_address("192.0.2.1") == "192.0.2.1"
    assert counting_address("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert counting_address("::ffff:192.0.2.1") == "192.0.2.1"
    assert counting_address(None) == "unknown"
    assert counting_address("not an address") == "not an address"


# --- bounded tables ---------------------------------------------------------------------------------


def test_the_memory_limiter_stays_bounded_and_drops_the_least_recently_used(make_app, pg_url: str) -> None:
    """The limiter counts in LocalCounters (one table per limit); a flood of addresses stays bounded."""
    app: AppUnderTest = make_app(pg_url, api={"unauthenticated_rate_limit": "2/minute"})
    limiter = frozen(app)
    table = limiter._storage["ip"]
    assert isinstance(table, LocalCounters) and table is not limiter._storage["key"]
    table._max_keys = 3
    for address in ("a", "b", "c"):
        limiter.hit_address(address)
    limiter.hit_address("a")  # a: 2 hits, and now the most recent
    limiter.hit_address("d")  # b, the least recently used, goes
    assert len(table) == 3
    with pytest.raises(ApiError) as limited:
        limiter.hit_address("a")  # a kept its count
    assert limited.value.headers["Retry-After"] == "45"
    limiter.hit_address("b")  # b starts over
    for number in range(10_000):
        limiter.hit_address(f"k{number}")
    assert len(table) == 3
    # A peek counts nothing.
    limiter.check_address("k9999")
    limiter.hit_address("k9999")
    with pytest.raises(ApiError):
        limiter.check_address("k9999")


def test_key_cache_is_bounded_and_forgets_unknown_digests_after_their_ttl() -> None:
    now = [0.0]
    cache = KeyCache(ttl=5, clock=lambda: now[0], unknown_ttl=3, size=2)
    alice, bob = Principal(uuid.uuid4(), "alice", False), Principal(uuid.uuid4(), "bob", True)
    cache.put("d1", alice)
    cache.put("d2", bob)
    assert cache.get("d1") == alice  # d1 now the most recent
    cache.put("d3", bob)  # d2 goes, not everything
    assert cache.get("d2") is None and cache.get("d1") == alice and cache.get("d3") == bob
    cache.drop_account(alice.id)
    assert cache.get("d1") is None and cache.get("d3") == bob

    cache.put_unknown("x1")
    assert cache.is_unknown("x1")
    now[0] = 3.0
    assert not cache.is_unknown("x1")  # a few seconds only
    for digest in ("x2", "x3", "x4"):
        cache.put_unknown(digest)
    assert not cache.is_unknown("x2") and cache.is_unknown("x3") and cache.is_unknown("x4")
    cache.forget_unknown("x4")
    assert not cache.is_unknown("x4")


# --- through waitress ------------------------------------------------------------------------------


def test_a_flood_over_http_gets_429_with_retry_after(start_api) -> None:
    api = start_api(unauthenticated_rate_limit="3/hour")  # an hour: no window ends mid-test
    client = api.client(None)

    def anyone() -> int:
        return client.get(PROVIDERS, headers={"Authorization": f"Bearer {random_key()}"}).status_code

    assert [anyone() for _ in range(3)] == [401, 401, 401]
    limited = client.get(PROVIDERS, headers={"Authorization": f"Bearer {random_key()}"})
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["Retry-After"]) <= 3600


def test_instances_sharing_redis_share_the_unauthenticated_limit(start_api, redis_url: str) -> None:
    first = start_api(unauthenticated_rate_limit="4/hour", rate_limit_storage=redis_url)
    second = start_api(unauthenticated_rate_limit="4/hour", rate_limit_storage=redis_url)
    on_first, on_second = first.client(), second.client()
    codes = [on_first.get(PROVIDERS).status_code for _ in range(2)]
    codes += [on_second.get(PROVIDERS).status_code for _ in range(2)]
    assert codes == [401, 401, 401, 401]
    assert_error(on_second.get(PROVIDERS), 429, "rate_limited")
    assert_error(on_first.get(PROVIDERS), 429, "rate_limited")  # the same count on the other instance
    for client in (on_first, on_second):
        client.http.close()
