"""Webhook endpoints and the outbox on each database: validation, sealed secrets, rotation, events."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import AuditLog, WebhookDelivery, WebhookEndpoint, WebhookEvent
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.errors import NotFound, ValidationError
from smtp_proxy.storage import accounts, webhooks
from smtp_proxy.storage.audit import CLI
from smtp_proxy.storage.providers import QuotaExceeded

URL = "https://hooks.example.net/smtp-proxy"


def tenant(database: Database, name: str = "alice") -> uuid.UUID:
    with database.transaction() as session:
        created = accounts.create_account(
            session,
            name=name,
            email=f"{name}@example.com",
            allowed_domains=[f"{name}.example.com"],
            bcrypt_cost=4,
            actor=CLI,
        )
        account_id = created.account.id
    database.remove_session()
    return account_id


def add(database: Database, cipher: Cipher, account_id: uuid.UUID, **fields) -> webhooks.NewSecret:
    values = {"url_": URL, "events": ["message.delivered", "message.failed"], **fields}
    with database.transaction() as session:
        made = webhooks.create_endpoint(session, cipher, account_id=account_id, actor=CLI, **values)
    database.remove_session()
    return made


@pytest.mark.parametrize(
    ("url", "allow_http", "problem"),
    [
        ("http://hooks.example.net/in", False, "must use https"),
        ("ftp://hooks.example.net/in", True, "must use https or http"),
        ("https:///no-host", False, "must name a host"),
        ("https://user:pw@hooks.example.net/", False, "no user or password"),
        ("https://hooks.example.net/in#part", False, "fragment"),
        ("https://hooks.example.net:99999/", False, "not a valid URL"),
        ("https://hooks.example.net/ in", False, "spaces"),
        ("https://hooks.example.net/" + "a" * 2048, False, "at most 2048"),
        ("https://bücher.example/", False, "https URL"),
        ("", False, "https URL"),
    ],
)
def test_a_bad_url_is_refused_with_the_reason(url: str, allow_http: bool, problem: str) -> None:
    with pytest.raises(ValidationError) as refused:
        webhooks.url(url, allow_http=allow_http)
    assert refused.value.field == "url" and problem in refused.value.problem


def test_http_only_where_private_networks_are_allowed() -> None:
    assert webhooks.url("http://127.0.0.1:8080/in", allow_http=True) == "http://127.0.0.1:8080/in"


@pytest.mark.parametrize("events", [[], ["message.bounced"], "message.failed", None])
def test_events_must_be_known_types(events: object) -> None:
    with pytest.raises(ValidationError) as refused:
        webhooks.event_types(events)
    assert refused.value.field == "events"


def test_events_are_kept_once_in_the_documented_order() -> None:
    chosen = ["message.failed", "message.delivered", "message.failed"]
    assert webhooks.event_types(chosen) == ["message.delivered", "message.failed"]


def test_the_secret_is_shown_once_and_only_sealed_at_rest(database: Database, cipher: Cipher) -> None:
    made = add(database, cipher, tenant(database))
    assert made.secret.startswith("whsec_") and len(made.secret) > 40
    with database.transaction() as session:
        raw = session.execute(text("SELECT * FROM webhook_endpoints")).one()._asdict()
        endpoint = session.get(WebhookEndpoint, made.endpoint.id)
        assert webhooks.signing_secrets(cipher, endpoint, now=utcnow()) == [made.secret]
    assert made.secret.encode() not in b"".join(
        bytes(v) if isinstance(v, (bytes, memoryview)) else str(v).encode() for v in raw.values()
    )


def test_a_sealed_secret_is_bound_to_its_row(database: Database, cipher: Cipher) -> None:
    account_id = tenant(database)
    first, second = add(database, cipher, account_id), add(database, cipher, account_id)
    with database.transaction() as session:
        # Copying one row's sealed secret into another row makes it unreadable, not someone else's.
        session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == second.endpoint.id)
            .values(secret_encrypted=first.endpoint.secret_encrypted)
        )
    database.remove_session()
    with database.transaction() as session, pytest.raises(Exception) as failed:
        webhooks.signing_secrets(cipher, session.get(WebhookEndpoint, second.endpoint.id), now=utcnow())
    assert "decrypt" in type(failed.value).__name__.lower() or "decrypt" in str(failed.value).lower()


def test_rotation_keeps_the_previous_secret_signing_for_24_hours(database: Database, cipher: Cipher) -> None:
    made = add(database, cipher, tenant(database))
    with database.transaction() as session:
        endpoint = session.get(WebhookEndpoint, made.endpoint.id)
        new = webhooks.rotate_secret(session, cipher, endpoint, actor=CLI)
    database.remove_session()
    assert new != made.secret
    with database.transaction() as session:
        endpoint = session.get(WebhookEndpoint, made.endpoint.id)
        now = utcnow()
        assert webhooks.signing_secrets(cipher, endpoint, now=now) == [new, made.secret]
        assert webhooks.signing_secrets(cipher, endpoint, now=now + timedelta(hours=24, seconds=1)) == [new]


def test_an_account_holds_at_most_ten_endpoints(database: Database, cipher: Cipher) -> None:
    account_id = tenant(database)
    for _ in range(webhooks.MAX_ENDPOINTS):
        add(database, cipher, account_id)
    with pytest.raises(QuotaExceeded, match="at most 10 webhook endpoints"):
        add(database, cipher, account_id)
    add(database, cipher, tenant(database, "bob"))  # another account's own ten


def test_another_accounts_endpoint_is_not_found(database: Database, cipher: Cipher) -> None:
    made = add(database, cipher, tenant(database))
    with database.transaction() as session, pytest.raises(NotFound):
        webhooks.get_endpoint(session, tenant(database, "bob"), made.endpoint.id)


def test_update_and_delete_are_audited_and_checked(database: Database, cipher: Cipher) -> None:
    account_id = tenant(database)
    made = add(database, cipher, account_id)
    with database.transaction() as session:
        endpoint = webhooks.get_endpoint(session, account_id, made.endpoint.id)
        with pytest.raises(ValidationError):
            webhooks.update_endpoint(session, endpoint, {"secret": "mine"}, actor=CLI)
        fields = webhooks.update_endpoint(
            session, endpoint, {"enabled": False, "events": ["message.deferred"]}, actor=CLI
        )
        assert fields == ["events", "enabled"]
    with database.transaction() as session:
        endpoint = webhooks.get_endpoint(session, account_id, made.endpoint.id)
        webhooks.delete_endpoint(session, endpoint, actor=CLI)
    with database.transaction() as session:
        rows = session.scalars(
            select(AuditLog).where(AuditLog.entity == "webhook").order_by(AuditLog.created_at)
        ).all()
        assert [(r.action, r.changes["fields"]) for r in rows] == [
            ("create", ["enabled", "events", "secret", "url"]),
            ("update", ["enabled", "events"]),
            ("delete", []),
        ]


def test_an_event_is_owed_to_each_enabled_endpoint_that_wants_it(database: Database, cipher: Cipher) -> None:
    account_id = tenant(database)
    failed_only = add(database, cipher, account_id, events=["message.failed"])
    both = add(database, cipher, account_id)
    add(database, cipher, account_id, enabled=False)
    add(database, cipher, tenant(database, "bob"))  # another account's endpoint never sees it
    payload = {"message_id": str(uuid.uuid4()), "recipients": ["x@example.org"]}
    with database.transaction() as session:

        def record(kind: str) -> uuid.UUID | None:
            return webhooks.record_event(session, account_id=account_id, kind=kind, payload=payload)

        delivered, failed, nobody = (record(f"message.{k}") for k in ("delivered", "failed", "deferred"))
    assert delivered is not None and failed is not None and nobody is None
    with database.transaction() as session:
        owed = {
            (row.event_id, row.endpoint_id, row.status, row.attempts)
            for row in session.scalars(select(WebhookDelivery))
        }
        assert owed == {
            (delivered, both.endpoint.id, "pending", 0),
            (failed, both.endpoint.id, "pending", 0),
            (failed, failed_only.endpoint.id, "pending", 0),
        }
        event = session.get(WebhookEvent, delivered)
        assert event.payload == {"id": str(delivered), "type": "message.delivered", **payload}
        assert session.scalar(select(WebhookEvent).where(WebhookEvent.type == "message.deferred")) is None


def test_an_event_rolled_back_with_its_outcome_leaves_nothing_owed(
    database: Database, cipher: Cipher
) -> None:
    account_id = tenant(database)
    add(database, cipher, account_id)

    class Abandoned(Exception):
        pass

    with pytest.raises(Abandoned), database.transaction() as session:
        webhooks.record_event(session, account_id=account_id, kind="message.delivered", payload={})
        raise Abandoned
    with database.transaction() as session:
        assert session.scalars(select(WebhookDelivery)).all() == []
        assert session.scalars(select(WebhookEvent)).all() == []


def test_unknown_event_types_are_a_programming_error(database: Database) -> None:
    with database.transaction() as session, pytest.raises(ValueError, match="unknown event type"):
        webhooks.record_event(session, account_id=uuid.uuid4(), kind="message.opened", payload={})
