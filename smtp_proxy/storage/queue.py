"""The delivery queue: claims under a lease, outcomes written under the same claim, the purge.

A worker claims due messages with one UPDATE whose subquery locks them with
``FOR UPDATE SKIP LOCKED`` (PostgreSQL): concurrent workers on any machine take
disjoint batches, without waiting on each other. A claimed message is
``processing`` with ``next_attempt_at`` at its lease's end and ``lease_id`` set
to the claim; a claim whose worker died runs out, and the message is claimed
again. Outcomes are written only while the claim still holds.

SQLite has no row locks: its single writer serialises whole claims, which is
enough for the one worker an embedded install runs.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, case, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from smtp_proxy.db.models import DeliveryLog, DeliveryStatus, EspProvider, MessageStatus, RoutingRule
from smtp_proxy.db.models import Message as MessageModel

_M = MessageModel.__table__.c
_LOGS = DeliveryLog.__table__

# What a worker needs of a claimed message.
_CLAIMED_COLUMNS = (
    _M.id,
    _M.account_id,
    _M.sender,
    _M.recipients,
    _M.headers,
    _M.body_encrypted,
    _M.attempts,
    _M.correlation_id,
    _M.created_at,
)


class Claimed(NamedTuple):
    id: uuid.UUID
    account_id: uuid.UUID
    sender: str
    recipients: list[str]
    headers: list[list[str]]
    body_encrypted: bytes | None
    attempts: int  # this claim included
    correlation_id: str
    created_at: datetime


class Claim(NamedTuple):
    lease_id: uuid.UUID
    until: datetime
    messages: list[Claimed]


def _claim_statement(status: MessageStatus) -> Any:
    due = (
        select(_M.id)
        .where(_M.status == status, _M.next_attempt_at <= bindparam("now"))
        .order_by(_M.next_attempt_at)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(MessageModel.__table__)
        .where(_M.id.in_(due))
        .values(
            status=MessageStatus.PROCESSING,
            lease_id=bindparam("lease_id"),
            next_attempt_at=bindparam("until"),
            attempts=_M.attempts + 1,
            updated_at=bindparam("now"),
        )
        .returning(*_CLAIMED_COLUMNS)
    )


# Built once. Leases that ran out first (their worker died), then the queue, oldest due first;
# two statements so that each walks the (status, next_attempt_at) index in order.
_CLAIM_EXPIRED = _claim_statement(MessageStatus.PROCESSING)
_CLAIM_QUEUED = _claim_statement(MessageStatus.QUEUED)


def claim(session: Session, *, limit: int, lease: float, now: datetime) -> Claim:
    """Claim up to ``limit`` due messages for ``lease`` seconds; the caller commits.

    Each claim counts as an attempt, so that a message that kills its worker
    every time still reaches ``max_attempts``.
    """
    lease_id = uuid.uuid4()
    until = now + timedelta(seconds=lease)
    params = {"now": now, "until": until, "lease_id": lease_id, "limit": limit}
    rows = list(session.execute(_CLAIM_EXPIRED, params))
    if len(rows) < limit:
        rows += session.execute(_CLAIM_QUEUED, {**params, "limit": limit - len(rows)})
    messages = [Claimed(*row) for row in rows]
    messages.sort(key=lambda m: (m.created_at, m.id))
    return Claim(lease_id, until, messages)


def _held(message_id: Any, lease_id: Any) -> Any:
    return and_(_M.id == message_id, _M.lease_id == lease_id, _M.status == MessageStatus.PROCESSING)


def extend(connection: Connection, message_id: uuid.UUID, lease_id: uuid.UUID, until: datetime) -> bool:
    """Move a held message's lease end to ``until``; False when the claim no longer holds."""
    result = connection.execute(
        update(MessageModel.__table__).where(_held(message_id, lease_id)).values(next_attempt_at=until)
    )
    return result.rowcount == 1


class Attempt(NamedTuple):
    """One provider's answer, for the delivery log."""

    provider_id: uuid.UUID | None
    status: DeliveryStatus
    response_code: int | None
    response_text: str
    at: datetime


def finish(
    session: Session,
    message_id: uuid.UUID,
    lease_id: uuid.UUID,
    *,
    status: MessageStatus,
    attempts: list[Attempt],
    now: datetime,
    provider_id: uuid.UUID | None = None,
    next_attempt_at: datetime | None = None,
) -> bool:
    """Write one claimed message's outcome and its attempts' log rows; the caller commits.

    ``status`` queued (with ``next_attempt_at``) for a retry, delivered or
    failed for the end. Returns False, changing nothing on the message, when
    the claim no longer holds (the lease ran out and another worker took the
    message over); the attempts are logged all the same, as they did happen.
    """
    values: dict[str, Any] = {"status": status, "lease_id": None, "updated_at": now}
    if status is MessageStatus.QUEUED:
        values["next_attempt_at"] = next_attempt_at or now
    else:
        values["processed_at"] = now
        values["next_attempt_at"] = now  # no longer the lease's end: nothing is due any more
        values["provider_id"] = _existing_provider(provider_id)
    held = session.execute(
        update(MessageModel.__table__).where(_held(message_id, lease_id)).values(**values)
    ).rowcount
    exists = held == 1 or session.scalar(select(_M.id).where(_M.id == message_id)) is not None
    if exists:
        log_attempts(session, message_id, attempts)
    return held == 1


