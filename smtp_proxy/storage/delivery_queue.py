"""The delivery queue: claims under a lease, outcomes written under the same claim, the purge.

A worker claims due messages with one UPDATE whose subquery locks them with
``FOR UPDATE SKIP LOCKED`` (PostgreSQL): concurrent workers on any machine take
disjoint batches, without waiting on each other. A claimed message is
``processing`` with ``next_attempt_at`` at its lease's end and ``lease_id`` set
to the claim; a claim whose worker died runs out, and the message is claimed
again. Outcomes are written only while the claim still holds.

Claims are fair across accounts. For each active account, the subquery takes
that account's oldest due messages from the (account_id, status,
next_attempt_at) index, no more than the account's allowance (the per-account
cap less what the claiming process already has in flight for it), and the
batch is filled by rank: every account's first message before any account's
second. So one account's backlog of a million waits behind nobody, and
nobody waits behind it. The cost grows with the number of accounts (one index
probe each), not with the number of queued messages.

Messages of a deactivated account are never claimed: they wait, with one
delivery-log line saying why (``hold_waiting``), go out at the first claim
after the account is active again, and fail at ``delivery.max_age``
(``fail_held``).

SQLite has no row locks and no LATERAL: a window function ranks each account's
due messages instead, and its single writer serialises whole claims, which is
enough for the one worker an embedded install runs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Boolean,
    Integer,
    Uuid,
    and_,
    bindparam,
    case,
    column,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from smtp_proxy.db.models import (
    Account,
    DeliveryLog,
    DeliveryStatus,
    EspProvider,
    MessageStatus,
    RoutingRule,
)
from smtp_proxy.db.models import Message as MessageModel
from smtp_proxy.db.types import UtcDateTime

_M = MessageModel.__table__.c
_A = Account.__table__.c
_LOGS = DeliveryLog.__table__
_L = _LOGS.c
# What a deactivated account's waiting messages say in their delivery log.
HELD_TEXT = "held: the account is deactivated"

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
    _M.dsn_ret,
    _M.dsn_envid,
    _M.dsn_recipients,
    _M.is_bounce,
    _M.delay_notified,
    column("bounces", Boolean),  # the account's, or the default the claim was given
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
    # RFC 3461, as the client gave them (``storage.messages.enqueue_message``).
    dsn_ret: str | None
    dsn_envid: str | None
    dsn_recipients: dict[str, Any] | None
    is_bounce: bool  # a delivery status notification itself: never answered with another
    delay_notified: bool  # the sender was told it is delayed: not again
    bounces: bool  # the account's effective setting: its own, else the claim's default


def dsn_of(message: Claimed, recipients: Iterable[str]) -> dict[str, Any] | None:
    """The RFC 3461 parameters of some of the message's recipients (a follow-up's), or None."""
    given = message.dsn_recipients
    if not given:
        return None
    kept = {recipient: given[recipient] for recipient in recipients if recipient in given}
    return kept or None


class Claim(NamedTuple):
    lease_id: uuid.UUID
    until: datetime
    messages: list[Claimed]


# PostgreSQL: per active account below its cap, a LATERAL index walk over (account_id, status,
# next_attempt_at) for its oldest due messages, locked with SKIP LOCKED, at most its allowance (the
# LIMIT may name the outer row: a lateral reference); the batch is then filled by rank across
# accounts, an account's rank starting after what is in flight for it. A row locked but left out by
# the outer LIMIT stays locked only until the claim commits. RETURNING is qualified (chosen.id).
_CLAIM_POSTGRESQL = """
UPDATE messages AS m
SET status = 'processing', lease_id = :lease_id, next_attempt_at = :until,
    attempts = m.attempts + 1, updated_at = :now
FROM (
    SELECT due.id, coalesce(a.bounces, :bounces_default) AS bounces
    FROM accounts AS a
    LEFT JOIN unnest(CAST(:busy_ids AS uuid[]), CAST(:busy_counts AS integer[])) AS busy(account_id, used)
           ON busy.account_id = a.id
    CROSS JOIN LATERAL (
        SELECT d.id, d.next_attempt_at
        FROM messages AS d
        WHERE d.account_id = a.id AND d.status = :status AND d.next_attempt_at <= :now
        ORDER BY d.next_attempt_at
        LIMIT greatest(:per_account - coalesce(busy.used, 0), 0)
        FOR UPDATE SKIP LOCKED
    ) AS due
    WHERE a.active AND coalesce(busy.used, 0) < :per_account
    ORDER BY row_number() OVER (PARTITION BY a.id ORDER BY due.next_attempt_at) + coalesce(busy.used, 0),
             due.next_attempt_at
    LIMIT :limit
) AS chosen
WHERE m.id = chosen.id
RETURNING m.id, m.account_id, m.sender, m.recipients, m.headers, m.body_encrypted, m.attempts,
          m.correlation_id, m.created_at, m.dsn_ret, m.dsn_envid, m.dsn_recipients, m.is_bounce,
          m.delay_notified, chosen.bounces
