"""/api/v1/providers over real HTTP: per-type validation, write-only secrets, tenant isolation."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import requests
from sqlalchemy import text

from smtp_proxy.api.schemas import SCHEMAS
from smtp_proxy.db.models import EspProvider
from smtp_proxy.storage.providers import ProviderSecrets, get_provider, provider_secrets
from tests.api import checks
from tests.api.conftest import ApiServer, Client, Tenant

PROVIDERS = "/api/v1/providers"
JSON = {"Content-Type": "application/json"}

# Distinctive secrets: a raw-text search for them in a response body cannot hit by accident.
SENDGRID_KEY = "SG.sendgrid-secret-4f1d2c9a7b"
MAILGUN_KEY = "key-mailgun-secret-8e3b5a0c1d"
SES_KEY = "AKIAIOSFODNN7EXAMPLE:ses/Secret+Key-9c2e7d1a0b"
SMTP_PASSWORD = "smtp-relay-p@ss-6a1f0e9d3c"


def sendgrid(name: str = "sendgrid-main", **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider_type": "sendgrid", "api_key": SENDGRID_KEY, **extra}


def mailgun(name: str = "mailgun-eu", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider_type": "mailgun",
        "api_key": MAILGUN_KEY,
        "settings": {"domain": "mg.example.com", "region": "eu"},
        **extra,
    }


def ses(name: str = "ses-ireland", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider_type": "ses",
        "api_key": SES_KEY,
        "settings": {"region": "eu-west-1"},
        **extra,
    }


def smtp(name: str = "smtp-relay", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider_type": "smtp",
        "smtp_config": {
            "host": "relay.example.com",
            "port": 587,
            "tls": "starttls",
            "username": "relay-user",
            "password": SMTP_PASSWORD,
        },
        **extra,
    }


BUILDERS = {"sendgrid": sendgrid, "mailgun": mailgun, "ses": ses, "smtp": smtp}
SECRETS = {"sendgrid": SENDGRID_KEY, "mailgun": MAILGUN_KEY, "ses": SES_KEY, "smtp": SMTP_PASSWORD}
ALL_SECRETS = tuple(SECRETS.values())


def assert_no_secret(response: requests.Response, *secrets: str) -> None:
    """Neither the body (raw or JSON-escaped) nor any header carries a secret (by default: any of them)."""
    checks.assert_no_secret(response, secrets or ALL_SECRETS)


def assert_error(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    return checks.assert_error(response, status, code, secrets=ALL_SECRETS)


def assert_invalid(response: requests.Response, *fields: str) -> dict[str, str]:
    return checks.assert_invalid(response, *fields, secrets=ALL_SECRETS)


def create(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(PROVIDERS, json=body)
    assert response.status_code == 201, response.text
    assert_no_secret(response)
    return response.json()


def names(client: Client) -> list[str]:
    response = client.get(PROVIDERS)
    assert response.status_code == 200, response.text
    return [item["name"] for item in response.json()["items"]]


def stored(api: ApiServer, tenant: Tenant, provider_id: str) -> EspProvider:
    with api.database.transaction() as session:
        provider = get_provider(session, uuid.UUID(tenant.id), uuid.UUID(provider_id))
        session.expunge(provider)
    api.database.remove_session()
    return provider


# --- creation and secrets ------------------------------------------------------------------------------


def test_create_each_type_and_secret_never_returned(api: ApiServer) -> None:
    tenant = api.tenant()
    created: dict[str, dict[str, Any]] = {}
    for kind, build in BUILDERS.items():
        body = build()
        response = tenant.client.post(PROVIDERS, json=body)
        assert response.status_code == 201, response.text
        assert_no_secret(response)
        provider = created[kind] = response.json()
        assert response.headers["Location"] == f"{PROVIDERS}/{provider['id']}"
        assert provider["name"] == body["name"]
        assert provider["provider_type"] == kind
        assert provider["enabled"] is True
        assert "api_key" not in provider
        if kind == "smtp":
            assert provider["has_api_key"] is False
            assert provider["has_smtp_password"] is True
            assert provider["settings"] == {}
            assert provider["smtp_config"] == {
                "host": "relay.example.com",
                "port": 587,
                "tls": "starttls",
                "username": "relay-user",
            }
        else:
            assert provider["has_api_key"] is True
            assert provider["has_smtp_password"] is False
            assert provider["smtp_config"] is None
            assert provider["settings"] == body.get("settings", {})

    for provider in created.values():
        got = tenant.client.get(f"{PROVIDERS}/{provider['id']}")
        assert got.status_code == 200
        assert_no_secret(got)
        assert got.json() == provider

    listed = tenant.client.get(PROVIDERS)
    assert listed.status_code == 200
    assert_no_secret(listed)
    assert sorted(listed.json()["items"], key=lambda p: p["id"]) == sorted(
        created.values(), key=lambda p: p["id"]
    )

    for provider in created.values():
        updated = tenant.client.put(f"{PROVIDERS}/{provider['id']}", json={"enabled": False})
        assert updated.status_code == 200, updated.text
        assert_no_secret(updated)
        assert updated.json()["enabled"] is False
        assert updated.json()["has_api_key"] is provider["has_api_key"]
        assert updated.json()["has_smtp_password"] is provider["has_smtp_password"]


def test_optional_fields_mailgun_region_smtp_password_enabled(api: ApiServer) -> None:
    tenant = api.tenant()
    without_region = create(tenant.client, mailgun("mg-default", settings={"domain": "mg.example.com"}))
    assert without_region["settings"] == {"domain": "mg.example.com"}
    us = create(tenant.client, mailgun("mg-us", settings={"domain": "mg.example.com", "region": "us"}))
    assert us["settings"] == {"domain": "mg.example.com", "region": "us"}

    open_relay = smtp("open-relay", smtp_config={"host": "relay.example.com", "port": 25, "tls": "none"})
    plain = create(tenant.client, open_relay)
    assert plain["has_smtp_password"] is False
    assert plain["smtp_config"] == {"host": "relay.example.com", "port": 25, "tls": "none"}
    assert provider_secrets(api.cipher, stored(api, tenant, plain["id"])).smtp_password is None

    for port in (1, 65535):
        edge = create(
            tenant.client,
            smtp(f"port-{port}", smtp_config={"host": "h.example.com", "port": port, "tls": "implicit"}),
        )
        assert edge["smtp_config"]["port"] == port

    disabled = create(tenant.client, sendgrid(enabled=False))
    assert disabled["enabled"] is False
    assert tenant.client.get(f"{PROVIDERS}/{disabled['id']}").json()["enabled"] is False


def test_secrets_are_stored_encrypted(api: ApiServer) -> None:
    tenant = api.tenant()
    for kind, build in BUILDERS.items():
        created = create(tenant.client, build())
        plaintext = SECRETS[kind]
        provider = stored(api, tenant, created["id"])
        opened = provider_secrets(api.cipher, provider)
        if kind == "smtp":
            assert opened == ProviderSecrets(api_key=None, smtp_password=plaintext)
            assert provider.smtp_password_encrypted is not None
            assert plaintext.encode() not in provider.smtp_password_encrypted
            assert "password" not in (provider.smtp_config or {})
            assert plaintext not in json.dumps(provider.smtp_config)
        else:
            assert opened == ProviderSecrets(api_key=plaintext, smtp_password=None)
            assert provider.api_key_encrypted is not None
            assert plaintext.encode() not in provider.api_key_encrypted
        # Nowhere in the row as PostgreSQL holds it is the secret in plain text (bytea as \x<hex>).
        with api.database.transaction() as session:
            row = session.execute(
                text("SELECT row_to_json(p)::text FROM esp_providers p WHERE id = :id"), {"id": created["id"]}
            ).scalar_one()
        api.database.remove_session()
        assert plaintext not in row
        assert plaintext.encode().hex() not in row
    # Nor in the audit trail.
    with api.database.transaction() as session:
        audit = session.execute(
            text("SELECT coalesce(string_agg(changes::text, ' '), '') FROM audit_log")
        ).scalar_one()
    api.database.remove_session()
    for secret in ALL_SECRETS:
        assert secret not in audit


def test_api_key_replacement_keeps_has_api_key_and_reseals(api: ApiServer) -> None:
    tenant = api.tenant()
    created = create(tenant.client, sendgrid())
    new_key = "SG.replacement-secret-0d9e8f7a6b"
    response = tenant.client.put(f"{PROVIDERS}/{created['id']}", json={"api_key": new_key})
    assert response.status_code == 200, response.text
    assert_no_secret(response, SENDGRID_KEY, new_key)
    assert response.json()["has_api_key"] is True
    assert response.json()["name"] == created["name"]
    assert_no_secret(tenant.client.get(f"{PROVIDERS}/{created['id']}"), SENDGRID_KEY, new_key)
    assert_no_secret(tenant.client.get(PROVIDERS), SENDGRID_KEY, new_key)
    provider = stored(api, tenant, created["id"])
    assert provider_secrets(api.cipher, provider).api_key == new_key
    assert new_key.encode() not in (provider.api_key_encrypted or b"")

    ses_provider = create(tenant.client, ses())
    new_ses_key = "AKIAABCDEFGHIJKLMNOP:another/Secret+9"
    response = tenant.client.put(f"{PROVIDERS}/{ses_provider['id']}", json={"api_key": new_ses_key})
    assert response.status_code == 200, response.text
    assert_no_secret(response, SES_KEY, new_ses_key)
    assert provider_secrets(api.cipher, stored(api, tenant, ses_provider["id"])).api_key == new_ses_key


def test_smtp_password_kept_when_left_out_and_replaced_when_given(api: ApiServer) -> None:
    tenant = api.tenant()
    created = create(tenant.client, smtp())
    path = f"{PROVIDERS}/{created['id']}"
    without_password = {"host": "relay2.example.com", "port": 465, "tls": "implicit", "username": "u2"}
    response = tenant.client.put(path, json={"smtp_config": without_password})
    assert response.status_code == 200, response.text
    assert response.json()["smtp_config"] == without_password
    assert response.json()["has_smtp_password"] is True
    assert provider_secrets(api.cipher, stored(api, tenant, created["id"])).smtp_password == SMTP_PASSWORD

    new_password = "second-relay-p@ss-7b2c1d0e9f"
    response = tenant.client.put(path, json={"smtp_config": {**without_password, "password": new_password}})
    assert response.status_code == 200, response.text
    assert_no_secret(response, SMTP_PASSWORD, new_password)
    assert response.json()["has_smtp_password"] is True
    assert response.json()["smtp_config"] == without_password
    assert provider_secrets(api.cipher, stored(api, tenant, created["id"])).smtp_password == new_password
    assert_no_secret(tenant.client.get(path), SMTP_PASSWORD, new_password)
    assert_no_secret(tenant.client.get(PROVIDERS), SMTP_PASSWORD, new_password)


# --- validation -----------------------------------------------------------------------------------------


def _without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def _smtp_config(**changes: Any) -> dict[str, Any]:
    body = smtp()
    body["smtp_config"] = {**body["smtp_config"], **changes}
    return body


def post(tenant: Tenant, body: dict[str, Any]) -> requests.Response:
    return tenant.client.post(PROVIDERS, json=body)


def field_error(response: requests.Response, field: str) -> str | None:
    return checks.field_error(response, field, secrets=ALL_SECRETS)


INVALID_CREATES: list[tuple[dict[str, Any], str]] = [
    (_without(sendgrid(), "api_key"), "api_key"),
    (sendgrid(api_key=""), "api_key"),
    (sendgrid(api_key=12345), "api_key"),
    (_without(mailgun(), "api_key"), "api_key"),
    (_without(mailgun(), "settings"), "settings"),
    (mailgun(settings={"region": "eu"}), "settings.domain"),
    (mailgun(settings={"domain": "mg.example.com", "region": "ap"}), "settings.region"),
    (mailgun(settings={"domain": "mg.example.com", "region": "EU"}), "settings.region"),
    (mailgun(settings={"domain": "mg.example.com", "zone": "x"}), "settings.zone"),
    (mailgun(settings="mg.example.com"), "settings"),
    (ses(api_key="AKIAIOSFODNN7EXAMPLE"), "api_key"),
    (ses(api_key="akiaiosfodnn7example:secret"), "api_key"),
    (ses(api_key="AKIASHORT:secret"), "api_key"),
    (ses(api_key="AKIAIOSFODNN7EXAMPLE:has space"), "api_key"),
    (ses(api_key="AKIAIOSFODNN7EXAMPLE:"), "api_key"),
    (_without(ses(), "api_key"), "api_key"),
    (_without(ses(), "settings"), "settings"),
    (ses(settings={}), "settings.region"),
    (ses(settings={"region": "ireland"}), "settings.region"),
    (ses(settings={"region": "EU-WEST-1"}), "settings.region"),
    (ses(settings={"region": 1}), "settings.region"),
    (_without(smtp(), "smtp_config"), "smtp_config"),
    (smtp(smtp_config="relay.example.com:587"), "smtp_config"),
    (smtp(smtp_config={"port": 25, "tls": "none"}), "smtp_config.host"),
    (smtp(smtp_config={"host": "relay.example.com", "tls": "none"}), "smtp_config.port"),
    (smtp(smtp_config={"host": "relay.example.com", "port": 25}), "smtp_config.tls"),
    (_smtp_config(port=0), "smtp_config.port"),
    (_smtp_config(port=70000), "smtp_config.port"),
    (_smtp_config(port=-25), "smtp_config.port"),
    (_smtp_config(port="587"), "smtp_config.port"),
    (_smtp_config(port=587.5), "smtp_config.port"),
    (_smtp_config(tls="ssl"), "smtp_config.tls"),
    (_smtp_config(tls=True), "smtp_config.tls"),
    (_smtp_config(helo="mx.example.com"), "smtp_config.helo"),
    (_smtp_config(host=""), "smtp_config.host"),
    (_smtp_config(password=12345), "smtp_config.password"),
    (sendgrid(provider_type="postmark"), "provider_type"),
    (sendgrid(provider_type="SendGrid"), "provider_type"),
    (_without(sendgrid(), "provider_type"), "provider_type"),
    (_without(sendgrid(), "name"), "name"),
    (sendgrid(name=""), "name"),
    (sendgrid(name="n" * 101), "name"),
    (sendgrid(name=None), "name"),
    (sendgrid(enabled="yes"), "enabled"),
    (sendgrid(owner="someone-else"), "owner"),
    (sendgrid(account_id=str(uuid.uuid4())), "account_id"),
    (sendgrid(has_api_key=True), "has_api_key"),
    # A field the type would ignore is refused, not stored unused.
    (sendgrid(smtp_config=smtp()["smtp_config"]), "smtp_config"),
    (mailgun(smtp_config=smtp()["smtp_config"]), "smtp_config"),
    (ses(smtp_config=smtp()["smtp_config"]), "smtp_config"),
    (smtp(api_key=SENDGRID_KEY), "api_key"),
]


def test_create_invalid_names_the_field_and_stores_nothing(api: ApiServer) -> None:
    tenant = api.tenant()
    failures = []
    for body, field in INVALID_CREATES:
        problem = field_error(tenant.client.post(PROVIDERS, json=body), field)
        if problem:
            failures.append(f"{json.dumps(body)} -> {problem}")
    assert not failures, "\n".join(failures)
    assert names(tenant.client) == []


def test_create_reports_every_bad_field_at_once(api: ApiServer) -> None:
    tenant = api.tenant()
    body = _smtp_config(port=0, tls="ssl", helo="x")
    body["enabled"] = "no"
    body["name"] = ""
    problems = assert_invalid(
        tenant.client.post(PROVIDERS, json=body),
        "smtp_config.port",
        "smtp_config.tls",
        "smtp_config.helo",
        "enabled",
        "name",
    )
    assert problems["smtp_config.helo"] == "is not a known field"
    assert names(tenant.client) == []


def test_create_without_a_provider_type_names_only_provider_type(api: ApiServer) -> None:
    # The root cause first: api_key, settings and smtp_config depend on the type, so they are
    # checked (and reported) only once provider_type is valid.
    tenant = api.tenant()
    missing = assert_invalid(tenant.client.post(PROVIDERS, json={"name": "x"}), "provider_type")
    assert missing == {"provider_type": "is required"}
    unknown = assert_invalid(
        tenant.client.post(PROVIDERS, json={"name": "x", "provider_type": "postfix"}), "provider_type"
    )
    assert list(unknown) == ["provider_type"]
    assert unknown["provider_type"] == "must be one of sendgrid, mailgun, ses, smtp"
    # Other bad fields beside it are still reported in the same answer; the type's own are not.
    both = assert_invalid(tenant.client.post(PROVIDERS, json={"name": "", "enabled": 1}), "provider_type")
    assert set(both) == {"provider_type", "name", "enabled"}
    # Once the type is valid, what it needs is named.
    mailgun_only = tenant.client.post(PROVIDERS, json={"name": "x", "provider_type": "mailgun"})
    assert set(assert_invalid(mailgun_only, "api_key")) == {"api_key", "settings"}
    assert names(tenant.client) == []


def _conditions(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        own = [node["if"]] if "if" in node else []
        return own + [found for value in node.values() for found in _conditions(value)]
    if isinstance(node, list):
        return [found for value in node for found in _conditions(value)]
    return []


def test_every_schema_branch_requires_the_fields_its_condition_tests() -> None:
    # An ``if`` on a field the body left out holds vacuously: every branch would apply and report
    # fields that only matter once that field is given (the ``{"name": "x"}`` case above).
    conditions = _conditions(SCHEMAS)
    assert len(conditions) >= 4  # ProviderCreate's one per type
    for condition in conditions:
        assert set(condition.get("properties", {})) <= set(condition.get("required", [])), condition


# --- update ---------------------------------------------------------------------------------------------


def test_put_partial_update_changes_only_given_fields(api: ApiServer) -> None:
    tenant = api.tenant()
    created = create(tenant.client, mailgun())
    path = f"{PROVIDERS}/{created['id']}"

    disabled = tenant.client.put(path, json={"enabled": False})
    assert disabled.status_code == 200, disabled.text
    assert disabled.json() == {**created, "enabled": False, "updated_at": disabled.json()["updated_at"]}
    assert disabled.json()["updated_at"] >= created["updated_at"]

    renamed = tenant.client.put(path, json={"name": "mailgun-renamed"})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "mailgun-renamed"
    assert renamed.json()["enabled"] is False
    assert renamed.json()["settings"] == created["settings"]
    assert renamed.json()["has_api_key"] is True
    assert tenant.client.get(path).json() == renamed.json()
    assert names(tenant.client) == ["mailgun-renamed"]

    # Renaming to its own name is no conflict.
    same = tenant.client.put(path, json={"name": "mailgun-renamed", "enabled": True})
    assert same.status_code == 200, same.text
    assert same.json()["enabled"] is True

    settings = tenant.client.put(path, json={"settings": {"domain": "mg2.example.com", "region": "us"}})
    assert settings.status_code == 200, settings.text
    assert settings.json()["settings"] == {"domain": "mg2.example.com", "region": "us"}
    assert settings.json()["provider_type"] == "mailgun"
    assert provider_secrets(api.cipher, stored(api, tenant, created["id"])).api_key == MAILGUN_KEY


INVALID_UPDATES: list[tuple[str, dict[str, Any], str]] = [
    ("mailgun", {"settings": {"domain": "mg.example.com", "region": "asia"}}, "settings.region"),
    ("mailgun", {"settings": {"region": "us"}}, "settings.domain"),
    ("mailgun", {"settings": {"domain": "mg.example.com", "colour": "red"}}, "settings.colour"),
    ("mailgun", {"api_key": ""}, "api_key"),
    ("ses", {"settings": {"region": "moon-base"}}, "settings.region"),
    ("ses", {"settings": {}}, "settings.region"),
    ("ses", {"api_key": "not-an-aws-key"}, "api_key"),
    ("smtp", {"smtp_config": {"host": "h.example.com", "port": 0, "tls": "none"}}, "smtp_config.port"),
    ("smtp", {"smtp_config": {"host": "h.example.com", "port": 70000, "tls": "none"}}, "smtp_config.port"),
    ("smtp", {"smtp_config": {"host": "h.example.com", "port": 25, "tls": "tls"}}, "smtp_config.tls"),
    ("smtp", {"smtp_config": {"host": "h.example.com", "port": 25, "tls": "none", "x": 1}}, "smtp_config.x"),
    ("smtp", {"smtp_config": None}, "smtp_config"),
    ("sendgrid", {"provider_type": "mailgun"}, "provider_type"),
    ("sendgrid", {"provider_type": "sendgrid"}, "provider_type"),
    ("sendgrid", {"name": ""}, "name"),
    ("sendgrid", {"name": "n" * 101}, "name"),
    ("sendgrid", {"api_key": None}, "api_key"),
    ("sendgrid", {"enabled": 0}, "enabled"),
    ("sendgrid", {"enabled": None}, "enabled"),
    ("sendgrid", {"colour": "blue"}, "colour"),
    ("sendgrid", {"id": str(uuid.uuid4())}, "id"),
    ("sendgrid", {}, "body"),
    ("sendgrid", {"smtp_config": {"host": "h.example.com", "port": 25, "tls": "none"}}, "smtp_config"),
    ("ses", {"smtp_config": {"host": "h.example.com", "port": 25, "tls": "none"}}, "smtp_config"),
    ("smtp", {"api_key": "SG.something"}, "api_key"),
]


def test_a_field_the_type_ignores_is_refused_with_a_reason(api: ApiServer) -> None:
    tenant = api.tenant()
    problems = assert_invalid(
        tenant.client.post(PROVIDERS, json=sendgrid(smtp_config=smtp()["smtp_config"])), "smtp_config"
    )
    assert problems == {"smtp_config": "is only for smtp providers"}
    problems = assert_invalid(tenant.client.post(PROVIDERS, json=smtp(api_key="SG.unused")), "api_key")
    assert "smtp_config.password" in problems["api_key"]
    assert names(tenant.client) == []


def test_put_invalid_is_422_and_changes_nothing(api: ApiServer) -> None:
    tenant = api.tenant()
    created = {kind: create(tenant.client, build()) for kind, build in BUILDERS.items()}
    failures = []
    for kind, change, field in INVALID_UPDATES:
        response = tenant.client.put(f"{PROVIDERS}/{created[kind]['id']}", json=change)
        problem = field_error(response, field)
        if problem:
            failures.append(f"{kind} {json.dumps(change)} -> {problem}")
        elif field == "provider_type" and response.json()["error"]["fields"][field] != "is not a known field":
            failures.append(f"{kind} {json.dumps(change)} -> {response.text}")
    assert not failures, "\n".join(failures)
    for kind, provider in created.items():
        assert tenant.client.get(f"{PROVIDERS}/{provider['id']}").json() == provider
        opened = provider_secrets(api.cipher, stored(api, tenant, provider["id"]))
        assert SECRETS[kind] in (opened.api_key, opened.smtp_password)


# --- uniqueness -----------------------------------------------------------------------------------------


def test_duplicate_name_is_409_within_a_tenant_only(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    first = create(alice.client, sendgrid("primary"))
    assert_error(alice.client.post(PROVIDERS, json=mailgun("primary")), 409, "conflict")
    assert names(alice.client) == ["primary"]
    # The same name in another tenant's namespace is fine.
    other = create(bob.client, smtp("primary"))
    assert other["id"] != first["id"]
    assert names(bob.client) == ["primary"]
    assert alice.client.get(f"{PROVIDERS}/{first['id']}").json() == first

    second = create(alice.client, ses("secondary"))
    assert_error(alice.client.put(f"{PROVIDERS}/{second['id']}", json={"name": "primary"}), 409, "conflict")
    assert alice.client.get(f"{PROVIDERS}/{second['id']}").json() == second
    assert names(alice.client) == ["primary", "secondary"]


def test_concurrent_duplicate_creates_give_one_201_and_409s(served_api: ApiServer) -> None:
    api = served_api
    tenant = api.tenant()
    responses: list[requests.Response] = []
    barrier = threading.Barrier(6)

    def post() -> None:
        client = api.client(tenant.api_key)
        barrier.wait(timeout=5)
        responses.append(client.post(PROVIDERS, json=sendgrid("racy")))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] + [409] * 5, [response.text for response in responses]
    for response in responses:
        if response.status_code == 409:
            assert_error(response, 409, "conflict")
    assert names(tenant.client) == ["racy"]


# --- tenant isolation -----------------------------------------------------------------------------------


def test_other_tenants_provider_is_404_and_untouched(api: ApiServer) -> None:
    owner, intruder = api.tenant(), api.tenant()
    created = create(owner.client, mailgun("owners-secret-provider"))
    path = f"{PROVIDERS}/{created['id']}"
    unknown = assert_error(owner.client.get(f"{PROVIDERS}/{uuid.uuid4()}"), 404, "not_found")

    for response in (
        intruder.client.get(path),
        intruder.client.put(path, json={"name": "hijacked", "enabled": False}),
        intruder.client.put(path, json={"api_key": "attacker-key-0000"}),
        intruder.client.put(path, json={"settings": {"domain": "evil.example", "region": "us"}}),
        intruder.client.delete(path),
    ):
        error = assert_error(response, 404, "not_found")
        assert "owners-secret-provider" not in response.text
        assert created["id"] not in response.text
        # Indistinguishable from an id that does not exist at all.
        assert error == unknown
    assert names(intruder.client) == []

    assert owner.client.get(path).json() == created
    assert names(owner.client) == ["owners-secret-provider"]
    assert provider_secrets(api.cipher, stored(api, owner, created["id"])).api_key == MAILGUN_KEY


def test_delete_then_404(api: ApiServer) -> None:
    tenant = api.tenant()
    keep = create(tenant.client, sendgrid("keep"))
    gone = create(tenant.client, smtp("gone"))
    path = f"{PROVIDERS}/{gone['id']}"
    response = tenant.client.delete(path)
    assert response.status_code == 204
    assert response.content == b""
    assert_error(tenant.client.get(path), 404, "not_found")
    assert_error(tenant.client.put(path, json={"enabled": False}), 404, "not_found")
    assert_error(tenant.client.delete(path), 404, "not_found")
    assert names(tenant.client) == ["keep"]
    assert tenant.client.get(f"{PROVIDERS}/{keep['id']}").json() == keep
    with api.database.transaction() as session:
        assert session.get(EspProvider, uuid.UUID(gone["id"])) is None
    api.database.remove_session()
    # The name is free again.
    assert create(tenant.client, smtp("gone"))["id"] != gone["id"]


def test_unknown_and_malformed_ids_are_404(api: ApiServer) -> None:
    tenant = api.tenant()
    create(tenant.client, sendgrid())
    for path in (
        f"{PROVIDERS}/{uuid.uuid4()}",
        f"{PROVIDERS}/not-a-uuid",
        f"{PROVIDERS}/1%27%20OR%20%271%27=%271",
        f"{PROVIDERS}/{uuid.uuid4().hex}x",
    ):
        assert_error(tenant.client.get(path), 404, "not_found")
        assert_error(tenant.client.put(path, json={"enabled": True}), 404, "not_found")
        assert_error(tenant.client.delete(path), 404, "not_found")
    assert names(tenant.client) == ["sendgrid-main"]


def test_requires_a_valid_api_key(api: ApiServer) -> None:
    tenant = api.tenant()
    created = create(tenant.client, sendgrid())
    anonymous = api.client(None)
    forged = api.client("spk_not-a-real-key")
    for response in (
        anonymous.get(PROVIDERS),
        anonymous.post(PROVIDERS, json=sendgrid("other")),
        anonymous.get(f"{PROVIDERS}/{created['id']}"),
        forged.put(f"{PROVIDERS}/{created['id']}", json={"enabled": False}),
        forged.delete(f"{PROVIDERS}/{created['id']}"),
    ):
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert tenant.client.get(f"{PROVIDERS}/{created['id']}").json() == created


def test_list_sorted_by_name_and_scoped_to_caller(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    for name in ("delta", "alpha", "charlie", "bravo"):
        create(alice.client, sendgrid(name))
    create(bob.client, smtp("zulu"))
    create(bob.client, ses("echo"))
    assert names(alice.client) == ["alpha", "bravo", "charlie", "delta"]
    assert names(bob.client) == ["echo", "zulu"]
    assert names(api.tenant().client) == []
    # A rename moves the provider to its new place in the order.
    alpha = alice.client.get(PROVIDERS).json()["items"][0]
    assert alice.client.put(f"{PROVIDERS}/{alpha['id']}", json={"name": "echo"}).status_code == 200
    assert names(alice.client) == ["bravo", "charlie", "delta", "echo"]


# --- hostile input --------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "x'; DROP TABLE esp_providers; --",
    'quote " double',
    "Robert'); DELETE FROM accounts WHERE ('1'='1",
    "1 OR 1=1",
    "%s %(name)s {0} %d",
    "back\\slash \\x00 \\n",
    "Zürich 東京 Привет 🚀",
    "\u202eright-to-left",
    "<script>alert(1)</script>",
    "tab\tand\nnewline",
    "   padded   ",
    "é" * 100,
]


def test_hostile_names_are_stored_and_returned_literally(api: ApiServer) -> None:
    tenant = api.tenant()
    ids: dict[str, str] = {}
    for name in HOSTILE_NAMES:
        created = create(tenant.client, sendgrid(name))
        assert created["name"] == name
        ids[name] = created["id"]
    for name, provider_id in ids.items():
        assert tenant.client.get(f"{PROVIDERS}/{provider_id}").json()["name"] == name
    assert sorted(names(tenant.client)) == sorted(HOSTILE_NAMES)
    # Compared literally: an injection-looking name clashes with itself and nothing else.
    assert_error(tenant.client.post(PROVIDERS, json=sendgrid(HOSTILE_NAMES[0])), 409, "conflict")
    renamed = tenant.client.put(f"{PROVIDERS}/{ids['1 OR 1=1']}", json={"name": 'it\'s 100% "fine"'})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == 'it\'s 100% "fine"'

    settings = {"note": "'; DROP TABLE esp_providers; --", "nested": {"k": ["%s", "ü", None, 1.5, True]}}
    created = create(tenant.client, sendgrid("settings", settings=settings))
    assert created["settings"] == settings
    assert tenant.client.get(f"{PROVIDERS}/{created['id']}").json()["settings"] == settings
    # The tables are intact and other tenants unaffected.
    assert len(names(tenant.client)) == len(HOSTILE_NAMES) + 1
    assert names(api.tenant().client) == []
    assert api.admin.get("/api/v1/accounts").status_code == 200


def test_nul_character_in_a_text_field_is_a_field_error(api: ApiServer) -> None:
    tenant = api.tenant()
    cases = [
        (sendgrid("nul\u0000name"), "name"),  # psycopg2: ValueError, a string literal cannot contain NUL
        (sendgrid(settings={"note": "a\u0000b"}), "settings.note"),  # jsonb: unsupported Unicode escape
        (_smtp_config(host="relay\u0000.example.com"), "smtp_config.host"),
    ]
    failures = [
        f"{field}: {problem}" for body, field in cases if (problem := field_error(post(tenant, body), field))
    ]
    assert not failures, "\n".join(failures)


def test_lone_surrogate_in_name_is_rejected(api: ApiServer) -> None:
    tenant = api.tenant()
    body = json.dumps(sendgrid("x")).replace('"x"', '"\\ud800"').encode()
    response = tenant.client.post(PROVIDERS, data=body, headers=JSON)
    assert response.status_code in (400, 422), response.text
    assert_error(
        response, response.status_code, "bad_request" if response.status_code == 400 else "invalid_fields"
    )
    assert names(tenant.client) == []


# --- request bodies -------------------------------------------------------------------------------------


def test_non_standard_json_constants_are_rejected(api: ApiServer) -> None:
    tenant = api.tenant()
    failures = []
    for constant in ("NaN", "Infinity", "-Infinity"):
        body = json.dumps(sendgrid("x", settings={"threshold": 0})).replace("0}", constant + "}")
        assert constant in body
        response = tenant.client.post(PROVIDERS, data=body, headers=JSON)
        if response.status_code not in (400, 422):
            failures.append(f"{constant}: {response.status_code} {response.text}")
    assert not failures, "\n".join(failures)
    assert names(tenant.client) == []


def test_deeply_nested_json_is_400(api: ApiServer) -> None:
    tenant = api.tenant()
    for body in ("[" * 30000 + "]" * 30000, '{"a":' * 10000 + "1" + "}" * 10000):
        assert len(body) < 64 * 1024
        assert_error(tenant.client.post(PROVIDERS, data=body, headers=JSON), 400, "bad_request")


def test_malformed_bodies_are_400(api: ApiServer) -> None:
    tenant = api.tenant()
    created = create(tenant.client, sendgrid())
    for data in (
        b"{",
        b'{"name": "x",}',
        b"",
        b"[]",
        b'[{"name": "x"}]',
        b'"sendgrid"',
        b"null",
        b"42",
        b"\xff\xfe",
    ):
        assert_error(tenant.client.post(PROVIDERS, data=data, headers=JSON), 400, "bad_request")
        assert_error(
            tenant.client.put(f"{PROVIDERS}/{created['id']}", data=data, headers=JSON), 400, "bad_request"
        )
    assert tenant.client.get(PROVIDERS).json()["items"] == [created]


def test_non_json_content_type_is_415(api: ApiServer) -> None:
    tenant = api.tenant()
    created = create(tenant.client, sendgrid())
    payload = json.dumps(sendgrid("other"))
    for headers in (
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {},
    ):
        response = tenant.client.post(PROVIDERS, data=payload, headers=headers)
        assert_error(response, 415, "unsupported_media_type")
    response = tenant.client.put(
        f"{PROVIDERS}/{created['id']}", data='{"enabled": false}', headers={"Content-Type": "text/plain"}
    )
    assert_error(response, 415, "unsupported_media_type")
    assert tenant.client.get(PROVIDERS).json()["items"] == [created]
    # Parameters of the media type are fine.
    with_charset = tenant.client.post(
        PROVIDERS, data=payload.encode(), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert with_charset.status_code == 201, with_charset.text
    assert names(tenant.client) == ["other", "sendgrid-main"]


def test_body_over_64_kib_is_413(served_api: ApiServer) -> None:
    api = served_api  # chunked bodies need real HTTP
    tenant = api.tenant()
    created = create(tenant.client, sendgrid())
    big = json.dumps(sendgrid("big", settings={"pad": "x" * (64 * 1024)}))
    assert len(big) > 64 * 1024
    assert_error(tenant.client.post(PROVIDERS, data=big, headers=JSON), 413, "payload_too_large")
    huge_update = json.dumps({"settings": {"pad": "y" * (70 * 1024)}})
    assert_error(
        tenant.client.put(f"{PROVIDERS}/{created['id']}", data=huge_update, headers=JSON),
        413,
        "payload_too_large",
    )
    # Chunked, without a Content-Length, the limit holds as well.
    chunks = (big[i : i + 8192].encode() for i in range(0, len(big), 8192))
    assert_error(tenant.client.post(PROVIDERS, data=chunks, headers=JSON), 413, "payload_too_large")
    assert tenant.client.get(PROVIDERS).json()["items"] == [created]
    # Just under the limit is accepted.
    small = json.dumps(sendgrid("small", settings={"pad": "z" * (60 * 1024)}))
    assert len(small) < 64 * 1024
    response = tenant.client.post(PROVIDERS, data=small, headers=JSON)
    assert response.status_code == 201, response.text[:200]
    assert names(tenant.client) == ["sendgrid-main", "small"]


def test_deleting_a_provider_audits_each_rule_it_takes_with_it(api: ApiServer) -> None:
    tenant = api.tenant()
    gone = create(tenant.client, sendgrid("gone"))
    keep = create(tenant.client, sendgrid("keep"))
    rules = [
        tenant.client.post(
            "/api/v1/routing-rules", json={"name": f"r{n}", "priority": n, "provider_id": provider["id"]}
        )
        for n, provider in enumerate([gone, gone, keep])
    ]
    assert [rule.status_code for rule in rules] == [201, 201, 201], [rule.text for rule in rules]
    assert tenant.client.delete(f"{PROVIDERS}/{gone['id']}").status_code == 204

    remaining = tenant.client.get("/api/v1/routing-rules").json()["items"]
    assert [rule["id"] for rule in remaining] == [rules[2].json()["id"]]
    entries = tenant.client.get("/api/v1/audit-log?limit=200").json()["items"]
    deleted = {(entry["entity"], entry["entity_id"]) for entry in entries if entry["action"] == "delete"}
    assert deleted == {
        ("provider", gone["id"]),
        ("routing_rule", rules[0].json()["id"]),
        ("routing_rule", rules[1].json()["id"]),
    }
