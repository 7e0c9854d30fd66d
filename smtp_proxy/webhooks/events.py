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


# The reply a ``message.suppressed`` event carries: no provider was asked about its recipients.
SUPPRESSED_REPLY = {"code": None, "text": "on the suppression list"}


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
    """The events of one outcome, each naming the recipients it concerns and the reply about them.

    - ``message.suppressed`` for the recipients left out (on the suppression list), with no
      provider and no reply code;
    - the outcome's own type for the rest, less those it leaves to others: a delivered
      message's ``bounced`` recipients (refused for good: ``message.failed``) and
      ``deferred_recipients`` (refused for now, queued as a follow-up: ``message.deferred``).

    A failed or deferred recipient the provider refused at RCPT carries that refusal as its
    reply, not the message's (which may be the 250 the others got); recipients with different
    replies get an event each.

    Whether any event was written (some endpoint wants one).
    """
    subscribed = subscriptions(session, message.account_id)
    if not subscribed:
        return False
    wanted = set().union(*subscribed.values())
    groups: list[tuple[str, list[str]]] = []
    if suppressed:
        groups.append(("message.suppressed", list(suppressed)))
    kind = KIND.get(status)
    tried = [r for r in message.recipients if r not in set(suppressed)]
    if kind is not None and tried:  # no recipient tried: the suppressed event says it all
        if status is MessageStatus.DELIVERED:
            elsewhere = set(deferred_recipients) | set(bounced)
            groups.append((kind, [r for r in tried if r not in elsewhere]))
            if bounced:
                groups.append(("message.failed", list(bounced)))
            if deferred_recipients:
                groups.append(("message.deferred", list(deferred_recipients)))
        else:
            groups.append((kind, tried))
    events = [
        event
        for kind, recipients in groups
        if kind in wanted
        for event in _by_reply(kind, recipients, outcome)
    ]
    if not events:
        return False
    for kind, recipients, reply in events:
        named = provider if kind != "message.suppressed" else None
        _record(session, message, kind, recipients, reply, named, now, subscribed)
    return True


def _by_reply(
    kind: str, recipients: list[str], outcome: Outcome
) -> list[tuple[str, list[str], dict[str, Any]]]:
    """``recipients`` of one event type grouped by the reply about each, in their order."""
    if kind == "message.suppressed":
        return [(kind, recipients, SUPPRESSED_REPLY)]
    refused_class = {"message.failed": 5, "message.deferred": 4}.get(kind)
    own = {r.recipient: r for r in outcome.refused if r.code // 100 == refused_class}
    grouped: dict[tuple[int | None, str], list[str]] = {}
    for recipient in recipients:
        refusal = own.get(recipient)
        reply = (refusal.code, refusal.text) if refusal is not None else (outcome.code, outcome.text)
        grouped.setdefault(reply, []).append(recipient)
    return [(kind, named, {"code": code, "text": text}) for (code, text), named in grouped.items()]


def _record(
    session: Session,
    message: Claimed,
    kind: str,
    recipients: list[str],
    reply: dict[str, Any],
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
        "reply": reply,
    }
    record_event(session, account_id=message.account_id, kind=kind, payload=payload, subscribed=subscribed)
