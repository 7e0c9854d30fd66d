"""/api/v1/accounts over real HTTP: credentials, scoping, validation, deactivation, key rotation."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
import requests
from sqlalchemy import select

from smtp_proxy import crypto
from smtp_proxy.db.models import Account
from smtp_proxy.storage.auth import Login, find_login
from tests.api.checks import assert_error
from tests.api.conftest import ApiServer, Client, Tenant, own_domain
from tests.logins import login_hash

ACCOUNTS = "/api/v1/accounts"
ACCOUNT_KEYS = {
    "id",
    "name",
    "email",
    "allowed_domains",
    "is_admin",
    "active",
    "allow_any_header_from",
    "limits",
    "relay_networks",
    "bounces",
    "bounces_effective",
    "created_at",
    "updated_at",
}


def assert_unauthorized(response: requests.Response, *, secrets: tuple[str, ...] = ()) -> None:
    assert_error(response, 401, "unauthorized", secrets=secrets)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def login(api: ApiServer, name: str) -> Login:
    """The account's login columns, read straight from the database."""
    try:
        with api.database.transaction() as session:
            found = find_login(session, name)
    finally:
        api.database.remove_session()
    assert found is not None, name
    return found


def stored_account(api: ApiServer, account_id: str) -> dict[str, Any]:
    """A snapshot of the account's row as stored (fresh read, no identity-map cache)."""
    try:
        with api.database.transaction() as session:
            row = session.execute(select(Account).where(Account.id == uuid.UUID(account_id))).scalar_one()
            snapshot = {
                "name": row.name,
                "email": row.email,
                "allowed_domains": list(row.allowed_domains),
                "is_admin": row.is_admin,
                "active": row.active,
                "password_hash": login_hash(session, row),
                "api_key_digest": row.api_key_digest,
            }
    finally:
        api.database.remove_session()
    return snapshot


def account_count(api: ApiServer) -> int:
    response = api.admin.get(ACCOUNTS)
    assert response.status_code == 200
    return len(response.json()["items"])


def new_body(name: str | None = None, **fields: Any) -> dict[str, Any]:
    name = name or f"acct-{uuid.uuid4().hex[:8]}"
    return {"name": name, "email": f"{name}@example.com", "allowed_domains": [own_domain()], **fields}


def check_each(cases: list[tuple[Any, ...]], check: Any) -> None:
    """Run ``check(*case)`` for every case; report every failing case at once."""
    failures: list[str] = []
    for case in cases:
        try:
            check(*case)
        except AssertionError as error:
            failures.append(f"{case!r}: {error}")
    assert not failures, "\n".join(failures)


# --- create -------------------------------------------------------------------------------------------


def test_create_returns_account_and_one_time_credentials_that_work(api: ApiServer) -> None:
    password = "correct-horse-battery-staple"
    body = new_body("shop.one", password=password, allowed_domains=["Shop.Example", "*.shop.example"])
    response = api.admin.post(ACCOUNTS, json=body)

    assert response.status_code == 201, response.text
    created = response.json()
    assert set(created) == ACCOUNT_KEYS | {"api_key", "password"}
    assert created["name"] == "shop.one"
    assert created["email"] == "shop.one@example.com"
    assert created["allowed_domains"] == ["shop.example", "*.shop.example"]
    assert created["is_admin"] is False
    assert created["active"] is True
    assert created["password"] == password  # the given password comes back exactly as given
    assert isinstance(created["api_key"], str) and len(created["api_key"]) >= 32
    assert response.headers["Location"] == f"{ACCOUNTS}/{created['id']}"
    uuid.UUID(created["id"])

    # The one-time key works at once and sees this account only.
    mine = api.client(created["api_key"]).get(ACCOUNTS)
    assert mine.status_code == 200, mine.text
    assert [item["id"] for item in mine.json()["items"]] == [created["id"]]

    # The password is the SMTP AUTH password: its stored hash verifies it; nothing is stored in the clear.
    stored = login(api, "shop.one")
    assert crypto.verify_password(password, stored.password_hash)
    assert password not in stored.password_hash
    row = stored_account(api, created["id"])
    assert row["api_key_digest"] == crypto.api_key_digest(created["api_key"])

    # Shown once: later reads carry neither credential (nor their stored forms).
    again = api.admin.get(f"{ACCOUNTS}/{created['id']}")
    assert again.status_code == 200
    assert set(again.json()) == ACCOUNT_KEYS
    listing = api.admin.get(ACCOUNTS).text
    for secret in (password, created["api_key"], row["password_hash"], row["api_key_digest"]):
        assert secret not in again.text
        assert secret not in listing


