"""GET /api/v1/messages and /messages/{id} over real HTTP: tenancy, filters, keyset pages, no bodies.

Messages are seeded through the storage layer (``enqueue_message``, as the SMTP
listener does); statuses, timestamps and delivery attempts are then set through
the ORM, so every expectation below is computed from rows the test controls.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from smtp_proxy.db.models import DeliveryLog, DeliveryStatus, Message, MessageStatus
from smtp_proxy.storage.messages import enqueue_message
from tests.api.checks import assert_error
from tests.api.conftest import ApiServer, Client, Tenant

BASE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def raw_message(subject: str, body: str, *, extra_headers: str = "") -> bytes:
    return (
        f"From: Sender <sender@example.com>\r\nTo: rcpt@example.net\r\nSubject: {subject}\r\n"
        f"{extra_headers}\r\n{body}\r\n"
    ).encode()


def enqueue(
    api: ApiServer,
    tenant: Tenant,
    *,
    subject: str = "hello",
    body: str = "plain body",
    data: bytes | None = None,
    sender: str = "sender@example.com",
    recipients: tuple[str, ...] = ("rcpt@example.net",),
    correlation_id: str | None = None,
    is_bounce: bool = False,
) -> str:
    """One message of ``tenant`` through the storage layer, in its own transaction; its id."""
    with api.database.transaction() as session:
        queued = enqueue_message(
            session,
            api.cipher,
            account_id=uuid.UUID(tenant.id),
            sender=sender,
            recipients=list(recipients),
            data=data if data is not None else raw_message(subject, body),
            correlation_id=correlation_id or uuid.uuid4().hex,
            is_bounce=is_bounce,
        )
    return str(queued.id)


def seed(api: ApiServer, tenant: Tenant, created_at: list[datetime]) -> list[str]:
    """One message per timestamp (created_at set through the ORM); ids in the given order."""
    ids = [enqueue(api, tenant, subject=f"seeded {n}") for n in range(len(created_at))]
    with api.database.transaction() as session:
        for message_id, moment in zip(ids, created_at, strict=True):
            row = session.get(Message, uuid.UUID(message_id))
            assert row is not None
            row.created_at = moment
    return ids


def set_status(api: ApiServer, statuses: dict[str, MessageStatus]) -> None:
    with api.database.transaction() as session:
        for message_id, status in statuses.items():
            row = session.get(Message, uuid.UUID(message_id))
            assert row is not None
            row.status = status
            row.attempts = 1 if status is not MessageStatus.QUEUED else 0
            if status in (MessageStatus.DELIVERED, MessageStatus.FAILED):
                row.processed_at = BASE + timedelta(days=1)


def newest_first(api: ApiServer, ids: list[str]) -> list[str]:
    """The order the API promises: created_at, then id, both descending (as the database sorts)."""
    with api.database.transaction() as session:
        stamps = {str(m.id): m.created_at for m in session.query(Message).filter(Message.id.in_(ids))}
    return sorted(ids, key=lambda i: (stamps[i], uuid.UUID(i)), reverse=True)


def list_ids(client: Client, **params: str) -> list[str]:
    response = client.get("/api/v1/messages", params=params)
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["next_cursor"] is None, "a single page was expected"
    return [item["id"] for item in page["items"]]


def walk(client: Client, **params: str) -> Iterator[dict[str, Any]]:
    """Every page of a listing, following next_cursor."""
    cursor: str | None = None
    for _ in range(1000):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get("/api/v1/messages", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        yield page
        cursor = page["next_cursor"]
        if cursor is None:
            return
    raise AssertionError("pagination did not end")


def keys(value: Any) -> Iterator[str]:
    """Every object key in a JSON document, at any depth."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from keys(inner)


# --- listing -------------------------------------------------------------------------------------


