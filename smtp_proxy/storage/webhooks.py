"""Webhook endpoints, their secrets, and the outbox of events owed to them.

An endpoint is a tenant's URL, the event types it wants and a secret that signs what
is POSTed there. The secret is generated, shown once, and sealed at rest (AES-GCM,
bound to its row and column). Rotating it keeps the previous secret valid for
``PREVIOUS_SECRET_HOURS``, so a receiver can switch without losing a request.

``record_event`` is the outbox: it writes the event and one delivery row per endpoint
that wants it, in the caller's transaction, the one that writes the outcome the event
reports. A process that dies afterwards leaves the rows for the sender to find.
"""

from __future__ import annotations

import secrets as random_secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from smtp_proxy.contract import WEBHOOK_EVENT_TYPES
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import WebhookDelivery, WebhookEndpoint, WebhookEvent
from smtp_proxy.db.types import utcnow
from smtp_proxy.errors import NotFound, ValidationError
from smtp_proxy.storage import audit
from smtp_proxy.storage.audit import Actor
from smtp_proxy.storage.providers import check_quota
from smtp_proxy.storage.tenancy import owned

ENTITY = "webhook"
EVENT_TYPES = WEBHOOK_EVENT_TYPES
MAX_ENDPOINTS = 10  # per account
PREVIOUS_SECRET_HOURS = 24
URL_MAX = 2048
UPDATABLE = ("url", "events", "enabled")
# Core tables for the outbox's hot statements: no ORM unit of work to pay for on each event.
_EVENTS = WebhookEvent.__table__
_DELIVERIES = WebhookDelivery.__table__


@dataclass(frozen=True)
class NewSecret:
    """An endpoint and the secret that is shown this once."""

    endpoint: WebhookEndpoint
    secret: str


def new_secret() -> str:
    return "whsec_" + random_secrets.token_urlsafe(32)


def url(value: object, *, allow_http: bool) -> str:
    """An absolute https URL (http too when ``allow_http``: ``delivery.allow_private_networks``).

    Where it points is checked again when it is POSTed to (the provider address guard), since a
    name can resolve elsewhere later.
    """
    if not isinstance(value, str) or not value or len(value) > URL_MAX or not value.isascii():
        raise ValidationError("url", f"must be an absolute https URL of at most {URL_MAX} characters")
    if any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise ValidationError("url", "must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise ValidationError("url", "is not a valid URL") from None
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        raise ValidationError("url", "must use https" if not allow_http else "must use https or http")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValidationError("url", "must name a host, and no user or password")
    if parts.fragment:
        raise ValidationError("url", "must not have a fragment")
    return value


def event_types(value: object) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValidationError("events", "must be a non-empty list of: " + ", ".join(EVENT_TYPES))
    chosen: list[str] = []
    for item in value:
        if item not in EVENT_TYPES:
            raise ValidationError("events", f"{item!r} is not one of: " + ", ".join(EVENT_TYPES))
        if item not in chosen:
            chosen.append(item)
    return [kind for kind in EVENT_TYPES if kind in chosen]


def _aad(endpoint_id: uuid.UUID, column: str) -> bytes:
    return f"webhook_endpoints.{column}:".encode() + endpoint_id.bytes


def create_endpoint(
    session: Session,
    cipher: Cipher,
    *,
    account_id: uuid.UUID,
    url_: str,
    events: object,
    enabled: bool = True,
    allow_http: bool = False,
    actor: Actor,
) -> NewSecret:
    """Validate and add an endpoint with a new secret. Raises ValidationError, or QuotaExceeded
    (``storage.providers``) past MAX_ENDPOINTS for the account, counted under its row's lock."""
    checked_url = url(url_, allow_http=allow_http)
    kinds = event_types(events)
    if not isinstance(enabled, bool):
        raise ValidationError("enabled", "must be true or false")
    check_quota(session, account_id, WebhookEndpoint, MAX_ENDPOINTS, "the relay's limit", "webhook endpoints")
    secret = new_secret()
    endpoint_id = uuid.uuid4()
    endpoint = WebhookEndpoint(
        id=endpoint_id,
        account_id=account_id,
        url=checked_url,
        events=kinds,
        enabled=enabled,
        secret_encrypted=cipher.encrypt(secret.encode(), _aad(endpoint_id, "secret_encrypted")),
    )
    session.add(endpoint)
    _audit(session, endpoint, actor, "create", ["url", "events", "enabled", "secret"])
    session.flush()
    return NewSecret(endpoint, secret)


def list_endpoints(session: Session, account_id: uuid.UUID) -> list[WebhookEndpoint]:
    query = select(WebhookEndpoint).where(WebhookEndpoint.account_id == account_id)
    return list(session.scalars(query.order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)))


