"""SMTP credentials per sender, relay networks, and the credential behind each message

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

An account may hold several SMTP logins (``smtp_credentials``), one per
application or device, each revoked on its own. The account's own login moves
there as the credential labelled ``account`` whose user name is the account's
name, so every existing login keeps working; ``accounts.password_hash`` goes.
``relay_networks`` lets an admin give an account networks whose clients send
without AUTH. ``messages.credential_id`` records who submitted each message, and
``audit_log.client_ip`` the address each API change came from.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
PRIMARY_LABEL = "account"
# A bcrypt hash no password matches (its digest part is not bcrypt's base64 of any output).
UNUSABLE_HASH = "$2b$12$" + "." * 53


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "smtp_credentials",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("username", sa.String(length=129), nullable=False),
        sa.Column("password_hash", sa.String(length=60), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("allowed_ips", JSON_DOC, nullable=False),
        sa.Column("allowed_domains", JSON_DOC, nullable=True),
        sa.Column("last_used_at", _timestamp(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_smtp_credentials_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smtp_credentials")),
        sa.UniqueConstraint("account_id", "label", name=op.f("uq_smtp_credentials_account_id_label")),
        sa.UniqueConstraint("username", name=op.f("uq_smtp_credentials_username")),
    )
    op.create_table(
        "relay_networks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("network", sa.String(length=43), nullable=False),
        sa.Column("require_tls", sa.Boolean(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_relay_networks_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_relay_networks")),
        sa.UniqueConstraint("network", name=op.f("uq_relay_networks_network")),
    )
    op.create_index(op.f("ix_relay_networks_account_id"), "relay_networks", ["account_id"], unique=False)

    # Each account's own login becomes its first credential.
    accounts = sa.table(
        "accounts",
        sa.column("id", sa.Uuid()),
        sa.column("name", sa.String()),
        sa.column("password_hash", sa.String()),
        sa.column("created_at", _timestamp()),
    )
    credentials = _credentials_table()
    connection = op.get_bind()
    now = datetime.now(UTC)
    rows = [
        {
            "id": uuid.uuid4(),
            "account_id": row.id,
            "username": row.name,
            "password_hash": row.password_hash,
            "label": PRIMARY_LABEL,
            "enabled": True,
            "allowed_ips": [],
            "allowed_domains": None,
            "last_used_at": None,
            "created_at": row.created_at,
            "updated_at": now,
        }
        for row in connection.execute(sa.select(accounts))
    ]
    if rows:
        connection.execute(sa.insert(credentials), rows)
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("password_hash")

    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("credential_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_messages_credential_id_smtp_credentials"),
            "smtp_credentials",
            ["credential_id"],
            ["id"],
            ondelete="SET NULL",
        )
    op.create_index(
        op.f("ix_messages_account_id_credential_id_created_at_id"),
        "messages",
        ["account_id", "credential_id", "created_at", "id"],
        unique=False,
    )
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("client_ip", sa.String(length=45), nullable=True))


def _credentials_table() -> sa.TableClause:
    return sa.table(
        "smtp_credentials",
        sa.column("id", sa.Uuid()),
        sa.column("account_id", sa.Uuid()),
        sa.column("username", sa.String()),
        sa.column("password_hash", sa.String()),
        sa.column("label", sa.String()),
        sa.column("enabled", sa.Boolean()),
        sa.column("allowed_ips", JSON_DOC),
        sa.column("allowed_domains", JSON_DOC),
        sa.column("last_used_at", _timestamp()),
        sa.column("created_at", _timestamp()),
        sa.column("updated_at", _timestamp()),
    )


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("client_ip")
    op.drop_index(op.f("ix_messages_account_id_credential_id_created_at_id"), table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_constraint(op.f("fk_messages_credential_id_smtp_credentials"), type_="foreignkey")
        batch.drop_column("credential_id")
    # The account's own login comes back from its primary credential; an account whose
    # primary credential was deleted gets a hash no password matches.
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column("password_hash", sa.String(length=60), nullable=False, server_default=UNUSABLE_HASH)
        )
    with op.batch_alter_table("accounts") as batch:
        batch.alter_column("password_hash", server_default=None)
    accounts = sa.table(
        "accounts", sa.column("id", sa.Uuid()), sa.column("name", sa.String()), sa.column("password_hash")
    )
    credentials = _credentials_table()
    primary = (
        sa.select(credentials.c.password_hash)
        .where(
            credentials.c.account_id == accounts.c.id,
            credentials.c.username == accounts.c.name,
        )
        .scalar_subquery()
    )
    op.execute(
        accounts.update()
        .where(
            sa.exists().where(
                credentials.c.account_id == accounts.c.id, credentials.c.username == accounts.c.name
            )
        )
        .values(password_hash=primary)
    )
    op.drop_index(op.f("ix_relay_networks_account_id"), table_name="relay_networks")
    op.drop_table("relay_networks")
    op.drop_table("smtp_credentials")
