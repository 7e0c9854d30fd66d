"""The API's error contract over real HTTP: stable JSON errors, headers, limits, outages, probes.

Every error body is checked for leaks (tracebacks, driver names, SQL, file paths).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from smtp_proxy.api import create_app
from tests.api import checks
from tests.api.conftest import ApiServer, Client
from tests.conftest import wait_until_accepting

LEAKS = re.compile(
    r"Traceback|sqlalchemy|psycopg2|SELECT|site-packages|\.py\b|/work/|/usr/|/tmp/|File \"", re.IGNORECASE
)
SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_BODY = 64 * 1024


def assert_error(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    """The shared error checks, plus: the exact content type, a safe request id, no internals in any case
    (``LEAKS``), and no keys in the error beyond code, message and fields."""
    error = checks.assert_error(response, status, code)
    assert response.headers["Content-Type"] == "application/json", response.headers
    assert SAFE_ID.fullmatch(response.headers["X-Request-ID"])
    assert_no_leak(response)
    assert set(error) <= {"code", "message", "fields"}
    return error


def assert_no_leak(response: requests.Response) -> None:
    found = LEAKS.search(response.text)
    assert found is None, f"error body leaks {found.group(0)!r}: {response.text}"


def positive_seconds(value: str | None) -> int:
    assert value is not None and value.isascii() and value.isdigit(), value
    assert 1 <= int(value) <= 3600, value
    return int(value)


# --- 404, 405, 401 -------------------------------------------------------------------------------


def test_an_unknown_path_is_a_json_404(api: ApiServer) -> None:
    tenant = api.tenant()
    paths = [
        "/nope",
        "/api",
        "/api/v1",
        "/api/v1/",
        "/api/v1/nope",
        "/api/v2/accounts",
        "/api/v1/messages/x/y",
        "/api/v1/accounts/" + str(uuid.uuid4()) + "/nope",
        "/api/v1/providers/not-a-uuid",
        "/api/v1/routing-rules/%00",
        "/healthz/extra",
    ]
    for path in paths:
        for client in (tenant.client, api.client(None)):
            error = assert_error(client.get(path), 404, "not_found")
            assert "fields" not in error, path


def test_a_wrong_method_is_a_405_with_allow(api: ApiServer) -> None:
    tenant = api.tenant()
    some_id = uuid.uuid4()
    cases = [
        ("DELETE", "/api/v1/messages", {"GET"}),
        ("POST", f"/api/v1/messages/{some_id}", {"GET"}),
        ("PUT", "/api/v1/accounts", {"GET", "POST"}),
        ("PATCH", f"/api/v1/providers/{some_id}", {"GET", "PUT", "DELETE"}),
        ("GET", f"/api/v1/accounts/{some_id}/rotate-key", {"POST"}),
        ("POST", "/api/v1/audit-log", {"GET"}),
        ("POST", "/api/v1/openapi.json", {"GET"}),
        ("POST", "/healthz", {"GET"}),
        ("DELETE", "/readyz", {"GET"}),
    ]
    for method, path, allowed in cases:
        for client in (tenant.client, api.client(None)):
            response = client.request(method, path)
            assert_error(response, 405, "method_not_allowed")
            allow = {m.strip() for m in response.headers["Allow"].split(",")}
            assert allowed <= allow, (method, path, allow)
            assert method not in allow, (method, path, allow)


def test_a_missing_or_bad_key_is_401_with_www_authenticate(api: ApiServer) -> None:
    tenant = api.tenant()
    offers: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer    "},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Bearer {tenant.api_key}x"},
        {"Authorization": f"Token {tenant.api_key}"},
        {"Authorization": f"Basic {tenant.api_key}"},
        {"Authorization": tenant.api_key},
        {"Authorization": "Bearer " + "k" * 300},
        {"Authorization": "Bearer \u00e9\u00e9\u00e9"},
        {"Authorization": "Bearer ' OR '1'='1"},
    ]
    anonymous = api.client(None)
    for headers in offers:
        for path in ("/api/v1/accounts", "/api/v1/messages", f"/api/v1/accounts/{tenant.id}"):
            response = anonymous.get(path, headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), headers
            assert tenant.api_key not in response.text
    # A write without a key is refused before its body is even looked at.
    response = anonymous.post("/api/v1/providers", data=b"{", headers={"Content-Type": "text/plain"})
    assert_error(response, 401, "unauthorized")
    # And the key itself works, with the scheme in any case.
    assert anonymous.get("/api/v1/accounts", headers={"Authorization": f"bearer {tenant.api_key}"}).ok


# --- bodies: 413, 415, 400 -----------------------------------------------------------------------


def padded_account(size: int) -> bytes:
    """A JSON account body of exactly ``size`` bytes (the e-mail carries the padding)."""
    name = f"big-{uuid.uuid4().hex[:8]}"
    empty = json.dumps({"name": name, "email": "", "allowed_domains": ["example.com"]}).encode()
    body = json.dumps({"name": name, "email": "e" * (size - len(empty)), "allowed_domains": ["example.com"]})
    assert len(body.encode()) == size
    return body.encode()


def account_names(api: ApiServer) -> set[str]:
    response = api.admin.get("/api/v1/accounts")
    assert response.status_code == 200, response.text
    return {item["name"] for item in response.json()["items"]}


def test_a_body_over_64_kib_is_413(served_api: ApiServer) -> None:
    api = served_api  # chunked bodies need real HTTP
    tenant = api.tenant()
    before = account_names(api)
    json_type = {"Content-Type": "application/json"}

    over = api.admin.post("/api/v1/accounts", data=padded_account(MAX_BODY + 1), headers=json_type)
    error = assert_error(over, 413, "payload_too_large")
    # The limit, in bytes and in the unit a person reads.
    assert error["message"] == "the request body is too large: the limit is 65536 bytes (64 KiB)"
    huge = api.admin.post("/api/v1/accounts", data=padded_account(4 * MAX_BODY), headers=json_type)
    assert_error(huge, 413, "payload_too_large")
    # Without a Content-Length (chunked), the limit holds all the same.
    chunks = (b" " * 1024 for _ in range(MAX_BODY // 1024 + 1))
    chunked = api.admin.post("/api/v1/accounts", data=chunks, headers=json_type)
    assert "65536 bytes (64 KiB)" in assert_error(chunked, 413, "payload_too_large")["message"]
    provider = tenant.client.post("/api/v1/providers", data=b"{" + b" " * MAX_BODY + b"}", headers=json_type)
    assert_error(provider, 413, "payload_too_large")

    # Exactly 64 KiB is read and validated: the e-mail is too long (422), not too large (413).
    at_limit = api.admin.post("/api/v1/accounts", data=padded_account(MAX_BODY), headers=json_type)
    error = assert_error(at_limit, 422, "invalid_fields")
    assert set(error["fields"]) == {"email"}
    assert account_names(api) == before


def test_a_body_that_is_not_json_is_415(api: ApiServer) -> None:
    tenant = api.tenant()
    good = json.dumps({"name": "p1", "provider_type": "sendgrid", "api_key": "SG.x"})
    offers: list[dict[str, Any]] = [
        {"data": good, "headers": {"Content-Type": "text/plain"}},
        {"data": good.encode()},  # no Content-Type at all
        {"data": {"name": "p1", "provider_type": "sendgrid", "api_key": "SG.x"}},  # a form
        {"data": good, "headers": {"Content-Type": "application/xml"}},
        {"data": good, "headers": {"Content-Type": "application/jsonx"}},
        {"files": {"file": ("p.json", good)}},
    ]
    for kwargs in offers:
        for method, path in (("POST", "/api/v1/providers"), ("PUT", f"/api/v1/accounts/{tenant.id}")):
            response = tenant.client.request(method, path, **kwargs)
            assert_error(response, 415, "unsupported_media_type")
    assert tenant.client.get("/api/v1/providers").json()["items"] == []
    # A charset parameter is still JSON.
    response = tenant.client.post(
        "/api/v1/providers", data=good, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 201, response.text


def test_malformed_json_and_non_objects_are_400(api: ApiServer) -> None:
    tenant = api.tenant()
    bodies = [
        b"",
        b"{",
        b'{"name": "p1",}',
        b"{'name': 'p1'}",
        b'{"name": "p1"} trailing',
        b"\xff\xfe\x00{",
        b"NaN-ish",
        b"[]",
        b'[{"name": "p1"}]',
        b'"a string"',
        b"42",
        b"true",
        b"null",
    ]
    json_type = {"Content-Type": "application/json"}
    for body in bodies:
        for client, method, path in (
            (tenant.client, "POST", "/api/v1/providers"),
            (tenant.client, "PUT", f"/api/v1/accounts/{tenant.id}"),
            (api.admin, "POST", "/api/v1/accounts"),
        ):
            response = client.request(method, path, data=body, headers=json_type)
            error = assert_error(response, 400, "bad_request")
            assert "fields" not in error, body
    assert tenant.client.get("/api/v1/providers").json()["items"] == []


# --- 429 -----------------------------------------------------------------------------------------


def test_the_rate_limit_is_per_key_with_retry_after(start_api: Callable[..., ApiServer]) -> None:
    limited = start_api(rate_limit="3/minute")
    alice, bob = limited.tenant(), limited.tenant()
    for _ in range(3):
        assert alice.client.get("/api/v1/providers").status_code == 200
    refused = alice.client.get("/api/v1/providers")
    assert_error(refused, 429, "rate_limited")
    positive_seconds(refused.headers.get("Retry-After"))
    # Any endpoint, any method: the key's budget is spent.
    assert_error(alice.client.get("/api/v1/messages"), 429, "rate_limited")
    assert_error(alice.client.post("/api/v1/providers", json={}), 429, "rate_limited")

    # Another key is still served, and so are the probes.
    assert bob.client.get("/api/v1/providers").status_code == 200
    for _ in range(5):
        assert alice.client.get("/healthz").status_code == 200
    # Successful responses carry no Retry-After.
    assert "Retry-After" not in bob.client.get("/api/v1/providers").headers


# --- 503 -----------------------------------------------------------------------------------------


def test_a_database_outage_is_503_and_the_api_recovers(served_api: ApiServer, postgresql_server: Any) -> None:
    api = served_api  # its own database and connections, which the outage breaks
    cached = api.tenant()
    uncached = api.tenant()  # its key was never used: the outage hits its lookup
    assert cached.client.get("/api/v1/providers").status_code == 200  # the principal is now cached
    anonymous = api.client(None)
    assert anonymous.get("/readyz").status_code == 200

    stopped = True
    postgresql_server.stop()
    try:
        for response in (
            cached.client.get("/api/v1/providers"),  # past auth (cached key), fails on the query
            cached.client.get("/api/v1/messages"),
            cached.client.post(
                "/api/v1/providers", json={"name": "p", "provider_type": "sendgrid", "api_key": "k"}
            ),
            uncached.client.get("/api/v1/providers"),  # the key lookup itself fails: 503, not 401
        ):
            assert_error(response, 503, "database_unavailable")
            positive_seconds(response.headers.get("Retry-After"))

        ready = anonymous.get("/readyz")
        assert_error(ready, 503, "database_unavailable")
        positive_seconds(ready.headers.get("Retry-After"))
        # The process itself is alive, and the document needs no database.
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/api/v1/openapi.json").status_code == 200

        postgresql_server.start()
        wait_until_accepting(postgresql_server)
        stopped = False

        assert anonymous.get("/readyz").json() == {"status": "ready", "database": "ok", "schema": "current"}
        assert cached.client.get("/api/v1/providers").status_code == 200
        assert uncached.client.get("/api/v1/providers").status_code == 200
        created = cached.client.post(
            "/api/v1/providers", json={"name": "after", "provider_type": "sendgrid", "api_key": "k"}
        )
        assert created.status_code == 201, created.text
    finally:
        if stopped or not postgresql_server.running():
            postgresql_server.start()
            wait_until_accepting(postgresql_server)
    # Nothing from the outage was half-stored.
    names = [item["name"] for item in cached.client.get("/api/v1/providers").json()["items"]]
    assert names == ["after"]


# --- request ids ---------------------------------------------------------------------------------


def test_a_safe_request_id_is_echoed_and_an_unsafe_one_replaced(api: ApiServer) -> None:
    tenant = api.tenant()
    calls: list[tuple[Client, str]] = [
        (tenant.client, "/api/v1/providers"),  # 200
        (tenant.client, "/api/v1/nope"),  # 404
        (api.client(None), "/api/v1/accounts"),  # 401
        (tenant.client, "/api/v1/messages?limit=0"),  # 422
        (api.client(None), "/healthz"),
    ]
    for offered in ("req-123_abc.DEF", "a", "Z" * 64, "0123456789abcdef0123456789abcdef"):
        for client, path in calls:
            response = client.get(path, headers={"X-Request-ID": offered})
            assert response.headers["X-Request-ID"] == offered, (offered, path)

    unsafe = [
        "has space",
        "x" * 200,
        "y" * 65,
        "semi;colon",
        "a/b",
        "<script>",
        "\u00e9t\u00e9",
        "a\tb",
        "'--",
    ]
    for offered in unsafe:
        for client, path in calls:
            first = client.get(path, headers={"X-Request-ID": offered}).headers["X-Request-ID"]
            second = client.get(path, headers={"X-Request-ID": offered}).headers["X-Request-ID"]
            assert SAFE_ID.fullmatch(first), (offered, first)
            assert offered not in first
            assert first != second  # a fresh id each time, not a fixed placeholder

    fresh = {api.client(None).get("/healthz").headers["X-Request-ID"] for _ in range(5)}
    assert len(fresh) == 5 and all(SAFE_ID.fullmatch(value) for value in fresh)


# --- metrics -------------------------------------------------------------------------------------


def request_totals(client: Client) -> dict[tuple[str, str], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "flask_http_request_total":
                totals[(sample.labels["method"], sample.labels["status"])] = sample.value
    return totals


def test_metrics_count_requests_by_status(api: ApiServer) -> None:
    tenant = api.tenant()
    anonymous = api.client(None)
    before = request_totals(anonymous)
    for _ in range(3):
        assert tenant.client.get("/api/v1/nope").status_code == 404
    for _ in range(2):
        assert anonymous.get("/api/v1/providers").status_code == 401
    assert tenant.client.get("/api/v1/messages", params={"limit": "0"}).status_code == 422
    assert tenant.client.delete("/api/v1/messages").status_code == 405
    assert tenant.client.get("/api/v1/providers").status_code == 200

    after = request_totals(anonymous)
    grew = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    assert grew[("GET", "404")] == 3
    assert grew[("GET", "401")] == 2
    assert grew[("GET", "422")] == 1
    assert grew[("DELETE", "405")] == 1
    assert grew[("GET", "200")] == 1  # the listing; scrapes of /metrics are not counted


# --- the OpenAPI document ------------------------------------------------------------------------

EXPECTED_OPERATIONS = {
    ("/accounts", "get"),
    ("/accounts", "post"),
    ("/accounts/{id}", "get"),
    ("/accounts/{id}", "put"),
    ("/accounts/{id}", "delete"),
    ("/accounts/{id}/rotate-key", "post"),
    ("/accounts/{id}/usage", "get"),
    ("/accounts/{id}/smtp-credentials", "get"),
    ("/accounts/{id}/smtp-credentials", "post"),
    ("/accounts/{id}/smtp-credentials/{credential_id}", "get"),
    ("/accounts/{id}/smtp-credentials/{credential_id}", "patch"),
    ("/accounts/{id}/smtp-credentials/{credential_id}", "delete"),
    ("/providers", "get"),
    ("/providers", "post"),
    ("/providers/{id}", "get"),
    ("/providers/{id}", "put"),
    ("/providers/{id}", "delete"),
    ("/routing-rules", "get"),
    ("/routing-rules", "post"),
    ("/routing-rules/{id}", "get"),
    ("/routing-rules/{id}", "put"),
    ("/routing-rules/{id}", "delete"),
    ("/messages", "get"),
    ("/messages/{id}", "get"),
    ("/suppressions", "get"),
    ("/suppressions", "post"),
    ("/suppressions/{id}", "get"),
    ("/suppressions/{id}", "delete"),
    ("/dkim-keys", "get"),
    ("/dkim-keys", "post"),
    ("/dkim-keys/{id}", "get"),
    ("/dkim-keys/{id}", "patch"),
    ("/dkim-keys/{id}", "delete"),
    ("/dkim-keys/{id}/verify", "post"),
    ("/webhooks", "get"),
    ("/webhooks", "post"),
    ("/webhooks/{id}", "get"),
    ("/webhooks/{id}", "patch"),
    ("/webhooks/{id}", "delete"),
    ("/webhooks/{id}/rotate-secret", "post"),
    ("/webhooks/{id}/deliveries", "get"),
    ("/webhooks/{id}/deliveries/{event_id}/redeliver", "post"),
    ("/audit-log", "get"),
}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
BODILESS_ACTIONS = {"rotate-key", "verify", "rotate-secret", "redeliver"}


def _document_parameter(match: re.Match[str]) -> str:
    name = match.group(1)
    return f"{{{name}}}" if name in ("credential_id", "event_id") else "{id}"


def served_operations(api: ApiServer) -> set[tuple[str, str]]:
    """Every (path, method) the app routes under /api/v1 but the document itself."""
    app = create_app(api.config, api.database)
    found: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.endpoint == "v1.openapi_json":
            continue
        # The document names a resource's own id {id}; a nested one keeps its name ({credential_id}).
        path = re.sub(r"<(?:\w+:)?(\w+)>", _document_parameter, rule.rule.removeprefix("/api/v1"))
        found |= {(path, method.lower()) for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    return found


def refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "$ref":
                yield inner
            else:
                yield from refs(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from refs(inner)


def test_the_openapi_document_is_public_and_complete(api: ApiServer) -> None:
    for client in (api.client(None), api.client("not-a-key"), api.admin):
        response = client.get("/api/v1/openapi.json")
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/json"
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] and document["info"]["version"]
    assert document["servers"] == [{"url": "/api/v1"}]
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}

    documented = {
        (path, method) for path, item in document["paths"].items() for method in item if method in METHODS
    }
    assert documented == EXPECTED_OPERATIONS
    assert served_operations(api) == EXPECTED_OPERATIONS  # the app serves nothing undocumented

    schemas = document["components"]["schemas"]
    for ref in refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            codes = set(operation["responses"])
            assert {"401", "429", "503"} <= codes, (path, method)
            assert any(code.startswith("2") for code in codes), (path, method)
            if "{id}" in path:
                assert "404" in codes, (path, method)
            # Actions on a resource take no body (rotate-key, verify); every other write takes one.
            if method in ("post", "put", "patch") and path.rsplit("/", 1)[1] not in BODILESS_ACTIONS:
                assert {"400", "413", "415", "422"} <= codes, (path, method)
                assert operation["requestBody"]["required"] is True


def test_no_error_leaks_internals(api: ApiServer) -> None:
    """A sweep over every kind of error the API gives, for leaks and the JSON shape."""
    tenant = api.tenant()
    json_type = {"Content-Type": "application/json"}
    injection = "'; SELECT * FROM accounts; --"
    cases: list[tuple[requests.Response, int, str]] = [
        (tenant.client.get(f"/api/v1/providers/{uuid.uuid4()}"), 404, "not_found"),
        (tenant.client.get("/api/v1/accounts/" + api.admin_id), 404, "not_found"),
        (tenant.client.post("/api/v1/accounts", json={"name": "x"}), 403, "forbidden"),
        (tenant.client.post("/api/v1/providers", data=b"{", headers=json_type), 400, "bad_request"),
        (
            tenant.client.post("/api/v1/providers", json={"name": injection, "provider_type": injection}),
            422,
            "invalid_fields",
        ),
        (tenant.client.get("/api/v1/messages", params={"since": injection}), 422, "invalid_fields"),
        (tenant.client.get("/api/v1/audit-log", params={"cursor": injection}), 422, "invalid_fields"),
        (api.client(injection).get("/api/v1/accounts"), 401, "unauthorized"),
    ]
    duplicate = {"name": "dup", "provider_type": "sendgrid", "api_key": "SG.secret-key-value"}
    assert tenant.client.post("/api/v1/providers", json=duplicate).status_code == 201
    cases.append((tenant.client.post("/api/v1/providers", json=duplicate), 409, "conflict"))
    for response, status, code in cases:
        assert_error(response, status, code)
        assert "SG.secret-key-value" not in response.text
        assert tenant.api_key not in response.text