def get_endpoint(session: Session, account_id: uuid.UUID, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    """The account's endpoint; another account's is NotFound, as none is (no oracle)."""
    return owned(session, WebhookEndpoint, account_id, endpoint_id, "webhook")


def update_endpoint(
    session: Session,
    endpoint: WebhookEndpoint,
    changes: Mapping[str, Any],
    *,
    allow_http: bool = False,
    actor: Actor,
) -> list[str]:
    """A partial update of UPDATABLE fields with one audit row; the fields set."""
    unknown = sorted(set(changes) - set(UPDATABLE))
    if unknown:
        raise ValidationError(unknown[0], "is not a field that can be changed")
    values: dict[str, Any] = {}
    if "url" in changes:
        values["url"] = url(changes["url"], allow_http=allow_http)
    if "events" in changes:
        values["events"] = event_types(changes["events"])
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ValidationError("enabled", "must be true or false")
        values["enabled"] = changes["enabled"]
    for name, value in values.items():
        setattr(endpoint, name, value)
    fields = [name for name in UPDATABLE if name in values]
    if fields:
        _audit(session, endpoint, actor, "update", fields)
        session.flush()
    return fields


def rotate_secret(session: Session, cipher: Cipher, endpoint: WebhookEndpoint, *, actor: Actor) -> str:
    """A new secret; the current one keeps signing beside it for PREVIOUS_SECRET_HOURS."""
    current = cipher.decrypt(endpoint.secret_encrypted, _aad(endpoint.id, "secret_encrypted"))
    secret = new_secret()
    previous = _aad(endpoint.id, "previous_secret_encrypted")
    endpoint.previous_secret_encrypted = cipher.encrypt(current, previous)
    endpoint.previous_secret_expires_at = utcnow() + timedelta(hours=PREVIOUS_SECRET_HOURS)
    endpoint.secret_encrypted = cipher.encrypt(secret.encode(), _aad(endpoint.id, "secret_encrypted"))
    _audit(session, endpoint, actor, "rotate", ["secret"])
    session.flush()
    return secret


def signing_secrets(cipher: Cipher, endpoint: WebhookEndpoint, *, now: datetime) -> list[str]:
    """The secrets that sign a request now: the current one, then the previous while it is valid."""
    found = [cipher.decrypt(endpoint.secret_encrypted, _aad(endpoint.id, "secret_encrypted")).decode()]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret_encrypted is not None and expires is not None and now < expires:
        sealed = endpoint.previous_secret_encrypted
        found.append(cipher.decrypt(sealed, _aad(endpoint.id, "previous_secret_encrypted")).decode())
    return found


def reseal_secrets(session: Session, cipher: Cipher) -> int:
    """Re-encrypt, under the current key, every endpoint secret sealed with an older key."""
    resealed = 0
    for endpoint in session.scalars(select(WebhookEndpoint)):
        for column in ("secret_encrypted", "previous_secret_encrypted"):
            blob = getattr(endpoint, column)
            if blob is not None and cipher.needs_rotation(blob):
                plain = cipher.decrypt(blob, _aad(endpoint.id, column))
                setattr(endpoint, column, cipher.encrypt(plain, _aad(endpoint.id, column)))
                resealed += 1
    session.flush()
    return resealed


def delete_endpoint(session: Session, endpoint: WebhookEndpoint, *, actor: Actor) -> None:
    """Gone at commit, with the deliveries still owed to it."""
    _audit(session, endpoint, actor, "delete", [])
    session.delete(endpoint)
    session.flush()


def subscriptions(connection: Session | Connection, account_id: uuid.UUID) -> dict[uuid.UUID, frozenset[str]]:
    """The account's enabled endpoints, each with the event types it wants."""
    rows = connection.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.events).where(
            WebhookEndpoint.account_id == account_id, WebhookEndpoint.enabled.is_(True)
        )
    )
    return {endpoint_id: frozenset(events or ()) for endpoint_id, events in rows}


