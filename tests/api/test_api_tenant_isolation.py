"""Tenant isolation in the API: operator-only account fields, one sender domain per tenant,
per-account limits and the usage endpoint, and the provider and rule caps.

Through Flask's test client (``make_app``) on PostgreSQL and, where the behaviour must not
depend on the database, SQLite too; the concurrent grants run through waitress.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from limits.storage import RedisStorage
from sqlalchemy import func, select

from smtp_proxy.counters import open_storage
from smtp_proxy.db.models import Account, AuditLog
from smtp_proxy.sending_limits import SendingLimits
from tests.api.checks import assert_error, assert_invalid
from tests.api.conftest import AppUnderTest, own_domain
from tests.logins import login_hash

ACCOUNTS = "/api/v1/accounts"
OPERATOR_VALUES: dict[str, Any] = {
    "allowed_domains": ["mine.example"],
    "is_admin": True,
    "active": False,
    "limits": {"messages_per_hour": None},
    "allow_any_header_from": True,
}


def stored(app: AppUnderTest, account_id: str) -> dict[str, Any]:
    """The account's row as stored, read afresh."""
    try:
        with app.database.transaction() as session:
            row = session.execute(select(Account).where(Account.id == uuid.UUID(account_id))).scalar_one()
            return {
                "email": row.email,
                "allowed_domains": list(row.allowed_domains),
                "is_admin": row.is_admin,
                "active": row.active,
                "allow_any_header_from": row.allow_any_header_from,
                "limits": dict(row.limits),
                "password_hash": login_hash(session, row),
                "updated_at": row.updated_at,
            }
    finally:
        app.database.remove_session()


def audit_rows(app: AppUnderTest, account_id: str | None = None) -> list[tuple[str, str, list[str]]]:
    """(action, actor, fields) of the audit rows, oldest first; one account's when given."""
    try:
        with app.database.transaction() as session:
            query = select(AuditLog).order_by(AuditLog.created_at, AuditLog.id)
            if account_id is not None:
                query = query.where(AuditLog.entity_id == uuid.UUID(account_id))
            return [(r.action, r.actor, r.changes["fields"]) for r in session.scalars(query)]
    finally:
        app.database.remove_session()


def audit_count(app: AppUnderTest) -> int:
    try:
        with app.database.transaction() as session:
            return int(session.scalar(select(func.count()).select_from(AuditLog)) or 0)
    finally:
        app.database.remove_session()


def account_names(app: AppUnderTest) -> list[str]:
    reply = app.call("GET", ACCOUNTS, app.admin_key)
    assert reply.status_code == 200, reply.text
    return sorted(item["name"] for item in reply.json()["items"])


# --- 1. the operator's fields ---------------------------------------------------------------------


@pytest.mark.parametrize("field", sorted(OPERATOR_VALUES))
def test_a_tenant_naming_an_operator_field_is_403_and_nothing_changes(
    make_app, db_url: str, field: str
) -> None:
    app: AppUnderTest = make_app(db_url)
    tenant = app.tenant()
    before, rows = stored(app, tenant["id"]), audit_count(app)
    for body in (
        {field: OPERATOR_VALUES[field]},
        {field: OPERATOR_VALUES[field], "email": "changed@example.com"},
        {field: "a value of the wrong type"},  # naming it is enough
    ):
        reply = app.call("PUT", f"{ACCOUNTS}/{tenant['id']}", tenant["api_key"], body=body)
        error = assert_error(reply, 403, "forbidden_field")
        assert field in error["message"], error
        assert set(error["fields"]) == {field}, error
    assert stored(app, tenant["id"]) == before
    assert audit_count(app) == rows
    # Its own email it may still change.
    reply = app.call(
        "PUT", f"{ACCOUNTS}/{tenant['id']}", tenant["api_key"], body={"email": "new@example.com"}
    )
    assert reply.status_code == 200, reply.text


