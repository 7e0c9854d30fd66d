"""/api/v1/accounts/{id}/smtp-credentials through Flask's test client on PostgreSQL, and the
credential behind each message in /api/v1/messages.

Passwords are checked against the stored bcrypt hash; every response of every test goes through
``no_hash``, so a hash (or its column name) showing up anywhere fails the test that made it.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import event, select

from smtp_proxy import crypto
from smtp_proxy.api.schemas import SCHEMAS
from smtp_proxy.db.models import AuditLog, Message, MessageStatus, SmtpCredential
from smtp_proxy.storage.messages import enqueue_message
from tests.api.checks import assert_error, assert_invalid
from tests.api.conftest import ApiServer, Client, Tenant, own_domain

GENERATED_PASSWORD_LENGTH = 32
# Every field the contract promises, and no other (no hash, no password but at creation).
KEYS = set(SCHEMAS["SmtpCredential"]["required"])


def no_hash(response: Any) -> Any:
    """The response, once it is known to carry no bcrypt hash and no hash field."""
    assert "$2b$" not in response.text and "password_hash" not in response.text, response.text
    return response


def path(account_id: str, credential_id: str | None = None) -> str:
    base = f"/api/v1/accounts/{account_id}/smtp-credentials"
    return f"{base}/{credential_id}" if credential_id else base


def call(client: Client, method: str, url: str, body: Any = None) -> Any:
    return no_hash(client.request(method, url, json=body))


def create(client: Client, account_id: str, **body: Any) -> dict[str, Any]:
    response = call(client, "POST", path(account_id), body)
    assert response.status_code == 201, response.text
    return response.json()


def patch(client: Client, account_id: str, credential_id: str, **body: Any) -> Any:
    return call(client, "PATCH", path(account_id, credential_id), body)


def listed(client: Client, account_id: str) -> list[dict[str, Any]]:
    response = call(client, "GET", path(account_id))
    assert response.status_code == 200, response.text
    return response.json()["items"]


def stored_hash(api: ApiServer, credential_id: str) -> str:
    with api.database.transaction() as session:
        credential = session.get(SmtpCredential, uuid.UUID(credential_id))
        assert credential is not None
        return credential.password_hash


def without_password(created: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in created.items() if key != "password"}


# --- create, read, update, delete ----------------------------------------------------------------------


def test_create_generates_a_password_shown_once(api: ApiServer) -> None:
    tenant = api.tenant()
    response = call(tenant.client, "POST", path(tenant.id), {"label": "billing"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["Location"] == path(tenant.id, created["id"])
    assert set(created) == KEYS | {"password"}
    assert created["username"] == f"{tenant.name}.billing"
    assert created["account_id"] == tenant.id
    assert created["enabled"] is True
    assert created["allowed_ips"] == []
    assert created["allowed_domains"] is None
    assert created["last_used_at"] is None
    assert len(created["password"]) == GENERATED_PASSWORD_LENGTH
    hashed = stored_hash(api, created["id"])
    assert hashed.startswith("$2b$04$")  # the config's bcrypt_cost
    assert crypto.verify_password(created["password"], hashed)

    # Never again: not in the detail, not in the list.
    shown = call(tenant.client, "GET", path(tenant.id, created["id"]))
    assert shown.status_code == 200
    assert shown.json() == without_password(created)
    items = listed(tenant.client, tenant.id)
    assert without_password(created) in items
    assert created["password"] not in shown.text
    # The account's own login is the credential labelled "account", named as the account.
    [primary] = [item for item in items if item["label"] == "account"]
    assert primary["username"] == tenant.name
    assert [item["label"] for item in items] == ["account", "billing"]


def test_create_with_a_chosen_password_user_name_and_restrictions(api: ApiServer) -> None:
    domain = own_domain()
    tenant = api.tenant(allowed_domains=[domain, f"*.{domain}"])
    chosen = "sixteen chars ok"
    created = create(
        tenant.client,
        tenant.id,
        label="printer-2nd-floor",
        username=f"{tenant.name}.printer",
        password=chosen,
        enabled=False,
        allowed_ips=["192.0.2.0/24", "2001:db8::1", "192.0.2.0/24"],
        allowed_domains=[f"News.{domain}", domain],
    )
    assert created["password"] == chosen
    assert created["username"] == f"{tenant.name}.printer"
    assert created["enabled"] is False
    assert created["allowed_ips"] == ["192.0.2.0/24", "2001:db8::1/128"]  # canonical, once each
    assert created["allowed_domains"] == [f"news.{domain}", domain]
    assert crypto.verify_password(chosen, stored_hash(api, created["id"]))
    assert call(tenant.client, "GET", path(tenant.id, created["id"])).json() == without_password(created)


def test_patch_changes_label_state_restrictions_and_password(api: ApiServer) -> None:
    domain = own_domain()
    tenant = api.tenant(allowed_domains=[domain, f"*.{domain}"])
    created = create(tenant.client, tenant.id, label="app")
    url = path(tenant.id, created["id"])

    changes = {
        "label": "app-v2",
        "enabled": False,
        "allowed_ips": ["198.51.100.7/32"],
        "allowed_domains": [f"*.{domain}"],
    }
    response = patch(tenant.client, tenant.id, created["id"], **changes)
    assert response.status_code == 200, response.text
    updated = response.json()
    assert {key: updated[key] for key in changes} == changes
    assert updated["username"] == created["username"]  # user names never change
    assert updated["created_at"] == created["created_at"]
    assert call(tenant.client, "GET", url).json() == updated

    # null gives the credential every domain of the account again; [] lets it AUTH from anywhere.
    response = patch(tenant.client, tenant.id, created["id"], allowed_domains=None, allowed_ips=[])
    assert response.status_code == 200, response.text
    assert response.json()["allowed_domains"] is None
    assert response.json()["allowed_ips"] == []
    assert response.json()["label"] == "app-v2"  # what was not named stays

    new_password = "a new password of 32 characters!"
    response = patch(tenant.client, tenant.id, created["id"], password=new_password)
    assert response.status_code == 200, response.text
    assert "password" not in response.json() and new_password not in response.text
    hashed = stored_hash(api, created["id"])
    assert crypto.verify_password(new_password, hashed)
    assert not crypto.verify_password(created["password"], hashed)


def test_delete_removes_the_credential(api: ApiServer) -> None:
    tenant = api.tenant()
    gone = create(tenant.client, tenant.id, label="old-device")
    kept = create(tenant.client, tenant.id, label="new-device")
    url = path(tenant.id, gone["id"])
    response = call(tenant.client, "DELETE", url)
    assert response.status_code == 204
    assert response.content == b""
    for method, body in (("GET", None), ("PATCH", {"enabled": True}), ("DELETE", None)):
        assert_error(call(tenant.client, method, url, body), 404, "not_found")
    assert [item["id"] for item in listed(tenant.client, tenant.id)][1:] == [kept["id"]]
    # The label and the user name are free again.
    again = create(tenant.client, tenant.id, label="old-device")
    assert again["username"] == gone["username"] and again["id"] != gone["id"]


# --- refusals ------------------------------------------------------------------------------------------


def test_a_chosen_password_under_16_characters_is_422(api: ApiServer) -> None:
    tenant = api.tenant()
    short = "fifteen chars!!"
    assert len(short) == 15
    control = "sixteen\x07chars ok"  # long enough, but the password policy refuses control characters
    for password in (short, control):
        response = call(tenant.client, "POST", path(tenant.id), {"label": "x", "password": password})
        assert set(assert_invalid(response, "password", secrets=[password])) == {"password"}
    credential = create(tenant.client, tenant.id, label="kept")
    assert_invalid(patch(tenant.client, tenant.id, credential["id"], password=short), "password")
    assert crypto.verify_password(credential["password"], stored_hash(api, credential["id"]))
    assert [item["label"] for item in listed(tenant.client, tenant.id)] == ["account", "kept"]


def test_schema_errors_name_each_field(api: ApiServer) -> None:
    tenant = api.tenant()
    credential = create(tenant.client, tenant.id, label="one")
    cases: list[tuple[str, str, Any, set[str]]] = [
        ("POST", path(tenant.id), {}, {"label"}),
        ("POST", path(tenant.id), {"label": "x", "colour": "red", "api_key": "k"}, {"colour", "api_key"}),
        ("POST", path(tenant.id), {"label": "-starts-with-a-dash", "enabled": "yes"}, {"label", "enabled"}),
        ("POST", path(tenant.id), {"label": "x", "username": "has space"}, {"username"}),
        ("POST", path(tenant.id), {"label": "x", "allowed_ips": "192.0.2.0/24"}, {"allowed_ips"}),
        ("POST", path(tenant.id), {"label": "x", "allowed_domains": []}, {"allowed_domains"}),
        ("PATCH", path(tenant.id, credential["id"]), {}, {"body"}),
        ("PATCH", path(tenant.id, credential["id"]), {"username": f"{tenant.name}.y"}, {"username"}),
        ("PATCH", path(tenant.id, credential["id"]), {"enabled": None}, {"enabled"}),
    ]
    for method, url, body, fields in cases:
        problems = assert_invalid(call(tenant.client, method, url, body), *fields)
        assert set(problems) == fields, (body, problems)
    malformed = tenant.client.post(path(tenant.id), data=b"{", headers={"Content-Type": "application/json"})
    assert_error(malformed, 400, "bad_request")
    assert [item["label"] for item in listed(tenant.client, tenant.id)] == ["account", "one"]


def test_every_rejected_value_is_named_in_one_422(api: ApiServer) -> None:
    tenant = api.tenant()
    body = {
        "label": "device",
        "username": "someone-else.device",
        "allowed_ips": ["192.0.2.1/24"],  # host bits set
        "allowed_domains": ["not-the-accounts.example"],
        "password": "sixteen\x07chars ok",  # a control character
    }
    problems = assert_invalid(call(tenant.client, "POST", path(tenant.id), body), secrets=[body["password"]])
    assert set(problems) == {"username", "allowed_ips.0", "allowed_domains", "password"}, problems
    assert "host bits" in problems["allowed_ips.0"]
    assert "not among the account's domains" in problems["allowed_domains"]
    assert [item["label"] for item in listed(tenant.client, tenant.id)] == ["account"]


def test_allowed_domains_outside_the_accounts_and_bad_networks_are_422(api: ApiServer) -> None:
    domain = own_domain()
    tenant = api.tenant(allowed_domains=[domain])
    credential = create(tenant.client, tenant.id, label="app", allowed_domains=[domain])
    not_subsets = [[f"sub.{domain}"], [f"*.{domain}"], [domain, "example.org"], ["not a domain"]]
    for domains in not_subsets:
        for method, url in (("POST", path(tenant.id)), ("PATCH", path(tenant.id, credential["id"]))):
            body = {"allowed_domains": domains, **({"label": "other"} if method == "POST" else {})}
            assert_invalid(call(tenant.client, method, url, body), "allowed_domains")
    for network in ("300.1.2.3/8", "192.0.2.0/33", "192.0.2.1/24", "::ffff:192.0.2.1", "example.com", ""):
        problems = assert_invalid(
            patch(tenant.client, tenant.id, credential["id"], allowed_ips=["198.51.100.0/24", network]),
            "allowed_ips.1",
        )
        assert set(problems) == {"allowed_ips.1"}, (network, problems)
    shown = call(tenant.client, "GET", path(tenant.id, credential["id"])).json()
    assert shown["allowed_domains"] == [domain] and shown["allowed_ips"] == []


def test_a_taken_label_or_user_name_is_409(api: ApiServer) -> None:
    taken_name = f"acme{uuid.uuid4().hex[:6]}"
    # Account names may hold dots: this account's own login is "<acme>.billing".
    holder = api.tenant(f"{taken_name}.billing")
    tenant = api.tenant(taken_name)
    first = create(tenant.client, tenant.id, label="web")
    second = create(tenant.client, tenant.id, label="cron")

    assert_error(call(tenant.client, "POST", path(tenant.id), {"label": "web"}), 409, "conflict")
    refused = call(tenant.client, "POST", path(tenant.id), {"label": "billing"})  # default user name
    assert "is taken" in assert_error(refused, 409, "conflict")["message"]
    refused = call(tenant.client, "POST", path(tenant.id), {"label": "other", "username": first["username"]})
    assert_error(refused, 409, "conflict")
    assert_error(patch(tenant.client, tenant.id, second["id"], label="web"), 409, "conflict")
    # Its own label again is no conflict.
    assert patch(tenant.client, tenant.id, first["id"], label="web").status_code == 200
    assert [item["label"] for item in listed(tenant.client, tenant.id)] == ["account", "web", "cron"]
    assert [item["username"] for item in listed(holder.client, holder.id)] == [holder.name]


# --- who may act on whose credentials --------------------------------------------------------------------


def test_another_tenants_account_or_credential_is_404_like_a_missing_one(api: ApiServer) -> None:
    tenant, other = api.tenant(), api.tenant()
    theirs = create(other.client, other.id, label="theirs")
    mine = create(tenant.client, tenant.id, label="mine")
    missing_account, missing_credential = str(uuid.uuid4()), str(uuid.uuid4())

    def refusal(method: str, url: str, body: Any = None) -> dict[str, Any]:
        return assert_error(call(tenant.client, method, url, body), 404, "not_found")

    bodies: dict[str, Any] = {
        "GET": None,
        "POST": {"label": "x"},
        "PATCH": {"enabled": False},
        "DELETE": None,
    }
    for method in ("GET", "POST"):
        # Whatever the body (even an invalid one), another tenant's account reads as a missing one.
        for body in (bodies[method], {"label": 7}):
            assert refusal(method, path(other.id), body) == refusal(method, path(missing_account), body)
    for method in ("GET", "PATCH", "DELETE"):
        body = bodies[method]
        assert refusal(method, path(other.id, theirs["id"]), body) == refusal(
            method, path(missing_account, missing_credential), body
        )
        # Another account's credential under the caller's own account id: as a missing credential.
        assert refusal(method, path(tenant.id, theirs["id"]), body) == refusal(
            method, path(tenant.id, missing_credential), body
        )
    assert refusal("PATCH", path(other.id, theirs["id"]), {"label": 7}) == refusal(
        "PATCH", path(missing_account, missing_credential), {"label": 7}
    )
    # The other tenant's credential is untouched; the caller's own still works.
    assert call(other.client, "GET", path(other.id, theirs["id"])).json() == without_password(theirs)
    assert [item["label"] for item in listed(other.client, other.id)] == ["account", "theirs"]
    assert call(tenant.client, "GET", path(tenant.id, mine["id"])).status_code == 200


def test_an_admin_manages_any_accounts_credentials(api: ApiServer) -> None:
    tenant = api.tenant()
    made = create(api.admin, tenant.id, label="by-admin", allowed_ips=["203.0.113.0/24"])
    assert made["username"] == f"{tenant.name}.by-admin"
    assert without_password(made) in listed(tenant.client, tenant.id)  # the tenant sees it too
    own = create(tenant.client, tenant.id, label="own")
    response = patch(api.admin, tenant.id, own["id"], enabled=False)
    assert response.status_code == 200 and response.json()["enabled"] is False
    assert call(api.admin, "DELETE", path(tenant.id, made["id"])).status_code == 204
    assert [item["label"] for item in listed(api.admin, tenant.id)] == ["account", "own"]
    assert_error(call(api.admin, "GET", path(str(uuid.uuid4()))), 404, "not_found")
    # An admin's user names follow the same rule: the account's name or "<account>.".
    refused = call(api.admin, "POST", path(tenant.id), {"label": "x", "username": "admin-own-name"})
    assert_invalid(refused, "username")


def test_every_change_is_audited_by_name_never_by_value(api: ApiServer) -> None:
    tenant = api.tenant()
    created = create(tenant.client, tenant.id, label="app", allowed_ips=["192.0.2.0/24"])
    patch(tenant.client, tenant.id, created["id"], label="app2", password="another password of 16+")
    patch(tenant.client, tenant.id, created["id"], enabled=False)
    patch(api.admin, tenant.id, created["id"], enabled=True, allowed_domains=None)
    call(tenant.client, "DELETE", path(tenant.id, created["id"]))
    with api.database.transaction() as session:
        rows = session.scalars(
            select(AuditLog)
            .where(AuditLog.entity == "smtp_credential", AuditLog.entity_id == uuid.UUID(created["id"]))
            .order_by(AuditLog.created_at, AuditLog.id)
        ).all()
        seen = [(row.action, row.actor, row.changes["fields"], str(row.account_id)) for row in rows]
    admin_name = api.admin.get(f"/api/v1/accounts/{api.admin_id}").json()["name"]
    assert seen == [
        ("create", tenant.name, ["allowed_ips", "enabled", "label", "password", "username"], tenant.id),
        ("update", tenant.name, ["label", "password"], tenant.id),
        ("disable", tenant.name, ["enabled"], tenant.id),
        ("update", admin_name, ["allowed_domains", "enabled"], tenant.id),
        ("delete", tenant.name, [], tenant.id),
    ]
    # The tenant reads its credential's entries in its own audit log; no value is in them.
    response = tenant.client.get("/api/v1/audit-log")
    entries = [entry for entry in response.json()["items"] if entry["entity"] == "smtp_credential"]
    assert [entry["action"] for entry in entries if entry["entity_id"] == created["id"]] == [
        "delete",
        "update",
        "disable",
        "update",
        "create",
    ]
    for secret in (created["password"], "another password of 16+", "192.0.2.0/24"):
        assert secret not in response.text


# --- the credential behind each message ------------------------------------------------------------------


def enqueue(api: ApiServer, tenant: Tenant, credential_id: str | None, subject: str) -> str:
    with api.database.transaction() as session:
        queued = enqueue_message(
            session,
            api.cipher,
            account_id=uuid.UUID(tenant.id),
            sender="sender@example.com",
            recipients=["rcpt@example.net"],
            data=f"Subject: {subject}\r\n\r\nbody\r\n".encode(),
            correlation_id=uuid.uuid4().hex,
            credential_id=uuid.UUID(credential_id) if credential_id else None,
        )
    return str(queued.id)


def messages(client: Client, **params: Any) -> dict[str, Any]:
    response = client.get("/api/v1/messages", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_messages_show_and_filter_by_their_credential(api: ApiServer) -> None:
    tenant, other = api.tenant(), api.tenant()
    web = create(tenant.client, tenant.id, label="web")["id"]
    cron = create(tenant.client, tenant.id, label="cron")["id"]
    theirs = create(other.client, other.id, label="theirs")["id"]
    sent = {
        "web-1": enqueue(api, tenant, web, "web-1"),
        "cron-1": enqueue(api, tenant, cron, "cron-1"),
        "relayed": enqueue(api, tenant, None, "relayed"),
        "web-2": enqueue(api, tenant, web, "web-2"),
        "web-3": enqueue(api, tenant, web, "web-3"),
        "theirs": enqueue(api, other, theirs, "theirs"),
    }
    with api.database.transaction() as session:
        row = session.get(Message, uuid.UUID(sent["web-2"]))
        assert row is not None
        row.status = MessageStatus.FAILED

    by_subject = {item["subject"]: item["credential_id"] for item in messages(tenant.client)["items"]}
    assert by_subject == {"web-1": web, "cron-1": cron, "relayed": None, "web-2": web, "web-3": web}
    detail = tenant.client.get(f"/api/v1/messages/{sent['cron-1']}").json()
    assert detail["credential_id"] == cron
    assert tenant.client.get(f"/api/v1/messages/{sent['relayed']}").json()["credential_id"] is None

    def subjects(**params: Any) -> list[str]:
        return [item["subject"] for item in messages(tenant.client, **params)["items"]]

    assert subjects(credential_id=web) == ["web-3", "web-2", "web-1"]
    assert subjects(credential_id=cron) == ["cron-1"]
    assert subjects(credential_id=web, status="queued") == ["web-3", "web-1"]
    assert subjects(credential_id=theirs) == []  # another tenant's credential: nothing of theirs
    assert subjects(credential_id=str(uuid.uuid4())) == []
    # Pages of one credential's messages.
    first = messages(tenant.client, credential_id=web, limit=2)
    assert [item["subject"] for item in first["items"]] == ["web-3", "web-2"]
    rest = messages(tenant.client, credential_id=web, limit=2, cursor=first["next_cursor"])
    assert [item["subject"] for item in rest["items"]] == ["web-1"] and rest["next_cursor"] is None

    for bad in ("not-a-uuid", "", "1234", f"{web}x"):
        problems = assert_invalid(tenant.client.get("/api/v1/messages", params={"credential_id": bad}))
        assert set(problems) == {"credential_id"}, (bad, problems)
    problems = assert_invalid(
        tenant.client.get("/api/v1/messages", params={"credential_id": "x", "status": "lost", "limit": "0"})
    )
    assert set(problems) == {"credential_id", "status", "limit"}

    # A deleted credential's messages stay, without it.
    assert call(tenant.client, "DELETE", path(tenant.id, cron)).status_code == 204
    assert tenant.client.get(f"/api/v1/messages/{sent['cron-1']}").json()["credential_id"] is None
    assert subjects(credential_id=cron) == []


def test_the_credential_filter_reads_its_index(api: ApiServer) -> None:
    """The page's statement can walk (account_id, credential_id, created_at, id) in order, with no sort.

    On a table of a few rows the planner's pick among equal costs says nothing; with sequential
    scans and sorts priced out, only an index that gives the page's order without a sort is left.
    """
    tenant = api.tenant()
    web = create(tenant.client, tenant.id, label="web")["id"]
    enqueue(api, tenant, web, "one")
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        if "FROM messages" in statement:
            statements.append((statement, parameters))

    connection = api.database.connection  # type: ignore[attr-defined]
    event.listen(connection, "before_cursor_execute", seen)
    try:
        assert len(messages(tenant.client, credential_id=web, limit=5)["items"]) == 1
    finally:
        event.remove(connection, "before_cursor_execute", seen)
    [(statement, parameters)] = statements
    for setting in ("enable_seqscan", "enable_sort", "enable_incremental_sort"):
        connection.exec_driver_sql(f"SET LOCAL {setting} = off")  # until the test's rollback
    plan = "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {statement}", parameters))
    assert "ix_messages_account_id_credential_id_created_at_id" in plan, plan
    assert "Sort" not in plan, plan