def test_list_shows_only_the_callers_messages_newest_first(api: ApiServer) -> None:
    alice, bob, carol = api.tenant(), api.tenant(), api.tenant()
    alice_ids: list[str] = []
    bob_ids: list[str] = []
    for n in range(3):  # interleaved, each in its own transaction: a real arrival order
        alice_ids.append(enqueue(api, alice, subject=f"alice {n}", body=f"alice secret body {n}"))
        bob_ids.append(enqueue(api, bob, subject=f"bob {n}", body=f"bob secret body {n}"))

    response = alice.client.get("/api/v1/messages")
    assert response.status_code == 200, response.text
    page = response.json()
    assert set(page) == {"items", "next_cursor"}
    assert page["next_cursor"] is None
    assert [item["id"] for item in page["items"]] == alice_ids[::-1]
    stamps = [datetime.fromisoformat(item["created_at"]) for item in page["items"]]
    assert stamps == sorted(stamps, reverse=True)
    assert "bob" not in response.text

    assert list_ids(bob.client) == bob_ids[::-1]
    assert list_ids(carol.client) == []

    first = page["items"][-1]
    data = raw_message("alice 0", "alice secret body 0")
    assert first["sender"] == "sender@example.com"
    assert first["recipients"] == ["rcpt@example.net"]
    assert first["subject"] == "alice 0"
    assert first["size"] == len(data)
    assert first["status"] == "queued"
    assert first["attempts"] == 0
    assert first["provider_id"] is None
    assert first["processed_at"] is None
    assert re.fullmatch(r"[0-9a-f]{32}", first["correlation_id"])
    for item in page["items"]:
        assert not [key for key in item if "body" in key.lower()]
    assert "secret body" not in response.text


def test_list_returns_header_text_literally(api: ApiServer) -> None:
    tenant = api.tenant()
    hostile = '\'; DROP TABLE messages; -- %s %(x)s "quoted" \u00e9\u4e2d\U0001f600'
    message_id = enqueue(
        api,
        tenant,
        data=raw_message(hostile, "body"),
        sender="o'brien+tag@example.com",
        recipients=("a@example.net", "\u00fc@example.org"),
        correlation_id="corr-%s-'1'",
    )
    (item,) = tenant.client.get("/api/v1/messages").json()["items"]
    assert item["id"] == message_id
    assert item["subject"] == hostile
    assert item["sender"] == "o'brien+tag@example.com"
    assert item["recipients"] == ["a@example.net", "\u00fc@example.org"]
    assert item["correlation_id"] == "corr-%s-'1'"


