"""/api/v1/audit-log over real HTTP: one row per change, scoping, no secret values, keyset pages."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from smtp_proxy.db.models import Account, AuditLog
from tests.api.checks import assert_error
from tests.api.conftest import ApiServer, Client, Tenant
from tests.logins import login_hash

AUDIT = "/api/v1/audit-log"
ACCOUNTS = "/api/v1/accounts"
PROVIDERS = "/api/v1/providers"
RULES = "/api/v1/routing-rules"
ENTRY_KEYS = {
    "id", "actor", "client_ip", "action", "entity", "entity_id", "account_id", "fields", "created_at",
}  # fmt: skip
ACCOUNT_CREATE_FIELDS = ["allowed_domains", "api_key", "email", "is_admin", "name", "password"]
PROVIDER_CREATE_FIELDS = ["enabled", "name", "provider_type", "settings", "smtp_config"]
RULE_FIELDS = ["conditions", "enabled", "name", "priority", "provider_id"]


# --- helpers ---------------------------------------------------------------------------------------


def page(client: Client, **params: Any) -> dict[str, Any]:
    response = client.get(AUDIT, params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"items", "next_cursor"}
    return body


def walk(client: Client, limit: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Every entry, following next_cursor; also the page sizes."""
    entries: list[dict[str, Any]] = []
    sizes: list[int] = []
    params: dict[str, Any] = {"limit": limit}
    for _ in range(1000):
        body = page(client, **params)
        entries.extend(body["items"])
        sizes.append(len(body["items"]))
        if body["next_cursor"] is None:
            return entries, sizes
        assert isinstance(body["next_cursor"], str) and body["next_cursor"]
        params = {"limit": limit, "cursor": body["next_cursor"]}
    raise AssertionError("pagination did not end")


def everything(client: Client) -> list[dict[str, Any]]:
    return walk(client, 200)[0]


def new_entries(client: Client, seen: set[str]) -> list[dict[str, Any]]:
    """Entries not in ``seen``, oldest first."""
    return [entry for entry in reversed(everything(client)) if entry["id"] not in seen]


def ids(entries: list[dict[str, Any]]) -> set[str]:
    return {entry["id"] for entry in entries}


def row_count(api: ApiServer) -> int:
    try:
        with api.database.transaction() as session:
            return int(session.scalar(select(func.count()).select_from(AuditLog)) or 0)
    finally:
        api.database.remove_session()


def admin_name(api: ApiServer) -> str:
    return api.admin.get(f"{ACCOUNTS}/{api.admin_id}").json()["name"]


def summary(entry: dict[str, Any]) -> tuple[str, str, str, list[str]]:
    return entry["action"], entry["entity"], entry["entity_id"], entry["fields"]


def sendgrid(client: Client, name: str, api_key: str = "SG.some-secret-key") -> dict[str, Any]:
    response = client.post(PROVIDERS, json={"name": name, "provider_type": "sendgrid", "api_key": api_key})
    assert response.status_code == 201, response.text
    return response.json()


