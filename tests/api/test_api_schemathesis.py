"""Property-based run of schemathesis 3.x over the live server's own OpenAPI document (waitress).

For every documented operation, with a tenant key and then the admin key,
schemathesis generates requests from the schema and checks that no response
is a server error and that every response matches the schema of its status.
Runs are bounded and derandomized so that a failure reproduces.
"""

from __future__ import annotations

import gc
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, given, settings
from schemathesis import experimental
from schemathesis.checks import not_a_server_error
from schemathesis.models import APIOperation, Case
from schemathesis.specs.openapi.checks import response_schema_conformance

from smtp_proxy.db.models import DeliveryLog, DeliveryStatus, Message
from smtp_proxy.storage.messages import enqueue_message
from tests.api.conftest import ApiServer, Client

if TYPE_CHECKING:  # importing it loads jsonschema's deprecated RefResolver at collection time
    from schemathesis.specs.openapi.schemas import BaseOpenAPISchema

# schemathesis 3.x resolves references with jsonschema's deprecated RefResolver.
pytestmark = pytest.mark.filterwarnings("ignore:jsonschema.RefResolver is deprecated:DeprecationWarning")

MAX_EXAMPLES = 15  # per operation and run; assert_meaningful checks that every operation was reached
CHECKS = (not_a_server_error, response_schema_conformance)


@pytest.fixture(autouse=True)
def _openapi_31() -> Iterator[None]:
    """Response validation of an OpenAPI 3.1 document is an opt-in feature of schemathesis 3.x."""
    was_enabled = experimental.OPEN_API_3_1.is_enabled
    experimental.OPEN_API_3_1.enable()
    yield
    if not was_enabled:
        experimental.OPEN_API_3_1.disable()


@dataclass
class Seeded:
    """Rows of one account that generated requests can point at."""

    provider_id: str
    rule_id: str
    message_id: str
    credential_id: str


def seed(api: ApiServer, client: Client, account_id: str) -> Seeded:
    """A provider, a rule, an SMTP credential, messages it sent with delivery attempts: lists then
    have items to validate."""
    provider = client.post(
        "/api/v1/providers", json={"name": "seeded", "provider_type": "sendgrid", "api_key": "SG.key"}
    )
    assert provider.status_code == 201, provider.text
    provider_id = provider.json()["id"]
    rule = client.post(
        "/api/v1/routing-rules",
        json={"name": "all", "provider_id": provider_id, "priority": 1, "conditions": {"weight": 50}},
    )
    assert rule.status_code == 201, rule.text
    credential = client.post(
        f"/api/v1/accounts/{account_id}/smtp-credentials", json={"label": "seeded", "allowed_ips": ["::1"]}
    )
    assert credential.status_code == 201, credential.text
    credential_id = credential.json()["id"]
    start = datetime(2024, 5, 1, tzinfo=UTC)
    with api.database.transaction() as session:
        for n in range(5):
            queued = enqueue_message(
                session,
                api.cipher,
                account_id=uuid.UUID(account_id),
                sender="sender@example.com",
                recipients=["rcpt@example.net"],
                data=f"From: sender@example.com\r\nSubject: seeded {n}\r\n\r\nbody {n}".encode(),
                correlation_id=f"seed-{n}",
                credential_id=uuid.UUID(credential_id) if n % 2 else None,
            )
            row = session.get(Message, queued.id)
            assert row is not None
            row.created_at = start + timedelta(hours=n)
            session.add(
                DeliveryLog(
                    message_id=queued.id,
                    provider_id=uuid.UUID(provider_id),
                    status=DeliveryStatus.DEFERRED,
                    response_code=451,
                    response_text="try later",
                    created_at=start + timedelta(hours=n, minutes=1),
                )
            )
    return Seeded(provider_id, rule.json()["id"], str(queued.id), credential_id)


def load_schema(api: ApiServer) -> BaseOpenAPISchema:
    return schemathesis.from_uri(
        f"{api.base_url}/api/v1/openapi.json",
        base_url=f"{api.base_url}/api/v1",
        validate_schema=True,  # the document itself must be valid OpenAPI 3.1
    )


def pointing_at(parameters: dict[str, str], provider_id: str) -> Callable[[Case], Case]:
    """Aim a generated case at a row that exists (and at an own provider in a rule's body)."""

    def aim(case: Case) -> Case:
        if parameters:
            case.path_parameters = {**(case.path_parameters or {}), **parameters}
        if isinstance(case.body, dict) and "provider_id" in case.body:
            case.body = {**case.body, "provider_id": provider_id}
        return case

    return aim


