"""The migrated schema is exactly the models, on PostgreSQL and on SQLite."""

from __future__ import annotations

import uuid

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import column, create_engine, inspect, table
from sqlalchemy.orm import Session

from smtp_proxy.db.migrate import alembic_config, current_revision, head_revision, upgrade
from smtp_proxy.db.models import Account, Base, Message
from smtp_proxy.db.types import utcnow


def test_migrated_schema_matches_models(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_upgrade_is_idempotent(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        head = head_revision()
        assert upgrade(engine) == (head, head)
        assert set(inspect(engine).get_table_names()) >= {
            "accounts",
            "esp_providers",
            "routing_rules",
            "messages",
            "delivery_logs",
            "audit_log",
        }
    finally:
        engine.dispose()


def test_migration_0009_adds_the_dsn_columns_and_takes_them_away(db_url: str) -> None:
    """Down to 0008 with a message and an account in it, and up again: the rows stay, with defaults."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            command.downgrade(alembic_config(connection), "0008")
            connection.commit()
        messages = {c["name"] for c in inspect(engine).get_columns("messages")}
        assert not messages & {"dsn_ret", "dsn_envid", "dsn_recipients", "is_bounce"}
        assert "bounces" not in {c["name"] for c in inspect(engine).get_columns("accounts")}
        account_id, message_id, now = uuid.uuid4(), uuid.uuid4(), utcnow()
        accounts = table("accounts", *(column(c, Account.__table__.c[c].type) for c in _0008_ACCOUNT_COLUMNS))
        old_messages = table(
            "messages", *(column(c, Message.__table__.c[c].type) for c in _0008_MESSAGE_COLUMNS)
        )
        with engine.begin() as connection:
            connection.execute(
                accounts.insert().values(
                    id=account_id, name="old", email="old@example.com", api_key_digest="0" * 64,
                    allowed_domains=[], is_admin=False, active=True, allow_any_header_from=False,
                    limits={}, created_at=now, updated_at=now,
                )
            )  # fmt: skip
            connection.execute(
                old_messages.insert().values(
                    id=message_id, account_id=account_id, sender="a@example.com", recipients=["b@x.test"],
                    headers=[], size=1, status="queued", correlation_id="c", attempts=0,
                    next_attempt_at=now, created_at=now, updated_at=now,
                )
            )  # fmt: skip
        assert upgrade(engine) == ("0008", head_revision())
        with Session(engine) as session:
            message = session.get(Message, message_id)
            assert message is not None
            assert (message.dsn_ret, message.dsn_envid, message.dsn_recipients) == (None, None, None)
            assert message.is_bounce is False  # the server default filled the old row
            assert session.get(Account, account_id).bounces is None  # the config's default
    finally:
        engine.dispose()


_0008_ACCOUNT_COLUMNS = (
    "id", "name", "email", "api_key_digest", "allowed_domains", "is_admin", "active",
    "allow_any_header_from", "limits", "created_at", "updated_at",
)  # fmt: skip
_0008_MESSAGE_COLUMNS = (
    "id", "account_id", "sender", "recipients", "headers", "size", "status", "correlation_id",
    "attempts", "next_attempt_at", "created_at", "updated_at",
)  # fmt: skip