def _existing_provider(provider_id: Any) -> Any:
    """The provider's id, or NULL if the tenant deleted it while the message was on its way.

    Resolved inside the statement, so that a provider deleted mid-delivery
    cannot fail the foreign key and with it the outcome's commit.
    """
    if provider_id is None:
        return None
    return select(_PROVIDER_ID).where(_PROVIDER_ID == provider_id).scalar_subquery()


_PROVIDER_ID = EspProvider.__table__.c.id
_LOG_INSERT = insert(_LOGS).values(
    provider_id=select(_PROVIDER_ID).where(_PROVIDER_ID == bindparam("pid")).scalar_subquery()
)


def log_attempts(session: Session, message_id: uuid.UUID, attempts: list[Attempt]) -> None:
    """Add delivery log rows to a message; the caller commits."""
    if not attempts:
        return
    session.execute(
        _LOG_INSERT,
        [
            {
                "id": uuid.uuid4(),
                "message_id": message_id,
                "pid": a.provider_id,
                "status": a.status,
                "response_code": a.response_code,
                "response_text": a.response_text,
                "created_at": a.at,
            }
            for a in attempts
        ],
    )


def release(session: Session, lease_id: uuid.UUID, message_ids: list[uuid.UUID], now: datetime) -> int:
    """Give unstarted claimed messages back to the queue, due now (on shutdown); the caller commits."""
    if not message_ids:
        return 0
    result = session.execute(
        update(MessageModel.__table__)
        .where(
            _M.id.in_(message_ids),
            _M.lease_id == lease_id,
            _M.status == MessageStatus.PROCESSING,
        )
        .values(
            status=MessageStatus.QUEUED,
            lease_id=None,
            next_attempt_at=now,
            attempts=case((_M.attempts > 0, _M.attempts - 1), else_=0),
            updated_at=now,
        )
    )
    return result.rowcount


def purge_bodies(session: Session, older_than: datetime, batch_size: int = 1000) -> int:
    """Drop the bodies of one batch of finished messages processed before ``older_than``.

    The metadata (envelope, headers, status, delivery log) stays. Returns how
    many bodies went; the caller commits and repeats while a full batch went.
    """
    batch = (
        select(_M.id)
        .where(
            _M.body_encrypted.is_not(None),
            _M.processed_at.is_not(None),
            _M.processed_at < older_than,
            _M.status.in_((MessageStatus.DELIVERED, MessageStatus.FAILED)),
        )
        .order_by(_M.processed_at)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = session.execute(
        update(MessageModel.__table__).where(_M.id.in_(batch)).values(body_encrypted=None)
    )
    return result.rowcount


def depth(connection: Connection | Session) -> dict[str, int]:
    """Messages waiting (queued, due or deferred) and being delivered (processing)."""
    rows = connection.execute(
        select(_M.status, func.count())
        .where(_M.status.in_((MessageStatus.QUEUED, MessageStatus.PROCESSING)))
        .group_by(_M.status)
    )
    counts = {str(MessageStatus.QUEUED): 0, str(MessageStatus.PROCESSING): 0}
    for status, count in rows:
        counts[str(MessageStatus(status))] = count
    return counts


class Route(NamedTuple):
    """An enabled rule of an account whose provider is enabled, with that provider."""

    rule_id: uuid.UUID
    priority: int
    conditions: dict[str, Any]
    provider: EspProvider


def routes(session: Session, account_id: uuid.UUID) -> list[Route]:
    """The account's usable rules, by priority then creation; disabled rules and providers left out."""
    query = (
        select(RoutingRule.id, RoutingRule.priority, RoutingRule.conditions, EspProvider)
        .join(EspProvider, EspProvider.id == RoutingRule.provider_id)
        .where(
            RoutingRule.account_id == account_id,
            RoutingRule.enabled.is_(True),
            EspProvider.enabled.is_(True),
            EspProvider.account_id == account_id,
        )
        .order_by(RoutingRule.priority, RoutingRule.created_at, RoutingRule.id)
    )
    return [
        Route(rule_id, priority, dict(conditions or {}), provider)
        for rule_id, priority, conditions, provider in session.execute(query)
    ]