def exercise(
    operation: APIOperation,
    session: requests.Session,
    headers: dict[str, str],
    aim: Callable[[Case], Case] | None = None,
) -> set[int]:
    """Bounded, derandomized examples of one operation; the statuses seen. Raises on a failed check."""
    seen: set[int] = set()
    strategy = operation.as_strategy()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(case=strategy.map(aim) if aim else strategy)
    def run(case: Case) -> None:
        response = case.call_and_validate(session=session, headers=headers, checks=CHECKS)
        seen.add(response.status_code)

    run()
    return seen


def describe(failure: BaseException) -> str:
    """The failure and whatever it wraps (Hypothesis groups the checks that failed)."""
    parts = [f"{type(failure).__name__}: {failure}"]
    parts += [describe(inner) for inner in getattr(failure, "exceptions", ())]
    return "\n".join(parts)


def fuzz(
    api: ApiServer, api_key: str, existing: dict[str, dict[str, str]], provider_id: str
) -> tuple[dict[str, set[int]], list[str]]:
    """Run every operation, then again aimed at existing rows; statuses seen and failures.

    ``existing`` maps an operation ("PUT /providers/{id}") to the path parameters of a
    row it may act on; each such operation gets a second run against that row.
    """
    schema = load_schema(api)
    headers = {"Authorization": f"Bearer {api_key}"}
    statuses: dict[str, set[int]] = {}
    failures: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            name = f"{operation.method.upper()} {operation.path}"
            runs: list[tuple[str, Callable[[Case], Case] | None]] = [(name, None)]
            if name in existing:
                runs.append((f"{name} existing", pointing_at(existing[name], provider_id)))
            for label, aim in runs:
                try:
                    statuses[label] = exercise(operation, session, headers, aim)
                except Exception as failure:  # one report per run, then go on with the others
                    failures.append(f"{label}: {describe(failure)}")
    return statuses, failures


def targets(seeded: Seeded, account_id: str) -> dict[str, dict[str, str]]:
    """Operations to aim at existing rows, and their path parameters. Never DELETE (later runs
    need the rows) nor the caller's own rotate-key (the run would lose its key); {} keeps random
    ids. ``seeded.credential_id`` is one of ``account_id``'s credentials."""
    account = {"id": account_id}
    credential = {**account, "credential_id": seeded.credential_id}
    return {
        "GET /accounts/{id}": account,
        "GET /accounts/{id}/usage": account,
        "PUT /accounts/{id}": account,
        "GET /accounts/{id}/smtp-credentials": account,
        "POST /accounts/{id}/smtp-credentials": account,
        "GET /accounts/{id}/smtp-credentials/{credential_id}": credential,
        "PATCH /accounts/{id}/smtp-credentials/{credential_id}": credential,
        "GET /providers/{id}": {"id": seeded.provider_id},
        "PUT /providers/{id}": {"id": seeded.provider_id},
        "POST /routing-rules": {},
        "GET /routing-rules/{id}": {"id": seeded.rule_id},
        "PUT /routing-rules/{id}": {"id": seeded.rule_id},
        "GET /messages/{id}": {"id": seeded.message_id},
    }


def assert_meaningful(statuses: dict[str, set[int]], existing: dict[str, dict[str, str]]) -> None:
    """The run reached every operation, past authentication, listed real rows, found existing ones."""
    assert len(statuses) == 43 + len(existing), sorted(statuses)
    for name, seen in statuses.items():
        assert 401 not in seen, (name, seen)
        assert all(status < 500 for status in seen), (name, seen)
    for name in ("GET /accounts", "GET /providers", "GET /routing-rules", "GET /messages", "GET /audit-log"):
        assert 200 in statuses[name], (name, statuses[name])
    for name in existing:
        if name.startswith("GET"):
            assert statuses[f"{name} existing"] == {200}, (name, statuses[f"{name} existing"])
        else:  # found the row: accepted, or refused for what the generated body says
            assert 404 not in statuses[f"{name} existing"], (name, statuses[f"{name} existing"])


def test_every_operation_with_a_tenant_key(served_api: ApiServer) -> None:
    api = served_api
    tenant = api.tenant()
    seeded = seed(api, tenant.client, tenant.id)
    existing = targets(seeded, tenant.id)
    started = time.monotonic()
    statuses, failures = fuzz(api, tenant.api_key, existing, seeded.provider_id)
    assert not failures, "\n\n".join(failures)
    assert_meaningful(statuses, existing)
    assert statuses["POST /accounts"] == {403}  # a tenant may not create accounts
    assert 200 in statuses["PUT /providers/{id} existing"]
    assert 201 in statuses["POST /providers"]
    assert 201 in statuses["POST /accounts/{id}/smtp-credentials existing"]
    assert 200 in statuses["PATCH /accounts/{id}/smtp-credentials/{credential_id} existing"]
    assert time.monotonic() - started < 90


