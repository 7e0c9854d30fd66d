"""The migrated schema is exactly the models, on PostgreSQL and on SQLite."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from smtp_proxy.db.migrate import current_revision, head_revision, upgrade
from smtp_proxy.db.models import Base


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