def test_passwords_given_or_generated_are_stored_hashed_and_returned_once(api: ApiServer) -> None:
    generated = api.admin.post(ACCOUNTS, json=new_body("gen-pass"))
    assert generated.status_code == 201, generated.text
    password = generated.json()["password"]
    assert isinstance(password, str) and len(password) >= 12
    assert crypto.verify_password(password, login(api, "gen-pass").password_hash)

    def given(label: str, password: str) -> None:
        response = api.admin.post(ACCOUNTS, json=new_body(f"pw-{label}", password=password))
        assert response.status_code == 201, response.text
        assert response.json()["password"] == password
        assert crypto.verify_password(password, login(api, f"pw-{label}").password_hash)

    check_each(
        [
            ("sql", "p@ss'word\"; DROP TABLE accounts;--"),
            ("unicode", "pässwörd-ünïcode-✓-%s"),
            ("spaces", "            x"),
            ("exactly-12", "123456789012"),
        ],
        given,
    )
    assert account_count(api) == 6


def test_created_admin_account_can_act_as_admin(api: ApiServer) -> None:
    response = api.admin.post(ACCOUNTS, json=new_body("second-admin", is_admin=True))
    assert response.status_code == 201, response.text
    assert response.json()["is_admin"] is True
    second = api.client(response.json()["api_key"])
    assert len(second.get(ACCOUNTS).json()["items"]) == 2
    assert second.post(ACCOUNTS, json=new_body()).status_code == 201


def test_tenant_cannot_create_accounts(api: ApiServer) -> None:
    tenant = api.tenant()
    before = account_count(api)
    for body in (new_body("sneaky", is_admin=True), new_body("sneaky")):
        assert_error(tenant.client.post(ACCOUNTS, json=body), 403, "forbidden")
    assert account_count(api) == before
    with api.database.transaction() as session:
        assert find_login(session, "sneaky") is None
    api.database.remove_session()


def test_duplicate_name_is_409_and_keeps_the_first(api: ApiServer) -> None:
    first = api.admin.post(ACCOUNTS, json=new_body("dupe", email="first@example.com"))
    assert first.status_code == 201
    second = api.admin.post(ACCOUNTS, json=new_body("dupe", email="second@example.com", is_admin=True))
    assert_error(second, 409, "conflict", secrets=(first.json()["api_key"], first.json()["id"]))
    dupes = [a for a in api.admin.get(ACCOUNTS).json()["items"] if a["name"] == "dupe"]
    assert [a["id"] for a in dupes] == [first.json()["id"]]
    row = stored_account(api, first.json()["id"])
    assert row["email"] == "first@example.com" and row["is_admin"] is False
    assert api.client(first.json()["api_key"]).get(ACCOUNTS).status_code == 200


def test_concurrent_creates_of_one_name_give_one_201_and_409s(served_api: ApiServer) -> None:
    api = served_api
    admin_key = api.admin.api_key
    statuses: list[int] = []
    bodies: list[str] = []
    start = threading.Barrier(4)

    def create() -> None:
        client = api.client(admin_key)
        start.wait(timeout=10)
        response = client.post(ACCOUNTS, json=new_body("race"))
        statuses.append(response.status_code)
        bodies.append(response.text)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(statuses) == [201, 409, 409, 409], bodies
    assert sum(1 for a in api.admin.get(ACCOUNTS).json()["items"] if a["name"] == "race") == 1


# --- validation -----------------------------------------------------------------------------------

INVALID_CREATES: list[tuple[dict[str, Any], str]] = [
    ({"name": "bad name!"}, "name"),
    ({"name": "-leading-dash"}, "name"),
    ({"name": "a" * 65}, "name"),
    ({"name": "jörg"}, "name"),
    ({"name": "alice\n"}, "name"),
    ({"name": 42}, "name"),
    ({"email": "not-an-email"}, "email"),
    ({"email": "two@at@example.com"}, "email"),
    ({"email": "user@localhost"}, "email"),
    ({"email": "ünïcode@example.com"}, "email"),
    ({"email": "x" * 250 + "@example.com"}, "email"),
    ({"email": ["a@example.com"]}, "email"),
    ({"allowed_domains": []}, "allowed_domains"),
    ({"allowed_domains": ["not a domain"]}, "allowed_domains"),
    ({"allowed_domains": ["example.com", "-bad-.example"]}, "allowed_domains"),
    ({"allowed_domains": "example.com"}, "allowed_domains"),
    ({"allowed_domains": {"domain": "example.com"}}, "allowed_domains"),
    ({"allowed_domains": ["example.com", 7]}, "allowed_domains.1"),
    ({"password": "short"}, "password"),
    ({"password": "a" * 73}, "password"),
    ({"password": "twelve chars\u0000"}, "password"),
    ({"password": 123456789012}, "password"),
    ({"is_admin": "yes"}, "is_admin"),
    ({"colour": "blue"}, "colour"),
    ({"name": None}, "name"),
]


