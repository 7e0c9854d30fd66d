"""The verdict on an attempt: the message's status, its retry, the worker's log lines, the follow-up."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from smtp_proxy.config import config_from_dict
from smtp_proxy.db.models import DeliveryStatus, MessageStatus
from smtp_proxy.delivery.outcome import Outcome, deferred, delivered, failed
from smtp_proxy.delivery.verdict import FollowUp, MessageFacts, Note, Verdict, decide

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
FIRST = MessageFacts(attempts=1, created_at=NOW - timedelta(minutes=1), body_readable=True)
SOME_REFUSED = Outcome(
    DeliveryStatus.DELIVERED, 250, "ok", retry_recipients=("b@example.net", "c@example.net")
)


def settings(**delivery: object):
    return config_from_dict({"delivery": delivery}, env={}).delivery


class Counted(random.Random):
    """No jitter, and a count of the draws: each draw is one backoff computed."""

    def __init__(self) -> None:
        super().__init__(0)
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return 0.0


def verdict(final: Outcome, message: MessageFacts = FIRST, **delivery: object) -> tuple[Verdict, int]:
    rng = Counted()
    return decide(final, message, NOW, settings(**delivery), rng), rng.draws


def test_delivered_finishes_the_message_with_no_retry() -> None:
    assert verdict(delivered(250, "ok")) == (Verdict(MessageStatus.DELIVERED, None, (), None), 0)


def test_permanent_failure_fails_the_message_with_no_retry() -> None:
    assert verdict(failed(550, "no such user")) == (Verdict(MessageStatus.FAILED, None, (), None), 0)


def test_temporary_failure_queues_the_message_again_after_one_backoff() -> None:
    decided, draws = verdict(deferred(451, "try later"))
    assert decided == Verdict(MessageStatus.QUEUED, NOW + timedelta(seconds=60), (), None)
    assert draws == 1


def test_the_retry_follows_the_backoff_schedule_of_the_attempts_made() -> None:
    third = FIRST._replace(attempts=3)
    assert verdict(deferred(451, "try later"), third)[0].retry_at == NOW + timedelta(seconds=240)


def test_temporary_failure_after_the_last_attempt_fails_the_message_and_says_why() -> None:
    last = FIRST._replace(attempts=30)
    decided, draws = verdict(deferred(451, "try later"), last, max_attempts=30)
    assert decided == Verdict(
        MessageStatus.FAILED, None, (Note(DeliveryStatus.FAILED, "gave up after 30 attempts"),), None
    )
    assert draws == 0


def test_temporary_failure_whose_retry_would_pass_max_age_fails_the_message_and_says_why() -> None:
    old = FIRST._replace(attempts=2, created_at=NOW - timedelta(days=5) + timedelta(seconds=100))
    decided, _ = verdict(deferred(451, "try later"), old)  # the next try, in 120s, is past 5 days
    reason = "gave up: not delivered within delivery.max_age (432000s)"
    assert decided == Verdict(MessageStatus.FAILED, None, (Note(DeliveryStatus.FAILED, reason),), None)


def test_recipients_refused_for_now_get_a_follow_up_on_the_message_own_schedule() -> None:
    decided, draws = verdict(SOME_REFUSED)
    follow_up = FollowUp(("b@example.net", "c@example.net"), NOW + timedelta(seconds=60))
    assert decided == Verdict(MessageStatus.DELIVERED, None, (), follow_up)
    assert draws == 1


def test_the_follow_up_logs_the_message_it_was_queued_as() -> None:
    follow_up = verdict(SOME_REFUSED)[0].follow_up
    assert follow_up is not None
    new_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert follow_up.queued_as(new_id) == Note(
        DeliveryStatus.DEFERRED, f"2 recipient(s) refused for now: retried as message {new_id}"
    )


def test_recipients_refused_for_now_are_not_retried_after_the_last_attempt() -> None:
    last = FIRST._replace(attempts=30)
    decided, _ = verdict(SOME_REFUSED, last, max_attempts=30)
    text = "2 recipient(s) refused for now, not retried: gave up after 30 attempts"
    assert decided == Verdict(MessageStatus.DELIVERED, None, (Note(DeliveryStatus.FAILED, text),), None)


def test_recipients_refused_for_now_are_not_retried_past_max_age() -> None:
    old = FIRST._replace(created_at=NOW - timedelta(days=5))
    decided, _ = verdict(SOME_REFUSED, old)
    text = (
        "2 recipient(s) refused for now, not retried: "
        "gave up: not delivered within delivery.max_age (432000s)"
    )
    assert decided == Verdict(MessageStatus.DELIVERED, None, (Note(DeliveryStatus.FAILED, text),), None)


def test_without_a_readable_body_no_follow_up_can_be_queued() -> None:
    unreadable = FIRST._replace(body_readable=False)
    assert verdict(SOME_REFUSED, unreadable) == (Verdict(MessageStatus.DELIVERED, None, (), None), 0)


def test_a_body_that_cannot_be_decrypted_is_tried_again_later() -> None:
    unreadable = FIRST._replace(body_readable=False)
    cannot = deferred(None, "the stored message cannot be decrypted (check the encryption keys)")
    assert verdict(cannot, unreadable)[0] == Verdict(
        MessageStatus.QUEUED, NOW + timedelta(seconds=60), (), None
    )


def test_a_purged_body_fails_the_message() -> None:
    purged = FIRST._replace(body_readable=False)
    gone = failed(None, "the message body is gone (purged)")
    assert verdict(gone, purged) == (Verdict(MessageStatus.FAILED, None, (), None), 0)