"""

# SQLite: no LATERAL and no row locks (one writer); a window function ranks each active account's
# due messages, which reads all of them: enough for the one embedded worker's queue. Its RETURNING
# names only the updated table, so the account's setting comes from a subquery there.
_CLAIM_SQLITE = """
UPDATE messages
SET status = 'processing', lease_id = :lease_id, next_attempt_at = :until,
    attempts = attempts + 1, updated_at = :now
WHERE id IN (
    SELECT id FROM (
        SELECT d.id, d.next_attempt_at,
               row_number() OVER (PARTITION BY d.account_id ORDER BY d.next_attempt_at)
               + coalesce((SELECT json_extract(b.value, '$[1]') FROM json_each(:busy) AS b
                           WHERE json_extract(b.value, '$[0]') = d.account_id), 0) AS rank
        FROM messages AS d JOIN accounts AS a ON a.id = d.account_id
        WHERE d.status = :status AND d.next_attempt_at <= :now AND a.active
    )
    WHERE rank <= :per_account
    ORDER BY rank, next_attempt_at
    LIMIT :limit
)
RETURNING id, account_id, sender, recipients, headers, body_encrypted, attempts, correlation_id, created_at,
          dsn_ret, dsn_envid, dsn_recipients, is_bounce, delay_notified,
          (SELECT coalesce(a.bounces, :bounces_default) FROM accounts AS a WHERE a.id = messages.account_id)
"""

_CLAIM_BINDS = (
    bindparam("lease_id", type_=Uuid()),
    bindparam("until", type_=UtcDateTime()),
    bindparam("now", type_=UtcDateTime()),
    bindparam("status", type_=_M.status.type),
    bindparam("per_account", type_=Integer()),
    bindparam("limit", type_=Integer()),
    bindparam("bounces_default", type_=Boolean()),
)


def _claim_statement(sql: str) -> Any:
    return text(sql).bindparams(*_CLAIM_BINDS).columns(*_CLAIMED_COLUMNS)


# Built once, for each database. Leases that ran out first (their worker died), then the queue.
_CLAIMS = {"postgresql": _claim_statement(_CLAIM_POSTGRESQL), "sqlite": _claim_statement(_CLAIM_SQLITE)}


def claim(
    session: Session,
    *,
    limit: int,
    lease: float,
    now: datetime,
    per_account: int | None = None,
    in_flight: Mapping[uuid.UUID, int] | None = None,
    expired: bool = True,
    bounces_default: bool = True,
) -> Claim:
    """Claim up to ``limit`` due messages for ``lease`` seconds, fairly across accounts; the caller commits.

    No account gets more than ``per_account`` less its count in ``in_flight`` (what the caller
    already holds of it; default: no cap but ``limit``). Deactivated accounts get nothing.
    ``expired``: look for claims that ran out first (a caller that claims many times a second
    may look only now and then: a lease runs out after minutes). Each claim counts as an
    attempt, so that a message that kills its worker every time still reaches ``max_attempts``.
    ``bounces_default`` (``delivery.bounces``) is each message's ``bounces`` when its account
    has no setting of its own.
    """
    lease_id = uuid.uuid4()
    until = now + timedelta(seconds=lease)
    cap = limit if per_account is None else per_account
    busy = {account: count for account, count in (in_flight or {}).items() if count > 0}
    statement = _CLAIMS[session.get_bind().dialect.name]
    rows: list[Any] = []
    statuses = (MessageStatus.PROCESSING, MessageStatus.QUEUED) if expired else (MessageStatus.QUEUED,)
    for status in statuses:
        if len(rows) >= limit:
            break
        params = {
            "now": now,
            "until": until,
            "lease_id": lease_id,
            "status": status,
            "per_account": cap,
            "limit": limit - len(rows),
            "bounces_default": bounces_default,
            **_busy_params(session, busy),
        }
        taken = list(session.execute(statement, params))
        for row in taken:
            busy[row.account_id] = busy.get(row.account_id, 0) + 1
        rows += taken
    messages = [Claimed(*row) for row in rows]
    messages.sort(key=lambda m: (m.created_at, m.id))
    return Claim(lease_id, until, messages)


def _busy_params(session: Session, busy: Mapping[uuid.UUID, int]) -> dict[str, Any]:
    """What each account has in flight, as the dialect's statement takes it."""
    if session.get_bind().dialect.name == "sqlite":  # Uuid is stored as 32 hex digits there
        return {"busy": json.dumps([[account.hex, count] for account, count in busy.items()])}
    return {"busy_ids": [str(account) for account in busy], "busy_counts": list(busy.values())}


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


