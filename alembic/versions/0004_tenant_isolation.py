"""tenant isolation: header-From exemption, per-account sending limits, fair claims

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

``allow_any_header_from`` lets an admin exempt one account from the From:/Sender:
alignment check. ``limits`` holds an account's own sending limits over the
config's defaults. The (account_id, status, next_attempt_at) index lets the
worker take each account's oldest due messages in turn, so that one account's
backlog cannot delay another account's new message.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column("allow_any_header_from", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("limits", JSON_DOC, nullable=False, server_default=sa.text("'{}'")))
    with op.batch_alter_table("accounts") as batch:
        # The defaults only filled existing rows; the models set both on insert.
        batch.alter_column("allow_any_header_from", server_default=None)
        batch.alter_column("limits", server_default=None)
    op.create_index(
        op.f("ix_messages_account_id_status_next_attempt_at"),
        "messages",
        ["account_id", "status", "next_attempt_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_messages_account_id_status_next_attempt_at"), table_name="messages")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("limits")
        batch.drop_column("allow_any_header_from")