def test_create_with_one_invalid_or_missing_field_is_422_naming_it(api: ApiServer) -> None:
    def rejected(body: dict[str, Any], field: str) -> None:
        response = api.admin.post(ACCOUNTS, json=body)
        error = assert_error(response, 422, "invalid_fields")
        assert set(error.get("fields", {})) == {field}, error
        assert field in error["message"]
        assert isinstance(error["fields"][field], str) and error["fields"][field]

    cases: list[tuple[Any, ...]] = [
        ({**new_body("valid-name"), **change}, field) for change, field in INVALID_CREATES
    ]
    for missing in ("name", "email", "allowed_domains"):
        body = new_body("valid-name")
        del body[missing]
        cases.append((body, missing))
    check_each(cases, rejected)
    assert account_count(api) == 1


def test_create_with_several_schema_errors_names_them_all(api: ApiServer) -> None:
    body = {"name": "bad name", "email": 5, "allowed_domains": [], "password": "short", "extra": 1}
    error = assert_error(api.admin.post(ACCOUNTS, json=body), 422, "invalid_fields")
    assert set(error["fields"]) == {"name", "email", "allowed_domains", "password", "extra"}
    error = assert_error(api.admin.post(ACCOUNTS, json={}), 422, "invalid_fields")
    assert error["fields"] == {name: "is required" for name in ("name", "email", "allowed_domains")}


def test_create_with_two_semantically_bad_fields_names_both(api: ApiServer) -> None:
    body = new_body(email="not-an-email", allowed_domains=["not a domain"])
    error = assert_error(api.admin.post(ACCOUNTS, json=body), 422, "invalid_fields")
    assert set(error["fields"]) == {"email", "allowed_domains"}


def test_create_with_a_malformed_body_or_wrong_content_type_or_method(api: ApiServer) -> None:
    json_type = {"Content-Type": "application/json"}
    assert_error(
        api.admin.post(ACCOUNTS, data=b'{"name": "x", "email": ', headers=json_type), 400, "bad_request"
    )
    assert_error(api.admin.post(ACCOUNTS, data=b"", headers=json_type), 400, "bad_request")
    assert_error(api.admin.post(ACCOUNTS, json=[new_body()]), 400, "bad_request")
    assert_error(api.admin.post(ACCOUNTS, json="a string"), 400, "bad_request")

    raw = json.dumps(new_body("typed")).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = api.admin.post(ACCOUNTS, data=raw, headers=headers)
        assert_error(response, 415, "unsupported_media_type")

    response = api.admin.request("PATCH", f"{ACCOUNTS}/{api.admin_id}", json={"email": "a@example.com"})
    assert_error(response, 405, "method_not_allowed")
    assert "PUT" in response.headers["Allow"]
    assert account_count(api) == 1


# --- list and get ----------------------------------------------------------------------------------


def test_list_is_all_for_an_admin_and_only_itself_for_a_tenant(api: ApiServer) -> None:
    alice = api.tenant("alice", email="alice-private@example.com")
    bob = api.tenant("bob", email="bob-private@example.com")

    everyone = api.admin.get(ACCOUNTS)
    assert everyone.status_code == 200
    assert {item["id"] for item in everyone.json()["items"]} == {api.admin_id, alice.id, bob.id}
    assert all(set(item) == ACCOUNT_KEYS for item in everyone.json()["items"])

    for me, other in ((alice, bob), (bob, alice)):
        mine = me.client.get(ACCOUNTS)
        assert mine.status_code == 200
        assert [item["id"] for item in mine.json()["items"]] == [me.id]
        for leaked in (other.id, other.name, f"{other.name}-private@example.com", api.admin_id):
            assert leaked not in mine.text


