"""SMTP credentials: several logins per account, each with its own password and restrictions.

One per application or device, so that a leaked password is revoked without touching
the others. User names are unique across the relay. A tenant's own names are its
account's name (the primary credential, labelled ``account``, which the account's
password calls set) or begin with ``<account>.``, so no tenant can take a name that
reads as another's. Passwords are generated unless given (then at least 16 characters)
and shown once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from smtp_proxy import crypto, validation
from smtp_proxy.contract import PRIMARY_CREDENTIAL_LABEL
from smtp_proxy.db.models import Account, SmtpCredential
from smtp_proxy.db.types import utcnow
from smtp_proxy.errors import Conflict, NotFound, ValidationError
from smtp_proxy.storage import audit
from smtp_proxy.storage.audit import Actor
from smtp_proxy.storage.tenancy import owned

ENTITY = "smtp_credential"
MIN_CHOSEN_PASSWORD = 16  # a password the caller picks; generated ones are longer
UPDATABLE = ("label", "enabled", "allowed_ips", "allowed_domains", "password")
# last_used_at is written at most this often per credential.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class NewCredential:
    """A created credential and its password, shown this once."""

    credential: SmtpCredential
    password: str


def chosen_password(value: object) -> str:
    """A password the caller picked: the general policy, and at least 16 characters."""
    if not isinstance(value, str):
        raise ValidationError("password", "must be a string")
    crypto.check_password_policy(value)
    if len(value) < MIN_CHOSEN_PASSWORD:
        raise ValidationError("password", f"must be at least {MIN_CHOSEN_PASSWORD} characters")
    return value


def restricted_domains(value: object, account: Account) -> list[str] | None:
    """``allowed_domains`` of a credential: None (all the account's) or a subset of the account's."""
    if value is None:
        return None
    patterns = validation.domain_patterns(value)
    held = list(account.allowed_domains or ())
    for pattern in patterns:
        if not validation.pattern_within(pattern, held):
            raise ValidationError("allowed_domains", f"{pattern} is not among the account's domains")
    return patterns


def own_username(value: object, account: Account) -> str:
    """A user name the account may hold: its own name, or ``<account>.<anything>``."""
    username = validation.credential_username(value)
    if username != account.name and not username.startswith(account.name + "."):
        raise ValidationError("username", f"must be {account.name!r} or begin with {account.name + '.'!r}")
    return username


def _label_taken(session: Session, account_id: uuid.UUID, label: str) -> bool:
    mine = SmtpCredential.account_id == account_id
    return session.scalar(select(SmtpCredential.id).where(mine, SmtpCredential.label == label)) is not None


def username_taken(session: Session, username: str) -> bool:
    return session.scalar(select(SmtpCredential.id).where(SmtpCredential.username == username)) is not None


def create_credential(
    session: Session,
    account: Account,
    *,
    label: str,
    bcrypt_cost: int,
    actor: Actor,
    username: str | None = None,
    password: str | None = None,
    enabled: bool = True,
    allowed_ips: object = (),
    allowed_domains: object = None,
) -> NewCredential:
    """Validate, hash and add a credential. Raises ValidationError, or Conflict for a taken
    label (within the account) or user name (across the relay)."""
    label = validation.credential_label(label)
    username = own_username(username if username is not None else f"{account.name}.{label}", account)
    if not isinstance(enabled, bool):
        raise ValidationError("enabled", "must be true or false")
    ips = validation.networks(list(allowed_ips) if isinstance(allowed_ips, tuple) else allowed_ips)
    domains = restricted_domains(allowed_domains, account)
    password = chosen_password(password) if password is not None else crypto.generate_password()
    if _label_taken(session, account.id, label):
        raise Conflict(f"the account already has a credential labelled {label!r}")
    if username_taken(session, username):
        raise Conflict(f"the SMTP user name {username!r} is taken")
    credential = SmtpCredential(
        id=uuid.uuid4(),
        account_id=account.id,
        username=username,
        password_hash=crypto.hash_password(password, bcrypt_cost),
        label=label,
        enabled=enabled,
        allowed_ips=ips,
        allowed_domains=domains,
    )
    session.add(credential)
    fields = ["username", "label", "password", "enabled"]
    fields += ["allowed_ips"] if ips else []
    fields += ["allowed_domains"] if domains is not None else []
    _audit(session, credential, actor, "create", fields)
    session.flush()
    return NewCredential(credential, password)


def list_credentials(session: Session, account_id: uuid.UUID) -> list[SmtpCredential]:
    query = select(SmtpCredential).where(SmtpCredential.account_id == account_id)
    return list(session.scalars(query.order_by(SmtpCredential.created_at, SmtpCredential.id)))


def get_credential(session: Session, account_id: uuid.UUID, credential_id: uuid.UUID) -> SmtpCredential:
    """The account's credential; NotFound for another account's, as for none (no oracle)."""
    return owned(session, SmtpCredential, account_id, credential_id, "SMTP credential")


def get_by_username(session: Session, username: str) -> SmtpCredential:
    credential = session.scalar(select(SmtpCredential).where(SmtpCredential.username == username))
    if credential is None:
        raise NotFound(f"no SMTP credential {username!r}")
    return credential


def primary_credential(session: Session, account: Account) -> SmtpCredential | None:
    """The account's own login (user name = the account's name), if it still has one."""
    return session.scalar(
        select(SmtpCredential).where(
            SmtpCredential.account_id == account.id, SmtpCredential.username == account.name
        )
    )


def set_primary_password(
    session: Session, account: Account, bcrypt_cost: int, password: str | None = None
) -> str:
    """The account's own login gets a new password (a generated one unless given); made again if
    it was deleted. Returns the password. Not audited here: it is a change of the account, which
    the caller (``storage.accounts``) audits as one row."""
    credential = primary_credential(session, account)
    if credential is None:
        if username_taken(session, account.name):
            raise Conflict(f"the SMTP user name {account.name!r} is taken")
        label = PRIMARY_CREDENTIAL_LABEL
        while _label_taken(session, account.id, label):
            label = f"{PRIMARY_CREDENTIAL_LABEL}-{uuid.uuid4().hex[:8]}"
        return _create_primary(session, account, label, bcrypt_cost, password)
    password = password if password is not None else crypto.generate_password()
    credential.password_hash = crypto.hash_password(password, bcrypt_cost)
    session.flush()
    return password


def _create_primary(
    session: Session, account: Account, label: str, bcrypt_cost: int, password: str | None
) -> str:
    password = password if password is not None else crypto.generate_password()
    credential = SmtpCredential(
        id=uuid.uuid4(),
        account_id=account.id,
        username=account.name,
        password_hash=crypto.hash_password(password, bcrypt_cost),
        label=label,
        enabled=True,
        allowed_ips=[],
        allowed_domains=None,
    )
    session.add(credential)
    session.flush()
    return password


def update_credential(
    session: Session,
    credential: SmtpCredential,
    account: Account,
    changes: Mapping[str, Any],
    *,
    bcrypt_cost: int,
    actor: Actor,
) -> list[str]:
    """Apply a partial update of UPDATABLE fields with one audit row; the fields set.

    The user name never changes: devices hold it. Raises ValidationError or Conflict
    (a label the account already uses); nothing is changed then.
    """
    unknown = sorted(set(changes) - set(UPDATABLE))
    if unknown:
        raise ValidationError(unknown[0], "is not a field that can be changed")
    values: dict[str, Any] = {}
    if "label" in changes:
        label = values["label"] = validation.credential_label(changes["label"])
        if label != credential.label and _label_taken(session, credential.account_id, label):
            raise Conflict(f"the account already has a credential labelled {label!r}")
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ValidationError("enabled", "must be true or false")
        values["enabled"] = changes["enabled"]
    if "allowed_ips" in changes:
        values["allowed_ips"] = validation.networks(changes["allowed_ips"])
    if "allowed_domains" in changes:
        values["allowed_domains"] = restricted_domains(changes["allowed_domains"], account)
    if "password" in changes:
        values["password_hash"] = crypto.hash_password(chosen_password(changes["password"]), bcrypt_cost)
    for name, value in values.items():
        setattr(credential, name, value)
    fields = [name for name in UPDATABLE if name in changes]
    if fields:
        action = "update"
        if values.get("enabled") is False:
            action = "disable"
        _audit(session, credential, actor, action, fields)
        session.flush()
    return fields


def delete_credential(session: Session, credential: SmtpCredential, *, actor: Actor) -> None:
    """Gone at commit: the next AUTH with it fails, and live sessions end at their next MAIL FROM."""
    _audit(session, credential, actor, "delete", [])
    session.delete(credential)
    session.flush()


def touch_last_used(session: Session, credential_id: uuid.UUID) -> bool:
    """Set ``last_used_at`` to now unless it was set within LAST_USED_RESOLUTION; True if written."""
    now = utcnow()
    result = session.execute(
        update(SmtpCredential)
        .where(
            SmtpCredential.id == credential_id,
            or_(
                SmtpCredential.last_used_at.is_(None),
                SmtpCredential.last_used_at < now - LAST_USED_RESOLUTION,
            ),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)


def _audit(
    session: Session, credential: SmtpCredential, actor: Actor, action: str, fields: list[str]
) -> None:
    audit.record(
        session,
        actor=actor,
        action=action,
        entity=ENTITY,
        entity_id=credential.id,
        account_id=credential.account_id,
        fields=fields,
    )
