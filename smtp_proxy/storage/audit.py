"""The audit trail, written in the same transaction as the change it records."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from smtp_proxy.db.models import AuditLog


@dataclass(frozen=True)
class Actor:
    """Who is making a change: an account (and the address its API call came from), or the
    operator's CLI."""

    name: str
    account_id: uuid.UUID | None = None
    client_ip: str | None = None


CLI = Actor("cli")


def record(
    session: Session,
    *,
    actor: Actor,
    action: str,
    entity: str,
    entity_id: uuid.UUID,
    account_id: uuid.UUID | None,
    fields: Iterable[str] = (),
) -> AuditLog:
    """Add one row. ``fields`` are the names of changed fields, never their values."""
    row = AuditLog(
        actor=actor.name,
        actor_id=actor.account_id,
        client_ip=actor.client_ip,
        action=action,
        entity=entity,
        entity_id=entity_id,
        account_id=account_id,
        changes={"fields": sorted(set(fields))},
    )
    session.add(row)
    return row


def list_entries(
    session: Session,
    account_id: uuid.UUID | None = None,
    limit: int = 100,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[AuditLog]:
    """Newest first; only one tenant's entries when ``account_id`` is given.

    ``before`` is the (created_at, id) of the last entry of the previous page.
    """
    query = select(AuditLog).order_by(AuditLog.created_at.desc(), AuditLog.id.desc()).limit(limit)
    if account_id is not None:
        query = query.where(AuditLog.account_id == account_id)
    if before is not None:
        query = query.where(tuple_(AuditLog.created_at, AuditLog.id) < tuple_(*before))
    return list(session.scalars(query))
