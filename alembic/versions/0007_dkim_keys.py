"""DKIM keys per account domain

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10

``dkim_keys`` holds each key's public half (the DNS record's p=) and its private
half sealed with the encryption key, bound to the row. (domain, selector) is one
DNS name, so it is unique across the relay.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ALGORITHM = sa.Enum("rsa-sha256", "ed25519-sha256", name="dkim_algorithm")


def upgrade() -> None:
    op.create_table(
        "dkim_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("selector", sa.String(length=63), nullable=False),
        sa.Column("algorithm", ALGORITHM, nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("private_key_encrypted", sa.LargeBinary(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_dkim_keys_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dkim_keys")),
        sa.UniqueConstraint("domain", "selector", name=op.f("uq_dkim_keys_domain_selector")),
    )
    op.create_index(op.f("ix_dkim_keys_account_id"), "dkim_keys", ["account_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_dkim_keys_account_id"), table_name="dkim_keys")
    op.drop_table("dkim_keys")
    ALGORITHM.drop(op.get_bind(), checkfirst=True)
