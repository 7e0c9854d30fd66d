"""The lookups SMTP needs: a credential's login columns by user name, an account's policy by id.

``find_login`` runs on every AUTH attempt, cache hit or not, so that a password change,
a disabled credential or a deactivation takes effect at once, and at a live session's
MAIL FROM once its state is older than a few seconds; it therefore reads the login and
sending-policy columns and nothing else, in one query over the credential and its
account. ``find_policy`` reads an account's policy with the state of each of its
credentials, for every live session of the account at once.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from smtp_proxy import validation
from smtp_proxy.db.models import Account, SmtpCredential
from smtp_proxy.errors import ValidationError


class Login(NamedTuple):
    id: uuid.UUID  # the account's
    name: str  # the account's
    credential_id: uuid.UUID
    username: str
    password_hash: str
    # What the credential may send as: its own subset (as far as the account still holds it),
    # else the account's domains.
    allowed_domains: list[str]
    active: bool  # the account is active and the credential enabled
    allow_any_header_from: bool
    limits: dict[str, Any]  # the account's own sending limits over the config's defaults
    allowed_ips: list[str]  # CIDRs the credential may log in from; empty: anywhere
    last_used_at: datetime | None


class CredentialState(NamedTuple):
    enabled: bool
    allowed_domains: list[str] | None  # the credential's own subset; None: the account's


class Policy(NamedTuple):
    """An account's sending policy and the state of each of its credentials: what a live
    session's MAIL FROM depends on, read in one query for all the account's sessions."""

    id: uuid.UUID
    name: str
    allowed_domains: list[str]
    active: bool
    allow_any_header_from: bool
    limits: dict[str, Any]
    credentials: dict[uuid.UUID, CredentialState]


_accounts = Account.__table__.c
_credentials = SmtpCredential.__table__.c
_LOGIN = (
    select(
        _accounts.id,
        _accounts.name,
        _credentials.id.label("credential_id"),
        _credentials.username,
        _credentials.password_hash,
        _accounts.allowed_domains,
        _credentials.allowed_domains.label("credential_domains"),
        _accounts.active,
        _credentials.enabled,
        _accounts.allow_any_header_from,
        _accounts.limits,
        _credentials.allowed_ips,
        _credentials.last_used_at,
    )
    .select_from(SmtpCredential.__table__.join(Account.__table__, _credentials.account_id == _accounts.id))
    .where(_credentials.username == bindparam("username"))
)
_POLICY = (
    select(
        _accounts.id,
        _accounts.name,
        _accounts.allowed_domains,
        _accounts.active,
        _accounts.allow_any_header_from,
        _accounts.limits,
        _credentials.id.label("credential_id"),
        _credentials.enabled,
        _credentials.allowed_domains.label("credential_domains"),
    )
    .select_from(
        Account.__table__.outerjoin(SmtpCredential.__table__, _credentials.account_id == _accounts.id)
    )
    .where(_accounts.id == bindparam("id"))
)


def effective_domains(account_domains: list[str], credential_domains: list[str] | None) -> list[str]:
    """The credential's patterns still inside the account's, or the account's when it has none."""
    if credential_domains is None:
        return list(account_domains)
    return [p for p in credential_domains if validation.pattern_within(p, account_domains)]


def find_login(session: Session | Connection, username: str) -> Login | None:
    """The login columns of the credential called ``username``, or None when there is none.

    A name no credential could have (wrong characters, too long, a NUL byte) is
    answered without a query: PostgreSQL rejects NUL in a text parameter, and
    the client chose the name.
    """
    try:
        validation.credential_username(username)
    except ValidationError:
        return None
    row = session.execute(_LOGIN, {"username": username}).one_or_none()
    if row is None:
        return None
    account_domains = list(row.allowed_domains or ())
    return Login(
        row.id,
        row.name,
        row.credential_id,
        row.username,
        row.password_hash,
        effective_domains(account_domains, row.credential_domains),
        bool(row.active) and bool(row.enabled),
        bool(row.allow_any_header_from),
        dict(row.limits or {}),
        list(row.allowed_ips or ()),
        row.last_used_at,
    )


def find_policy(session: Session | Connection, account_id: uuid.UUID) -> Policy | None:
    """The account's policy with its credentials' states, or None when there is no such account."""
    rows = session.execute(_POLICY, {"id": account_id}).all()
    if not rows:
        return None
    row = rows[0]
    return Policy(
        row.id,
        row.name,
        list(row.allowed_domains or ()),
        bool(row.active),
        bool(row.allow_any_header_from),
        dict(row.limits or {}),
        {
            each.credential_id: CredentialState(bool(each.enabled), each.credential_domains)
            for each in rows
            if each.credential_id is not None
        },
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