def test_a_tenant_naming_several_operator_fields_hears_of_each(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(pg_url)
    tenant = app.tenant()
    reply = app.call("PUT", f"{ACCOUNTS}/{tenant['id']}", tenant["api_key"], body=dict(OPERATOR_VALUES))
    error = assert_error(reply, 403, "forbidden_field")
    assert set(error["fields"]) == set(OPERATOR_VALUES)
    for field in OPERATOR_VALUES:
        assert field in error["message"]
    # Another tenant's account stays a 404, whatever the body names.
    other = app.tenant()
    reply = app.call("PUT", f"{ACCOUNTS}/{other['id']}", tenant["api_key"], body={"is_admin": True})
    assert_error(reply, 404, "not_found")


def test_an_admin_sets_every_operator_field_and_each_change_is_audited(make_app, db_url: str) -> None:
    app: AppUnderTest = make_app(db_url)
    tenant = app.tenant()
    path = f"{ACCOUNTS}/{tenant['id']}"
    assert tenant["allow_any_header_from"] is False and tenant["limits"] == {}

    body = {
        "allowed_domains": ["Shop.Example", "*.shop.example"],
        "allow_any_header_from": True,
        "limits": {"messages_per_hour": 500, "recipients_per_day": None},
    }
    reply = app.call("PUT", path, app.admin_key, body=body)
    assert reply.status_code == 200, reply.text
    shown = reply.json()
    assert shown["allowed_domains"] == ["shop.example", "*.shop.example"]
    assert shown["allow_any_header_from"] is True
    assert shown["limits"] == {"messages_per_hour": 500, "recipients_per_day": None}
    assert app.call("GET", path, tenant["api_key"]).json() == shown  # the tenant sees them too
    row = stored(app, tenant["id"])
    assert row["limits"] == {"messages_per_hour": 500, "recipients_per_day": None}
    assert row["allow_any_header_from"] is True

    # active: false is a deactivation, as DELETE is: the key stops working at once.
    assert app.call("GET", path, tenant["api_key"]).status_code == 200
    reply = app.call("PUT", path, app.admin_key, body={"active": False})
    assert reply.status_code == 200 and reply.json()["active"] is False
    assert_error(app.call("GET", path, tenant["api_key"]), 401, "unauthorized")
    # active: true reactivates, and the key works again at once (not after a cache's TTL).
    reply = app.call("PUT", path, app.admin_key, body={"active": True})
    assert reply.status_code == 200 and reply.json()["active"] is True
    assert app.call("GET", path, tenant["api_key"]).status_code == 200

    reply = app.call("PUT", path, app.admin_key, body={"is_admin": True, "limits": {}})
    assert reply.status_code == 200 and reply.json()["limits"] == {}
    assert app.call("GET", ACCOUNTS, tenant["api_key"]).json()["items"].__len__() > 1  # now an admin

    admin_name = app.call("GET", f"{ACCOUNTS}/{app.admin_id}", app.admin_key).json()["name"]
    assert audit_rows(app, tenant["id"]) == [
        ("create", admin_name, ["allowed_domains", "api_key", "email", "is_admin", "name", "password"]),
        ("update", admin_name, ["allow_any_header_from", "allowed_domains", "limits"]),
        ("deactivate", admin_name, ["active"]),
        ("reactivate", admin_name, ["active"]),
        ("update", admin_name, ["is_admin", "limits"]),
    ]


def test_an_admin_creates_an_account_with_its_limits_and_header_from_exemption(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(pg_url)
    created = app.tenant(allow_any_header_from=True, limits={"messages_per_minute": 10})
    assert created["allow_any_header_from"] is True
    assert created["limits"] == {"messages_per_minute": 10}
    assert audit_rows(app, created["id"])[0][2] == sorted(
        [
            "allowed_domains",
            "api_key",
            "email",
            "is_admin",
            "name",
            "password",
            "allow_any_header_from",
            "limits",
        ]
    )
    bad = {
        "name": "x1",
        "email": "x@example.com",
        "allowed_domains": [own_domain()],
        "limits": {"per_week": 1},
    }
    assert_invalid(app.call("POST", ACCOUNTS, app.admin_key, body=bad), "limits.per_week")


# --- 2. one domain, one tenant --------------------------------------------------------------------

OVERLAPS = [
    ("a.example", "a.example"),
    ("*.a.example", "b.a.example"),
    ("b.a.example", "*.a.example"),
    ("*.a.example", "*.b.a.example"),
    ("*.b.a.example", "*.a.example"),
    ("A.Example.", "a.example"),
]


@pytest.mark.parametrize(("held", "wanted"), OVERLAPS)
def test_a_domain_another_active_account_holds_is_409_on_create_and_update(
    make_app, db_url: str, held: str, wanted: str
) -> None:
    app: AppUnderTest = make_app(db_url)
    holder = app.tenant(allowed_domains=[held])
    other = app.tenant()
    names, before, rows = account_names(app), stored(app, other["id"]), audit_count(app)

    body = {"name": "newcomer", "email": "n@example.com", "allowed_domains": [own_domain(), wanted]}
    error = assert_error(app.call("POST", ACCOUNTS, app.admin_key, body=body), 409, "domain_taken")
    assert wanted.lower().rstrip(".") in error["message"]
    assert set(error["fields"]) == {"allowed_domains"}
    assert holder["name"] not in error["message"]

    reply = app.call("PUT", f"{ACCOUNTS}/{other['id']}", app.admin_key, body={"allowed_domains": [wanted]})
    error = assert_error(reply, 409, "domain_taken")
    assert wanted.lower().rstrip(".") in error["message"]

    assert account_names(app) == names
    assert stored(app, other["id"]) == before
    assert audit_count(app) == rows
    # The holder itself may be given its own domains again.
    reply = app.call(
        "PUT", f"{ACCOUNTS}/{holder['id']}", app.admin_key, body={"allowed_domains": [held, wanted]}
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    ("held", "wanted"),
    [("*.a.example", "a.example"), ("a.example", "b.example"), ("*.a.example", "xa.example")],
)
def test_domains_that_do_not_overlap_are_granted(make_app, pg_url: str, held: str, wanted: str) -> None:
    app: AppUnderTest = make_app(pg_url)
    app.tenant(allowed_domains=[held])
    assert app.tenant(allowed_domains=[wanted])["allowed_domains"] == [wanted]


def test_shared_domains_are_allowed_when_unique_sender_domains_is_off(make_app, db_url: str) -> None:
    app: AppUnderTest = make_app(db_url, security={"unique_sender_domains": False})
    first = app.tenant(allowed_domains=["*.shared.example"])
    second = app.tenant(allowed_domains=["mail.shared.example"])
    reply = app.call(
        "PUT", f"{ACCOUNTS}/{first['id']}", app.admin_key, body={"allowed_domains": ["x.example"]}
    )
    assert reply.status_code == 200
    reply = app.call(
        "PUT", f"{ACCOUNTS}/{second['id']}", app.admin_key, body={"allowed_domains": ["x.example"]}
    )
    assert reply.status_code == 200, reply.text


def test_a_deactivated_holder_frees_its_domain_and_cannot_come_back_while_it_is_taken(
    make_app, db_url: str
) -> None:
    app: AppUnderTest = make_app(db_url)
    holder = app.tenant(allowed_domains=["*.shop.example"])
    assert app.call("DELETE", f"{ACCOUNTS}/{holder['id']}", app.admin_key).status_code == 204
    successor = app.tenant(allowed_domains=["eu.shop.example"])
    assert successor["allowed_domains"] == ["eu.shop.example"]

    rows = audit_count(app)
    reply = app.call("PUT", f"{ACCOUNTS}/{holder['id']}", app.admin_key, body={"active": True})
    error = assert_error(reply, 409, "domain_taken")
    assert "reactivate" in error["message"] and "*.shop.example" in error["message"]
    assert stored(app, holder["id"])["active"] is False
    assert audit_count(app) == rows
    assert_error(app.call("GET", ACCOUNTS, holder["api_key"]), 401, "unauthorized")

    # With other domains it may come back.
    body = {"active": True, "allowed_domains": ["shop.example"]}
    reply = app.call("PUT", f"{ACCOUNTS}/{holder['id']}", app.admin_key, body=body)
    assert reply.status_code == 200, reply.text
    assert app.call("GET", ACCOUNTS, holder["api_key"]).status_code == 200


def test_concurrent_grants_of_one_domain_give_one_account(start_api) -> None:
    """On PostgreSQL the check runs under an advisory lock: of racing creates, one wins."""
    api = start_api()
    count = 6
    barrier = threading.Barrier(count)
    statuses: list[int] = []
    codes: list[str] = []
    lock = threading.Lock()

    def grant(number: int) -> None:
        client = api.client(api.admin.api_key)
        body = {
            "name": f"racer{number}",
            "email": f"r{number}@example.com",
            "allowed_domains": ["*.race.example"],
        }
        barrier.wait()
        reply = client.post(ACCOUNTS, json=body)
        with lock:
            statuses.append(reply.status_code)
            if reply.status_code != 201:
                codes.append(reply.json()["error"]["code"])

    threads = [threading.Thread(target=grant, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(statuses) == [201] + [409] * (count - 1), statuses
    assert codes == ["domain_taken"] * (count - 1)
    holders = [a for a in api.admin.get(ACCOUNTS).json()["items"] if a["name"].startswith("racer")]
    assert len(holders) == 1


# --- 3. limits and usage --------------------------------------------------------------------------

DAY_START = 1_800_000_000 - 1_800_000_000 % 86400
NOW = DAY_START + 10 * 3600 + 15  # 10:00:15 UTC: 45 s left in the minute, 3,585 in the hour


def frozen_counters(app: AppUnderTest) -> SendingLimits:
    """The app's counters, read at a fixed moment: same storage, a clock that does not tick."""
    made = app.app.extensions["smtp_proxy.sending_limits"]
    assert isinstance(made, SendingLimits)
    frozen = SendingLimits(made.storage, clock=lambda: NOW)
    app.app.extensions["smtp_proxy.sending_limits"] = frozen
    return frozen


def windows(reply) -> dict[str, dict[str, Any]]:
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert list(body) == ["account_id", "shared", "windows"]
    assert [w["name"] for w in body["windows"]] == [
        "messages_per_minute",
        "messages_per_hour",
        "messages_per_day",
        "recipients_per_day",
    ]
    return {w.pop("name"): w for w in body["windows"]}


def test_usage_shows_effective_limits_and_counted_sends(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(pg_url, limits={"messages_per_hour": 100, "recipients_per_day": 1000})
    # create_app made the app's counters on limits.storage (memory://: this process's own).
    assert isinstance(
        app.app.extensions["smtp_proxy.sending_limits"].storage, type(open_storage("memory://"))
    )
    counters = frozen_counters(app)
    tenant = app.tenant(limits={"messages_per_minute": 5, "recipients_per_day": None})
    path = f"{ACCOUNTS}/{tenant['id']}/usage"

    reply = app.call("GET", path, tenant["api_key"])
    assert reply.json()["account_id"] == tenant["id"] and reply.json()["shared"] is False
    assert windows(reply) == {
        "messages_per_minute": {"limit": 5, "used": 0, "resets_in": 45},  # its own
        "messages_per_hour": {"limit": 100, "used": 0, "resets_in": 3585},  # the config's
        "messages_per_day": {"limit": None, "used": 0, "resets_in": 50385},  # neither: unlimited
        "recipients_per_day": {"limit": None, "used": 0, "resets_in": 50385},  # its own null
    }

    counters.record(uuid.UUID(tenant["id"]), 3)
    counters.record(uuid.UUID(tenant["id"]), 2)
    used = {name: w["used"] for name, w in windows(app.call("GET", path, app.admin_key)).items()}
    assert used == {
        "messages_per_minute": 2,
        "messages_per_hour": 2,
        "messages_per_day": 2,
        "recipients_per_day": 5,
    }

    # An admin changes the override; the usage shows it at once.
    body = {"limits": {"messages_per_day": 50}}
    assert app.call("PUT", f"{ACCOUNTS}/{tenant['id']}", app.admin_key, body=body).status_code == 200
    limits = {name: w["limit"] for name, w in windows(app.call("GET", path, tenant["api_key"])).items()}
    assert limits == {
        "messages_per_minute": None,
        "messages_per_hour": 100,
        "messages_per_day": 50,
        "recipients_per_day": 1000,
    }


def test_usage_of_another_tenant_or_no_account_is_404(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(pg_url)
    alice, bob = app.tenant(), app.tenant()
    assert_error(app.call("GET", f"{ACCOUNTS}/{bob['id']}/usage", alice["api_key"]), 404, "not_found")
    assert_error(app.call("GET", f"{ACCOUNTS}/{uuid.uuid4()}/usage", app.admin_key), 404, "not_found")
    assert_error(app.call("GET", f"{ACCOUNTS}/{bob['id']}/usage"), 401, "unauthorized")
    assert app.call("GET", f"{ACCOUNTS}/{bob['id']}/usage", app.admin_key).status_code == 200


def test_usage_is_shared_by_apps_on_one_redis_and_not_by_memory(
    make_app, pg_url: str, redis_url: str
) -> None:
    first: AppUnderTest = make_app(pg_url, limits={"storage": redis_url})
    second: AppUnderTest = make_app(pg_url, limits={"storage": redis_url})
    assert isinstance(first.app.extensions["smtp_proxy.sending_limits"].storage, RedisStorage)
    tenant = first.tenant()
    account_id = uuid.UUID(tenant["id"])
    counting = frozen_counters(first)
    counting.record(account_id, 4)
    counting.flush()  # sent to Redis at once rather than by its flushing thread
    frozen_counters(second)
    reply = second.call("GET", f"{ACCOUNTS}/{tenant['id']}/usage", tenant["api_key"])
    assert reply.json()["shared"] is True
    assert windows(reply)["recipients_per_day"]["used"] == 4
    assert (
        windows(second.call("GET", f"{ACCOUNTS}/{tenant['id']}/usage", tenant["api_key"]))[
            "messages_per_minute"
        ]["used"]
        == 1
    )

    # memory://: each app (each process) has counts of its own.
    alone: AppUnderTest = make_app(pg_url)
    frozen_counters(alone)
    reply = alone.call("GET", f"{ACCOUNTS}/{tenant['id']}/usage", tenant["api_key"])
    assert reply.json()["shared"] is False
    assert windows(reply)["recipients_per_day"]["used"] == 0


# --- 4. caps on providers and rules ---------------------------------------------------------------


def test_one_provider_or_rule_over_the_cap_is_422_naming_the_limit(make_app, db_url: str) -> None:
    app: AppUnderTest = make_app(db_url, limits={"max_providers_per_account": 2, "max_rules_per_account": 3})
    tenant, other = app.tenant(), app.tenant()
    key = tenant["api_key"]

    def provider(name: str, api_key: str = key):
        return app.call(
            "POST",
            "/api/v1/providers",
            api_key,
            body={"name": name, "provider_type": "sendgrid", "api_key": "k"},
        )

    def rule(name: str, provider_id: str):
        return app.call(
            "POST",
            "/api/v1/routing-rules",
            key,
            body={"name": name, "provider_id": provider_id, "priority": 1},
        )

    first = provider("one").json()
    assert provider("two").status_code == 201
    rows = audit_count(app)
    error = assert_invalid(provider("three"), "body")
    refused = provider("three").json()["error"]
    assert "limits.max_providers_per_account" in refused["message"] and "2" in refused["message"]
    assert "limits.max_providers_per_account" in error["body"]
    assert audit_count(app) == rows
    assert provider("mine", other["api_key"]).status_code == 201  # another tenant has its own count

    for number in range(3):
        assert rule(f"r{number}", first["id"]).status_code == 201
    refused = rule("r3", first["id"])
    assert_invalid(refused, "body")
    assert "limits.max_rules_per_account" in refused.json()["error"]["message"]

    # Deleting one makes room for one.
    assert app.call("DELETE", f"/api/v1/providers/{first['id']}", key).status_code == 204  # its rules too
    assert provider("three").status_code == 201
    assert provider("four").status_code == 422
