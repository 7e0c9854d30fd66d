"""An account's suppression list: recipients the worker leaves out of every delivery.

Addresses are stored normalised (``normalise``): the whole address in lower case. RFC 5321 lets
a local part be case-sensitive, but no mailbox provider in use treats ``John@`` and ``john@`` as
different people, and the large ESPs' own suppression lists ignore case too. A suppression list
errs on the side of not sending: treating two spellings of one bounced mailbox as two would send
to it again, and hurt the sender's reputation, for no one's benefit. Nothing else changes: dots
and ``+tags`` are kept, since whether they matter is the mailbox provider's business.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from smtp_proxy import validation
from smtp_proxy.contract import EMAIL_MAX, SuppressionReason
from smtp_proxy.db.models import Suppression
from smtp_proxy.db.types import utcnow
from smtp_proxy.errors import Conflict, NotFound, ValidationError
from smtp_proxy.storage import audit
from smtp_proxy.storage.audit import Actor

ENTITY = "suppression"
_FIELDS = ("address", "reason")
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


class Bounce(NamedTuple):
    """A recipient a provider refused permanently, and the reply that said so."""

    recipient: str
    provider_id: uuid.UUID | None
    code: int | None
    text: str


class Filters(NamedTuple):
    reason: SuppressionReason | None = None
    address: str | None = None
    before: tuple[datetime, uuid.UUID] | None = None  # (created_at, id) of the previous page's last


def normalise(address: str) -> str:
    """The form an address is stored and matched in: trimmed, lower case."""
    return address.strip().lower()


def checked(value: object, field: str = "address") -> str:
    """An address a person typed, normalised; ValidationError when it is not one."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, "must be an email address")
    address = normalise(value)
    local, at, domain = address.rpartition("@")
    if not at or not local or len(address) > EMAIL_MAX or any(c.isspace() or c in "<>" for c in local):
        raise ValidationError(field, "must be an email address (local@domain)")
    try:
        validation.domain(domain, field)
    except ValidationError:
        raise ValidationError(field, "must be an email address with a valid domain") from None
    # Stored as the worker will see it in an envelope (an IDN stays in its U-label form).
    return address


def suppressed(session: Session, account_id: uuid.UUID, recipients: Iterable[str]) -> set[str]:
    """Which of ``recipients`` (as given) are on the account's list."""
    by_form: dict[str, list[str]] = {}
    for recipient in recipients:
        by_form.setdefault(normalise(recipient), []).append(recipient)
    if not by_form:
        return set()
    found = session.scalars(
        select(Suppression.address).where(
            Suppression.account_id == account_id, Suppression.address.in_(list(by_form))
        )
    )
    return {recipient for address in found for recipient in by_form[address]}


def add_bounces(
    session: Session,
    account_id: uuid.UUID,
    message_id: uuid.UUID | None,
    bounces: Iterable[Bounce],
    now: datetime,
) -> None:
    """Suppress the hard-bounced recipients; an address already listed keeps its first entry.

    No audit row: the worker is not an actor, and the entry itself names the message and
    the reply that caused it. The caller commits (with the message's outcome).
    """
    rows = {}
    for bounce in bounces:
        address = normalise(bounce.recipient)
        if address and len(address) <= EMAIL_MAX and address not in rows:
            rows[address] = {
                "id": uuid.uuid4(),
                "account_id": account_id,
                "address": address,
                "reason": SuppressionReason.HARD_BOUNCE,
                "message_id": message_id,
                "provider_id": bounce.provider_id,
                "response_code": bounce.code,
                "response_text": bounce.text[:1000],
                "created_at": now,
            }
    if not rows:
        return
    insert = _INSERTS[session.get_bind().dialect.name]
    statement = insert(Suppression.__table__).on_conflict_do_nothing(index_elements=["account_id", "address"])
    session.execute(statement, list(rows.values()))


def add_manual(session: Session, account_id: uuid.UUID, address: str, *, actor: Actor) -> Suppression:
    """Suppress an address by hand; Conflict when it is listed already (for any reason)."""
    address = checked(address)
    if session.scalar(
        select(Suppression.id).where(Suppression.account_id == account_id, Suppression.address == address)
    ):
        raise Conflict("the address is on the suppression list already")
    entry = Suppression(
        id=uuid.uuid4(),
        account_id=account_id,
        address=address,
        reason=SuppressionReason.MANUAL,
        created_at=utcnow(),
    )
    session.add(entry)
    audit.record(
        session,
        actor=actor,
        action="create",
        entity=ENTITY,
        entity_id=entry.id,
        account_id=account_id,
        fields=_FIELDS,
    )
    session.flush()  # a concurrent insert of the same address is a unique violation: Conflict
    return entry


def get_suppression(session: Session, account_id: uuid.UUID | None, suppression_id: uuid.UUID) -> Suppression:
    """One entry of the account's list (any account's when ``account_id`` is None: an admin)."""
    query = select(Suppression).where(Suppression.id == suppression_id)
    if account_id is not None:
        query = query.where(Suppression.account_id == account_id)
    entry = session.scalar(query)
    if entry is None:
        raise NotFound("no such suppression")
    return entry


def delete_suppression(session: Session, entry: Suppression, *, actor: Actor) -> None:
    """Take an address off the list: the worker sends to it again from the next delivery."""
    audit.record(
        session, actor=actor, action="delete", entity=ENTITY, entity_id=entry.id, account_id=entry.account_id
    )
    session.delete(entry)
    session.flush()


def list_suppressions(
    session: Session, account_id: uuid.UUID, filters: Filters, limit: int
) -> list[Suppression]:
    """Newest first; up to ``limit`` entries (ask for one more to know whether a page follows)."""
    query = (
        select(Suppression)
        .where(Suppression.account_id == account_id)
        .order_by(Suppression.created_at.desc(), Suppression.id.desc())
        .limit(limit)
    )
    if filters.reason is not None:
        query = query.where(Suppression.reason == filters.reason)
    if filters.address is not None:
        query = query.where(Suppression.address == normalise(filters.address))
    if filters.before is not None:
        query = query.where(tuple_(Suppression.created_at, Suppression.id) < tuple_(*filters.before))
    return list(session.scalars(query))
