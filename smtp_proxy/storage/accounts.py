"""Accounts: creation with one-time credentials, lookups, rotation, deactivation."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from smtp_proxy import crypto, validation
from smtp_proxy.db.models import Account
from smtp_proxy.errors import Conflict, NotFound
from smtp_proxy.storage import audit
from smtp_proxy.storage.audit import CLI, Actor

ENTITY = "account"


@dataclass(frozen=True)
class NewAccount:
    """A created account and the credentials that are shown this once."""

    account: Account
    api_key: str
    password: str


def create_account(
    session: Session,
    *,
    name: str,
    email: str,
    allowed_domains: list[str],
    bcrypt_cost: int,
    password: str | None = None,
    is_admin: bool = False,
    actor: Actor = CLI,
) -> NewAccount:
    """Validate, hash and add an account. Raises ValidationError or Conflict."""
    name = validation.account_name(name)
    email = validation.email(email)
    domains = validation.domain_patterns(allowed_domains)
    password = password if password is not None else crypto.generate_password()
    password_hash = crypto.hash_password(password, bcrypt_cost)
    if session.scalar(select(Account.id).where(Account.name == name)) is not None:
        raise Conflict(f"an account named {name!r} already exists")
    api_key = crypto.generate_api_key()
    account = Account(
        id=uuid.uuid4(),
        name=name,
        email=email,
        allowed_domains=domains,
        password_hash=password_hash,
        api_key_digest=crypto.api_key_digest(api_key),
        is_admin=is_admin,
        active=True,
    )
    session.add(account)
    audit.record(
        session,
        actor=actor,
        action="create",
        entity=ENTITY,
        entity_id=account.id,
        account_id=account.id,
        fields=("name", "email", "allowed_domains", "is_admin", "password", "api_key"),
    )
    session.flush()
    return NewAccount(account, api_key, password)


def get_account(session: Session, account_id: uuid.UUID) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound("no such account")
    return account


def get_account_by_name(session: Session, name: str) -> Account:
    account = session.scalar(select(Account).where(Account.name == name))
    if account is None:
        raise NotFound(f"no account named {name!r}")
    return account


def find_by_api_key(session: Session, api_key: str) -> Account | None:
    """The active account holding this key, or None."""
    digest = crypto.api_key_digest(api_key)
    return session.scalar(select(Account).where(Account.api_key_digest == digest, Account.active.is_(True)))


def list_accounts(session: Session) -> list[Account]:
    return list(session.scalars(select(Account).order_by(Account.name)))


def set_password(
    session: Session, account: Account, bcrypt_cost: int, password: str | None = None, actor: Actor = CLI
) -> str:
    """Replace the SMTP password (a generated one unless given); returns it."""
    password = password if password is not None else crypto.generate_password()
    account.password_hash = crypto.hash_password(password, bcrypt_cost)
    _audit_update(session, account, actor, ("password",))
    return password


def rotate_api_key(session: Session, account: Account, actor: Actor = CLI) -> str:
    """Issue a new API key; the old one stops working at commit. Returns the new key."""
    api_key = crypto.generate_api_key()
    account.api_key_digest = crypto.api_key_digest(api_key)
    _audit_update(session, account, actor, ("api_key",))
    return api_key


def deactivate_account(session: Session, account: Account, actor: Actor = CLI) -> None:
    """No more AUTH or API calls; the account's data is kept."""
    if not account.active:
        return
    account.active = False
    _audit_update(session, account, actor, ("active",), action="deactivate")


def _audit_update(
    session: Session, account: Account, actor: Actor, fields: tuple[str, ...], action: str = "update"
) -> None:
    session.add(account)
    audit.record(
        session,
        actor=actor,
        action=action,
        entity=ENTITY,
        entity_id=account.id,
        account_id=account.id,
        fields=fields,
    )
    session.flush()
