"""Accounts: creation with one-time credentials, lookups, updates, rotation, deactivation.

A sender domain belongs to one tenant: granting a domain (or a ``*.`` pattern)
that overlaps one an active account holds is refused with ``DomainTaken``
unless the caller passes ``unique_domains=False`` (``security.unique_sender_domains``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from smtp_proxy import crypto, validation
from smtp_proxy.db.models import Account
from smtp_proxy.errors import Conflict, NotFound, ValidationError
from smtp_proxy.storage import audit, credentials
from smtp_proxy.storage import relay_networks as relay
from smtp_proxy.storage.audit import Actor

ENTITY = "account"
# Fields update_account takes; all but the first three are the operator's (admins and the CLI only).
UPDATABLE = (
    "email",
    "password",
    "bounces",
    "allowed_domains",
    "is_admin",
    "active",
    "allow_any_header_from",
    "limits",
    "relay_networks",
)
# Fields update_account writes through their own tables, not as columns of the account.
WRITTEN_ELSEWHERE = frozenset({"password", "relay_networks"})
OPERATOR_FIELDS = UPDATABLE[3:]  # all but email, password and bounces: admins and the CLI only
# An arbitrary constant naming "the grant of sender domains" in pg_advisory_xact_lock
# (db/migrate.py uses another for migrations).
_DOMAIN_LOCK_ID = 0x736D74705F646F6D  # "smtp_dom"


class DomainTaken(Conflict):
    """A domain pattern overlaps one that another active account holds."""

    def __init__(self, domain: str, held: str, *, reactivating: bool = False) -> None:
        overlap = "" if domain == held else f" (it overlaps {held})"
        if reactivating:
            message = f"cannot reactivate: {domain} is now granted to another active account{overlap}"
        else:
            message = f"{domain} is already granted to another active account{overlap}"
        super().__init__(message)
        self.domain = domain
        self.held = held


def check_domains_free(
    session: Session, domains: Iterable[str], *, exclude: uuid.UUID | None, reactivating: bool = False
) -> None:
    """Raise DomainTaken when a pattern overlaps one of another active account.

    On PostgreSQL this first takes a transaction-scoped advisory lock, so that two
    grants running at once are checked one after the other and the second sees the
    first once it commits (READ COMMITTED: each statement reads the latest commits).
    SQLite has a single writer, which serialises the writing transactions anyway.
    """
    domains = list(domains)
    if not domains:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _DOMAIN_LOCK_ID})
    query = select(Account.allowed_domains).where(Account.active.is_(True))
    if exclude is not None:
        query = query.where(Account.id != exclude)
    for held in session.scalars(query):
        clash = validation.first_overlap(domains, held or ())
        if clash is not None:
            raise DomainTaken(*clash, reactivating=reactivating)


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
    allow_any_header_from: bool = False,
    limits: Mapping[str, int | None] | None = None,
    relay_networks: object = (),
    unique_domains: bool = True,
    actor: Actor,
) -> NewAccount:
    """Validate, hash and add an account.

    Raises ValidationError, Conflict for a taken name, or DomainTaken (unless
    ``unique_domains`` is False) for a domain another active account holds.
    """
    name = validation.account_name(name)
    email = validation.email(email)
    domains = validation.domain_patterns(allowed_domains)
    overrides = validation.limit_overrides(dict(limits or {}))
    networks = relay.entries(list(relay_networks) if isinstance(relay_networks, tuple) else relay_networks)
    if password is not None:
        crypto.check_password_policy(password)  # a bad field is told before any conflict
    if session.scalar(select(Account.id).where(Account.name == name)) is not None:
        raise Conflict(f"an account named {name!r} already exists")
    if credentials.username_taken(session, name):
        raise Conflict(f"{name!r} is taken as another account's SMTP user name")
    if unique_domains:
        check_domains_free(session, domains, exclude=None)
    api_key = crypto.generate_api_key()
    account = Account(
        id=uuid.uuid4(),
        name=name,
        email=email,
        allowed_domains=domains,
        api_key_digest=crypto.api_key_digest(api_key),
        is_admin=is_admin,
        active=True,
        allow_any_header_from=bool(allow_any_header_from),
        limits=overrides,
    )
    session.add(account)
    session.flush()  # the credential's foreign key needs the row
    # The account's own login: its first SMTP credential, user name = the account's name.
    password = credentials.set_primary_password(session, account, bcrypt_cost, password)
    if networks:
        relay.replace_networks(session, account, networks)
    fields = ["name", "email", "allowed_domains", "is_admin", "password", "api_key"]
    fields += ["allow_any_header_from"] if allow_any_header_from else []
    fields += ["limits"] if overrides else []
    fields += ["relay_networks"] if networks else []
    audit.record(
        session,
        actor=actor,
        action="create",
        entity=ENTITY,
        entity_id=account.id,
        account_id=account.id,
        fields=fields,
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
    session: Session, account: Account, bcrypt_cost: int, password: str | None = None, *, actor: Actor
) -> str:
    """Replace the password of the account's own login (a generated one unless given); returns it."""
    password = credentials.set_primary_password(session, account, bcrypt_cost, password)
    _audit_update(session, account, actor, ("password",))
    return password


