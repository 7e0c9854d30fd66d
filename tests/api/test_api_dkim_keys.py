"""/api/v1/dkim-keys: keys for the account's domains, the record to publish, a DNS check; no private key."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key
from sqlalchemy import select

from smtp_proxy import dkim
from smtp_proxy.api.dkim_keys import LOOKUP_EXTENSION
from smtp_proxy.db.models import AuditLog, DkimKey
from smtp_proxy.storage import dkim_keys
from tests.api import checks
from tests.api.conftest import ApiServer, Tenant

PEM_MARKERS = ("PRIVATE KEY", "-----BEGIN")


def domain_of(api: ApiServer, tenant: Tenant) -> str:
    return api.admin.get(f"/api/v1/accounts/{tenant.id}").json()["allowed_domains"][0]


@pytest.fixture
def dns(api: ApiServer) -> Iterator[dict[str, str]]:
    """The DNS as the verify endpoint sees it: name -> TXT text; a name set to "SERVFAIL" fails."""
    records: dict[str, str] = {}

    def lookup(name: str) -> str | None:
        found = records.get(name)
        if found == "SERVFAIL":
            raise dkim.DnsLookupError("SERVFAIL")
        return found

    assert api.app is not None
    api.app.extensions[LOOKUP_EXTENSION] = lookup
    yield records
    del api.app.extensions[LOOKUP_EXTENSION]


def private_keys(api: ApiServer, key_id: str) -> Callable[[], bytes]:
    def opened() -> bytes:
        with api.database.read() as session:
            row = session.get(DkimKey, uuid.UUID(key_id))
            assert row is not None
            (key,) = [k for k in dkim_keys.signing_keys(session, api.cipher, row.account_id)]
            return key.private_key

    return opened


def test_create_rsa_by_default_with_the_record_to_publish_and_no_private_key(api: ApiServer) -> None:
    tenant = api.tenant()
    domain = domain_of(api, tenant)
    response = tenant.client.post("/api/v1/dkim-keys", json={"domain": domain})
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["Location"] == f"/api/v1/dkim-keys/{body['id']}"
    assert body["algorithm"] == "rsa-sha256" and body["enabled"] is True and body["domain"] == domain
    assert body["selector"] == "sp" + datetime.now(UTC).strftime("%Y%m")
    record = body["dns_record"]
    assert record["type"] == "TXT" and record["name"] == f"{body['selector']}._domainkey.{domain}"
    match = re.fullmatch(r"v=DKIM1; k=rsa; p=([A-Za-z0-9+/=]+)", record["value"])
    assert match is not None
    assert load_der_public_key(base64.b64decode(match.group(1))).key_size == 2048  # type: ignore[union-attr]
    assert set(body) == {
        "id",
        "domain",
        "selector",
        "algorithm",
        "enabled",
        "dns_record",
        "created_at",
        "updated_at",
    }

    # The private key is stored sealed, and no response carries it.
    private = private_keys(api, body["id"])()
    with api.database.read() as session:
        blob = session.scalar(
            select(DkimKey.private_key_encrypted).where(DkimKey.id == uuid.UUID(body["id"]))
        )
    assert blob is not None and private not in blob and b"PRIVATE KEY" not in blob
    for reply in (
        response,
        tenant.client.get(f"/api/v1/dkim-keys/{body['id']}"),
        tenant.client.get("/api/v1/dkim-keys"),
    ):
        assert reply.status_code == 200 or reply.status_code == 201
        checks.assert_no_secret(reply, [private.decode(), *PEM_MARKERS])


def test_ed25519_on_request_and_a_chosen_selector(api: ApiServer) -> None:
    tenant = api.tenant()
    domain = domain_of(api, tenant)
    body = {"domain": domain.upper(), "selector": "Mail2026", "algorithm": "ed25519-sha256"}
    response = tenant.client.post("/api/v1/dkim-keys", json=body)
    assert response.status_code == 201, response.text
    key = response.json()
    assert (key["domain"], key["selector"], key["algorithm"]) == (domain, "mail2026", "ed25519-sha256")
    value = key["dns_record"]["value"]
    assert value.startswith("v=DKIM1; k=ed25519; p=") and len(base64.b64decode(value.split("p=")[1])) == 32
    private = private_keys(api, key["id"])()
    checks.assert_no_secret(response, [private.decode()])


def test_a_subdomain_of_a_wildcard_domain_is_allowed_a_foreign_domain_is_422(api: ApiServer) -> None:
    base = f"w{uuid.uuid4().hex[:10]}.example.org"
    tenant = api.tenant(allowed_domains=[f"*.{base}"])
    ok = tenant.client.post("/api/v1/dkim-keys", json={"domain": f"mail.{base}"})
    assert ok.status_code == 201, ok.text
    for domain in (base, "example.com", "not a domain"):
        refused = tenant.client.post("/api/v1/dkim-keys", json={"domain": domain})
        error = checks.assert_error(refused, 422, "invalid_fields")
        assert list(error["fields"]) == ["domain"], error


def test_bad_fields_are_422_naming_each(api: ApiServer) -> None:
    tenant = api.tenant()
    body = {
        "domain": domain_of(api, tenant),
        "selector": "-bad-",
        "algorithm": "rsa-1024",
        "private_key": "x",
    }
    error = checks.assert_error(tenant.client.post("/api/v1/dkim-keys", json=body), 422, "invalid_fields")
    assert set(error["fields"]) == {"selector", "algorithm", "private_key"}


def test_a_taken_selector_of_the_domain_is_409(api: ApiServer) -> None:
    tenant = api.tenant()
    body = {"domain": domain_of(api, tenant), "selector": "s1", "algorithm": "ed25519-sha256"}
    assert tenant.client.post("/api/v1/dkim-keys", json=body).status_code == 201
    checks.assert_error(tenant.client.post("/api/v1/dkim-keys", json=body), 409, "conflict")


def test_list_get_disable_enable_delete_with_audit_rows(api: ApiServer) -> None:
    tenant = api.tenant()
    domain = domain_of(api, tenant)
    created = [
        tenant.client.post(
            "/api/v1/dkim-keys", json={"domain": domain, "selector": s, "algorithm": "ed25519-sha256"}
        ).json()
        for s in ("b", "a")
    ]
    listed = tenant.client.get("/api/v1/dkim-keys").json()["items"]
    assert [k["selector"] for k in listed] == ["a", "b"]
    key_id = created[0]["id"]
    path = f"/api/v1/dkim-keys/{key_id}"
    assert tenant.client.get(path).json() == created[0]
    off = tenant.client.request("PATCH", path, json={"enabled": False})
    assert off.status_code == 200 and off.json()["enabled"] is False
    assert tenant.client.get(path).json()["enabled"] is False
    assert tenant.client.request("PATCH", path, json={"enabled": True}).json()["enabled"] is True
    checks.assert_error(tenant.client.request("PATCH", path, json={}), 422, "invalid_fields")
    assert tenant.client.delete(path).status_code == 204
    checks.assert_error(tenant.client.get(path), 404, "not_found")
    with api.database.read() as session:
        rows = session.scalars(select(AuditLog).where(AuditLog.entity_id == uuid.UUID(key_id))).all()
        actions = sorted((row.action, tuple(row.changes["fields"])) for row in rows)
    assert actions == [
        ("create", ("algorithm", "domain", "enabled", "selector")),
        ("delete", ()),
        ("update", ("enabled",)),
        ("update", ("enabled",)),
    ]


def test_another_tenants_key_is_404_everywhere(api: ApiServer) -> None:
    owner, other = api.tenant(), api.tenant()
    body = {"domain": domain_of(api, owner), "algorithm": "ed25519-sha256"}
    key_id = owner.client.post("/api/v1/dkim-keys", json=body).json()["id"]
    path = f"/api/v1/dkim-keys/{key_id}"
    checks.assert_error(other.client.get(path), 404, "not_found")
    checks.assert_error(other.client.request("PATCH", path, json={"enabled": False}), 404, "not_found")
    checks.assert_error(other.client.post(path + "/verify"), 404, "not_found")
    checks.assert_error(other.client.delete(path), 404, "not_found")
    assert other.client.get("/api/v1/dkim-keys").json() == {"items": []}
    assert owner.client.get(path).json()["enabled"] is True


def test_verify_reports_missing_published_and_matching_records(api: ApiServer, dns: dict[str, str]) -> None:
    tenant = api.tenant()
    body = {"domain": domain_of(api, tenant), "algorithm": "ed25519-sha256"}
    key = tenant.client.post("/api/v1/dkim-keys", json=body).json()
    record = key["dns_record"]
    path = f"/api/v1/dkim-keys/{key['id']}/verify"

    missing = tenant.client.post(path).json()
    assert missing == {"published": False, "matches": False, "found": None, "dns_record": record}

    stale = "v=DKIM1; k=ed25519; p=" + base64.b64encode(b"\x01" * 32).decode()
    dns[record["name"]] = stale
    assert tenant.client.post(path).json() == {
        "published": True,
        "matches": False,
        "found": stale,
        "dns_record": record,
    }

    # As published, folded by the DNS host's interface (spaces inside p=) it still matches.
    value = record["value"]
    dns[record["name"]] = value[:30] + " " + value[30:]
    result = tenant.client.post(path).json()
    assert (result["published"], result["matches"]) == (True, True)

    dns[record["name"]] = "SERVFAIL"
    checks.assert_error(tenant.client.post(path), 502, "dns_unavailable")


def test_the_openapi_document_lists_the_dkim_operations(api: ApiServer) -> None:
    paths = api.admin.get("/api/v1/openapi.json").json()["paths"]
    assert set(paths["/dkim-keys"]) == {"get", "post"}
    assert set(paths["/dkim-keys/{id}"]) == {"parameters", "get", "patch", "delete"}
    assert set(paths["/dkim-keys/{id}/verify"]) == {"parameters", "post"}