def test_every_operation_with_the_admin_key(served_api: ApiServer) -> None:
    api = served_api
    seeded = seed(api, api.admin, api.admin_id)
    other = api.tenant()  # the admin acts on another account, never on its own key
    theirs = api.admin.post(f"/api/v1/accounts/{other.id}/smtp-credentials", json={"label": "theirs"})
    assert theirs.status_code == 201, theirs.text
    existing = {
        **targets(replace(seeded, credential_id=theirs.json()["id"]), other.id),
        "POST /accounts/{id}/rotate-key": {"id": other.id},
        "DELETE /accounts/{id}": {"id": other.id},
    }
    started = time.monotonic()
    statuses, failures = fuzz(api, api.admin.api_key or "", existing, seeded.provider_id)
    assert not failures, "\n\n".join(failures)
    assert_meaningful(statuses, existing)
    assert time.monotonic() - started < 90


# --- what the run found --------------------------------------------------------------------------


def test_text_the_database_cannot_hold_is_422_naming_the_field(api: ApiServer) -> None:
    """Found by the runs above: U+0000 in a settings key of POST /providers was a 500 (PostgreSQL
    refuses NUL in text and JSONB; a lone surrogate cannot be encoded). Pinned case by case."""
    tenant = api.tenant()
    provider_id = seed(api, tenant.client, tenant.id).provider_id
    sendgrid = {"provider_type": "sendgrid", "api_key": "SG.key"}
    smtp = {"provider_type": "smtp", "smtp_config": {"host": "h\u0000", "port": 25, "tls": "none"}}
    header = {"headers": [{"name": "X-Tag", "contains": "\u0000"}]}
    cases: list[tuple[str, str, dict[str, object], str]] = [
        ("POST", "/api/v1/providers", {"name": "p\u0000", **sendgrid}, "name"),
        ("POST", "/api/v1/providers", {"name": "p\ud800", **sendgrid}, "name"),
        ("POST", "/api/v1/providers", {"name": "p1", **sendgrid, "settings": {"\u0000": 1}}, "settings"),
        (
            "POST",
            "/api/v1/providers",
            {"name": "p2", **sendgrid, "settings": {"x": "a\u0000b"}},
            "settings.x",
        ),
        ("POST", "/api/v1/providers", {"name": "p3", **smtp}, "smtp_config.host"),
        ("PUT", f"/api/v1/providers/{provider_id}", {"settings": {"k": "\u0000"}}, "settings.k"),
        (
            "POST",
            "/api/v1/routing-rules",
            {"name": "r\u0000", "provider_id": provider_id, "priority": 1},
            "name",
        ),
        (
            "POST",
            "/api/v1/routing-rules",
            {"name": "r1", "provider_id": provider_id, "priority": 1, "conditions": header},
            "conditions.headers.0.contains",
        ),
        ("PUT", f"/api/v1/accounts/{tenant.id}", {"password": "\ud800" * 12}, "password"),
    ]
    for method, path, body, field in cases:
        response = tenant.client.request(
            method, path, data=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (method, path, body, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_fields"
        assert set(error["fields"]) == {field}, (body, error)
    # Nothing of it was stored.
    assert [p["id"] for p in tenant.client.get("/api/v1/providers").json()["items"]] == [provider_id]
    assert len(tenant.client.get("/api/v1/routing-rules").json()["items"]) == 1


def test_the_conformance_check_catches_a_mismatch(served_api: ApiServer) -> None:
    """Guards the runs above against passing vacuously: a document that demands a field the
    API never sends must make response_schema_conformance fail."""
    api = served_api
    tenant = api.tenant()
    seed(api, tenant.client, tenant.id)
    document = requests.get(f"{api.base_url}/api/v1/openapi.json", timeout=10).json()
    message = document["components"]["schemas"]["Message"]
    message["required"] = [*message["required"], "not_sent_by_the_api"]
    schema = schemathesis.from_dict(document, base_url=f"{api.base_url}/api/v1")
    operation = schema["/messages"]["GET"]
    with requests.Session() as session, pytest.raises(Exception, match="not_sent_by_the_api"):
        exercise(operation, session, {"Authorization": f"Bearer {tenant.api_key}"})
    # Hypothesis keeps the failing example's response, and with it a connection the session's
    # pool gave up, for its report: close every client connection still open.
    for connection in gc.get_objects():
        if isinstance(connection, urllib3.connection.HTTPConnection):
            connection.close()