def rule(client: Client, provider_id: str, name: str = "all", priority: int = 10) -> dict[str, Any]:
    body = {
        "name": name,
        "provider_id": provider_id,
        "priority": priority,
        "conditions": {"recipient_domains": ["example.com"]},
    }
    response = client.post(RULES, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def cursor_of(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# --- one row per change ----------------------------------------------------------------------------


def test_account_changes_write_one_row_each(api: ApiServer) -> None:
    admin = admin_name(api)
    seen = ids(everything(api.admin))
    tenant = api.tenant(password="initial-password-1")
    created = new_entries(api.admin, seen)
    assert len(created) == 1
    entry = created[0]
    assert set(entry) == ENTRY_KEYS
    assert summary(entry) == ("create", "account", tenant.id, ACCOUNT_CREATE_FIELDS)
    assert entry["account_id"] == tenant.id and entry["actor"] == admin
    uuid.UUID(entry["id"])
    datetime.fromisoformat(entry["created_at"])

    path = f"{ACCOUNTS}/{tenant.id}"
    steps: list[tuple[Client, str, str, dict[str, Any] | None, tuple[str, list[str]], str]] = [
        (tenant.client, "PUT", path, {"email": "new@example.com"}, ("update", ["email"]), tenant.name),
        (
            api.admin,
            "PUT",
            path,
            {"allowed_domains": ["example.org"]},
            ("update", ["allowed_domains"]),
            admin,
        ),
        (tenant.client, "PUT", path, {"password": "the-new-password"}, ("update", ["password"]), tenant.name),
        (api.admin, "PUT", path, {"is_admin": True}, ("update", ["is_admin"]), admin),
        (api.admin, "PUT", path, {"is_admin": False}, ("update", ["is_admin"]), admin),
        (tenant.client, "POST", f"{path}/rotate-key", None, ("update", ["api_key"]), tenant.name),
        (api.admin, "DELETE", path, None, ("deactivate", ["active"]), admin),
    ]
    for client, method, url, body, (action, fields), actor in steps:
        seen = ids(everything(api.admin))
        kwargs = {"json": body} if body is not None else {}
        response = client.request(method, url, **kwargs)
        assert response.status_code in (200, 204), (method, url, response.text)
        if method == "POST":  # the tenant's key changed; keep acting with the new one
            tenant.client.api_key = response.json()["api_key"]
        rows = new_entries(api.admin, seen)
        assert [summary(row) for row in rows] == [(action, "account", tenant.id, fields)], (body, rows)
        assert rows[0]["account_id"] == tenant.id
        assert rows[0]["actor"] == actor


def test_account_update_of_several_fields_writes_one_row(api: ApiServer) -> None:
    tenant = api.tenant()
    seen = ids(everything(api.admin))
    body = {"email": "both@example.com", "allowed_domains": ["example.net"], "password": "another-password"}
    assert api.admin.put(f"{ACCOUNTS}/{tenant.id}", json=body).status_code == 200
    rows = new_entries(api.admin, seen)
    assert [summary(row) for row in rows] == [
        ("update", "account", tenant.id, ["allowed_domains", "email", "password"])
    ]


def test_provider_changes_write_one_row_each(api: ApiServer) -> None:
    tenant = api.tenant()
    seen = ids(everything(api.admin))

    provider = sendgrid(tenant.client, "primary")
    smtp_body = {
        "name": "relay",
        "provider_type": "smtp",
        "smtp_config": {
            "host": "smtp.example.com",
            "port": 587,
            "tls": "starttls",
            "password": "smtp-secret",
        },
    }
    smtp = tenant.client.post(PROVIDERS, json=smtp_body).json()
    renamed = tenant.client.put(
        f"{PROVIDERS}/{provider['id']}", json={"name": "main", "api_key": "SG.rotated"}
    )
    assert renamed.status_code == 200, renamed.text
    assert tenant.client.put(f"{PROVIDERS}/{provider['id']}", json={"enabled": False}).status_code == 200
    new_smtp = {"host": "smtp2.example.com", "port": 465, "tls": "implicit", "password": "smtp-secret-2"}
    assert tenant.client.put(f"{PROVIDERS}/{smtp['id']}", json={"smtp_config": new_smtp}).status_code == 200
    assert tenant.client.delete(f"{PROVIDERS}/{smtp['id']}").status_code == 204

    rows = new_entries(tenant.client, seen)
    assert [summary(row) for row in rows] == [
        ("create", "provider", provider["id"], sorted([*PROVIDER_CREATE_FIELDS, "api_key"])),
        ("create", "provider", smtp["id"], PROVIDER_CREATE_FIELDS),
        ("update", "provider", provider["id"], ["api_key", "name"]),
        ("update", "provider", provider["id"], ["enabled"]),
        ("update", "provider", smtp["id"], ["smtp_config", "smtp_password"]),
        ("delete", "provider", smtp["id"], []),
    ]
    assert {row["account_id"] for row in rows} == {tenant.id}
    assert {row["actor"] for row in rows} == {tenant.name}
    assert new_entries(api.admin, seen) == rows  # the admin sees the same rows


def test_rule_changes_write_one_row_each(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = sendgrid(tenant.client, "primary")
    other = sendgrid(tenant.client, "backup")
    seen = ids(everything(tenant.client))

    created = rule(tenant.client, provider["id"])
    path = f"{RULES}/{created['id']}"
    assert tenant.client.put(path, json={"priority": 5, "enabled": False}).status_code == 200
    assert tenant.client.put(path, json={"provider_id": other["id"]}).status_code == 200
    conditions = {"conditions": {"headers": [{"name": "X-Tag", "contains": "news"}], "weight": 50}}
    assert tenant.client.put(path, json=conditions).status_code == 200
    assert tenant.client.delete(path).status_code == 204

    rows = new_entries(tenant.client, seen)
    assert [summary(row) for row in rows] == [
        ("create", "routing_rule", created["id"], RULE_FIELDS),
        ("update", "routing_rule", created["id"], ["enabled", "priority"]),
        ("update", "routing_rule", created["id"], ["provider_id"]),
        ("update", "routing_rule", created["id"], ["conditions"]),
        ("delete", "routing_rule", created["id"], []),
    ]
    assert {(row["account_id"], row["actor"]) for row in rows} == {(tenant.id, tenant.name)}


def test_failed_changes_write_no_rows(api: ApiServer) -> None:
    alice, bob = api.tenant("alice"), api.tenant("bob")
    provider = sendgrid(alice.client, "primary")
    sendgrid(alice.client, "backup")
    mailgun = alice.client.post(
        PROVIDERS,
        json={
            "name": "mg",
            "provider_type": "mailgun",
            "api_key": "key-1",
            "settings": {"domain": "mg.example"},
        },
    )
    assert mailgun.status_code == 201, mailgun.text
    bobs_provider = sendgrid(bob.client, "bobs")
    bob_domain = bob.client.get(f"{ACCOUNTS}/{bob.id}").json()["allowed_domains"][0]
    rule_id = rule(alice.client, provider["id"])["id"]
    before_rows = row_count(api)
    before_entries = everything(api.admin)
    before_accounts = {a["id"]: a for a in api.admin.get(ACCOUNTS).json()["items"]}

    attempts: list[tuple[Client, str, str, dict[str, Any] | None, int]] = [
        # accounts
        (
            api.admin,
            "POST",
            ACCOUNTS,
            {"name": "alice", "email": "a@example.com", "allowed_domains": ["a.com"]},
            409,
        ),
        (
            alice.client,
            "POST",
            ACCOUNTS,
            {"name": "carol", "email": "c@example.com", "allowed_domains": ["c.com"]},
            403,
        ),
        (
            api.admin,
            "POST",
            ACCOUNTS,
            {"name": "bad name", "email": "c@example.com", "allowed_domains": ["c.com"]},
            422,
        ),
        (api.admin, "POST", ACCOUNTS, {"name": "dave", "email": "nope", "allowed_domains": ["d.com"]}, 422),
        (
            alice.client,
            "PUT",
            f"{ACCOUNTS}/{alice.id}",
            {"email": "x@example.com", "password": "twelve chars\u0007"},
            422,
        ),
        (
            api.admin,
            "PUT",
            f"{ACCOUNTS}/{alice.id}",
            {"email": "x@example.com", "allowed_domains": ["no way"]},
            422,
        ),
        (alice.client, "PUT", f"{ACCOUNTS}/{alice.id}", {"is_admin": True}, 403),
        (alice.client, "PUT", f"{ACCOUNTS}/{alice.id}", {"email": "x@example.com", "active": True}, 403),
        (alice.client, "PUT", f"{ACCOUNTS}/{alice.id}", {"allowed_domains": ["alice.example"]}, 403),
        (alice.client, "PUT", f"{ACCOUNTS}/{alice.id}", {"limits": {}}, 403),
        (alice.client, "PUT", f"{ACCOUNTS}/{alice.id}", {"allow_any_header_from": False}, 403),
        (api.admin, "PUT", f"{ACCOUNTS}/{alice.id}", {"allowed_domains": [bob_domain]}, 409),
        (
            api.admin,
            "POST",
            ACCOUNTS,
            {"name": "erin", "email": "e@example.com", "allowed_domains": [bob_domain]},
            409,
        ),
        (alice.client, "PUT", f"{ACCOUNTS}/{bob.id}", {"email": "x@example.com"}, 404),
        (alice.client, "DELETE", f"{ACCOUNTS}/{bob.id}", None, 404),
        (alice.client, "POST", f"{ACCOUNTS}/{bob.id}/rotate-key", None, 404),
        # providers
        (
            alice.client,
            "POST",
            PROVIDERS,
            {"name": "primary", "provider_type": "sendgrid", "api_key": "k"},
            409,
        ),
        (alice.client, "POST", PROVIDERS, {"name": "new", "provider_type": "sendgrid"}, 422),
        (alice.client, "PUT", f"{PROVIDERS}/{provider['id']}", {"name": "backup"}, 409),
        (alice.client, "PUT", f"{PROVIDERS}/{provider['id']}", {"provider_type": "ses"}, 422),
        (alice.client, "PUT", f"{PROVIDERS}/{mailgun.json()['id']}", {"settings": {"region": "mars"}}, 422),
        (alice.client, "PUT", f"{PROVIDERS}/{bobs_provider['id']}", {"name": "stolen"}, 404),
        (alice.client, "DELETE", f"{PROVIDERS}/{bobs_provider['id']}", None, 404),
        # rules
        (alice.client, "POST", RULES, {"name": "r", "provider_id": bobs_provider["id"], "priority": 1}, 422),
        (alice.client, "POST", RULES, {"name": "r", "provider_id": str(uuid.uuid4()), "priority": 1}, 422),
        (alice.client, "PUT", f"{RULES}/{rule_id}", {"provider_id": bobs_provider["id"]}, 422),
        (alice.client, "PUT", f"{RULES}/{rule_id}", {"priority": -1}, 422),
        (bob.client, "PUT", f"{RULES}/{rule_id}", {"priority": 1}, 404),
        (bob.client, "DELETE", f"{RULES}/{rule_id}", None, 404),
        # no key at all
        (
            api.client(None),
            "POST",
            PROVIDERS,
            {"name": "anon", "provider_type": "sendgrid", "api_key": "k"},
            401,
        ),
        (api.client(None), "DELETE", f"{ACCOUNTS}/{alice.id}", None, 401),
    ]
    failures: list[str] = []
    for client, method, url, body, status in attempts:
        response = client.request(method, url, **({"json": body} if body is not None else {}))
        if response.status_code != status:
            failures.append(f"{method} {url} {body}: {response.status_code} {response.text}")
        elif row_count(api) != before_rows:
            failures.append(f"{method} {url} {body}: wrote an audit row")
    assert not failures, "\n".join(failures)

    assert everything(api.admin) == before_entries
    assert {a["id"]: a for a in api.admin.get(ACCOUNTS).json()["items"]} == before_accounts


def test_rows_record_the_acting_account(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = sendgrid(tenant.client, "primary")
    assert api.admin.put(f"{PROVIDERS}/{provider['id']}", json={"enabled": False}).status_code == 404
    try:
        with api.database.transaction() as session:
            rows = session.execute(
                select(AuditLog.action, AuditLog.actor, AuditLog.actor_id, AuditLog.account_id).where(
                    AuditLog.entity_id.in_([uuid.UUID(provider["id"]), uuid.UUID(tenant.id)])
                )
            ).all()
    finally:
        api.database.remove_session()
    admin = uuid.UUID(api.admin_id)
    assert sorted(tuple(row) for row in rows) == sorted(
        [
            ("create", admin_name(api), admin, uuid.UUID(tenant.id)),
            ("create", tenant.name, uuid.UUID(tenant.id), uuid.UUID(tenant.id)),
        ]
    )


# --- who sees what -----------------------------------------------------------------------------------


def test_tenant_sees_only_its_own_entries_and_admin_sees_all(api: ApiServer) -> None:
    alice, bob = api.tenant("alice"), api.tenant("bob")
    alice_provider = sendgrid(alice.client, "a-primary")
    alice_rule = rule(alice.client, alice_provider["id"])
    bob_provider = sendgrid(bob.client, "b-primary")
    bob_rule = rule(bob.client, bob_provider["id"])
    admin_provider = sendgrid(api.admin, "admin-own")
    assert alice.client.put(f"{ACCOUNTS}/{alice.id}", json={"email": "alice2@example.com"}).status_code == 200
    assert bob.client.post(f"{ACCOUNTS}/{bob.id}/rotate-key").status_code == 200

    everyone = everything(api.admin)
    assert {e["entity_id"] for e in everyone} >= {
        alice.id,
        bob.id,
        api.admin_id,
        alice_provider["id"],
        alice_rule["id"],
        bob_provider["id"],
        bob_rule["id"],
        admin_provider["id"],
    }

    mine = everything(alice.client)
    assert mine, "a tenant sees its own entries"
    assert {e["account_id"] for e in mine} == {alice.id}
    assert {e["entity_id"] for e in mine} == {alice.id, alice_provider["id"], alice_rule["id"]}
    assert mine == [e for e in everyone if e["account_id"] == alice.id]
    text = alice.client.get(AUDIT, params={"limit": 200}).text
    for foreign in (bob.id, bob.name, bob_provider["id"], bob_rule["id"], admin_provider["id"], api.admin_id):
        assert foreign not in text
    # Its own account's creation by the admin is its own entry (the actor is the admin).
    assert any(e["entity_id"] == alice.id and e["action"] == "create" for e in mine)

    # The same holds page by page.
    paged, _ = walk(alice.client, 2)
    assert paged == mine


def test_audit_log_needs_a_valid_key(api: ApiServer) -> None:
    tenant = api.tenant()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {tenant.api_key}"}):
        response = api.client(None).get(AUDIT, headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.admin.delete(f"{ACCOUNTS}/{tenant.id}").status_code == 204
    assert_error(tenant.client.get(AUDIT), 401, "unauthorized")


# --- no secrets --------------------------------------------------------------------------------------


def test_entries_name_fields_but_never_hold_secret_values(api: ApiServer) -> None:
    password = "Initial-Pa55word-secret"
    tenant = api.tenant(password=password)
    rotated = tenant.client.post(f"{ACCOUNTS}/{tenant.id}/rotate-key").json()["api_key"]
    client = api.client(rotated)
    new_password = "Changed-Pa55word-secret"
    assert client.put(f"{ACCOUNTS}/{tenant.id}", json={"password": new_password}).status_code == 200
    provider = sendgrid(client, "primary", api_key="SG.first-provider-secret")
    assert client.put(f"{PROVIDERS}/{provider['id']}", json={"api_key": "SG.second-provider-secret"}).ok
    smtp = client.post(
        PROVIDERS,
        json={
            "name": "relay",
            "provider_type": "smtp",
            "smtp_config": {
                "host": "smtp.example.com",
                "port": 25,
                "tls": "none",
                "password": "smtp-pass-secret",
            },
        },
    )
    assert smtp.status_code == 201, smtp.text
    ses = client.post(
        PROVIDERS,
        json={
            "name": "ses",
            "provider_type": "ses",
            "api_key": "AKIAABCDEFGHIJKLMNOP:ses-secret-value",
            "settings": {"region": "eu-west-1"},
        },
    )
    assert ses.status_code == 201, ses.text

    try:
        with api.database.transaction() as session:
            row = session.get(Account, uuid.UUID(tenant.id))
            assert row is not None
            stored = (login_hash(session, row), row.api_key_digest)
            raw_changes = json.dumps([r.changes for r in session.scalars(select(AuditLog))])
    finally:
        api.database.remove_session()

    secrets = (
        password,
        new_password,
        tenant.api_key,
        rotated,
        api.admin.api_key,
        "SG.first-provider-secret",
        "SG.second-provider-secret",
        "smtp-pass-secret",
        "ses-secret-value",
        "AKIAABCDEFGHIJKLMNOP",
        *stored,
    )
    admin_text = api.admin.get(AUDIT, params={"limit": 200}).text
    tenant_text = client.get(AUDIT, params={"limit": 200}).text
    for secret in secrets:
        assert secret not in admin_text, secret
        assert secret not in tenant_text, secret
        assert secret not in raw_changes, secret

    names = {"name", "email", "allowed_domains", "is_admin", "password", "api_key", "active"}
    names |= {"allow_any_header_from", "limits"}
    names |= {"provider_type", "settings", "smtp_config", "smtp_password", "enabled"}
    names |= {"provider_id", "priority", "conditions"}
    for entry in everything(api.admin):
        assert set(entry) == ENTRY_KEYS
        assert all(isinstance(field, str) for field in entry["fields"])
        assert set(entry["fields"]) <= names, entry
        assert entry["fields"] == sorted(entry["fields"])


# --- pages ---------------------------------------------------------------------------------------------


def make_entries(tenant: Tenant, count: int) -> None:
    """``count`` audit rows for the tenant: one provider create and then updates."""
    provider = sendgrid(tenant.client, "churn")
    for number in range(count - 1):
        response = tenant.client.put(f"{PROVIDERS}/{provider['id']}", json={"enabled": number % 2 == 0})
        assert response.status_code == 200


def test_pages_walk_every_entry_once_newest_first(api: ApiServer) -> None:
    tenant = api.tenant()
    make_entries(tenant, 11)
    api.tenant()  # a second tenant's creation: the admin sees it, the tenant does not
    full = page(api.admin, limit=200)
    assert full["next_cursor"] is None
    entries = full["items"]
    total = len(entries)
    assert total == 14  # the admin (cli), two tenants, one provider create, ten updates
    stamps = [datetime.fromisoformat(e["created_at"]) for e in entries]
    assert stamps == sorted(stamps, reverse=True)

    for limit in (1, 2, 3, 5, total - 1, total, total + 1, 200):
        walked, sizes = walk(api.admin, limit)
        assert [e["id"] for e in walked] == [e["id"] for e in entries], limit
        assert len(ids(walked)) == total
        assert all(size <= limit for size in sizes)
        assert sizes == [limit] * (total // limit) + ([total % limit] if total % limit else []), (
            limit,
            sizes,
        )

    mine = page(tenant.client, limit=200)["items"]
    assert len(mine) == 12
    walked, _ = walk(tenant.client, 5)
    assert walked == mine


def test_pages_stay_consistent_while_entries_are_added(api: ApiServer) -> None:
    tenant = api.tenant()
    make_entries(tenant, 6)
    original = page(tenant.client, limit=200)["items"]

    first = page(tenant.client, limit=3)
    assert first["items"] == original[:3]
    late = sendgrid(tenant.client, "late")  # newer rows arrive between pages
    assert tenant.client.put(f"{PROVIDERS}/{late['id']}", json={"enabled": False}).ok

    rest: list[dict[str, Any]] = []
    cursor = first["next_cursor"]
    while cursor:
        body = page(tenant.client, limit=3, cursor=cursor)
        rest.extend(body["items"])
        cursor = body["next_cursor"]
    assert first["items"] + rest == original
    # The cursor of a page is reusable and gives the same answer.
    assert page(tenant.client, limit=3, cursor=first["next_cursor"])["items"] == original[3:6]


def test_default_page_is_fifty_entries(api: ApiServer) -> None:
    tenant = api.tenant()
    make_entries(tenant, 55)
    first = page(tenant.client)
    assert len(first["items"]) == 50
    assert first["next_cursor"]
    second = page(tenant.client, cursor=first["next_cursor"])
    assert len(second["items"]) == 6  # 55 provider rows and the account's creation
    assert second["next_cursor"] is None
    assert not ids(first["items"]) & ids(second["items"])


BAD_LIMITS = ["0", "201", "-1", "abc", "1.5", "", " 5", "1e3", "0x10", "99999999999999999999999"]
BAD_CURSORS = [
    "garbage!",
    "////",
    "",
    cursor_of(b"not a date|not a uuid"),
    cursor_of(b"2024-01-01T00:00:00+00:00|not-a-uuid"),
    cursor_of(b"2024-01-01T00:00:00+00:00"),
    cursor_of(b"\xff\xfe\xfd|\x00"),
    cursor_of(f"yesterday|{uuid.uuid4()}".encode()),
    cursor_of(f"2024-01-01T00:00:00+00:00|{uuid.uuid4()}|extra".encode()),
    cursor_of(b"' OR 1=1 --|00000000-0000-0000-0000-000000000000"),
]


def test_bad_limit_or_cursor_is_422_naming_it(api: ApiServer) -> None:
    tenant = api.tenant()
    failures: list[str] = []
    cases = [({"limit": value}, "limit") for value in BAD_LIMITS]
    cases += [({"cursor": value}, "cursor") for value in BAD_CURSORS]
    for client in (api.admin, tenant.client):
        for params, field in cases:
            response = client.get(AUDIT, params=params)
            try:
                error = assert_error(response, 422, "invalid_fields")
                assert set(error["fields"]) == {field}, error
            except AssertionError as problem:
                failures.append(f"{params!r}: {problem}")
    assert not failures, "\n".join(failures)

    both = assert_error(
        api.admin.get(AUDIT, params={"limit": "0", "cursor": "garbage!"}), 422, "invalid_fields"
    )
    assert set(both["fields"]) == {"limit", "cursor"}


def test_unicode_digit_limit_is_422(api: ApiServer) -> None:
    for value in ("²", "³"):
        error = assert_error(api.admin.get(AUDIT, params={"limit": value}), 422, "invalid_fields")
        assert set(error["fields"]) == {"limit"}
