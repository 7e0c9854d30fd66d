"""What a message's outcome tells its tenant: the event types and their JSON payloads.

Called in the transaction that writes the outcome (``delivery.worker``), so the event and
the outcome are committed together or not at all; ``storage.webhooks.record_event`` writes
them only for an account with an enabled endpoint that wants the type. The account's
endpoints are read once per outcome, however many events it gives.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from smtp_proxy.db.models import MessageStatus
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.delivery.outcome import Outcome
from smtp_proxy.storage.delivery_queue import Claimed
from smtp_proxy.storage.webhooks import record_event, subscriptions

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
    provider: str | None,
    now: datetime,
    deferred_recipients: Sequence[str] = (),
    suppressed: Sequence[str] = (),
    bounced: Sequence[str] = (),
) -> bool:
    """The events of one outcome, each naming the recipients it concerns.

    - ``message.suppressed`` for the recipients left out (on the suppression list);
    - the outcome's own type for the rest, less those it leaves to others: a delivered
      message's ``bounced`` recipients (refused for good: ``message.failed``) and
      ``deferred_recipients`` (refused for now, queued as a follow-up: ``message.deferred``).

    Whether any event was written (some endpoint wants one).
    """
    subscribed = subscriptions(session, message.account_id)
    if not subscribed:
        return False
    wanted = set().union(*subscribed.values())
    events: list[tuple[str, list[str]]] = []
    if suppressed:
        events.append(("message.suppressed", list(suppressed)))
    kind = KIND.get(status)
    tried = [r for r in message.recipients if r not in set(suppressed)]
    if kind is not None and tried:  # no recipient tried: the suppressed event says it all
        if status is MessageStatus.DELIVERED:
            elsewhere = set(deferred_recipients) | set(bounced)
            events.append((kind, [r for r in tried if r not in elsewhere]))
            if bounced:
                events.append(("message.failed", list(bounced)))
            if deferred_recipients:
                events.append(("message.deferred", list(deferred_recipients)))
        else:
            events.append((kind, tried))
    events = [(kind, recipients) for kind, recipients in events if kind in wanted]
    if not events:
        return False
    for kind, recipients in events:
        named = provider if kind != "message.suppressed" else None
        _record(session, message, kind, recipients, outcome, named, now, subscribed)
    return True


def _record(
    session: Session,
    message: Claimed,
    kind: str,
    recipients: list[str],
    outcome: Outcome,
    provider: str | None,
    now: datetime,
    subscribed: dict[uuid.UUID, frozenset[str]],
) -> None:
    payload: dict[str, Any] = {
        "time": iso_timestamp(now),
        "message_id": str(message.id),
        "correlation_id": message.correlation_id,
        "recipients": recipients,
        "provider": provider,
        "reply": {"code": outcome.code, "text": outcome.text},
    }
    record_event(session, account_id=message.account_id, kind=kind, payload=payload, subscribed=subscribed)
