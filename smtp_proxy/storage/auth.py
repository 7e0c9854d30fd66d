"""The one lookup SMTP AUTH needs: an account's login columns by name.

It runs on every AUTH attempt, cache hit or not, so that a password change or a
deactivation takes effect at once, and at a live session's MAIL FROM once its
account state is older than a few seconds; it therefore reads the login and
sending-policy columns and nothing else.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from smtp_proxy import validation
from smtp_proxy.db.models import Account
from smtp_proxy.errors import ValidationError


class Login(NamedTuple):
    id: uuid.UUID
    name: str
    password_hash: str
    allowed_domains: list[str]
    active: bool
    allow_any_header_from: bool
    limits: dict[str, Any]  # the account's own sending limits over the config's defaults


_accounts = Account.__table__.c
_LOGIN = select(
    _accounts.id,
    _accounts.name,
    _accounts.password_hash,
    _accounts.allowed_domains,
    _accounts.active,
    _accounts.allow_any_header_from,
    _accounts.limits,
).where(_accounts.name == bindparam("name"))


def find_login(session: Session | Connection, name: str) -> Login | None:
    """The login columns of the account called ``name``, or None when there is none.

    A name no account could have (wrong characters, too long, a NUL byte) is
    answered without a query: PostgreSQL rejects NUL in a text parameter, and
    the client chose the name.
    """
    try:
        validation.account_name(name)
    except ValidationError:
        return None
    row = session.execute(_LOGIN, {"name": name}).one_or_none()
    if row is None:
        return None
    return Login(
        row.id,
        row.name,
        row.password_hash,
        list(row.allowed_domains or ()),
        bool(row.active),
        bool(row.allow_any_header_from),
        dict(row.limits or {}),
    )


class KeyHolder(NamedTuple):
    """The active account an API key belongs to: what authorisation needs."""

    id: uuid.UUID
    name: str
    is_admin: bool


def find_key_holder(session: Session | Connection, api_key_digest: str) -> KeyHolder | None:
    """The active account whose API key has this SHA-256 digest, or None."""
    table = Account.__table__.c
    row = session.execute(
        select(table.id, table.name, table.is_admin).where(
            table.api_key_digest == api_key_digest, table.active.is_(True)
        )
    ).one_or_none()
    return None if row is None else KeyHolder(row.id, row.name, bool(row.is_admin))