def test_get_own_account_and_404_for_anyone_elses(api: ApiServer) -> None:
    alice = api.tenant("alice", email="alice-private@example.com")
    bob = api.tenant("bob", email="bob-private@example.com")

    own = alice.client.get(f"{ACCOUNTS}/{alice.id}")
    assert own.status_code == 200
    assert own.json()["id"] == alice.id and own.json()["email"] == "alice-private@example.com"

    for target in (bob.id, api.admin_id, str(uuid.uuid4())):
        response = alice.client.get(f"{ACCOUNTS}/{target}")
        assert_error(response, 404, "not_found", secrets=("bob-private@example.com", "bob", target))
    # An admin reads any account.
    assert api.admin.get(f"{ACCOUNTS}/{bob.id}").json()["email"] == "bob-private@example.com"
    assert_error(api.admin.get(f"{ACCOUNTS}/{uuid.uuid4()}"), 404, "not_found")
    assert_error(api.admin.get(f"{ACCOUNTS}/not-a-uuid"), 404, "not_found")


# --- update ----------------------------------------------------------------------------------------


def test_admin_updates_a_tenants_email_and_allowed_domains(api: ApiServer) -> None:
    tenant = api.tenant()
    before = tenant.client.get(f"{ACCOUNTS}/{tenant.id}").json()

    response = api.admin.put(
        f"{ACCOUNTS}/{tenant.id}",
        json={"email": "new.address@example.org", "allowed_domains": ["Example.org", "*.mail.example.org"]},
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert set(updated) == ACCOUNT_KEYS
    assert updated["email"] == "new.address@example.org"
    assert updated["allowed_domains"] == ["example.org", "*.mail.example.org"]
    assert updated["updated_at"] > before["updated_at"]
    assert {k: v for k, v in updated.items() if k not in ("email", "allowed_domains", "updated_at")} == {
        k: v for k, v in before.items() if k not in ("email", "allowed_domains", "updated_at")
    }
    assert tenant.client.get(f"{ACCOUNTS}/{tenant.id}").json() == updated
    assert login(api, tenant.name).allowed_domains == ["example.org", "*.mail.example.org"]


def test_admin_updates_a_tenants_email_and_password(api: ApiServer) -> None:
    tenant = api.tenant()
    response = api.admin.put(f"{ACCOUNTS}/{tenant.id}", json={"email": "ops@example.net"})
    assert response.status_code == 200, response.text
    assert stored_account(api, tenant.id)["email"] == "ops@example.net"

    response = api.admin.put(f"{ACCOUNTS}/{tenant.id}", json={"password": "set-by-the-admin-✓"})
    assert response.status_code == 200, response.text
    assert "set-by-the-admin-✓" not in response.text
    assert crypto.verify_password("set-by-the-admin-✓", login(api, tenant.name).password_hash)


def test_password_change_replaces_the_hash(api: ApiServer) -> None:
    tenant = api.tenant(password="the-old-password-1")
    old_hash = login(api, tenant.name).password_hash
    before = stored_account(api, tenant.id)
    assert crypto.verify_password("the-old-password-1", old_hash)

    response = tenant.client.put(f"{ACCOUNTS}/{tenant.id}", json={"password": "the-new-password-2"})
    assert response.status_code == 200, response.text
    assert set(response.json()) == ACCOUNT_KEYS
    assert "the-new-password-2" not in response.text

    new_hash = login(api, tenant.name).password_hash
    assert new_hash != old_hash
    assert crypto.verify_password("the-new-password-2", new_hash)
    assert not crypto.verify_password("the-old-password-1", new_hash)
    # Nothing but the hash changed.
    assert {**stored_account(api, tenant.id), "password_hash": old_hash} == before
    # The API key is untouched by a password change.
    assert tenant.client.get(ACCOUNTS).status_code == 200


def test_tenant_cannot_change_is_admin_of_itself_or_others(api: ApiServer) -> None:
    tenant, other = api.tenant(), api.tenant()
    for body in ({"is_admin": True}, {"is_admin": True, "email": "changed@example.com"}, {"is_admin": False}):
        assert_error(tenant.client.put(f"{ACCOUNTS}/{tenant.id}", json=body), 403, "forbidden_field")
    row = stored_account(api, tenant.id)
    assert row["is_admin"] is False
    assert row["email"] == f"{tenant.name}@example.com"
    assert_error(tenant.client.post(ACCOUNTS, json=new_body()), 403, "forbidden")

    # On another account the answer may be 403 or 404, but it reveals nothing and changes nothing.
    response = tenant.client.put(f"{ACCOUNTS}/{other.id}", json={"is_admin": True})
    assert response.status_code in (403, 404)
    assert other.name not in response.text and other.id not in response.text
    assert stored_account(api, other.id)["is_admin"] is False


# --- bounces ---------------------------------------------------------------------------------------


def bounce_setting(client: Client, account_id: str) -> tuple[Any, Any]:
    body = client.get(f"{ACCOUNTS}/{account_id}").json()
    return body["bounces"], body["bounces_effective"]


def audited_fields(api: ApiServer, account_id: str) -> list[list[str]]:
    """The fields of each audit row on the account, oldest first."""
    items = api.admin.get("/api/v1/audit-log", params={"limit": 200}).json()["items"]
    return [e["fields"] for e in reversed(items) if e["entity"] == "account" and e["entity_id"] == account_id]


def test_a_tenant_sets_its_own_bounces_and_back_to_the_default(api: ApiServer) -> None:
    tenant = api.tenant()
    assert bounce_setting(tenant.client, tenant.id) == (None, True)  # delivery.bounces is on by default
    response = tenant.client.put(f"{ACCOUNTS}/{tenant.id}", json={"bounces": False})
    assert response.status_code == 200, response.text
    assert (response.json()["bounces"], response.json()["bounces_effective"]) == (False, False)
    assert bounce_setting(tenant.client, tenant.id) == (False, False)
    response = tenant.client.put(f"{ACCOUNTS}/{tenant.id}", json={"bounces": None})
    assert response.status_code == 200, response.text
    assert bounce_setting(tenant.client, tenant.id) == (None, True)
    assert audited_fields(api, tenant.id)[-2:] == [["bounces"], ["bounces"]]


def test_a_tenant_cannot_set_another_accounts_bounces_and_an_admin_can(api: ApiServer) -> None:
    tenant, other = api.tenant(), api.tenant()
    response = tenant.client.put(f"{ACCOUNTS}/{other.id}", json={"bounces": False})
    assert_error(response, 404, "not_found", secrets=(other.name, other.id))
    assert bounce_setting(api.admin, other.id) == (None, True)
    response = api.admin.put(f"{ACCOUNTS}/{other.id}", json={"bounces": False})
    assert response.status_code == 200, response.text
    assert bounce_setting(other.client, other.id) == (False, False)
    assert audited_fields(api, other.id)[-1] == ["bounces"]


@pytest.mark.parametrize("value", ["yes", 1, [], {}])
def test_bounces_must_be_true_false_or_null(api: ApiServer, value: Any) -> None:
    tenant = api.tenant()
    response = tenant.client.put(f"{ACCOUNTS}/{tenant.id}", json={"bounces": value})
    error = assert_error(response, 422, "invalid_fields")
    assert list(error["fields"]) == ["bounces"]
    assert bounce_setting(tenant.client, tenant.id) == (None, True)


def test_bounces_effective_follows_the_config_default(start_api) -> None:
    api = start_api(sections={"delivery": {"bounces": False}})
    tenant = api.tenant()
    assert bounce_setting(tenant.client, tenant.id) == (None, False)
    assert tenant.client.put(f"{ACCOUNTS}/{tenant.id}", json={"bounces": True}).status_code == 200
    assert bounce_setting(tenant.client, tenant.id) == (True, True)


def test_admin_promotion_and_demotion_take_effect_at_once(api: ApiServer) -> None:
    tenant = api.tenant()
    assert_error(tenant.client.post(ACCOUNTS, json=new_body()), 403, "forbidden")  # caches the key

    promoted = api.admin.put(f"{ACCOUNTS}/{tenant.id}", json={"is_admin": True})
    assert promoted.status_code == 200 and promoted.json()["is_admin"] is True
    assert tenant.client.post(ACCOUNTS, json=new_body()).status_code == 201

    demoted = api.admin.put(f"{ACCOUNTS}/{tenant.id}", json={"is_admin": False})
    assert demoted.status_code == 200 and demoted.json()["is_admin"] is False
    assert_error(tenant.client.post(ACCOUNTS, json=new_body()), 403, "forbidden")


def test_put_across_tenants_is_404_and_changes_nothing(api: ApiServer) -> None:
    alice = api.tenant("alice")
    bob = api.tenant("bob", email="bob-private@example.com", password="bobs-own-password")
    before = stored_account(api, bob.id)

    for body in (
        {"email": "hijack@example.com"},
        {"allowed_domains": ["evil.example"]},
        {"password": "hijacked-password-1"},
    ):
        response = alice.client.put(f"{ACCOUNTS}/{bob.id}", json=body)
        assert_error(response, 404, "not_found", secrets=("bob-private@example.com", bob.id))
    assert_error(
        alice.client.put(f"{ACCOUNTS}/{api.admin_id}", json={"email": "x@example.com"}), 404, "not_found"
    )
    assert stored_account(api, bob.id) == before
    assert crypto.verify_password("bobs-own-password", login(api, "bob").password_hash)
    assert_error(
        api.admin.put(f"{ACCOUNTS}/{uuid.uuid4()}", json={"email": "x@example.com"}), 404, "not_found"
    )


INVALID_UPDATES: list[tuple[dict[str, Any], str]] = [
    ({"email": "not-an-email"}, "email"),
    ({"email": "a@b@example.com"}, "email"),
    ({"email": 7}, "email"),
    ({"password": "short"}, "password"),
    ({"password": "b" * 80}, "password"),
    ({"password": None}, "password"),
    ({"name": "renamed"}, "name"),
    ({"api_key": "mine"}, "api_key"),
    ({}, "body"),
]
# The operator's fields: an admin sending a bad value gets the same 422.
INVALID_ADMIN_UPDATES: list[tuple[dict[str, Any], str]] = [
    ({"allowed_domains": []}, "allowed_domains"),
    ({"allowed_domains": ["under_score.example"]}, "allowed_domains"),
    ({"allowed_domains": "example.com"}, "allowed_domains"),
    ({"is_admin": "no"}, "is_admin"),
    ({"active": "yes"}, "active"),
    ({"allow_any_header_from": 1}, "allow_any_header_from"),
    ({"limits": {"messages_per_hour": 0}}, "limits.messages_per_hour"),
    ({"limits": {"messages_per_hour": 1.5}}, "limits.messages_per_hour"),
    ({"limits": {"messages_per_hour": True}}, "limits.messages_per_hour"),
    ({"limits": {"messages_per_week": 5}}, "limits.messages_per_week"),
    ({"limits": []}, "limits"),
]


def test_update_with_one_invalid_field_is_422_naming_it(api: ApiServer) -> None:
    tenant = api.tenant()
    before = stored_account(api, tenant.id)

    def rejected(client: Client, body: dict[str, Any], field: str) -> None:
        error = assert_error(client.put(f"{ACCOUNTS}/{tenant.id}", json=body), 422, "invalid_fields")
        assert set(error.get("fields", {})) == {field}, error

    cases: list[tuple[Any, ...]] = [(tenant.client, body, field) for body, field in INVALID_UPDATES]
    cases += [(api.admin, body, field) for body, field in INVALID_UPDATES + INVALID_ADMIN_UPDATES]
    check_each(cases, rejected)
    assert stored_account(api, tenant.id) == before


def test_update_that_fails_late_changes_nothing(api: ApiServer) -> None:
    # email passes, then the password policy rejects a control character: the whole PUT rolls back.
    tenant = api.tenant()
    before = stored_account(api, tenant.id)
    response = tenant.client.put(
        f"{ACCOUNTS}/{tenant.id}", json={"email": "changed@example.com", "password": "twelve chars\u0007"}
    )
    assert assert_error(response, 422, "invalid_fields")["fields"].keys() == {"password"}
    response = api.admin.put(
        f"{ACCOUNTS}/{tenant.id}", json={"email": "changed@example.com", "allowed_domains": ["no way"]}
    )
    assert assert_error(response, 422, "invalid_fields")["fields"].keys() == {"allowed_domains"}
    assert stored_account(api, tenant.id) == before


def test_update_with_malformed_json_or_wrong_content_type_is_rejected(api: ApiServer) -> None:
    tenant = api.tenant()
    path = f"{ACCOUNTS}/{tenant.id}"
    assert_error(
        tenant.client.put(path, data=b"{not json", headers={"Content-Type": "application/json"}),
        400,
        "bad_request",
    )
    assert_error(tenant.client.put(path, json="a string"), 400, "bad_request")
    assert_error(
        tenant.client.put(path, data=b'{"email": "x@example.com"}', headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert stored_account(api, tenant.id)["email"] == f"{tenant.name}@example.com"


# --- hostile strings -------------------------------------------------------------------------------


def test_hostile_emails_are_stored_and_returned_literally(api: ApiServer) -> None:
    tenant = api.tenant()
    counter = iter(range(100))

    def stored_literally(email: str) -> None:
        name = f"hostile{next(counter)}"
        created = api.admin.post(ACCOUNTS, json=new_body(name, email=email))
        assert created.status_code == 201, created.text
        assert created.json()["email"] == email
        assert api.admin.get(f"{ACCOUNTS}/{created.json()['id']}").json()["email"] == email
        assert stored_account(api, created.json()["id"])["email"] == email

        updated = tenant.client.put(f"{ACCOUNTS}/{tenant.id}", json={"email": email})
        assert updated.status_code == 200, updated.text
        assert updated.json()["email"] == email
        assert stored_account(api, tenant.id)["email"] == email

    emails = [
        "o'brien+x@example.com",
        "x'OR'1'='1@example.com",
        "robert'--%s{}|`~$@example.com",
        "a%27%3B--@example.com",
        "'/*!*/--@example.com",
    ]
    check_each([(email,) for email in emails], stored_literally)
    # Nothing else was touched: the admin, the tenant and one account per address, each with its own.
    items = api.admin.get(ACCOUNTS).json()["items"]
    assert len(items) == 2 + len(emails)
    assert sorted(item["email"] for item in items if item["name"].startswith("hostile")) == sorted(emails)


def test_email_with_an_international_domain_round_trips(api: ApiServer) -> None:
    created = api.admin.post(ACCOUNTS, json=new_body("idn", email="o'brien@bücher.example"))
    assert created.status_code == 201, created.text
    email = created.json()["email"]
    local, _, host = email.partition("@")
    assert local == "o'brien"
    assert host.encode("ascii").decode("idna") == "bücher.example"
    assert api.admin.get(f"{ACCOUNTS}/{created.json()['id']}").json()["email"] == email


# --- deactivate ------------------------------------------------------------------------------------


def test_delete_deactivates_and_the_key_stops_working(api: ApiServer) -> None:
    tenant = api.tenant()
    assert tenant.client.get(ACCOUNTS).status_code == 200  # the key is now cached

    response = api.admin.delete(f"{ACCOUNTS}/{tenant.id}")
    assert response.status_code == 204
    assert response.content == b""

    assert_unauthorized(tenant.client.get(ACCOUNTS))
    assert_unauthorized(tenant.client.get(f"{ACCOUNTS}/{tenant.id}"))
    # The row stays, inactive, for the admin to see; SMTP AUTH sees it inactive too.
    shown = api.admin.get(f"{ACCOUNTS}/{tenant.id}")
    assert shown.status_code == 200 and shown.json()["active"] is False
    assert tenant.id in {item["id"] for item in api.admin.get(ACCOUNTS).json()["items"]}
    assert login(api, tenant.name).active is False
    # Deactivating again changes nothing.
    assert api.admin.delete(f"{ACCOUNTS}/{tenant.id}").status_code == 204
    assert_unauthorized(tenant.client.get(ACCOUNTS))

    # A tenant may deactivate itself, with the same effect.
    other = api.tenant()
    assert other.client.delete(f"{ACCOUNTS}/{other.id}").status_code == 204
    assert_unauthorized(other.client.get(ACCOUNTS))
    assert stored_account(api, other.id)["active"] is False


def test_tenant_cannot_deactivate_another_account(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    assert_error(alice.client.delete(f"{ACCOUNTS}/{bob.id}"), 404, "not_found", secrets=(bob.name,))
    assert_error(alice.client.delete(f"{ACCOUNTS}/{api.admin_id}"), 404, "not_found")
    assert_error(api.admin.delete(f"{ACCOUNTS}/{uuid.uuid4()}"), 404, "not_found")
    assert bob.client.get(ACCOUNTS).status_code == 200
    assert api.admin.get(ACCOUNTS).status_code == 200
    assert stored_account(api, bob.id)["active"] is True


# --- rotate key ------------------------------------------------------------------------------------


def test_rotate_key_issues_a_new_key_and_kills_the_old_one_at_once(api: ApiServer) -> None:
    tenant = api.tenant()
    assert tenant.client.get(ACCOUNTS).status_code == 200  # the old key is now cached

    response = tenant.client.post(f"{ACCOUNTS}/{tenant.id}/rotate-key")
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"api_key"}
    new_key = response.json()["api_key"]
    assert new_key != tenant.api_key and len(new_key) >= 32

    assert_unauthorized(tenant.client.get(ACCOUNTS), secrets=(new_key,))
    fresh = api.client(new_key).get(f"{ACCOUNTS}/{tenant.id}")
    assert fresh.status_code == 200 and fresh.json()["id"] == tenant.id
    assert stored_account(api, tenant.id)["api_key_digest"] == crypto.api_key_digest(new_key)


def test_admin_rotates_a_tenants_key_and_only_the_newest_works(api: ApiServer) -> None:
    tenant = api.tenant()
    assert tenant.client.get(ACCOUNTS).status_code == 200
    first = api.admin.post(f"{ACCOUNTS}/{tenant.id}/rotate-key")
    assert first.status_code == 200
    first_key = first.json()["api_key"]
    assert_unauthorized(tenant.client.get(ACCOUNTS))
    assert [i["id"] for i in api.client(first_key).get(ACCOUNTS).json()["items"]] == [tenant.id]

    second_key = api.client(first_key).post(f"{ACCOUNTS}/{tenant.id}/rotate-key").json()["api_key"]
    assert len({tenant.api_key, first_key, second_key}) == 3
    assert_unauthorized(api.client(tenant.api_key).get(ACCOUNTS))
    assert_unauthorized(api.client(first_key).get(ACCOUNTS))
    assert api.client(second_key).get(ACCOUNTS).status_code == 200
    assert api.admin.get(ACCOUNTS).status_code == 200  # the admin's own key is untouched


def test_tenant_cannot_rotate_another_accounts_key(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    before = stored_account(api, bob.id)["api_key_digest"]
    response = alice.client.post(f"{ACCOUNTS}/{bob.id}/rotate-key")
    assert_error(response, 404, "not_found")
    assert "api_key" not in response.text
    assert_error(alice.client.post(f"{ACCOUNTS}/{api.admin_id}/rotate-key"), 404, "not_found")
    assert stored_account(api, bob.id)["api_key_digest"] == before
    assert bob.client.get(ACCOUNTS).status_code == 200
    assert api.admin.get(ACCOUNTS).status_code == 200


def test_rotating_a_deactivated_accounts_key_does_not_revive_it(api: ApiServer) -> None:
    tenant = api.tenant()
    assert api.admin.delete(f"{ACCOUNTS}/{tenant.id}").status_code == 204
    response = api.admin.post(f"{ACCOUNTS}/{tenant.id}/rotate-key")
    assert response.status_code == 200
    assert_unauthorized(api.client(response.json()["api_key"]).get(ACCOUNTS))


# --- authentication --------------------------------------------------------------------------------


def _auth_variants(tenant: Tenant) -> dict[str, dict[str, str]]:
    return {
        "no header": {},
        "empty": {"Authorization": ""},
        "scheme only": {"Authorization": "Bearer"},
        "scheme and blank": {"Authorization": "Bearer    "},
        "basic scheme with a valid key": {"Authorization": f"Basic {tenant.api_key}"},
        "token scheme with a valid key": {"Authorization": f"Token {tenant.api_key}"},
        "key without scheme": {"Authorization": tenant.api_key},
        "unknown key": {"Authorization": "Bearer " + "0" * 64},
        "valid key with a suffix": {"Authorization": f"Bearer {tenant.api_key}x"},
        "valid key truncated": {"Authorization": f"Bearer {tenant.api_key[:-1]}"},
        "very long key": {"Authorization": "Bearer " + "k" * 8000},
        "non-ascii key": {"Authorization": "Bearer caf\xe9-key"},
        "sql in key": {"Authorization": "Bearer ' OR '1'='1"},
    }


def test_requests_without_a_valid_key_are_401_with_www_authenticate(api: ApiServer) -> None:
    tenant = api.tenant()
    anonymous = api.client(None)
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", ACCOUNTS, {}),
        ("POST", ACCOUNTS, {"json": new_body("anon")}),
        ("GET", f"{ACCOUNTS}/{tenant.id}", {}),
        ("PUT", f"{ACCOUNTS}/{tenant.id}", {"json": {"email": "anon@example.com"}}),
        ("DELETE", f"{ACCOUNTS}/{tenant.id}", {}),
        ("POST", f"{ACCOUNTS}/{tenant.id}/rotate-key", {}),
    ]

    def refused(label: str, headers: dict[str, str], method: str, path: str, kwargs: dict[str, Any]) -> None:
        response = anonymous.request(method, path, headers=headers, **kwargs)
        assert_unauthorized(response, secrets=(tenant.api_key,))

    check_each(
        [(label, headers, *call) for label, headers in _auth_variants(tenant).items() for call in calls],
        refused,
    )
    # Nothing changed behind the 401s.
    row = stored_account(api, tenant.id)
    assert row["active"] is True and row["email"] == f"{tenant.name}@example.com"
    assert row["api_key_digest"] == crypto.api_key_digest(tenant.api_key)
    with api.database.transaction() as session:
        assert find_login(session, "anon") is None
    api.database.remove_session()


def test_authentication_comes_first_and_the_scheme_is_case_insensitive(api: ApiServer) -> None:
    assert_unauthorized(
        api.client(None).post(ACCOUNTS, data=b"{broken", headers={"Content-Type": "application/json"})
    )
    assert_unauthorized(
        api.client("0" * 64).post(ACCOUNTS, data=b"x", headers={"Content-Type": "text/plain"})
    )

    tenant = api.tenant()
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = api.client(None).get(ACCOUNTS, headers={"Authorization": f"{scheme} {tenant.api_key}"})
        assert response.status_code == 200, (scheme, response.text)