def test_status_filter_returns_only_that_status(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    ids = seed(api, alice, [BASE + timedelta(minutes=n) for n in range(8)])
    wanted = {
        ids[0]: MessageStatus.PROCESSING,
        ids[5]: MessageStatus.PROCESSING,
        ids[1]: MessageStatus.DELIVERED,
        ids[3]: MessageStatus.DELIVERED,
        ids[6]: MessageStatus.DELIVERED,
        ids[7]: MessageStatus.FAILED,
    }
    set_status(api, wanted)
    # Bob's messages of every status must never show up in Alice's filtered pages.
    bob_ids = seed(api, bob, [BASE + timedelta(minutes=n, seconds=30) for n in range(4)])
    set_status(api, dict(zip(bob_ids, MessageStatus, strict=True)))

    for status in MessageStatus:
        expected = [i for i in ids if wanted.get(i, MessageStatus.QUEUED) is status][::-1]
        response = alice.client.get("/api/v1/messages", params={"status": status.value})
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        assert [item["id"] for item in items] == expected, status
        assert {item["status"] for item in items} <= {status.value}
    assert list_ids(alice.client) == ids[::-1]
    delivered = alice.client.get("/api/v1/messages", params={"status": "delivered"}).json()["items"]
    assert all(datetime.fromisoformat(item["processed_at"]) == BASE + timedelta(days=1) for item in delivered)
    assert all(item["attempts"] == 1 for item in delivered)


def test_since_and_until_bound_created_at(api: ApiServer) -> None:
    tenant = api.tenant()
    ids = seed(api, tenant, [BASE + timedelta(hours=n) for n in range(6)])  # 12:00 .. 17:00 UTC

    def between(low: int, high: int) -> list[str]:
        return ids[low:high][::-1]

    cases: list[tuple[dict[str, str], list[str]]] = [
        ({"since": "2024-05-01T14:00:00Z"}, between(2, 6)),  # since is inclusive
        ({"since": "2024-05-01T14:00:00+00:00"}, between(2, 6)),
        ({"since": "2024-05-01T14:00:00"}, between(2, 6)),  # no zone: UTC
        ({"since": "2024-05-01T16:00:00+02:00"}, between(2, 6)),
        ({"since": "2024-05-01T09:00:00-05:00"}, between(2, 6)),
        ({"since": "2024-05-01T14:00:00.000001Z"}, between(3, 6)),
        ({"until": "2024-05-01T15:00:00Z"}, between(0, 3)),  # until is exclusive
        ({"until": "2024-05-01T15:00:00"}, between(0, 3)),
        ({"until": "2024-05-01T17:00:00+02:00"}, between(0, 3)),
        ({"until": "2024-05-01T15:00:00.000001+00:00"}, between(0, 4)),
        ({"since": "2024-05-01T13:00:00Z", "until": "2024-05-01T16:00:00Z"}, between(1, 4)),
        ({"since": "2024-05-01T13:30:00", "until": "2024-05-01T17:30:00+02:00"}, between(2, 4)),
        ({"since": "2024-05-01"}, between(0, 6)),
        ({"since": "2024-05-02"}, []),
        ({"until": "2024-05-01T12:00:00Z"}, []),
        ({"since": "2024-05-01T16:00:00Z", "until": "2024-05-01T13:00:00Z"}, []),
        ({"since": "2024-05-01T13:00:00Z", "status": "queued"}, between(1, 6)),
        ({"since": "2024-05-01T13:00:00Z", "status": "failed"}, []),
    ]
    for params, expected in cases:
        assert list_ids(tenant.client, **params) == expected, params


def test_since_accepts_a_lower_case_z(api: ApiServer) -> None:
    tenant = api.tenant()
    ids = seed(api, tenant, [BASE, BASE + timedelta(hours=2)])
    assert list_ids(tenant.client, since="2024-05-01T13:00:00z") == ids[1:]


def test_time_bounds_at_the_edge_of_the_calendar_are_not_a_server_error(api: ApiServer) -> None:
    tenant = api.tenant()
    for params in ({"since": "0001-01-01T00:00:00+05:00"}, {"until": "9999-12-31T23:59:59-05:00"}):
        response = tenant.client.get("/api/v1/messages", params=params)
        assert response.status_code in (200, 422), (params, response.text)


# --- pages ---------------------------------------------------------------------------------------


def test_pages_walk_every_message_once(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    # Groups of three share one created_at: the id must break ties, or pages skip or repeat rows.
    stamps = [BASE + timedelta(minutes=n // 3) for n in range(23)]
    ids = seed(api, alice, stamps)
    seed(api, bob, stamps[::2])
    expected = newest_first(api, ids)

    for limit in (1, 4, 7, 22, 23, 24, 200):
        pages = list(walk(alice.client, limit=str(limit)))
        seen = [item["id"] for page in pages for item in page["items"]]
        assert seen == expected, limit  # no gaps, no duplicates, newest first
        assert len(pages) == -(-len(ids) // limit), limit
        assert all(len(page["items"]) == limit for page in pages[:-1]), limit
        assert 1 <= len(pages[-1]["items"]) <= limit, limit
        assert pages[-1]["next_cursor"] is None, limit
        assert all(isinstance(page["next_cursor"], str) for page in pages[:-1]), limit


def test_default_limit_is_fifty(api: ApiServer) -> None:
    tenant = api.tenant()
    ids = seed(api, tenant, [BASE + timedelta(seconds=n) for n in range(51)])
    pages = list(walk(tenant.client))
    assert [len(page["items"]) for page in pages] == [50, 1]
    assert [item["id"] for page in pages for item in page["items"]] == ids[::-1]


def test_pages_with_a_status_filter(api: ApiServer) -> None:
    tenant = api.tenant()
    ids = seed(api, tenant, [BASE + timedelta(minutes=n // 2) for n in range(12)])
    set_status(api, {i: MessageStatus.DELIVERED for i in ids[::3]})
    expected = [i for i in newest_first(api, ids) if i in ids[::3]]
    pages = list(walk(tenant.client, status="delivered", limit="2"))
    assert [item["id"] for page in pages for item in page["items"]] == expected
    assert [len(page["items"]) for page in pages] == [2, 2]


def test_a_new_message_does_not_shift_the_next_page(api: ApiServer) -> None:
    tenant = api.tenant()
    ids = seed(api, tenant, [BASE + timedelta(minutes=n) for n in range(10)])
    expected = ids[::-1]

    first = tenant.client.get("/api/v1/messages", params={"limit": "4"}).json()
    assert [item["id"] for item in first["items"]] == expected[:4]
    newcomer = enqueue(api, tenant, subject="arrived later")  # newest of all

    second = tenant.client.get("/api/v1/messages", params={"limit": "4", "cursor": first["next_cursor"]})
    assert second.status_code == 200, second.text
    assert [item["id"] for item in second.json()["items"]] == expected[4:8]
    third = tenant.client.get(
        "/api/v1/messages", params={"limit": "4", "cursor": second.json()["next_cursor"]}
    ).json()
    assert [item["id"] for item in third["items"]] == expected[8:]
    assert third["next_cursor"] is None

    fresh = tenant.client.get("/api/v1/messages", params={"limit": "4"}).json()
    assert [item["id"] for item in fresh["items"]] == [newcomer, *expected[:3]]


def test_a_cursor_does_not_cross_tenants(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    seed(api, alice, [BASE + timedelta(minutes=n) for n in range(6)])
    bob_ids = seed(api, bob, [BASE + timedelta(minutes=n, seconds=30) for n in range(6)])
    cursor = alice.client.get("/api/v1/messages", params={"limit": "2"}).json()["next_cursor"]
    # Alice's cursor only positions Bob's listing; it never shows him her rows.
    page = bob.client.get("/api/v1/messages", params={"cursor": cursor}).json()
    assert {item["id"] for item in page["items"]} <= set(bob_ids)


# --- bad parameters ------------------------------------------------------------------------------


def test_every_bad_parameter_is_named_at_once(api: ApiServer) -> None:
    tenant = api.tenant()
    response = tenant.client.get(
        "/api/v1/messages",
        params={
            "status": "sent",
            "limit": "0",
            "since": "yesterday",
            "until": "2024-13-45T99:00:00Z",
            "cursor": "garbage!!",
        },
    )
    error = assert_error(response, 422, "invalid_fields")
    assert set(error["fields"]) == {"status", "limit", "since", "until", "cursor"}
    for name in error["fields"]:
        assert name in error["message"]
    assert "queued" in error["fields"]["status"]
    assert "200" in error["fields"]["limit"]


def test_a_bad_limit_is_422(api: ApiServer) -> None:
    tenant = api.tenant()
    # Unicode digits (superscript two, Arabic-Indic ten, full-width ten) were once a 500 (str.isdigit).
    values = ("0", "201", "abc", "-1", "1.5", "", " 5", "1e2", "0x10", "99999999999999", "+5", "05 ")
    for value in (*values, "\u00b2", "\u0661\u0660", "\uff11\uff10"):
        response = tenant.client.get("/api/v1/messages", params={"limit": value})
        error = assert_error(response, 422, "invalid_fields")
        assert set(error["fields"]) == {"limit"}, value


def test_limit_bounds_are_accepted(api: ApiServer) -> None:
    tenant = api.tenant()
    seed(api, tenant, [BASE, BASE + timedelta(seconds=1)])
    assert len(tenant.client.get("/api/v1/messages", params={"limit": "1"}).json()["items"]) == 1
    assert len(tenant.client.get("/api/v1/messages", params={"limit": "200"}).json()["items"]) == 2


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_a_forged_cursor_is_422(api: ApiServer) -> None:
    tenant = api.tenant()
    forged = [
        "garbage",
        "",
        "!!!",
        "\u00e9t\u00e9",
        _b64("2024-05-01T12:00:00+00:00|not-a-uuid"),
        _b64("not a date|" + str(uuid.uuid4())),
        _b64("no separator at all"),
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
    ]
    for cursor in forged:
        response = tenant.client.get("/api/v1/messages", params={"cursor": cursor})
        error = assert_error(response, 422, "invalid_fields")
        assert set(error["fields"]) == {"cursor"}, cursor


def test_is_bounce_shows_and_filters_the_delivery_status_notifications(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    sent = enqueue(api, alice, subject="an ordinary message")
    bounce = enqueue(api, alice, sender="", recipients=("sender@example.com",), is_bounce=True)
    later = enqueue(api, alice, subject="another")
    enqueue(api, bob, is_bounce=True)  # never in Alice's pages
    items = {item["id"]: item["is_bounce"] for item in alice.client.get("/api/v1/messages").json()["items"]}
    assert items == {sent: False, bounce: True, later: False}
    assert list_ids(alice.client, is_bounce="true") == [bounce]
    assert set(list_ids(alice.client, is_bounce="false")) == {sent, later}
    assert list_ids(alice.client, is_bounce="true", status="delivered") == []
    detail = alice.client.get(f"/api/v1/messages/{bounce}").json()
    assert detail["is_bounce"] is True and detail["sender"] == ""


def test_a_bad_filter_is_422_naming_it(api: ApiServer) -> None:
    tenant = api.tenant()
    for params in (
        {"is_bounce": "yes"},
        {"is_bounce": "True"},
        {"status": "QUEUED"},
        {"status": ""},
        {"since": "not a date"},
        {"until": "2024-05-01T25:00:00Z"},
    ):
        error = assert_error(tenant.client.get("/api/v1/messages", params=params), 422, "invalid_fields")
        assert set(error["fields"]) == set(params), params


# --- one message ---------------------------------------------------------------------------------


def add_delivery(
    api: ApiServer,
    message_id: str,
    *,
    status: DeliveryStatus,
    at: datetime,
    provider_id: str | None = None,
    code: int | None = None,
    text: str | None = None,
) -> str:
    with api.database.transaction() as session:
        row = DeliveryLog(
            message_id=uuid.UUID(message_id),
            provider_id=uuid.UUID(provider_id) if provider_id else None,
            status=status,
            response_code=code,
            response_text=text,
            created_at=at,
        )
        session.add(row)
        session.flush()
        return str(row.id)


def make_provider(tenant: Tenant) -> str:
    response = tenant.client.post(
        "/api/v1/providers",
        json={"name": "primary", "provider_type": "sendgrid", "api_key": "SG.secret-value"},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_detail_has_headers_and_deliveries_and_never_the_body(api: ApiServer) -> None:
    tenant = api.tenant()
    provider_id = make_provider(tenant)
    body_text = "The confidential body ZX81-7731 must never leave the database"
    data = raw_message(
        "=?utf-8?b?w6l0w6kgcmVwb3J0?=",
        body_text,
        extra_headers="X-Custom: '; DROP TABLE messages; -- %s\r\nX-Folded: first\r\n second\r\n",
    )
    message_id = enqueue(api, tenant, data=data, correlation_id="corr-detail")
    # Inserted out of order: the API lists attempts oldest first.
    delivered = add_delivery(
        api,
        message_id,
        status=DeliveryStatus.DELIVERED,
        at=BASE + timedelta(minutes=5),
        provider_id=provider_id,
        code=202,
        text="Accepted",
    )
    network = add_delivery(api, message_id, status=DeliveryStatus.FAILED, at=BASE)
    deferred = add_delivery(
        api,
        message_id,
        status=DeliveryStatus.DEFERRED,
        at=BASE + timedelta(minutes=1),
        provider_id=provider_id,
        code=451,
        text="4.7.1 try again later",
    )
    with api.database.transaction() as session:
        row = session.get(Message, uuid.UUID(message_id))
        assert row is not None
        row.status, row.attempts, row.provider_id = MessageStatus.DELIVERED, 3, uuid.UUID(provider_id)
        row.processed_at = BASE + timedelta(minutes=5)

    response = tenant.client.get(f"/api/v1/messages/{message_id}")
    assert response.status_code == 200, response.text
    detail = response.json()
    assert body_text not in response.text
    assert "ZX81" not in response.text
    assert not [key for key in keys(detail) if "body" in key.lower()]

    assert detail["id"] == message_id
    assert detail["subject"] == "\u00e9t\u00e9 report"
    assert detail["status"] == "delivered"
    assert detail["attempts"] == 3
    assert detail["provider_id"] == provider_id
    assert detail["correlation_id"] == "corr-detail"
    assert detail["size"] == len(data)
    assert datetime.fromisoformat(detail["processed_at"]) == BASE + timedelta(minutes=5)
    assert detail["headers"] == [
        ["From", "Sender <sender@example.com>"],
        ["To", "rcpt@example.net"],
        ["Subject", "=?utf-8?b?w6l0w6kgcmVwb3J0?="],
        ["X-Custom", "'; DROP TABLE messages; -- %s"],
        ["X-Folded", "first second"],
    ]
    assert [d["id"] for d in detail["deliveries"]] == [network, deferred, delivered]
    assert detail["deliveries"][0] == {
        "id": network,
        "provider_id": None,
        "status": "failed",
        "response_code": None,
        "response_text": None,
        "created_at": detail["deliveries"][0]["created_at"],
    }
    assert datetime.fromisoformat(detail["deliveries"][0]["created_at"]) == BASE
    assert detail["deliveries"][1] == {
        "id": deferred,
        "provider_id": provider_id,
        "status": "deferred",
        "response_code": 451,
        "response_text": "4.7.1 try again later",
        "created_at": detail["deliveries"][1]["created_at"],
    }
    assert detail["deliveries"][2]["status"] == "delivered"
    assert detail["deliveries"][2]["response_code"] == 202

    # The list item and the detail agree on every field the list has.
    (item,) = tenant.client.get("/api/v1/messages").json()["items"]
    assert {key: detail[key] for key in item} == item
    assert set(detail) == set(item) | {"headers", "deliveries"}


def test_detail_of_a_message_without_deliveries(api: ApiServer) -> None:
    tenant = api.tenant()
    message_id = enqueue(api, tenant, subject="fresh", body="the body text 0042")
    response = tenant.client.get(f"/api/v1/messages/{message_id.upper()}")
    assert response.status_code == 200, response.text
    assert response.json()["deliveries"] == []
    assert response.json()["id"] == message_id
    assert "0042" not in response.text


def test_another_tenants_message_is_404_like_an_unknown_one(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    message_id = enqueue(api, alice, subject="alice private subject", body="alice body")
    add_delivery(api, message_id, status=DeliveryStatus.DEFERRED, at=BASE, code=451, text="alice reply")

    theirs = bob.client.get(f"/api/v1/messages/{message_id}")
    unknown = bob.client.get(f"/api/v1/messages/{uuid.uuid4()}")
    error = assert_error(theirs, 404, "not_found")
    assert error == assert_error(unknown, 404, "not_found")  # nothing tells the two apart
    for secret in ("alice", message_id):
        assert secret not in theirs.text
    assert alice.client.get(f"/api/v1/messages/{message_id}").status_code == 200


def test_a_malformed_message_id_is_404(api: ApiServer) -> None:
    tenant = api.tenant()
    enqueue(api, tenant)
    for path in (
        "not-a-uuid",
        "12345",
        "00000000-0000-0000-0000-00000000000g",
        "00000000-0000-0000-0000-0000000000000",
        "%27%20OR%201%3D1--",
        "..%2F..%2Fhealthz",
    ):
        assert_error(tenant.client.get(f"/api/v1/messages/{path}"), 404, "not_found")


def test_messages_need_a_key(api: ApiServer) -> None:
    tenant = api.tenant()
    message_id = enqueue(api, tenant, subject="keyed")
    for path in ("/api/v1/messages", f"/api/v1/messages/{message_id}"):
        response = api.client(None).get(path)
        assert_error(response, 401, "unauthorized")
        assert "keyed" not in response.text
