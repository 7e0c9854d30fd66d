"""What a message's outcome tells its tenant: the event types and their JSON payloads.

Called in the transaction that writes the outcome (``delivery.worker``), so the event and
the outcome are committed together or not at all; ``storage.webhooks.record_event`` writes
them only for an account with an enabled endpoint that wants the type.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from smtp_proxy.db.models import EspProvider, MessageStatus
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.delivery.outcome import Outcome
from smtp_proxy.storage.delivery_queue import Claimed
from smtp_proxy.storage.webhooks import record_event

KIND = {
    MessageStatus.DELIVERED: "message.delivered",
    MessageStatus.QUEUED: "message.deferred",
    MessageStatus.FAILED: "message.failed",
}


def record_outcome(
    session: Session,
    message: Claimed,
    *,
    status: MessageStatus,
    outcome: Outcome,
    provider_id: uuid.UUID | None,
    now: datetime,
    deferred_recipients: Sequence[str] = (),
    suppressed: Sequence[str] = (),
    bounced: Sequence[str] = (),
) -> None:
    """The events of one outcome, each naming the recipients it concerns.

    - ``message.suppressed`` for the recipients left out (on the suppression list);
    - the outcome's own type for the rest, less those it leaves to others: a delivered
      message's ``bounced`` recipients (refused for good: ``message.failed``) and
      ``deferred_recipients`` (refused for now, queued as a follow-up: ``message.deferred``).
    """
    if suppressed:
        _record(session, message, "message.suppressed", list(suppressed), outcome, None, now)
    kind = KIND.get(status)
    if kind is None:
        return
    tried = [r for r in message.recipients if r not in set(suppressed)]
    if not tried:
        return  # every recipient was suppressed: that event says it all
    provider = _provider_name(session, provider_id)
    if status is MessageStatus.DELIVERED:
        elsewhere = set(deferred_recipients) | set(bounced)
        _record(session, message, kind, [r for r in tried if r not in elsewhere], outcome, provider, now)
        if bounced:
            _record(session, message, "message.failed", list(bounced), outcome, provider, now)
        if deferred_recipients:
            _record(session, message, "message.deferred", list(deferred_recipients), outcome, provider, now)
        return
    _record(session, message, kind, tried, outcome, provider, now)


def _record(
    session: Session,
    message: Claimed,
    kind: str,
    recipients: list[str],
    outcome: Outcome,
    provider: str | None,
    now: datetime,
) -> None:
    payload: dict[str, Any] = {
        "time": iso_timestamp(now),
        "message_id": str(message.id),
        "correlation_id": message.correlation_id,
        "recipients": recipients,
        "provider": provider,
        "reply": {"code": outcome.code, "text": outcome.text},
    }
    record_event(session, account_id=message.account_id, kind=kind, payload=payload)


def _provider_name(session: Session, provider_id: uuid.UUID | None) -> str | None:
    if provider_id is None:
        return None
    return session.scalar(select(EspProvider.name).where(EspProvider.id == provider_id))