def record_event(
    connection: Session | Connection,
    *,
    account_id: uuid.UUID,
    kind: str,
    payload: Mapping[str, Any],
    subscribed: Mapping[uuid.UUID, frozenset[str]] | None = None,
) -> uuid.UUID | None:
    """Write the event and one delivery per enabled endpoint of the account that wants it, in
    the caller's transaction; the event's id, or None when no endpoint wants it (nothing written).

    ``payload`` is the event's JSON object without its id; the id is added here, so the body
    POSTed carries the id a receiver deduplicates by. ``subscribed`` is the account's
    ``subscriptions``, read in this transaction, for a caller that records several events.
    """
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}")
    if subscribed is None:
        subscribed = subscriptions(connection, account_id)
    wanted = [endpoint_id for endpoint_id, kinds in subscribed.items() if kind in kinds]
    if not wanted:
        return None
    event_id = uuid.uuid4()
    now = utcnow()
    body = {"id": str(event_id), "type": kind, **payload}
    connection.execute(
        _EVENTS.insert(),
        [{"id": event_id, "account_id": account_id, "type": kind, "payload": body, "created_at": now}],
    )
    connection.execute(
        _DELIVERIES.insert(),
        [
            {
                "id": uuid.uuid4(),
                "event_id": event_id,
                "endpoint_id": endpoint_id,
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
                "updated_at": now,
            }
            for endpoint_id in wanted
        ],
    )
    return event_id


def _audit(session: Session, endpoint: WebhookEndpoint, actor: Actor, action: str, fields: list[str]) -> None:
    audit.record(
        session,
        actor=actor,
        action=action,
        entity=ENTITY,
        entity_id=endpoint.id,
        account_id=endpoint.account_id,
        fields=fields,
    )


# --- the outbox: claimed by the sender, settled by each answer -------------------------------------

GIVE_UP_AFTER = timedelta(hours=24)


class Owed(NamedTuple):
    """One claimed delivery, with what sending it needs."""

    id: uuid.UUID
    lease_id: uuid.UUID
    event_id: uuid.UUID
    endpoint_id: uuid.UUID
    url: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime


class Answered(NamedTuple):
    """What became of one POST of a claimed delivery; ``retry_in`` applies if it was not a 2xx."""

    owed: Owed
    status_code: int | None
    error: str | None
    retry_in: float


def claim_due(
    session: Session,
    *,
    now: datetime,
    lanes: int,
    batch: int,
    lease: float,
    skip_endpoints: Iterable[uuid.UUID] = (),
) -> list[list[Owed]]:
    """Claim due deliveries for ``lease`` seconds: at most ``batch`` for each of at most ``lanes``
    endpoints, oldest first, one list per endpoint; the caller commits.

    Endpoints in ``skip_endpoints`` (those the caller already sends enough to) get nothing, so
    one slow endpoint holds only its own share. On PostgreSQL, ``SKIP LOCKED`` lets several
    workers claim at once without taking the same row; rows looked at and not taken are left
    as they were. A delivery of a disabled endpoint stays owed until the endpoint is enabled
    again or deleted.
    """
    query = (
        select(_DELIVERIES.c.id, _DELIVERIES.c.endpoint_id)
        .join(WebhookEndpoint.__table__, _DELIVERIES.c.endpoint_id == WebhookEndpoint.id)
        .where(
            _DELIVERIES.c.status == "pending",
            _DELIVERIES.c.next_attempt_at <= now,
            WebhookEndpoint.enabled.is_(True),
        )
        .order_by(_DELIVERIES.c.next_attempt_at)
        .limit(lanes * batch)
    )
    skipped = list(skip_endpoints)
    if skipped:
        query = query.where(_DELIVERIES.c.endpoint_id.not_in(skipped))
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(of=_DELIVERIES, skip_locked=True)
    chosen: dict[uuid.UUID, list[uuid.UUID]] = {}
    for delivery_id, endpoint_id in session.execute(query):
        ids = chosen.get(endpoint_id)
        if ids is None and len(chosen) < lanes:
            chosen[endpoint_id] = ids = []
        if ids is not None and len(ids) < batch:
            ids.append(delivery_id)
    taken = [delivery_id for ids in chosen.values() for delivery_id in ids]
    if not taken:
        return []
    lease_id = uuid.uuid4()
    session.execute(
        _DELIVERIES.update()
        .where(_DELIVERIES.c.id.in_(taken))
        .values(lease_id=lease_id, next_attempt_at=now + timedelta(seconds=lease), updated_at=now)
    )
    rows = session.execute(
        select(
            _DELIVERIES.c.id,
            _DELIVERIES.c.event_id,
            _DELIVERIES.c.endpoint_id,
            WebhookEndpoint.url,
            _EVENTS.c.payload,
            _DELIVERIES.c.attempts,
            _DELIVERIES.c.created_at,
        )
        .join(WebhookEndpoint.__table__, _DELIVERIES.c.endpoint_id == WebhookEndpoint.id)
        .join(_EVENTS, _DELIVERIES.c.event_id == _EVENTS.c.id)
        .where(_DELIVERIES.c.id.in_(taken))
        .order_by(_DELIVERIES.c.next_attempt_at, _DELIVERIES.c.created_at)
    )
    lanes_of: dict[uuid.UUID, list[Owed]] = {endpoint_id: [] for endpoint_id in chosen}
    for row in rows:
        lanes_of[row.endpoint_id].append(
            Owed(row.id, lease_id, row.event_id, row.endpoint_id, row.url, dict(row.payload), *row[5:])
        )
    return [owed for owed in lanes_of.values() if owed]


