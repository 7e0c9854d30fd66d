"""dsn: RFC 3461 parameters kept with each message, bounces marked, an account's bounce setting

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-09

What the listener parsed from MAIL FROM (RET, ENVID) and RCPT TO (NOTIFY, ORCPT)
stays with the message, so the worker can honour it when it writes a delivery
status notification (RFC 3464). ``dsn_recipients`` is written only when some
recipient gave a parameter: the common message stores NULLs. ``is_bounce`` marks
the notifications themselves (never answered with another), and ``accounts.bounces``
overrides the ``delivery.bounces`` default when not NULL. ``delay_notified``: the
sender was told once that the message is delayed (``delivery.delay_notice_after``).
A partial index finds an account's notifications (they are few) for the API's
``?is_bounce=true``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("dsn_ret", sa.String(length=4), nullable=True))
        batch.add_column(sa.Column("dsn_envid", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("dsn_recipients", JSON_DOC, nullable=True))
        batch.add_column(sa.Column("is_bounce", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("delay_notified", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index(
        "ix_messages_bounces",
        "messages",
        ["account_id", "created_at", "id"],
        unique=False,
        postgresql_where=sa.text("is_bounce"),
        sqlite_where=sa.text("is_bounce"),
    )
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("bounces", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("bounces")
    op.drop_index("ix_messages_bounces", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("delay_notified")
        batch.drop_column("is_bounce")
        batch.drop_column("dsn_recipients")
        batch.drop_column("dsn_envid")
        batch.drop_column("dsn_ret")
