"""The worker's side of delivery status notifications: what an outcome owes the sender, queued.

Called in the transaction that writes the outcome (``delivery.worker``), so a notice is
committed with the failure it reports or not at all, and is sent, at least once, like any
message: a message of the same account from ``<>`` to the original's envelope sender,
routed by the account's rules, stored and listed with ``is_bounce`` set. ``delivery.dsn``
decides who is told what and writes the report.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy.orm import Session

from smtp_proxy.config import DeliveryConfig
from smtp_proxy.contract import MessageStatus
from smtp_proxy.crypto import Cipher
from smtp_proxy.delivery import dsn
from smtp_proxy.delivery.outcome import Outcome
from smtp_proxy.storage import delivery_queue
from smtp_proxy.storage.delivery_queue import Claimed
from smtp_proxy.storage.messages import enqueue_message

log = logging.getLogger("smtp_proxy.delivery")


class Queued(NamedTuple):
    """A notice queued as message ``id`` for the original's sender, naming ``recipients``."""

    id: uuid.UUID
    action: dsn.Action
    recipients: tuple[str, ...]


def queue_notices(
    session: Session,
    cipher: Cipher,
    message: Claimed,
    *,
    status: MessageStatus,
    final: Outcome,
    suppressed: Sequence[str],
    following_up: Sequence[str],
    data: bytes | None,
    remote_mta: str | None,
    reporting_mta: str,
    settings: DeliveryConfig,
    now: datetime,
) -> list[Queued]:
    """Queue the notices this outcome owes the sender; ``data`` is the original (None: unreadable)."""
    if not dsn.may_notify(message.sender, is_bounce=message.is_bounce, bounces=message.bounces):
        return []  # nothing to read or decide
    given = message.dsn_recipients or {}
    original = dsn.Original(
        message_id=message.id,
        sender=message.sender,
        is_bounce=message.is_bounce,
        arrived=message.created_at,
        ret=message.dsn_ret,
        envid=message.dsn_envid,
        notify={
            address: frozenset(params["notify"]) if params.get("notify") else None
            for address, params in given.items()
        },
    )
    delay_due = (
        status is MessageStatus.QUEUED
        and not message.delay_notified
        and now - message.created_at >= timedelta(seconds=settings.delay_notice_after)
    )
    outcomes = dsn.recipient_outcomes(
        status,
        final,
        [r for r in message.recipients if r not in set(suppressed)],
        suppressed,
        following_up=following_up,
        delay_due=delay_due,
        remote_mta=remote_mta,
        orcpt={address: params.get("orcpt") for address, params in given.items()},
    )
    queued: list[Queued] = []
    for notice in dsn.notices(original, outcomes, bounces=message.bounces):
        try:
            report = dsn.build(
                notice,
                original,
                data if data is not None else _header_section(message.headers),
                reporting_mta=reporting_mta,
                now=now,
                retry_until=message.created_at + timedelta(seconds=settings.max_age),
            )
        except Exception:  # noqa: BLE001 - a notice that cannot be written must not hold up the outcome
            log.exception(
                "delivery status notification not written",
                extra={"event": "delivery.notice_failed", "message_id": str(message.id)},
            )
            continue
        enqueued = enqueue_message(
            session,
            cipher,
            account_id=message.account_id,
            sender="",
            recipients=[message.sender],
            data=report,
            correlation_id=message.correlation_id,
            is_bounce=True,
        )
        queued.append(Queued(enqueued.id, notice.action, tuple(r.address for r in notice.recipients)))
        if notice.action is dsn.Action.DELAYED:
            delivery_queue.mark_delay_notified(session, message.id)
    return queued


def _header_section(headers: Sequence[Sequence[str]]) -> bytes:
    """The original's header section from its stored fields, when its body cannot be read."""
    return "".join(f"{name}: {value}\r\n" for name, value in headers).encode("utf-8", "replace")
