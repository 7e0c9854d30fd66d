"""The storage layer on PostgreSQL and on SQLite, through ``Database.transaction()``.

Every test reads its results back through a fresh session (``fresh``), so what
is checked is what reached the database, not the session's identity map.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import psycopg2
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from smtp_proxy import crypto
from smtp_proxy.crypto import Cipher
from smtp_proxy.db import session as session_module
from smtp_proxy.db.models import Account, AuditLog, EspProvider, Message, MessageStatus, ProviderType
from smtp_proxy.db.session import Database
from smtp_proxy.errors import Conflict, DatabaseUnavailable, DecryptionError, NotFound, ValidationError
from smtp_proxy.storage import accounts, audit, messages, providers, routing_rules
from smtp_proxy.storage.accounts import NewAccount
from smtp_proxy.storage.audit import Actor
from tests.conftest import wait_until_accepting
from tests.logins import login_hash
from tests.waiting import wait_for

BCRYPT_COST = 4
ACCOUNT_CREATE_FIELDS = ["allowed_domains", "api_key", "email", "is_admin", "name", "password"]


class Boom(Exception):
    """Raised inside a transaction after a change, to force the rollback."""


# --- fixtures and helpers -------------------------------------------------------------------------


@contextlib.contextmanager
def fresh(db: Database) -> Iterator[Session]:
    """A transaction on a brand-new session: everything it returns comes from the database."""
    db.remove_session()
    with db.transaction() as session:
        yield session
    db.remove_session()


def new_account(
    db: Database,
    name: str = "alice",
    *,
    domains: tuple[str, ...] | None = None,
    password: str | None = None,
    is_admin: bool = False,
    actor: Actor = audit.CLI,
) -> NewAccount:
    """An account; its sender domain is ``<name>.example.com`` unless ``domains`` are given."""
    domains = domains if domains is not None else (f"{name}.example.com",)
    with db.transaction() as session:
        created = accounts.create_account(
            session,
            name=name,
            email=f"{name}@example.com",
            allowed_domains=list(domains),
            bcrypt_cost=BCRYPT_COST,
            password=password,
            is_admin=is_admin,
            actor=actor,
        )
    db.remove_session()
    return created


def new_provider(db: Database, cipher: Cipher, account_id: uuid.UUID, name: str = "sendgrid-main", **kw):
    kw.setdefault("provider_type", ProviderType.SENDGRID)
    with db.transaction() as session:
        provider = providers.create_provider(
            session, cipher, account_id=account_id, name=name, **kw, actor=audit.CLI
        )
    db.remove_session()
    return provider


def new_rule(db: Database, account_id: uuid.UUID, provider_id: uuid.UUID, name: str, priority: int, **kw):
    with db.transaction() as session:
        rule = routing_rules.create_rule(
            session,
            account_id=account_id,
            provider_id=provider_id,
            name=name,
            priority=priority,
            **kw,
            actor=audit.CLI,
        )
    db.remove_session()
    return rule


def audit_rows(db: Database, account_id: uuid.UUID | None = None) -> list[AuditLog]:
    with fresh(db) as session:
        return audit.list_entries(session, account_id)


def assert_utc_aware(value: datetime) -> None:
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - value) < timedelta(minutes=5)


# --- accounts -------------------------------------------------------------------------------------


def test_create_account_returns_credentials_once_and_stores_only_hash_and_digest(database: Database) -> None:
    with database.transaction() as session:
        created = accounts.create_account(
            session,
            name="alice",
            email="Ops@Example.COM",
            allowed_domains=["Example.COM.", "*.Mail.Example.com", "example.com"],
            bcrypt_cost=4,
            actor=audit.CLI,
        )
    assert re.fullmatch(r"[0-9a-f]{64}", created.api_key)
    assert len(created.password) >= crypto.MIN_PASSWORD_LENGTH

    with fresh(database) as session:
        stored = accounts.get_account(session, created.account.id)
        assert stored.name == "alice"
        assert stored.email == "Ops@example.com"
        assert stored.allowed_domains == ["example.com", "*.mail.example.com"]
        assert stored.is_admin is False
        assert stored.active is True
        # The password only as a bcrypt hash of the configured cost.
        assert login_hash(session, stored) != created.password
        assert login_hash(session, stored).startswith("$2b$04$")
        assert crypto.verify_password(created.password, login_hash(session, stored))
        assert not crypto.verify_password(created.password + "x", login_hash(session, stored))
        # The API key only as its SHA-256 digest.
        assert stored.api_key_digest == hashlib.sha256(created.api_key.encode()).hexdigest()
        row = session.execute(select(Account.__table__)).one()._asdict()
        assert not any(created.api_key in str(v) or created.password in str(v) for v in row.values())
        found = accounts.find_by_api_key(session, created.api_key)
        assert found is not None and found.id == created.account.id
        assert accounts.find_by_api_key(session, crypto.generate_api_key()) is None
        assert accounts.find_by_api_key(session, stored.api_key_digest) is None


def test_create_account_with_given_password_and_admin_flag(database: Database) -> None:
    created = new_account(database, "bob", password="correct horse battery", is_admin=True)
    assert created.password == "correct horse battery"
    with fresh(database) as session:
        stored = accounts.get_account_by_name(session, "bob")
        assert stored.is_admin is True
        assert crypto.verify_password("correct horse battery", login_hash(session, stored))


def test_create_account_writes_audit_row_naming_fields_without_values(database: Database) -> None:
    created = new_account(database, "alice")
    [entry] = audit_rows(database)
    assert entry.action == "create"
    assert entry.entity == "account"
    assert entry.entity_id == created.account.id
    assert entry.account_id == created.account.id
    assert entry.actor == "cli"
    assert entry.actor_id is None
    assert entry.changes == {"fields": ACCOUNT_CREATE_FIELDS}
    text = json.dumps(entry.changes)
    assert created.password not in text and created.api_key not in text


def test_audit_records_acting_account_and_filters_by_tenant(database: Database) -> None:
    admin = new_account(database, "admin", is_admin=True)
    actor = Actor("admin", admin.account.id)
    tenant = new_account(database, "tenant", actor=actor)
    with fresh(database) as session:
        [entry] = audit.list_entries(session, tenant.account.id)
        assert entry.actor == "admin"
        assert entry.actor_id == admin.account.id
        assert entry.account_id == tenant.account.id
        assert [e.account_id for e in audit.list_entries(session, admin.account.id)] == [admin.account.id]
        everything = audit.list_entries(session)
        # Newest first.
        assert [e.entity_id for e in everything] == [tenant.account.id, admin.account.id]
        assert len(audit.list_entries(session, limit=1)) == 1


def test_duplicate_account_name_is_conflict_and_stores_nothing(database: Database) -> None:
    new_account(database, "alice")
    with pytest.raises(Conflict), database.transaction() as session:
        accounts.create_account(
            session,
            name="alice",
            email="other@example.org",
            allowed_domains=["example.org"],
            bcrypt_cost=4,
            actor=audit.CLI,
        )
    with fresh(database) as session:
        assert [a.email for a in accounts.list_accounts(session)] == ["alice@example.com"]
        assert len(audit.list_entries(session)) == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": "bad name"}, "name"),
        ({"name": "-leading-dash"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": ""}, "name"),
        ({"email": "not-an-email"}, "email"),
        ({"email": "a@localhost"}, "email"),
        ({"allowed_domains": ["localhost"]}, "allowed_domains"),
        ({"allowed_domains": ["exa_mple.com"]}, "allowed_domains"),
        ({"allowed_domains": []}, "allowed_domains"),
        ({"password": "short"}, "password"),
    ],
    ids=[
        "space-in-name",
        "dash-first",
        "name-too-long",
        "empty-name",
        "email-no-at",
        "email-single-label",
        "domain-single-label",
        "domain-underscore",
        "no-domains",
        "short-password",
    ],
)
def test_invalid_account_input_names_the_field(database: Database, overrides: dict, field: str) -> None:
    arguments = {
        "name": "alice",
        "email": "alice@example.com",
        "allowed_domains": ["example.com"],
        "bcrypt_cost": 4,
        **overrides,
    }
    with pytest.raises(ValidationError) as caught, database.transaction() as session:
        accounts.create_account(session, **arguments, actor=audit.CLI)
    assert caught.value.field == field
    with fresh(database) as session:
        assert accounts.list_accounts(session) == []
        assert audit.list_entries(session) == []


def test_list_accounts_sorted_by_name(database: Database) -> None:
    for name in ("carol", "alice", "bob"):
        new_account(database, name)
    with fresh(database) as session:
        assert [a.name for a in accounts.list_accounts(session)] == ["alice", "bob", "carol"]


def test_unknown_account_lookups_are_not_found(database: Database) -> None:
    with database.transaction() as session:
        with pytest.raises(NotFound):
            accounts.get_account(session, uuid.uuid4())
        with pytest.raises(NotFound):
            accounts.get_account_by_name(session, "nobody")


def test_set_password_replaces_the_old_one(database: Database) -> None:
    created = new_account(database, "alice")
    with database.transaction() as session:
        account = accounts.get_account_by_name(session, "alice")
        given = accounts.set_password(session, account, 4, "a brand new password", actor=audit.CLI)
    assert given == "a brand new password"
    with fresh(database) as session:
        stored = accounts.get_account_by_name(session, "alice")
        assert crypto.verify_password("a brand new password", login_hash(session, stored))
        assert not crypto.verify_password(created.password, login_hash(session, stored))

    with database.transaction() as session:
        generated = accounts.set_password(
            session, accounts.get_account_by_name(session, "alice"), 4, actor=audit.CLI
        )
    assert len(generated) >= crypto.MIN_PASSWORD_LENGTH
    with fresh(database) as session:
        stored = accounts.get_account_by_name(session, "alice")
        assert crypto.verify_password(generated, login_hash(session, stored))
        assert not crypto.verify_password("a brand new password", login_hash(session, stored))

    updates = [e for e in audit_rows(database, created.account.id) if e.action == "update"]
    assert [e.changes for e in updates] == [{"fields": ["password"]}] * 2
    assert all(e.entity == "account" and e.entity_id == created.account.id for e in updates)


def test_set_password_refuses_a_short_password(database: Database) -> None:
    created = new_account(database, "alice")
    with pytest.raises(ValidationError) as caught, database.transaction() as session:
        accounts.set_password(
            session, accounts.get_account_by_name(session, "alice"), 4, "too short", actor=audit.CLI
        )
    assert caught.value.field == "password"
    with fresh(database) as session:
        stored = accounts.get_account_by_name(session, "alice")
        assert crypto.verify_password(created.password, login_hash(session, stored))


def test_rotate_api_key_retires_the_old_key(database: Database) -> None:
    created = new_account(database, "alice")
    with database.transaction() as session:
        new_key = accounts.rotate_api_key(
            session, accounts.get_account_by_name(session, "alice"), actor=audit.CLI
        )
    assert new_key != created.api_key
    assert re.fullmatch(r"[0-9a-f]{64}", new_key)
    with fresh(database) as session:
        assert accounts.find_by_api_key(session, created.api_key) is None
        found = accounts.find_by_api_key(session, new_key)
        assert found is not None and found.id == created.account.id
        assert found.api_key_digest == hashlib.sha256(new_key.encode()).hexdigest()
    [entry] = [e for e in audit_rows(database) if e.action == "update"]
    assert entry.changes == {"fields": ["api_key"]}
    assert new_key not in json.dumps(entry.changes)


def test_deactivate_keeps_data_blocks_key_and_is_idempotent(database: Database, cipher: Cipher) -> None:
    created = new_account(database, "alice", domains=("example.com", "*.example.org"))
    new_provider(database, cipher, created.account.id, api_key="sg-key")
    with database.transaction() as session:
        accounts.deactivate_account(session, accounts.get_account_by_name(session, "alice"), actor=audit.CLI)
    with fresh(database) as session:
        assert accounts.find_by_api_key(session, created.api_key) is None
        stored = accounts.get_account(session, created.account.id)
        assert stored.active is False
        assert stored.email == "alice@example.com"
        assert stored.allowed_domains == ["example.com", "*.example.org"]
        assert crypto.verify_password(created.password, login_hash(session, stored))
        assert [p.name for p in providers.list_providers(session, created.account.id)] == ["sendgrid-main"]

    with database.transaction() as session:
        accounts.deactivate_account(session, accounts.get_account_by_name(session, "alice"), actor=audit.CLI)
    with fresh(database) as session:
        assert accounts.get_account(session, created.account.id).active is False
    deactivations = [e for e in audit_rows(database) if e.action == "deactivate"]
    assert len(deactivations) == 1
    assert deactivations[0].changes == {"fields": ["active"]}
    assert deactivations[0].entity_id == created.account.id


def _change_create(session: Session, _cipher: Cipher) -> None:
    accounts.create_account(
        session,
        name="bob",
        email="bob@example.com",
        allowed_domains=["bob.example.com"],
        bcrypt_cost=4,
        actor=audit.CLI,
    )


def _change_password(session: Session, _cipher: Cipher) -> None:
    accounts.set_password(
        session, accounts.get_account_by_name(session, "alice"), 4, "rolled back password", actor=audit.CLI
    )


def _change_key(session: Session, _cipher: Cipher) -> None:
    accounts.rotate_api_key(session, accounts.get_account_by_name(session, "alice"), actor=audit.CLI)


def _change_deactivate(session: Session, _cipher: Cipher) -> None:
    accounts.deactivate_account(session, accounts.get_account_by_name(session, "alice"), actor=audit.CLI)


def _change_provider(session: Session, cipher: Cipher) -> None:
    account = accounts.get_account_by_name(session, "alice")
    providers.create_provider(
        session,
        cipher,
        account_id=account.id,
        name="p",
        provider_type="mailgun",
        api_key="k",
        actor=audit.CLI,
    )


@pytest.mark.parametrize(
    "change",
    [_change_create, _change_password, _change_key, _change_deactivate, _change_provider],
    ids=["create", "set_password", "rotate_api_key", "deactivate", "create_provider"],
)
def test_transaction_that_raises_keeps_neither_change_nor_audit_row(
    database: Database, cipher: Cipher, change
) -> None:
    created = new_account(database, "alice")
    with pytest.raises(Boom), database.transaction() as session:
        change(session, cipher)
        session.flush()
        raise Boom
    with fresh(database) as session:
        assert [a.name for a in accounts.list_accounts(session)] == ["alice"]
        stored = accounts.get_account_by_name(session, "alice")
        assert stored.active is True
        assert crypto.verify_password(created.password, login_hash(session, stored))
        assert accounts.find_by_api_key(session, created.api_key) is not None
        assert providers.list_providers(session, created.account.id) == []
        assert [(e.action, e.entity) for e in audit.list_entries(session)] == [("create", "account")]


def test_update_account_applies_each_field_with_one_audit_row(database: Database) -> None:
    created = new_account(database, "alice")
    root = new_account(database, "root", is_admin=True).account
    admin = Actor("root", root.id)
    changes = {
        "email": "Ops@Example.ORG",
        "allowed_domains": ["Shop.Example.", "*.shop.example"],
        "is_admin": True,
        "allow_any_header_from": True,
        "limits": {"recipients_per_day": None, "messages_per_minute": 30},
        "password": "a fresh password",
    }
    with database.transaction() as session:
        account = accounts.get_account(session, created.account.id)
        fields = accounts.update_account(
            session, account, changes, actor=admin, bcrypt_cost=BCRYPT_COST, unique_domains=True
        ).fields
    assert fields == ["email", "password", "allowed_domains", "is_admin", "allow_any_header_from", "limits"]
    with fresh(database) as session:
        stored = accounts.get_account(session, created.account.id)
        assert stored.email == "Ops@example.org"
        assert stored.allowed_domains == ["shop.example", "*.shop.example"]
        assert stored.is_admin is True and stored.allow_any_header_from is True
        assert stored.limits == {"messages_per_minute": 30, "recipients_per_day": None}
        assert crypto.verify_password("a fresh password", login_hash(session, stored))
    row = audit_rows(database, created.account.id)[0]
    assert (row.action, row.actor, row.actor_id) == ("update", "root", admin.account_id)
    assert row.changes == {"fields": sorted(fields)}
    assert "a fresh password" not in json.dumps(row.changes)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "renamed"}, "name"),
        ({"allowed_domains": []}, "allowed_domains"),
        ({"limits": {"messages_per_hour": 0}}, "limits.messages_per_hour"),
        ({"limits": {"messages_per_week": 1}}, "limits.messages_per_week"),
        ({"limits": {"messages_per_hour": True}}, "limits.messages_per_hour"),
        ({"limits": "lots"}, "limits"),
        ({"active": "yes"}, "active"),
        ({"password": "short"}, "password"),
    ],
)
def test_update_account_rejects_bad_values_and_changes_nothing(
    database: Database, changes: dict, field: str
) -> None:
    created = new_account(database, "alice")
    with pytest.raises(ValidationError) as caught, database.transaction() as session:
        account = accounts.get_account(session, created.account.id)
        accounts.update_account(
            session, account, changes, actor=audit.CLI, bcrypt_cost=BCRYPT_COST, unique_domains=True
        )
    assert caught.value.field == field
    with fresh(database) as session:
        stored = accounts.get_account(session, created.account.id)
        assert stored.allowed_domains == ["alice.example.com"] and stored.limits == {}
    assert [row.action for row in audit_rows(database)] == ["create"]


def test_domain_taken_on_create_update_and_reactivation(database: Database) -> None:
    holder = new_account(database, "holder", domains=("*.shop.example",)).account
    other = new_account(database, "other").account
    with pytest.raises(accounts.DomainTaken) as caught:
        new_account(database, "newcomer", domains=("eu.shop.example",))
    assert (caught.value.domain, caught.value.held) == ("eu.shop.example", "*.shop.example")
    assert "eu.shop.example" in str(caught.value) and "holder" not in str(caught.value)

    def update(account_id: uuid.UUID, changes: dict, *, unique: bool = True) -> list[str]:
        with database.transaction() as session:
            account = accounts.get_account(session, account_id)
            return accounts.update_account(
                session, account, changes, actor=audit.CLI, bcrypt_cost=BCRYPT_COST, unique_domains=unique
            ).fields

    with pytest.raises(accounts.DomainTaken):
        update(other.id, {"allowed_domains": ["*.eu.shop.example"]})
    assert update(other.id, {"allowed_domains": ["shop.example"]}) == ["allowed_domains"]  # not covered
    assert update(holder.id, {"allowed_domains": ["*.shop.example", "x.shop.example"]})  # its own
    # A deactivated holder frees the domain; it cannot come back while another holds it.
    with database.transaction() as session:
        accounts.deactivate_account(session, accounts.get_account(session, holder.id), actor=audit.CLI)
    new_account(database, "successor", domains=("eu.shop.example",))
    with pytest.raises(accounts.DomainTaken) as caught:
        update(holder.id, {"active": True})
    assert "reactivate" in str(caught.value)
    assert update(holder.id, {"allowed_domains": ["*.shop.example"]}) == [
        "allowed_domains"
    ]  # inactive: no check
    assert update(holder.id, {"active": True}, unique=False) == ["active"]
    assert [row.action for row in audit_rows(database, holder.id)][:2] == ["reactivate", "update"]
    with fresh(database) as session:
        assert accounts.get_account(session, holder.id).active is True
    assert len(audit_rows(database)) == 8  # 3 creates and 5 changes; the refusals wrote nothing


def test_unique_domains_false_lets_two_accounts_share_one(database: Database) -> None:
    new_account(database, "first", domains=("shared.example",))
    with database.transaction() as session:
        created = accounts.create_account(
            session,
            name="second",
            email="s@example.com",
            allowed_domains=["shared.example"],
            bcrypt_cost=BCRYPT_COST,
            unique_domains=False,
            actor=audit.CLI,
        )
        assert created.account.allowed_domains == ["shared.example"]


# --- providers ------------------------------------------------------------------------------------


SMTP_CONFIG = {"host": "smtp.example.net", "port": 587, "tls": True, "username": "relay"}


def test_provider_create_get_list_and_secret_round_trip(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    created = new_provider(
        database,
        cipher,
        owner.id,
        name="smtp-out",
        provider_type="smtp",
        api_key="api-secret-4711",
        settings={"region": "eu"},
        smtp_config={**SMTP_CONFIG, "password": "smtp-secret-0815"},
    )
    new_provider(database, cipher, owner.id, name="a-mailgun", provider_type=ProviderType.MAILGUN)
    with fresh(database) as session:
        provider = providers.get_provider(session, owner.id, created.id)
        assert provider.name == "smtp-out"
        assert provider.provider_type is ProviderType.SMTP
        assert provider.settings == {"region": "eu"}
        assert provider.smtp_config == SMTP_CONFIG  # the password is kept apart
        assert provider.enabled is True
        secrets = providers.provider_secrets(cipher, provider)
        assert secrets.api_key == "api-secret-4711"
        assert secrets.smtp_password == "smtp-secret-0815"
        assert [p.name for p in providers.list_providers(session, owner.id)] == ["a-mailgun", "smtp-out"]
        other = providers.get_provider(session, owner.id, providers.list_providers(session, owner.id)[0].id)
        assert providers.provider_secrets(cipher, other) == providers.ProviderSecrets(None, None)

    [entry] = [e for e in audit_rows(database) if e.entity == "provider" and e.entity_id == created.id]
    assert entry.action == "create"
    assert entry.account_id == owner.id
    assert entry.changes == {
        "fields": ["api_key", "enabled", "name", "provider_type", "settings", "smtp_config"]
    }
    assert "secret" not in json.dumps(entry.changes)


def test_provider_secret_columns_hold_ciphertext(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    created = new_provider(
        database,
        cipher,
        owner.id,
        api_key="api-secret-4711",
        smtp_config={**SMTP_CONFIG, "password": "smtp-secret-0815"},
    )
    with fresh(database) as session:
        row = session.execute(select(EspProvider.__table__).where(EspProvider.id == created.id)).one()
    row_text = repr(row._asdict())
    assert "api-secret-4711" not in row_text and "smtp-secret-0815" not in row_text
    for blob, secret in (
        (row.api_key_encrypted, b"api-secret-4711"),
        (row.smtp_password_encrypted, b"smtp-secret-0815"),
    ):
        assert isinstance(blob, bytes)
        assert secret not in blob
        assert blob[:1] == b"\x01"
        assert len(blob) > len(secret)
    # Bound to its row and column: the api key blob does not open as the SMTP password.
    with pytest.raises(DecryptionError):
        cipher.decrypt(row.api_key_encrypted, b"esp_providers.smtp_password:" + created.id.bytes)


def test_provider_secret_copied_to_another_row_does_not_open(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    first = new_provider(database, cipher, owner.id, name="first", api_key="first-secret")
    second = new_provider(database, cipher, owner.id, name="second", api_key="second-secret")
    with database.transaction() as session:
        session.execute(
            update(EspProvider)
            .where(EspProvider.id == second.id)
            .values(api_key_encrypted=first.api_key_encrypted)
        )
    with fresh(database) as session:
        copied = providers.get_provider(session, owner.id, second.id)
        with pytest.raises(DecryptionError):
            providers.provider_secrets(cipher, copied)


def test_update_provider_changes_only_given_fields_and_keeps_secrets(
    database: Database, cipher: Cipher
) -> None:
    owner = new_account(database, "alice").account
    created = new_provider(
        database,
        cipher,
        owner.id,
        provider_type="smtp",
        api_key="old-api-key",
        smtp_config={**SMTP_CONFIG, "password": "old-smtp-password"},
    )

    with database.transaction() as session:
        provider = providers.get_provider(session, owner.id, created.id)
        providers.update_provider(
            session, cipher, provider, settings={"x": 1}, enabled=False, actor=audit.CLI
        )
    with fresh(database) as session:
        provider = providers.get_provider(session, owner.id, created.id)
        assert provider.settings == {"x": 1}
        assert provider.enabled is False
        assert provider.name == "sendgrid-main"
        assert providers.provider_secrets(cipher, provider) == providers.ProviderSecrets(
            "old-api-key", "old-smtp-password"
        )

    # A new smtp_config without a password keeps the stored password.
    with database.transaction() as session:
        provider = providers.get_provider(session, owner.id, created.id)
        providers.update_provider(
            session, cipher, provider, smtp_config={**SMTP_CONFIG, "port": 2525}, actor=audit.CLI
        )
    with fresh(database) as session:
        provider = providers.get_provider(session, owner.id, created.id)
        assert provider.smtp_config == {**SMTP_CONFIG, "port": 2525}
        assert providers.provider_secrets(cipher, provider).smtp_password == "old-smtp-password"

    with database.transaction() as session:
        provider = providers.get_provider(session, owner.id, created.id)
        providers.update_provider(
            session,
            cipher,
            provider,
            name="renamed",
            api_key="new-api-key",
            smtp_config={**SMTP_CONFIG, "password": "new-smtp-password"},
            actor=audit.CLI,
        )
    with fresh(database) as session:
        provider = providers.get_provider(session, owner.id, created.id)
        assert provider.name == "renamed"
        assert providers.provider_secrets(cipher, provider) == providers.ProviderSecrets(
            "new-api-key", "new-smtp-password"
        )

    # An explicit None clears a secret.
    with database.transaction() as session:
        provider = providers.get_provider(session, owner.id, created.id)
        providers.update_provider(session, cipher, provider, api_key=None, actor=audit.CLI)
    with fresh(database) as session:
        provider = providers.get_provider(session, owner.id, created.id)
        assert provider.api_key_encrypted is None
        assert providers.provider_secrets(cipher, provider).api_key is None

    updates = [e.changes["fields"] for e in reversed(audit_rows(database)) if e.action == "update"]
    assert updates == [
        ["enabled", "settings"],
        ["smtp_config"],
        ["api_key", "name", "smtp_config", "smtp_password"],
        ["api_key"],
    ]


def test_provider_of_another_tenant_is_not_found(database: Database, cipher: Cipher) -> None:
    alice = new_account(database, "alice").account
    mallory = new_account(database, "mallory").account
    created = new_provider(database, cipher, alice.id, api_key="alice-secret")
    with fresh(database) as session:
        with pytest.raises(NotFound):
            providers.get_provider(session, mallory.id, created.id)
        with pytest.raises(NotFound):
            providers.get_provider(session, alice.id, uuid.uuid4())
        assert providers.list_providers(session, mallory.id) == []
        assert [p.id for p in providers.list_providers(session, alice.id)] == [created.id]


def test_provider_names_are_unique_per_tenant(database: Database, cipher: Cipher) -> None:
    alice = new_account(database, "alice").account
    bob = new_account(database, "bob").account
    new_provider(database, cipher, alice.id, name="main")
    new_provider(database, cipher, alice.id, name="backup")
    with pytest.raises(Conflict), database.transaction() as session:
        providers.create_provider(
            session, cipher, account_id=alice.id, name="main", provider_type="ses", actor=audit.CLI
        )
    # The same name is fine for another tenant.
    new_provider(database, cipher, bob.id, name="main")
    # Renaming onto a sibling's name is a conflict too.
    with pytest.raises(Conflict), database.transaction() as session:
        backup = next(p for p in providers.list_providers(session, alice.id) if p.name == "backup")
        providers.update_provider(session, cipher, backup, name="main", actor=audit.CLI)
    with fresh(database) as session:
        assert [p.name for p in providers.list_providers(session, alice.id)] == ["backup", "main"]
        assert [p.name for p in providers.list_providers(session, bob.id)] == ["main"]


def test_delete_provider_deletes_its_routing_rules(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    doomed = new_provider(database, cipher, owner.id, name="doomed")
    kept = new_provider(database, cipher, owner.id, name="kept")
    doomed_rule = new_rule(database, owner.id, doomed.id, "to-doomed", 1)
    kept_rule = new_rule(database, owner.id, kept.id, "to-kept", 2)
    with database.transaction() as session:
        providers.delete_provider(
            session, providers.get_provider(session, owner.id, doomed.id), actor=audit.CLI
        )
    with fresh(database) as session:
        with pytest.raises(NotFound):
            providers.get_provider(session, owner.id, doomed.id)
        with pytest.raises(NotFound):
            routing_rules.get_rule(session, owner.id, doomed_rule.id)
        assert [r.id for r in routing_rules.list_rules(session, owner.id)] == [kept_rule.id]
        assert [p.name for p in providers.list_providers(session, owner.id)] == ["kept"]
    # The rule taken along is audited as deleted too, in the same transaction.
    deleted = {(e.entity, e.entity_id, e.account_id) for e in audit_rows(database) if e.action == "delete"}
    assert deleted == {("provider", doomed.id, owner.id), ("routing_rule", doomed_rule.id, owner.id)}


def test_provider_and_rule_caps_count_per_account(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    other = new_account(database, "bob").account
    first = new_provider(database, cipher, owner.id, "one", max_providers=2)
    new_provider(database, cipher, owner.id, "two", max_providers=2)
    with pytest.raises(providers.QuotaExceeded) as caught:
        new_provider(database, cipher, owner.id, "three", max_providers=2)
    assert "limits.max_providers_per_account" in str(caught.value) and "2" in str(caught.value)
    new_provider(database, cipher, other.id, "three", max_providers=2)
    new_provider(database, cipher, owner.id, "uncapped")  # None: no cap (the storage default)

    new_rule(database, owner.id, first.id, "r1", 1, max_rules=1)
    with pytest.raises(providers.QuotaExceeded) as caught:
        new_rule(database, owner.id, first.id, "r2", 2, max_rules=1)
    assert "limits.max_rules_per_account" in str(caught.value)
    with fresh(database) as session:
        assert len(providers.list_providers(session, owner.id)) == 3
        assert len(routing_rules.list_rules(session, owner.id)) == 1


# --- routing rules --------------------------------------------------------------------------------


def test_rules_are_listed_by_priority(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    provider = new_provider(database, cipher, owner.id)
    for name, priority, enabled in [
        ("twenty", 20, True),
        ("five", 5, True),
        ("ten-a", 10, False),
        ("ten-b", 10, True),
        ("zero", 0, True),
    ]:
        new_rule(database, owner.id, provider.id, name, priority, enabled=enabled)
    with fresh(database) as session:
        assert [r.name for r in routing_rules.list_rules(session, owner.id)] == [
            "zero",
            "five",
            "ten-a",
            "ten-b",
            "twenty",
        ]
        enabled = routing_rules.list_rules(session, owner.id, enabled_only=True)
        assert [r.name for r in enabled] == ["zero", "five", "ten-b", "twenty"]


def test_rule_get_update_delete(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    first = new_provider(database, cipher, owner.id, name="first")
    second = new_provider(database, cipher, owner.id, name="second")
    rule = new_rule(database, owner.id, first.id, "eu", 10, conditions={"recipient_domains": ["example.de"]})
    other = new_rule(database, owner.id, first.id, "rest", 20)
    with fresh(database) as session:
        stored = routing_rules.get_rule(session, owner.id, rule.id)
        assert (stored.name, stored.priority, stored.provider_id) == ("eu", 10, first.id)
        assert stored.conditions == {"recipient_domains": ["example.de"]}
        assert stored.enabled is True

    with database.transaction() as session:
        routing_rules.update_rule(
            session,
            routing_rules.get_rule(session, owner.id, rule.id),
            {"priority": 30, "provider_id": second.id, "conditions": {"sender_domains": ["x.example"]}},
            actor=audit.CLI,
        )
    with fresh(database) as session:
        stored = routing_rules.get_rule(session, owner.id, rule.id)
        assert (stored.priority, stored.provider_id) == (30, second.id)
        assert stored.conditions == {"sender_domains": ["x.example"]}
        assert [r.name for r in routing_rules.list_rules(session, owner.id)] == ["rest", "eu"]

    with pytest.raises(ValidationError) as caught, database.transaction() as session:
        routing_rules.update_rule(
            session, routing_rules.get_rule(session, owner.id, rule.id), {"colour": 1}, actor=audit.CLI
        )
    assert caught.value.field == "colour"

    with database.transaction() as session:
        routing_rules.delete_rule(
            session, routing_rules.get_rule(session, owner.id, rule.id), actor=audit.CLI
        )
    with fresh(database) as session:
        with pytest.raises(NotFound):
            routing_rules.get_rule(session, owner.id, rule.id)
        assert [r.id for r in routing_rules.list_rules(session, owner.id)] == [other.id]

    entries = [(e.action, e.changes) for e in reversed(audit_rows(database)) if e.entity_id == rule.id]
    assert entries == [
        ("create", {"fields": ["conditions", "enabled", "name", "priority", "provider_id"]}),
        ("update", {"fields": ["conditions", "priority", "provider_id"]}),
        ("delete", {"fields": []}),
    ]


@pytest.mark.parametrize("priority", [-1, -100, True, 1.5, "1"])
def test_invalid_priority_is_rejected(database: Database, cipher: Cipher, priority: object) -> None:
    owner = new_account(database, "alice").account
    provider = new_provider(database, cipher, owner.id)
    with pytest.raises(ValidationError) as caught, database.transaction() as session:
        routing_rules.create_rule(
            session,
            account_id=owner.id,
            provider_id=provider.id,
            name="r",
            priority=priority,
            actor=audit.CLI,
        )
    assert caught.value.field == "priority"
    rule = new_rule(database, owner.id, provider.id, "r", 3)
    with pytest.raises(ValidationError) as caught, database.transaction() as session:
        routing_rules.update_rule(
            session,
            routing_rules.get_rule(session, owner.id, rule.id),
            {"priority": priority},
            actor=audit.CLI,
        )
    assert caught.value.field == "priority"
    with fresh(database) as session:
        assert [(r.name, r.priority) for r in routing_rules.list_rules(session, owner.id)] == [("r", 3)]


def test_rules_cannot_use_another_tenants_provider(database: Database, cipher: Cipher) -> None:
    alice = new_account(database, "alice").account
    mallory = new_account(database, "mallory").account
    alice_provider = new_provider(database, cipher, alice.id)
    mallory_provider = new_provider(database, cipher, mallory.id)
    with pytest.raises(NotFound), database.transaction() as session:
        routing_rules.create_rule(
            session,
            account_id=mallory.id,
            provider_id=alice_provider.id,
            name="steal",
            priority=1,
            actor=audit.CLI,
        )
    rule = new_rule(database, mallory.id, mallory_provider.id, "own", 1)
    with pytest.raises(NotFound), database.transaction() as session:
        routing_rules.update_rule(
            session,
            routing_rules.get_rule(session, mallory.id, rule.id),
            {"provider_id": alice_provider.id},
            actor=audit.CLI,
        )
    with fresh(database) as session:
        with pytest.raises(NotFound):
            routing_rules.get_rule(session, alice.id, rule.id)
        assert routing_rules.list_rules(session, alice.id) == []
        assert routing_rules.get_rule(session, mallory.id, rule.id).provider_id == mallory_provider.id


# --- messages -------------------------------------------------------------------------------------


RAW_MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org, carol@example.org\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?= =?iso-8859-1?q?_=E0_bient=F4t?=\r\n"
    b"X-Eight-Bit: caf\xe9 \xff\xfe\r\n"
    b"X-Nul: before\x00after\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Body with 8-bit \xe9\xff and a NUL \x00 byte.\r\n"
    b".leading dot\r\n"
)


def enqueue(db: Database, cipher: Cipher, account_id: uuid.UUID, data: bytes = RAW_MESSAGE) -> Message:
    with db.transaction() as session:
        message = messages.enqueue_message(
            session,
            cipher,
            account_id=account_id,
            sender="alice@example.com",
            recipients=["bob@example.org", "carol@example.org"],
            data=data,
            correlation_id="req-0123456789abcdef",
        )
    db.remove_session()
    return message


def test_enqueue_message_round_trip(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    queued = enqueue(database, cipher, owner.id)
    with fresh(database) as session:
        message = messages.get_message(session, queued.id, account_id=owner.id)
        assert message.status is MessageStatus.QUEUED
        assert message.account_id == owner.id
        assert message.sender == "alice@example.com"
        assert message.recipients == ["bob@example.org", "carol@example.org"]
        assert message.size == len(RAW_MESSAGE)
        assert message.correlation_id == "req-0123456789abcdef"
        assert message.attempts == 0
        assert message.provider_id is None
        assert message.subject == "Grüße aus Köln à bientôt"
        names = [pair[0] for pair in message.headers]
        assert names == ["From", "To", "Subject", "X-Eight-Bit", "X-Nul", "Message-ID"]
        assert all(isinstance(pair, list) and len(pair) == 2 for pair in message.headers)
        headers = dict(message.headers)
        assert headers["From"] == "Alice <alice@example.com>"
        assert headers["Message-ID"] == "<1@example.com>"
        assert "\x00" not in headers["X-Nul"]
        assert headers["X-Nul"].startswith("before") and headers["X-Nul"].endswith("after")
        assert headers["X-Eight-Bit"].startswith("caf")
        assert messages.message_body(cipher, message) == RAW_MESSAGE
        raw = session.scalar(select(Message.body_encrypted).where(Message.id == queued.id))
        assert b"Body with 8-bit" not in raw


def test_enqueue_message_without_subject(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    data = b"From: a@example.com\r\n\r\nno subject here\r\n"
    queued = enqueue(database, cipher, owner.id, data)
    with fresh(database) as session:
        message = messages.get_message(session, queued.id)
        assert message.subject is None
        assert message.headers == [["From", "a@example.com"]]
        assert messages.message_body(cipher, message) == data


def test_enqueue_message_keeps_raw_utf8_header_text(database: Database, cipher: Cipher) -> None:
    """RFC 6532 (SMTPUTF8) headers carry UTF-8 unencoded; valid UTF-8 must survive as text."""
    owner = new_account(database, "alice").account
    data = "From: Jörg <joerg@example.com>\r\nSubject: Grüße aus Köln\r\n\r\nHallo\r\n".encode()
    queued = enqueue(database, cipher, owner.id, data)
    with fresh(database) as session:
        message = messages.get_message(session, queued.id)
        assert message.subject == "Grüße aus Köln"
        assert message.headers == [["From", "Jörg <joerg@example.com>"], ["Subject", "Grüße aus Köln"]]


def test_message_of_another_tenant_is_not_found(database: Database, cipher: Cipher) -> None:
    alice = new_account(database, "alice").account
    mallory = new_account(database, "mallory").account
    queued = enqueue(database, cipher, alice.id)
    with fresh(database) as session:
        with pytest.raises(NotFound):
            messages.get_message(session, queued.id, account_id=mallory.id)
        with pytest.raises(NotFound):
            messages.get_message(session, uuid.uuid4(), account_id=alice.id)
        assert messages.get_message(session, queued.id, account_id=alice.id).id == queued.id
        assert messages.get_message(session, queued.id).id == queued.id


def test_purged_message_body_is_not_found(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    queued = enqueue(database, cipher, owner.id)
    with database.transaction() as session:
        messages.get_message(session, queued.id).body_encrypted = None
    with fresh(database) as session:
        message = messages.get_message(session, queued.id, account_id=owner.id)
        assert message.body_encrypted is None
        assert message.subject == "Grüße aus Köln à bientôt"
        with pytest.raises(NotFound):
            messages.message_body(cipher, message)


def test_message_body_is_bound_to_its_message(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    first = enqueue(database, cipher, owner.id)
    second = enqueue(database, cipher, owner.id, b"Subject: other\r\n\r\nother\r\n")
    with database.transaction() as session:
        first_blob = session.scalar(select(Message.body_encrypted).where(Message.id == first.id))
        session.execute(update(Message).where(Message.id == second.id).values(body_encrypted=first_blob))
    with fresh(database) as session:
        with pytest.raises(DecryptionError):
            messages.message_body(cipher, messages.get_message(session, second.id))


# --- timestamps -----------------------------------------------------------------------------------


def test_timestamps_come_back_timezone_aware_utc(database: Database, cipher: Cipher) -> None:
    owner = new_account(database, "alice").account
    provider = new_provider(database, cipher, owner.id)
    rule = new_rule(database, owner.id, provider.id, "r", 1)
    queued = enqueue(database, cipher, owner.id)
    with fresh(database) as session:
        account = accounts.get_account(session, owner.id)
        stored_provider = providers.get_provider(session, owner.id, provider.id)
        stored_rule = routing_rules.get_rule(session, owner.id, rule.id)
        message = messages.get_message(session, queued.id)
        [entry, *_] = audit.list_entries(session)
        for value in (
            account.created_at,
            account.updated_at,
            stored_provider.created_at,
            stored_rule.created_at,
            message.created_at,
            message.next_attempt_at,
            entry.created_at,
        ):
            assert_utc_aware(value)
        assert message.processed_at is None

    # A naive datetime is refused rather than stored with a guessed zone.
    with pytest.raises(StatementError, match="naive datetime"), database.transaction() as session:
        messages.get_message(session, queued.id).next_attempt_at = datetime(2030, 1, 1)
        session.flush()
    # An aware non-UTC datetime is stored as the same instant.
    instant = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    with database.transaction() as session:
        messages.get_message(session, queued.id).next_attempt_at = instant.astimezone(
            timezone(timedelta(hours=5))
        )
    with fresh(database) as session:
        stored = messages.get_message(session, queued.id).next_attempt_at
        assert stored == instant
        assert stored.utcoffset() == timedelta(0)


# --- concurrency and outages ----------------------------------------------------------------------


def test_racing_duplicate_account_name_is_conflict(pg_url: str, make_config) -> None:
    """The unique index, not only the pre-check, turns a race into Conflict."""
    db = Database(make_config(pg_url).database)
    errors: list[BaseException] = []

    def second_writer() -> None:
        try:
            with db.transaction() as session:
                accounts.create_account(
                    session,
                    name="racer",
                    email="b@example.com",
                    allowed_domains=["example.com"],
                    bcrypt_cost=4,
                    actor=audit.CLI,
                )
        except BaseException as error:  # handed to the main thread
            errors.append(error)
        finally:
            db.remove_session()

    thread = threading.Thread(target=second_writer)
    dbname = pg_url.rsplit("/", 1)[1]
    try:
        with db.transaction() as session:
            accounts.create_account(
                session,
                name="racer",
                email="a@example.com",
                allowed_domains=["example.com"],
                bcrypt_cost=4,
                actor=audit.CLI,
            )
            thread.start()
            # Commit only once the second writer waits on our uncommitted row.
            _wait_for_lock_waiter(pg_url, dbname)
        thread.join(30)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], Conflict), errors
        with fresh(db) as session:
            assert [a.email for a in accounts.list_accounts(session)] == ["a@example.com"]
            assert len(audit.list_entries(session)) == 1
    finally:
        thread.join(30)
        db.dispose()


def _wait_for_lock_waiter(pg_url: str, dbname: str, timeout: float = 20.0) -> None:
    connection = psycopg2.connect(pg_url)
    connection.autocommit = True

    def waiting() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                (dbname,),
            )
            return bool(cursor.fetchone()[0])

    try:
        wait_for(waiting, "the second writer to wait on the first one's row", timeout=timeout)
    finally:
        connection.close()


def test_a_grant_waits_for_a_concurrent_grant_and_then_sees_it(pg_url: str, make_config) -> None:
    """The domain check holds an advisory lock to the end of its transaction: a second grant
    waits for the first to commit, then finds the domain taken."""
    db = Database(make_config(pg_url).database)
    holding, release = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    def first() -> None:
        with db.transaction() as session:
            accounts.create_account(
                session, name="first", email="f@example.com", allowed_domains=["*.race.example"],
                bcrypt_cost=BCRYPT_COST, actor=audit.CLI,
            )  # fmt: skip
            holding.set()
            release.wait(timeout=30)
        db.remove_session()

    def second() -> None:
        try:
            new_account(db, "second", domains=("eu.race.example",))
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)
        else:
            outcome.append(None)
        db.remove_session()

    def waiting_for_the_lock() -> bool:
        with db.autocommit() as connection:
            query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            return connection.exec_driver_sql(query).scalar() == 1

    threads = [threading.Thread(target=first)]
    threads[0].start()
    try:
        assert holding.wait(timeout=30)
        threads.append(threading.Thread(target=second))
        threads[1].start()
        wait_for(waiting_for_the_lock, "the second grant to wait on the advisory lock", timeout=30)
        assert outcome == []  # still waiting
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=30)
    try:
        assert len(outcome) == 1 and isinstance(outcome[0], accounts.DomainTaken), outcome
        with fresh(db) as session:
            assert [a.name for a in accounts.list_accounts(session)] == ["first"]
    finally:
        db.dispose()


def test_unreachable_database_is_database_unavailable(make_config) -> None:
    config = make_config("postgresql://u:p@127.0.0.1:1/x", database={"connect_timeout": "1s"})
    db = Database(config.database)
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable), db.transaction() as session:
            accounts.list_accounts(session)
        assert db.ping() is False
        assert time.monotonic() - started < 30
    finally:
        db.dispose()


def test_postgresql_outage_then_recovery_without_a_new_database_object(
    pg_url: str, make_config, postgresql_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep this test last: it stops the session's cluster and starts it again."""
    db = Database(make_config(pg_url, database={"connect_timeout": "1s"}).database)
    stopped = False
    try:
        new_account(db, "before")
        assert db.ping() is True

        # A change in flight when the server goes away is not half-stored.
        with pytest.raises(DatabaseUnavailable), db.transaction() as session:
            accounts.create_account(
                session,
                name="inflight",
                email="i@example.com",
                allowed_domains=["example.com"],
                bcrypt_cost=4,
                actor=audit.CLI,
            )
            stopped = True
            postgresql_server.stop()

        with pytest.raises(DatabaseUnavailable), db.transaction() as session:
            accounts.list_accounts(session)
        assert db.ping() is False
        with pytest.raises(DatabaseUnavailable), db.transaction() as session:
            accounts.find_by_api_key(session, "x")

        postgresql_server.start()
        wait_until_accepting(postgresql_server)
        stopped = False

        # The same Database object recovers by itself.
        assert db.ping() is True
        with db.transaction() as session:
            assert [a.name for a in accounts.list_accounts(session)] == ["before"]
        new_account(db, "after")

        # A restart while the pool sits idle: its connections are stale, and the very
        # first transaction afterwards must still succeed (a connection idle past the
        # threshold is pinged at checkout and replaced). The threshold is made zero
        # here so that "idle" does not depend on how fast the cluster restarts.
        monkeypatch.setattr(session_module, "PING_IDLE_AFTER_SECONDS", 0.0)
        stopped = True
        postgresql_server.stop()
        postgresql_server.start()
        wait_until_accepting(postgresql_server)
        stopped = False
        db.remove_session()
        with db.transaction() as session:
            assert [a.name for a in accounts.list_accounts(session)] == ["after", "before"]
        assert db.ping() is True
    finally:
        if stopped or not postgresql_server.running():
            postgresql_server.start()
            wait_until_accepting(postgresql_server)
        db.dispose()
