"""DKIM keys of one tenant; the private half is sealed to its row and only the worker opens it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from smtp_proxy import dkim, validation
from smtp_proxy.contract import DKIM_SELECTOR, DkimAlgorithm
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import Account, DkimKey
from smtp_proxy.errors import Conflict, ValidationError
from smtp_proxy.storage import audit
from smtp_proxy.storage.audit import Actor
from smtp_proxy.storage.tenancy import owned

ENTITY = "dkim_key"
_SELECTOR = re.compile(DKIM_SELECTOR)


def _aad(key_id: uuid.UUID) -> bytes:
    return b"dkim_keys.private_key:" + key_id.bytes


def key_domain(value: object, account: Account) -> str:
    """The key's domain: a valid domain the account may send from (``*.x`` covers x's subdomains)."""
    domain = validation.domain(value)
    if not validation.pattern_within(domain, account.allowed_domains or ()):
        raise ValidationError("domain", f"{domain} is not among the account's allowed domains")
    return domain


def check_selector(value: object) -> str:
    if not isinstance(value, str) or not _SELECTOR.fullmatch(value):
        raise ValidationError("selector", "must be one DNS label: letters, digits and -, at most 63")
    return value.lower()


def create_key(
    session: Session,
    cipher: Cipher,
    *,
    account: Account,
    domain: str,
    selector: str | None = None,
    algorithm: DkimAlgorithm | str = DkimAlgorithm.RSA_SHA256,
    enabled: bool = True,
    actor: Actor,
) -> DkimKey:
    """Generate and store a key.

    Raises ValidationError for a domain outside the account's, Conflict for a taken selector.
    """
    domain = key_domain(domain, account)
    chosen = check_selector(selector) if selector is not None else dkim.default_selector()
    taken = select(DkimKey.id).where(DkimKey.domain == domain, DkimKey.selector == chosen)
    if session.scalar(taken) is not None:
        raise Conflict(f"a DKIM key with selector {chosen!r} exists for {domain}")
    pair = dkim.generate(DkimAlgorithm(algorithm))
    key_id = uuid.uuid4()
    key = DkimKey(
        id=key_id,
        account_id=account.id,
        domain=domain,
        selector=chosen,
        algorithm=pair.algorithm,
        public_key=pair.public_key,
        private_key_encrypted=cipher.encrypt(pair.private_key, _aad(key_id)),
        enabled=enabled,
    )
    session.add(key)
    audit.record(
        session,
        actor=actor,
        action="create",
        entity=ENTITY,
        entity_id=key_id,
        account_id=account.id,
        fields=["domain", "selector", "algorithm", "enabled"],
    )
    session.flush()
    return key


def get_key(session: Session, account_id: uuid.UUID, key_id: uuid.UUID) -> DkimKey:
    """A tenant's own key; another tenant's id is NotFound."""
    return owned(session, DkimKey, account_id, key_id, "DKIM key")


def list_keys(session: Session, account_id: uuid.UUID) -> Sequence[DkimKey]:
    return session.scalars(
        select(DkimKey)
        .where(DkimKey.account_id == account_id)
        .order_by(DkimKey.domain, DkimKey.selector, DkimKey.id)
    ).all()


def set_enabled(session: Session, key: DkimKey, enabled: bool, *, actor: Actor) -> DkimKey:
    key.enabled = enabled
    audit.record(
        session,
        actor=actor,
        action="update",
        entity=ENTITY,
        entity_id=key.id,
        account_id=key.account_id,
        fields=["enabled"],
    )
    session.flush()
    return key


def delete_key(session: Session, key: DkimKey, *, actor: Actor) -> None:
    audit.record(
        session, actor=actor, action="delete", entity=ENTITY, entity_id=key.id, account_id=key.account_id
    )
    session.delete(key)
    session.flush()


def signing_keys(session: Session, cipher: Cipher, account_id: uuid.UUID) -> list[dkim.SigningKey]:
    """The account's enabled keys, opened, newest first per domain: for the worker only.

    Raises DecryptionError when one cannot be opened (a missing previous encryption key).
    """
    rows = session.scalars(
        select(DkimKey)
        .where(DkimKey.account_id == account_id, DkimKey.enabled.is_(True))
        .order_by(DkimKey.created_at.desc(), DkimKey.id)
    ).all()
    return [
        dkim.SigningKey(
            row.domain, row.selector, row.algorithm, cipher.decrypt(row.private_key_encrypted, _aad(row.id))
        )
        for row in rows
    ]


def reseal_keys(session: Session, cipher: Cipher) -> int:
    """Re-encrypt, under the current key, every DKIM private key sealed with an older one."""
    resealed = 0
    for key in session.scalars(select(DkimKey)):
        if cipher.needs_rotation(key.private_key_encrypted):
            plain = cipher.decrypt(key.private_key_encrypted, _aad(key.id))
            key.private_key_encrypted = cipher.encrypt(plain, _aad(key.id))
            resealed += 1
    session.flush()
    return resealed
