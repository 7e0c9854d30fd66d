"""The suppression list: recipients an account no longer sends to

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10

One row per (account, normalised address): added by the worker when a
provider refuses a recipient permanently (``hard_bounce``, with the message,
provider and reply that caused it) or through the API (``manual``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

REASON = sa.Enum("hard_bounce", "manual", name="suppression_reason")


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("address", sa.String(length=254), nullable=False),
        sa.Column("reason", REASON, nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=True),
        sa.Column("provider_id", sa.Uuid(), nullable=True),
        sa.Column("response_code", sa.Integer(), nullable=True),
        sa.Column("response_text", sa.String(length=1000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_suppressions_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_suppressions_message_id_messages"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["provider_id"],
            ["esp_providers.id"],
            name=op.f("fk_suppressions_provider_id_esp_providers"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressions")),
        sa.UniqueConstraint("account_id", "address", name=op.f("uq_suppressions_account_id_address")),
    )
    op.create_index(
        op.f("ix_suppressions_account_id_created_at_id"),
        "suppressions",
        ["account_id", "created_at", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_suppressions_account_id_created_at_id"), table_name="suppressions")
    op.drop_table("suppressions")
    REASON.drop(op.get_bind(), checkfirst=True)
