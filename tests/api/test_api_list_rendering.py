"""List pages are rendered by PostgreSQL, detail views in Python: both must say the same.

storage/json_rows.py builds the provider and message lists as JSON inside
PostgreSQL; on SQLite the API renders the same rows itself. These tests run
on both databases and hold every list item equal to what the Python renderer
makes of the same row, down to the timestamp format.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from smtp_proxy.db.models import Message, MessageStatus
from tests.conftest import _url

TIMESTAMP = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$"


@pytest.fixture(params=["postgresql", "sqlite"])
def pg_url(request: pytest.FixtureRequest) -> str:
    """Shadows the shared fixture: start_api serves these tests on both databases."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    databases = request.getfixturevalue("pg_databases")
    name = databases.take()
    request.addfinalizer(lambda: databases.give_back(name))
    return _url(request.getfixturevalue("postgresql_server"), name)


@pytest.fixture
def api(served_api):
    """Served by start_api on the database above."""
    return served_api


PROVIDERS = [
    {"name": "sg", "provider_type": "sendgrid", "api_key": "SG.secret"},
    {
        "name": 'mg \u00e9t\u00e9 "quoted" <b>',
        "provider_type": "mailgun",
        "api_key": "key-1",
        "settings": {"domain": "mg.example.com", "region": "eu"},
        "enabled": False,
    },
    {
        "name": "ses'; DROP TABLE esp_providers;--",
        "provider_type": "ses",
        "api_key": "AKIAEXAMPLEKEY123456:SECRET",
        "settings": {"region": "eu-west-1"},
    },
    {
        "name": "relay \u2028 line",
        "provider_type": "smtp",
        "smtp_config": {
            "host": "smtp.example.net",
            "port": 587,
            "tls": "starttls",
            "username": "u",
            "password": "p",
        },
    },
    {
        "name": "relay-open",
        "provider_type": "smtp",
        "smtp_config": {"host": "smtp.example.net", "port": 25, "tls": "none"},
    },
]


def test_provider_list_items_equal_their_detail_views(api) -> None:
    tenant = api.tenant()
    for body in PROVIDERS:
        response = tenant.client.post("/api/v1/providers", json=body)
        assert response.status_code == 201, (body, response.text)

    listed = tenant.client.get("/api/v1/providers")
    assert listed.status_code == 200
    assert listed.headers["Content-Type"] == "application/json"
    items = listed.json()["items"]
    assert [item["name"] for item in items] == sorted(body["name"] for body in PROVIDERS)
    for item in items:
        detail = tenant.client.get(f"/api/v1/providers/{item['id']}").json()
        assert item == detail
        assert list(item) == list(detail)  # keys in the same order too
        assert re.match(TIMESTAMP, item["created_at"])
    assert "secret" not in listed.text.lower() and "SECRET" not in listed.text
    assert tenant.client.get("/api/v1/providers").json() == {"items": items}

    other = api.tenant()
    assert other.client.get("/api/v1/providers").json() == {"items": []}


def _store_messages(api, account_id: str, provider_id: str | None) -> list[str]:
    base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)  # whole seconds: no microseconds to print
    ids = []
    with api.database.transaction() as session:
        for n in range(7):
            message_id = uuid.uuid4()
            ids.append(str(message_id))
            created = base + timedelta(minutes=n, microseconds=0 if n % 2 else 1234 * n)
            session.add(
                Message(
                    id=message_id,
                    account_id=uuid.UUID(account_id),
                    sender="app@example.com",
                    recipients=[f"r{n}@example.net", "\u00e9l\u00e8ve@example.org"] if n != 3 else [],
                    subject=None if n == 4 else f'Subject \u00e9 "{n}" \\ </script>',
                    headers=[["Subject", "x"]],
                    body_encrypted=b"sealed",
                    size=100 + n,
                    status=MessageStatus.DELIVERED if n % 3 == 0 else MessageStatus.QUEUED,
                    correlation_id=f"corr-{n}",
                    attempts=n,
                    provider_id=uuid.UUID(provider_id) if provider_id and n % 3 == 0 else None,
                    next_attempt_at=created,
                    processed_at=created + timedelta(seconds=5) if n % 3 == 0 else None,
                    created_at=created,
                    updated_at=created,
                )
            )
    return ids


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?status=queued",
        "?status=delivered",
        "?limit=2",
        "?limit=3&status=queued",
        "?since=2024-05-01T12:02:00Z",
    ],
)
def test_message_pages_equal_their_detail_views_and_paginate_alike(api, query: str) -> None:
    tenant = api.tenant()
    provider = tenant.client.post("/api/v1/providers", json=PROVIDERS[0]).json()
    stored = _store_messages(api, tenant.id, provider["id"])

    seen: list[str] = []
    path = f"/api/v1/messages{query}"
    for _ in range(10):
        response = tenant.client.get(path)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        for item in page["items"]:
            detail = tenant.client.get(f"/api/v1/messages/{item['id']}").json()
            assert {key: detail[key] for key in item} == item
            assert re.match(TIMESTAMP, item["created_at"])
            seen.append(item["id"])
        if page["next_cursor"] is None:
            break
        path = f"/api/v1/messages{query}{'&' if query else '?'}cursor={page['next_cursor']}"
    assert len(seen) == len(set(seen))
    assert set(seen) <= set(stored)
    everything = tenant.client.get("/api/v1/messages?limit=200").json()["items"]
    assert [item["id"] for item in everything] == list(reversed(stored))  # newest first
    if query in ("", "?limit=2"):
        assert seen == [item["id"] for item in everything]
