"""What an attempt's final outcome means for its message: status, retry, log lines, follow-up.

Pure: it reads no clock, database or network (``now`` and ``rng`` come in), so every branch is
tested with plain values. The worker persists what it says.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from smtp_proxy.config import DeliveryConfig
from smtp_proxy.contract import DeliveryStatus, MessageStatus
from smtp_proxy.delivery import backoff
from smtp_proxy.delivery.outcome import Outcome


class MessageFacts(NamedTuple):
    """What the verdict needs to know of the claimed message."""

    attempts: int  # this attempt included
    created_at: datetime
    body_readable: bool  # False: purged, or it cannot be decrypted


class Note(NamedTuple):
    """A delivery-log line of the worker's own (no provider, no response code)."""

    status: DeliveryStatus
    text: str


class FollowUp(NamedTuple):
    """A new message for the recipients the provider refused for now while it took the others."""

    recipients: tuple[str, ...]
    next_attempt_at: datetime

    def queued_as(self, message_id: uuid.UUID) -> Note:
        """The original message's log line once the follow-up is queued as ``message_id``."""
        return Note(
            DeliveryStatus.DEFERRED,
            f"{len(self.recipients)} recipient(s) refused for now: retried as message {message_id}",
        )


@dataclass(frozen=True)
class Verdict:
    """What the worker writes for the message, under its claim, after one attempt."""

    status: MessageStatus
    retry_at: datetime | None  # set when status is QUEUED
    notes: tuple[Note, ...]  # after the attempt's own lines
    follow_up: FollowUp | None


def decide(
    final: Outcome, message: MessageFacts, now: datetime, settings: DeliveryConfig, rng: random.Random
) -> Verdict:
    """The message's fate after an attempt that ended in ``final``.

    A temporary outcome queues the message again after its backoff, or fails it once attempts or
    ``delivery.max_age`` are spent; recipients refused for now in a delivery get a follow-up message
    on the same terms (the same attempts and age: splitting a message does not extend its life).
    """
    # Delivered to the others, refused for now: only with the body can a follow-up carry them.
    pending = final.retry_recipients if final.delivered and message.body_readable else ()
    if not (final.temporary or pending):
        status = MessageStatus.DELIVERED if final.delivered else MessageStatus.FAILED
        return Verdict(status, None, (), None)
    retry = backoff.next_try(message.attempts, message.created_at, now, settings, rng)
    if final.temporary:
        if retry.at is None:
            return Verdict(MessageStatus.FAILED, None, (Note(DeliveryStatus.FAILED, retry.reason),), None)
        return Verdict(MessageStatus.QUEUED, retry.at, (), None)
    if retry.at is None:
        text = f"{len(pending)} recipient(s) refused for now, not retried: {retry.reason}"
        return Verdict(MessageStatus.DELIVERED, None, (Note(DeliveryStatus.FAILED, text),), None)
    return Verdict(MessageStatus.DELIVERED, None, (), FollowUp(pending, retry.at))
