"""message pages: newest first within a tenant and status

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

GET /api/v1/messages?status=... reads one page, newest first, of a tenant's
messages in one status. (account_id, status, created_at, id) answers it from
the index in order; the old (account_id, status) index made PostgreSQL sort
every matching row for each page.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_messages_account_id_status_created_at_id"),
        "messages",
        ["account_id", "status", "created_at", "id"],
        unique=False,
    )
    op.drop_index(op.f("ix_messages_account_id_status"), table_name="messages")


def downgrade() -> None:
    op.create_index(op.f("ix_messages_account_id_status"), "messages", ["account_id", "status"], unique=False)
    op.drop_index(op.f("ix_messages_account_id_status_created_at_id"), table_name="messages")