def mark_delay_notified(session: Session, message_id: uuid.UUID) -> None:
    """The sender has been told the message is delayed: in the transaction that queued the notice."""
    session.execute(update(MessageModel).where(_M.id == message_id).values(delay_notified=True))


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


def hold(session: Session, message_id: uuid.UUID, lease_id: uuid.UUID, now: datetime) -> bool:
    """Give back a claimed message whose account turned out deactivated, with the held line.

    Like ``release``: the claim does not count as an attempt, and the message is due at once, so
    that it goes out at the first claim after the account is active again. The caller commits.
    """
    if not release(session, lease_id, [message_id], now):
        return False
    log_attempts(session, message_id, [Attempt(None, DeliveryStatus.DEFERRED, None, HELD_TEXT, now)])
    return True


def account_active(session: Session, account_id: uuid.UUID) -> bool:
    """Whether the account exists and is active."""
    return bool(session.scalar(select(_A.active).where(_A.id == account_id)))


def inactive_accounts(session: Session) -> dict[uuid.UUID, datetime]:
    """The deactivated accounts, with when each was last changed."""
    rows = session.execute(select(_A.id, _A.updated_at).where(_A.active.is_(False)))
    return {account_id: updated_at for account_id, updated_at in rows}


def sweep_lock(session: Session) -> bool:
    """Whether this transaction may sweep held messages: one process at a time (PostgreSQL).

    Two processes writing held lines at once could both find a message without one. The lock is
    a transaction-level advisory lock: it goes with the commit. SQLite has one worker only.
    """
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(_SWEEP_LOCK))))


# An arbitrary constant that names the held-message sweep among advisory locks.
_SWEEP_LOCK = 0x736D7470_686F6C64 % (2**63)


def _waiting(now: datetime) -> Any:
    """Queued, or claimed under a lease that ran out (its worker died)."""
    return or_(
        _M.status == MessageStatus.QUEUED,
        and_(_M.status == MessageStatus.PROCESSING, _M.next_attempt_at < now),
    )


def hold_waiting(session: Session, account_id: uuid.UUID, now: datetime, batch_size: int = 1000) -> int:
    """Write the held line on one batch of a deactivated account's waiting messages; the caller commits.

    Only on messages without one since they last changed, so that each gets it once, not at every
    sweep. A claim that ran out becomes queued again (it keeps its attempt count and due time).
    Returns how many were held; repeat while a full batch was.
    """
    logged = exists().where(
        _L.message_id == _M.id, _L.response_text == HELD_TEXT, _L.created_at >= _M.updated_at
    )
    return _settle_batch(
        session,
        (_M.account_id == account_id, _waiting(now), ~logged),
        {"status": MessageStatus.QUEUED, "lease_id": None, "updated_at": now},
        DeliveryStatus.DEFERRED,
        HELD_TEXT,
        now,
        batch_size,
    )


def fail_held(
    session: Session,
    account_ids: list[uuid.UUID],
    created_before: datetime,
    now: datetime,
    reason: str,
    batch_size: int = 1000,
) -> int:
    """Fail one batch of deactivated accounts' waiting messages created before the cutoff.

    The (account_id, status, created_at) index finds them without reading the rest of the
    queue. The caller commits and repeats while a full batch went.
    """
    if not account_ids:
        return 0
    return _settle_batch(
        session,
        (_M.account_id.in_(account_ids), _waiting(now), _M.created_at < created_before),
        {
            "status": MessageStatus.FAILED,
            "lease_id": None,
            "processed_at": now,
            "next_attempt_at": now,
            "updated_at": now,
        },
        DeliveryStatus.FAILED,
        reason,
        now,
        batch_size,
    )


def _settle_batch(
    session: Session,
    conditions: tuple[Any, ...],
    values: dict[str, Any],
    status: DeliveryStatus,
    text: str,
    now: datetime,
    batch_size: int,
) -> int:
    """Update one batch of the messages matching ``conditions`` (rows others hold are skipped)
    and log ``text`` on each; how many were updated."""
    batch = (
        select(_M.id).where(*conditions).limit(batch_size).with_for_update(skip_locked=True).scalar_subquery()
    )
    ids = session.scalars(
        update(MessageModel.__table__).where(_M.id.in_(batch)).values(**values).returning(_M.id)
    ).all()
    _log_each(session, ids, status, text, now)
    return len(ids)


def _log_each(
    session: Session, message_ids: list[uuid.UUID], status: DeliveryStatus, text_: str, now: datetime
) -> None:
    if message_ids:
        session.execute(
            insert(_LOGS),
            [
                {
                    "id": uuid.uuid4(),
                    "message_id": message_id,
                    "provider_id": None,
                    "status": status,
                    "response_code": None,
                    "response_text": text_,
                    "created_at": now,
                }
                for message_id in message_ids
            ],
        )


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