def rotate_api_key(session: Session, account: Account, *, actor: Actor) -> str:
    """Issue a new API key; the old one stops working at commit. Returns the new key."""
    api_key = crypto.generate_api_key()
    account.api_key_digest = crypto.api_key_digest(api_key)
    _audit_update(session, account, actor, ("api_key",))
    return api_key


@dataclass(frozen=True)
class AccountUpdate:
    """What ``update_account`` did: the fields it set and the action audited (None: nothing given)."""

    fields: list[str]
    action: str | None

    @property
    def reactivated(self) -> bool:
        """The account was inactive and is active now: its key works again."""
        return self.action == "reactivate"


def update_account(
    session: Session,
    account: Account,
    changes: Mapping[str, Any],
    *,
    actor: Actor,
    bcrypt_cost: int,
    unique_domains: bool,
) -> AccountUpdate:
    """Apply a partial update of the fields in UPDATABLE, with one audit row.

    Whether the caller may set the operator's fields is the caller's decision (the API
    allows them to admins only). ``active: False`` is a deactivation, audited as one;
    ``active: True`` reactivates. A grant of domains (new domains for an active account,
    or a reactivation) is checked against the other active accounts unless
    ``unique_domains`` is False. Raises ValidationError or DomainTaken; nothing is
    changed then.
    """
    unknown = sorted(set(changes) - set(UPDATABLE))
    if unknown:
        raise ValidationError(unknown[0], "is not a field that can be changed")
    values = dict(changes)
    if "email" in values:
        values["email"] = validation.email(values["email"])
    if "allowed_domains" in values:
        values["allowed_domains"] = validation.domain_patterns(values["allowed_domains"])
    if "limits" in values:
        values["limits"] = validation.limit_overrides(values["limits"])
    if "relay_networks" in values:
        values["relay_networks"] = relay.entries(values["relay_networks"])
    for flag in ("is_admin", "active", "allow_any_header_from"):
        if flag in values and not isinstance(values[flag], bool):
            raise ValidationError(flag, "must be true or false")
    if "bounces" in values and values["bounces"] is not None and not isinstance(values["bounces"], bool):
        raise ValidationError("bounces", "must be true, false or null (the config's delivery.bounces)")
    if "password" in values:
        if not isinstance(values["password"], str):
            raise ValidationError("password", "must be a string")
        crypto.check_password_policy(values["password"])

    was_active = bool(account.active)
    active = values.get("active", was_active)
    reactivating = active and not was_active
    if unique_domains and active and ("allowed_domains" in values or reactivating):
        domains = values.get("allowed_domains", account.allowed_domains or [])
        check_domains_free(session, domains, exclude=account.id, reactivating=reactivating)

    for name in UPDATABLE:
        if name in values and name not in WRITTEN_ELSEWHERE:
            setattr(account, name, values[name])
    if "relay_networks" in values:
        relay.replace_networks(session, account, values["relay_networks"])
    if "password" in values:
        credentials.set_primary_password(session, account, bcrypt_cost, values["password"])
    if not values:
        return AccountUpdate([], None)
    action = "update"
    if was_active and not active:
        action = "deactivate"
    elif reactivating:
        action = "reactivate"
    fields = tuple(name for name in UPDATABLE if name in values)
    _audit_update(session, account, actor, fields, action=action)
    return AccountUpdate(list(fields), action)


def deactivate_account(session: Session, account: Account, *, actor: Actor) -> None:
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