def settle(session: Session, answered: Iterable[Answered], *, now: datetime) -> dict[uuid.UUID, str]:
    """Write each answer under the claim that sent it; each delivery's new status by its id.

    A 2xx: delivered. Otherwise it is tried again in ``retry_in`` seconds, until it has been
    owed for GIVE_UP_AFTER: then dropped. A claim that ran out meanwhile (another sender took
    the delivery over) writes nothing and answers "lost". Answers alike are written by one
    statement, so a batch of 2xx costs one.
    """
    alike: dict[tuple[Any, ...], list[uuid.UUID]] = {}
    statuses: dict[uuid.UUID, str] = {}
    for owed, status_code, error, retry_in in answered:
        if status_code is not None and 200 <= status_code < 300:
            status, next_at = "delivered", now
        elif now - owed.created_at >= GIVE_UP_AFTER:
            status, next_at = "dropped", now
        else:
            status, next_at = "pending", now + timedelta(seconds=retry_in)
        key = (owed.lease_id, status, next_at, status_code, (error or None) and error[:500])
        alike.setdefault(key, []).append(owed.id)
        statuses[owed.id] = "lost"
    for (lease_id, status, next_at, status_code, error), ids in alike.items():
        written = session.execute(
            _DELIVERIES.update()
            .where(_DELIVERIES.c.id.in_(ids), _DELIVERIES.c.lease_id == lease_id)
            .values(
                status=status,
                attempts=_DELIVERIES.c.attempts + 1,
                next_attempt_at=next_at,
                lease_id=None,
                last_status_code=status_code,
                last_error=error,
                last_attempt_at=now,
                updated_at=now,
            )
            .returning(_DELIVERIES.c.id)
        )
        for delivery_id in written.scalars():
            statuses[delivery_id] = status
    return statuses


def give_back(session: Session, owed: Iterable[Owed], *, now: datetime, delay: float = 0.0) -> None:
    """Claimed deliveries the sender did not send: due again after ``delay``, no attempt counted."""
    by_lease: dict[uuid.UUID, list[uuid.UUID]] = {}
    for item in owed:
        by_lease.setdefault(item.lease_id, []).append(item.id)
    for lease_id, ids in by_lease.items():
        session.execute(
            _DELIVERIES.update()
            .where(_DELIVERIES.c.id.in_(ids), _DELIVERIES.c.lease_id == lease_id)
            .values(lease_id=None, next_attempt_at=now + timedelta(seconds=delay))
        )


def deliveries_with_types(
    session: Session, endpoint_id: uuid.UUID, limit: int = 100
) -> list[tuple[WebhookDelivery, str]]:
    """An endpoint's most recent deliveries, each with its event's type, newest first."""
    query = (
        select(WebhookDelivery, WebhookEvent.type)
        .join(WebhookEvent, WebhookDelivery.event_id == WebhookEvent.id)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
        .limit(limit)
    )
    return [(delivery, kind) for delivery, kind in session.execute(query)]


def redeliver(
    session: Session, endpoint_id: uuid.UUID, event_id: uuid.UUID, *, now: datetime
) -> WebhookDelivery:
    """Owe the event to the endpoint again, now (whatever became of it before)."""
    delivery = session.scalar(
        select(WebhookDelivery).where(
            WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.event_id == event_id
        )
    )
    if delivery is None:
        raise NotFound("no such delivery")
    delivery.status = "pending"
    delivery.next_attempt_at = now
    delivery.lease_id = None
    delivery.created_at = now  # the 24 hours of retries start again
    session.flush()
    return delivery
