"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25

The tables of the foundation: accounts, esp_providers, routing_rules, messages,
delivery_logs and audit_log. Must produce exactly smtp_proxy.db.models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ENUMS = ("provider_type", "message_status", "delivery_status")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("password_hash", sa.String(length=60), nullable=False),
        sa.Column("api_key_digest", sa.String(length=64), nullable=False),
        sa.Column("allowed_domains", JSON_DOC, nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("api_key_digest", name=op.f("uq_accounts_api_key_digest")),
        sa.UniqueConstraint("name", name=op.f("uq_accounts_name")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=True),
        sa.Column("actor_id", sa.Uuid(), nullable=True),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("entity_id", sa.Uuid(), nullable=False),
        sa.Column("changes", JSON_DOC, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_audit_log_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["actor_id"],
            ["accounts.id"],
            name=op.f("fk_audit_log_actor_id_accounts"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(
        op.f("ix_audit_log_account_id_created_at"),
        "audit_log",
        ["account_id", "created_at"],
        unique=False,
    )
    op.create_table(
        "esp_providers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column(
            "provider_type",
            sa.Enum("sendgrid", "mailgun", "ses", "smtp", name="provider_type"),
            nullable=False,
        ),
        sa.Column("api_key_encrypted", sa.LargeBinary(), nullable=True),
        sa.Column("settings", JSON_DOC, nullable=False),
        sa.Column("smtp_config", JSON_DOC, nullable=True),
        sa.Column("smtp_password_encrypted", sa.LargeBinary(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_esp_providers_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_esp_providers")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_esp_providers_account_id_name")),
    )
    op.create_index(
        op.f("ix_esp_providers_account_id"),
        "esp_providers",
        ["account_id"],
        unique=False,
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("sender", sa.String(length=256), nullable=False),
        sa.Column("recipients", JSON_DOC, nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("headers", JSON_DOC, nullable=False),
        sa.Column("body_encrypted", sa.LargeBinary(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("queued", "processing", "delivered", "failed", name="message_status"),
            nullable=False,
        ),
        sa.Column("provider_id", sa.Uuid(), nullable=True),
        sa.Column("correlation_id", sa.String(length=64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_messages_attempts_not_negative")),
        sa.CheckConstraint("size >= 0", name=op.f("ck_messages_size_not_negative")),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_messages_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["provider_id"],
            ["esp_providers.id"],
            name=op.f("fk_messages_provider_id_esp_providers"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
    )
    op.create_index(
        op.f("ix_messages_account_id_created_at"),
        "messages",
        ["account_id", "created_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_messages_account_id_status"),
        "messages",
        ["account_id", "status"],
        unique=False,
    )
    op.create_index(op.f("ix_messages_correlation_id"), "messages", ["correlation_id"], unique=False)
    op.create_index(op.f("ix_messages_provider_id"), "messages", ["provider_id"], unique=False)
    op.create_index(
        op.f("ix_messages_status_next_attempt_at"),
        "messages",
        ["status", "next_attempt_at"],
        unique=False,
    )
    op.create_table(
        "routing_rules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("provider_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("conditions", JSON_DOC, nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("priority >= 0", name=op.f("ck_routing_rules_priority_not_negative")),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_routing_rules_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["provider_id"],
            ["esp_providers.id"],
            name=op.f("fk_routing_rules_provider_id_esp_providers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing_rules")),
    )
    op.create_index(
        op.f("ix_routing_rules_account_id_priority"),
        "routing_rules",
        ["account_id", "priority"],
        unique=False,
    )
    op.create_index(
        op.f("ix_routing_rules_provider_id"),
        "routing_rules",
        ["provider_id"],
        unique=False,
    )
    op.create_table(
        "delivery_logs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("provider_id", sa.Uuid(), nullable=True),
        sa.Column(
            "status",
            sa.Enum("delivered", "deferred", "failed", name="delivery_status"),
            nullable=False,
        ),
        sa.Column("response_code", sa.Integer(), nullable=True),
        sa.Column("response_text", sa.String(length=1000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_delivery_logs_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["provider_id"],
            ["esp_providers.id"],
            name=op.f("fk_delivery_logs_provider_id_esp_providers"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_logs")),
    )
    op.create_index(
        op.f("ix_delivery_logs_message_id"),
        "delivery_logs",
        ["message_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_delivery_logs_provider_id"),
        "delivery_logs",
        ["provider_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_delivery_logs_provider_id"), table_name="delivery_logs")
    op.drop_index(op.f("ix_delivery_logs_message_id"), table_name="delivery_logs")
    op.drop_table("delivery_logs")
    op.drop_index(op.f("ix_routing_rules_provider_id"), table_name="routing_rules")
    op.drop_index(op.f("ix_routing_rules_account_id_priority"), table_name="routing_rules")
    op.drop_table("routing_rules")
    op.drop_index(op.f("ix_messages_status_next_attempt_at"), table_name="messages")
    op.drop_index(op.f("ix_messages_provider_id"), table_name="messages")
    op.drop_index(op.f("ix_messages_correlation_id"), table_name="messages")
    op.drop_index(op.f("ix_messages_account_id_status"), table_name="messages")
    op.drop_index(op.f("ix_messages_account_id_created_at"), table_name="messages")
    op.drop_table("messages")
    op.drop_index(op.f("ix_esp_providers_account_id"), table_name="esp_providers")
    op.drop_table("esp_providers")
    op.drop_index(op.f("ix_audit_log_account_id_created_at"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("accounts")
    if op.get_bind().dialect.name == "postgresql":
        for name in ENUMS:
            op.execute(sa.text(f"DROP TYPE IF EXISTS {name}"))
