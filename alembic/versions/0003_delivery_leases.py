"""delivery leases: the claim that holds a processing message; the purge's index

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

A worker claims messages under a lease: status processing, next_attempt_at
the lease's end, lease_id the claim. The outcome is written only while the
claim still holds, so a worker whose lease ran out (and whose messages another
worker took over) cannot overwrite the newer outcome. The partial index finds
the finished messages that still hold a body, for the retention purge.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_PURGEABLE = "body_encrypted IS NOT NULL AND processed_at IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("lease_id", sa.Uuid(), nullable=True))
    op.create_index(
        "ix_messages_purgeable",
        "messages",
        ["processed_at"],
        unique=False,
        postgresql_where=sa.text(_PURGEABLE),
        sqlite_where=sa.text(_PURGEABLE),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_purgeable", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("lease_id")
