"""The delivery queue's storage on PostgreSQL and SQLite: claims, leases, fenced outcomes, release, purge."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import timedelta

from sqlalchemy import select, update

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import Account, DeliveryLog, DeliveryStatus, Message, MessageStatus, ProviderType
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.storage import delivery_queue
from smtp_proxy.storage.messages import enqueue_message
from tests.integration.test_storage import fresh, new_account, new_provider, new_rule

LEASE = 60.0


def enqueue(db: Database, cipher: Cipher, account_id: uuid.UUID, count: int = 1) -> list[uuid.UUID]:
    ids = []
    with db.transaction() as session:
        for n in range(count):
            ids.append(
                enqueue_message(
                    session,
                    cipher,
                    account_id=account_id,
                    sender="app@example.com",
                    recipients=[f"r{n}@example.net"],
                    data=f"Subject: {n}\r\n\r\nbody {n}\r\n".encode(),
                    correlation_id=f"c{n}",
                ).id
            )
    return ids


def claim(db: Database, limit: int = 10, lease: float = LEASE, now=None) -> delivery_queue.Claim:
    with db.transaction() as session:
        return delivery_queue.claim(session, limit=limit, lease=lease, now=now or utcnow())


def row(db: Database, message_id: uuid.UUID) -> Message:
    with fresh(db) as session:
        return session.get(Message, message_id)


def logs(db: Database, message_id: uuid.UUID) -> list[DeliveryLog]:
    with fresh(db) as session:
        query = (
            select(DeliveryLog).where(DeliveryLog.message_id == message_id).order_by(DeliveryLog.created_at)
        )
        return list(session.scalars(query))


def test_claim_takes_due_messages_oldest_first_under_a_lease(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    ids = enqueue(database, cipher, account.id, 5)
    with database.transaction() as session:  # one not due yet
        session.execute(
            update(Message).where(Message.id == ids[4]).values(next_attempt_at=utcnow() + timedelta(hours=1))
        )
    taken = claim(database, limit=3)
    assert [m.id for m in taken.messages] == ids[:3]
    assert all(m.attempts == 1 for m in taken.messages)
    assert taken.messages[0].body_encrypted and taken.messages[0].recipients == ["r0@example.net"]
    stored = row(database, ids[0])
    assert stored.status is MessageStatus.PROCESSING and stored.lease_id == taken.lease_id
    assert stored.next_attempt_at == taken.until
    assert [m.id for m in claim(database).messages] == [ids[3]]  # claimed ones and the future one stay
    assert claim(database).messages == []


def test_a_lease_that_ran_out_is_claimed_again_and_fences_the_old_claim(
    database: Database, cipher: Cipher
) -> None:
    account = new_account(database).account
    provider = new_provider(database, cipher, account.id, api_key="k")
    (message_id,) = enqueue(database, cipher, account.id)
    first = claim(database, lease=1)
    later = utcnow() + timedelta(seconds=2)
    second = claim(database, now=later)
    assert [m.id for m in second.messages] == [message_id] and second.messages[0].attempts == 2
    # The first worker comes back late: its outcome must not overwrite the second claim's.
    attempt = delivery_queue.Attempt(provider.id, DeliveryStatus.DELIVERED, 250, "ok", utcnow())
    with database.transaction() as session:
        held = delivery_queue.finish(
            session,
            message_id,
            first.lease_id,
            status=MessageStatus.DELIVERED,
            attempts=[attempt],
            now=utcnow(),
        )
    assert held is False
    assert row(database, message_id).status is MessageStatus.PROCESSING
    assert [entry.response_text for entry in logs(database, message_id)] == ["ok"]  # it did happen
    with database.transaction() as session:
        assert delivery_queue.finish(
            session,
            message_id,
            second.lease_id,
            status=MessageStatus.DELIVERED,
            attempts=[],
            now=later,
            provider_id=provider.id,
        )
    stored = row(database, message_id)
    assert stored.status is MessageStatus.DELIVERED and stored.provider_id == provider.id
    assert stored.processed_at == later == stored.next_attempt_at and stored.lease_id is None


def test_finish_with_a_retry_requeues_at_the_given_time(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    (message_id,) = enqueue(database, cipher, account.id)
    taken = claim(database)
    retry_at = utcnow() + timedelta(minutes=5)
    attempts = [
        delivery_queue.Attempt(None, DeliveryStatus.DEFERRED, 451, "try later", utcnow()),
        delivery_queue.Attempt(None, DeliveryStatus.DEFERRED, None, "connection refused", utcnow()),
    ]
    with database.transaction() as session:
        assert delivery_queue.finish(
            session,
            message_id,
            taken.lease_id,
            status=MessageStatus.QUEUED,
            attempts=attempts,
            now=utcnow(),
            next_attempt_at=retry_at,
        )
    stored = row(database, message_id)
    assert (stored.status, stored.next_attempt_at, stored.processed_at) == (
        MessageStatus.QUEUED,
        retry_at,
        None,
    )
    assert [(e.response_code, e.status) for e in logs(database, message_id)] == [
        (451, DeliveryStatus.DEFERRED),
        (None, DeliveryStatus.DEFERRED),
    ]
    assert claim(database).messages == []  # not due before retry_at
    assert [m.attempts for m in claim(database, now=retry_at).messages] == [2]


def test_release_gives_unstarted_messages_back_without_counting_an_attempt(
    database: Database, cipher: Cipher
) -> None:
    account = new_account(database).account
    ids = enqueue(database, cipher, account.id, 3)
    taken = claim(database)
    with database.transaction() as session:
        assert delivery_queue.release(session, taken.lease_id, ids[:2], utcnow()) == 2
        assert delivery_queue.release(session, uuid.uuid4(), [ids[2]], utcnow()) == 0  # another claim's
    assert [row(database, i).status for i in ids] == [MessageStatus.QUEUED] * 2 + [MessageStatus.PROCESSING]
    assert [m.attempts for m in claim(database).messages] == [1, 1]


def test_purge_drops_only_old_finished_bodies(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    ids = enqueue(database, cipher, account.id, 4)
    taken = claim(database, limit=3)
    old = utcnow() - timedelta(days=40)
    with database.transaction() as session:
        delivery_queue.finish(
            session, ids[0], taken.lease_id, status=MessageStatus.DELIVERED, attempts=[], now=old
        )
        delivery_queue.finish(
            session, ids[1], taken.lease_id, status=MessageStatus.FAILED, attempts=[], now=old
        )
        delivery_queue.finish(
            session, ids[2], taken.lease_id, status=MessageStatus.DELIVERED, attempts=[], now=utcnow()
        )
    cutoff = utcnow() - timedelta(days=30)
    with database.transaction() as session:
        assert delivery_queue.purge_bodies(session, cutoff, batch_size=1) == 1
    with database.transaction() as session:
        assert delivery_queue.purge_bodies(session, cutoff) == 1
        assert delivery_queue.purge_bodies(session, cutoff) == 0
    bodies = [row(database, i).body_encrypted for i in ids]
    assert bodies[0] is None and bodies[1] is None
    assert bodies[2] is not None and bodies[3] is not None  # recent, and still queued
    assert row(database, ids[0]).sender == "app@example.com"  # the metadata stays


def test_depth_counts_waiting_and_in_delivery(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    enqueue(database, cipher, account.id, 5)
    claim(database, limit=2)
    with database.transaction() as session:
        assert delivery_queue.depth(session) == {"queued": 3, "processing": 2}


def test_routes_leave_out_disabled_rules_and_providers(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    other = new_account(database, "bob", domains=("bob.example",)).account
    on = new_provider(database, cipher, account.id, "on", api_key="k")
    off = new_provider(database, cipher, account.id, "off", api_key="k", enabled=False)
    new_rule(database, account.id, on.id, "second", 5)
    new_rule(database, account.id, on.id, "first", 1, conditions={"weight": 10})
    new_rule(database, account.id, on.id, "disabled", 0, enabled=False)
    new_rule(database, account.id, off.id, "provider-off", 0)
    theirs = new_provider(
        database, cipher, other.id, "theirs", provider_type=ProviderType.SENDGRID, api_key="k"
    )
    new_rule(database, other.id, theirs.id, "not mine", 0)
    with database.read() as session:
        found = delivery_queue.routes(session, account.id)
    assert [(r.priority, r.conditions, r.provider.name) for r in found] == [
        (1, {"weight": 10}, "on"),
        (5, {}, "on"),
    ]


def test_concurrent_claims_take_disjoint_batches_without_waiting(
    pg_url: str, make_config, encryption_key: str
) -> None:
    """FOR UPDATE SKIP LOCKED: a claim still open in one transaction does not block or share with another."""
    config = make_config(pg_url)
    db = Database(config.database)
    cipher = Cipher.from_config(config.security)
    try:
        account = new_account(db).account
        ids = enqueue(db, cipher, account.id, 6)
        holding = threading.Event()
        release = threading.Event()
        first: list[uuid.UUID] = []

        def slow_claim() -> None:
            with db.transaction() as session:
                first.extend(
                    m.id for m in delivery_queue.claim(session, limit=3, lease=LEASE, now=utcnow()).messages
                )
                holding.set()
                release.wait(10)
            db.remove_session()

        thread = threading.Thread(target=slow_claim)
        thread.start()
        assert holding.wait(10)
        second = [m.id for m in claim(db, limit=10).messages]  # returns at once, uncommitted rows skipped
        release.set()
        thread.join()
        assert sorted(first + second) == sorted(ids) and not set(first) & set(second)
    finally:
        db.dispose()


def test_an_outcome_for_a_provider_deleted_meanwhile_is_still_written(
    database: Database, cipher: Cipher
) -> None:
    """The tenant deletes the provider while the worker sends through it: the outcome still commits."""
    account = new_account(database).account
    provider = new_provider(database, cipher, account.id, api_key="k")
    kept = new_provider(database, cipher, account.id, "kept", api_key="k")
    (message_id,) = enqueue(database, cipher, account.id)
    taken = claim(database)
    with database.transaction() as session:
        session.delete(session.get(type(provider), provider.id))
    attempts = [
        delivery_queue.Attempt(kept.id, DeliveryStatus.DEFERRED, 503, "busy", utcnow()),
        delivery_queue.Attempt(provider.id, DeliveryStatus.DELIVERED, 250, "ok", utcnow()),
    ]
    with database.transaction() as session:
        assert delivery_queue.finish(
            session,
            message_id,
            taken.lease_id,
            status=MessageStatus.DELIVERED,
            attempts=attempts,
            now=utcnow(),
            provider_id=provider.id,
        )
    stored = row(database, message_id)
    assert stored.status is MessageStatus.DELIVERED and stored.provider_id is None
    assert [(e.provider_id, e.response_text) for e in logs(database, message_id)] == [
        (kept.id, "busy"),
        (None, "ok"),
    ]


# --- fair claims ----------------------------------------------------------------------------------


def deactivate(db: Database, account_id: uuid.UUID, active: bool = False) -> None:
    with db.transaction() as session:
        session.execute(update(Account).where(Account.id == account_id).values(active=active))


def test_a_backlog_does_not_delay_another_accounts_new_message(database: Database, cipher: Cipher) -> None:
    """A's 300 due messages are older than B's one, yet B's is in the first claim."""
    a = new_account(database, "alice").account
    b = new_account(database, "bob", domains=("bob.example",)).account
    backlog = enqueue(database, cipher, a.id, 300)
    (fresh_one,) = enqueue(database, cipher, b.id)
    taken = claim(database, limit=10)
    assert fresh_one in [m.id for m in taken.messages]
    assert [m.id for m in taken.messages if m.account_id == a.id] == backlog[:9]  # A's oldest first


def test_each_accounts_first_message_comes_before_any_accounts_second(
    database: Database, cipher: Cipher
) -> None:
    a = new_account(database, "alice").account
    b = new_account(database, "bob", domains=("bob.example",)).account
    c = new_account(database, "carol", domains=("carol.example",)).account
    for account in (a, b, c):
        enqueue(database, cipher, account.id, 3)
    taken = claim(database, limit=4)
    assert sorted(Counter(m.account_id for m in taken.messages).values()) == [1, 1, 2]


def test_the_per_account_cap_counts_what_the_claimer_has_in_flight(
    database: Database, cipher: Cipher
) -> None:
    a = new_account(database, "alice").account
    b = new_account(database, "bob", domains=("bob.example",)).account
    enqueue(database, cipher, a.id, 10)
    enqueue(database, cipher, b.id, 10)

    def take(in_flight: dict[uuid.UUID, int]) -> Counter[uuid.UUID]:
        with database.transaction() as session:
            taken = delivery_queue.claim(
                session, limit=50, lease=LEASE, now=utcnow(), per_account=3, in_flight=in_flight
            )
        return Counter(m.account_id for m in taken.messages)

    assert take({a.id: 2}) == {a.id: 1, b.id: 3}
    assert take({a.id: 3, b.id: 1}) == {b.id: 2}
    assert take({a.id: 5, b.id: 0}) == {b.id: 3}


def test_expired_leases_come_first_and_count_toward_the_cap(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    ids = enqueue(database, cipher, account.id, 6)
    first = claim(database, limit=2, lease=1)
    later = utcnow() + timedelta(seconds=2)
    with database.transaction() as session:
        taken = delivery_queue.claim(session, limit=10, lease=LEASE, now=later, per_account=3)
    assert {m.id for m in first.messages} <= {m.id for m in taken.messages}
    assert len(taken.messages) == 3 and {m.id for m in taken.messages} < set(ids)


def test_a_deactivated_accounts_messages_are_not_claimed_until_it_is_active_again(
    database: Database, cipher: Cipher
) -> None:
    a = new_account(database, "alice").account
    b = new_account(database, "bob", domains=("bob.example",)).account
    held = enqueue(database, cipher, a.id, 2)
    expired = claim(database, limit=1, lease=1).messages[0].id  # one of A's, its worker gone
    (theirs,) = enqueue(database, cipher, b.id)
    deactivate(database, a.id)
    later = utcnow() + timedelta(seconds=2)
    assert [m.id for m in claim(database, now=later).messages] == [theirs]
    deactivate(database, a.id, active=True)
    again = claim(database, now=later).messages
    assert {m.id for m in again} == set(held) and expired in held
    assert {m.id: m.attempts for m in again} == {expired: 2, next(i for i in held if i != expired): 1}


def test_held_messages_get_one_line_each_and_fail_at_max_age(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    old, recent = enqueue(database, cipher, account.id, 2)
    deactivate(database, account.id)
    with database.transaction() as session:
        assert delivery_queue.inactive_accounts(session).keys() == {account.id}
    now = utcnow()
    with database.transaction() as session:
        assert delivery_queue.sweep_lock(session)
        assert delivery_queue.hold_waiting(session, account.id, now) == 2
    with database.transaction() as session:
        assert delivery_queue.hold_waiting(session, account.id, utcnow()) == 0  # once, not every sweep
    with database.transaction() as session:
        session.execute(
            update(Message).where(Message.id == old).values(created_at=utcnow() - timedelta(days=6))
        )
    cutoff = utcnow() - timedelta(days=5)
    with database.transaction() as session:
        assert (
            delivery_queue.fail_held(session, [account.id], cutoff, utcnow(), "too old", batch_size=10) == 1
        )
    assert row(database, old).status is MessageStatus.FAILED and row(database, old).processed_at is not None
    assert row(database, recent).status is MessageStatus.QUEUED and row(database, recent).attempts == 0
    assert [(e.status, e.response_text) for e in logs(database, old)] == [
        (DeliveryStatus.DEFERRED, delivery_queue.HELD_TEXT),
        (DeliveryStatus.FAILED, "too old"),
    ]
    assert [e.response_text for e in logs(database, recent)] == [delivery_queue.HELD_TEXT]


def test_hold_gives_a_claimed_message_back_without_counting_the_attempt(
    database: Database, cipher: Cipher
) -> None:
    account = new_account(database).account
    (message_id,) = enqueue(database, cipher, account.id)
    taken = claim(database)
    with database.transaction() as session:
        assert delivery_queue.hold(session, message_id, taken.lease_id, utcnow())
    stored = row(database, message_id)
    assert (stored.status, stored.attempts, stored.lease_id) == (MessageStatus.QUEUED, 0, None)
    assert [e.response_text for e in logs(database, message_id)] == [delivery_queue.HELD_TEXT]
    with database.transaction() as session:  # its line counts: the sweep does not write another
        assert delivery_queue.hold_waiting(session, account.id, utcnow()) == 0


def test_a_claim_told_not_to_look_for_run_out_leases_leaves_them(database: Database, cipher: Cipher) -> None:
    account = new_account(database).account
    (message_id,) = enqueue(database, cipher, account.id)
    claim(database, lease=1)
    later = utcnow() + timedelta(seconds=2)
    with database.transaction() as session:
        assert delivery_queue.claim(session, limit=10, lease=LEASE, now=later, expired=False).messages == []
    assert [m.id for m in claim(database, now=later).messages] == [message_id]


def test_a_claim_carries_the_dsn_parameters_and_the_accounts_bounce_setting(
    database: Database, cipher: Cipher
) -> None:
    """What the worker needs for a delivery status notification comes with the claim, no query more."""
    quiet, loud, unset = (new_account(database, name).account for name in ("quiet", "loud", "unset"))
    with database.transaction() as session:
        session.execute(update(Account).where(Account.id == quiet.id).values(bounces=False))
        session.execute(update(Account).where(Account.id == loud.id).values(bounces=True))
        dsn = {"bob@example.net": {"notify": ["FAILURE", "DELAY"], "orcpt": "rfc822;bob@example.net"}}
        with_dsn = enqueue_message(
            session,
            cipher,
            account_id=quiet.id,
            sender="app@example.com",
            recipients=["bob@example.net", "carol@example.net"],
            data=b"Subject: dsn\r\n\r\nbody\r\n",
            correlation_id="dsn",
            dsn_ret="HDRS",
            dsn_envid="env 1",
            dsn_recipients=dsn,
            delay_notified=True,  # a follow-up whose original told its sender of the delay
        ).id
        bounce = enqueue_message(
            session,
            cipher,
            account_id=loud.id,
            sender="",
            recipients=["app@example.com"],
            data=b"Subject: failed\r\n\r\nbody\r\n",
            correlation_id="bounce",
            is_bounce=True,
        ).id
    (plain,) = enqueue(database, cipher, unset.id)
    with database.transaction() as session:
        taken = delivery_queue.claim(session, limit=10, lease=LEASE, now=utcnow(), bounces_default=False)
    claimed = {m.id: m for m in taken.messages}
    assert claimed[with_dsn][-6:] == ("HDRS", "env 1", dsn, False, True, False)
    assert claimed[bounce][-6:] == (None, None, None, True, False, True)
    assert claimed[plain][-6:] == (None, None, None, False, False, False)  # the default given
    assert row(database, plain).dsn_recipients is None  # SQL NULL, not a JSON null
    with fresh(database) as session:
        unset_dsn = set(session.scalars(select(Message.id).where(Message.dsn_recipients.is_(None))))
        assert unset_dsn == {bounce, plain}
    with database.transaction() as session:
        delivery_queue.release(session, taken.lease_id, list(claimed), utcnow())
    assert {m.id: m.bounces for m in claim(database).messages} == {with_dsn: False, bounce: True, plain: True}


def test_dsn_of_keeps_the_parameters_of_the_recipients_named() -> None:
    base = delivery_queue.Claimed(
        *[None] * 9,
        dsn_ret=None,
        dsn_envid=None,
        dsn_recipients=None,
        is_bounce=False,
        delay_notified=False,
        bounces=True,
    )
    assert delivery_queue.dsn_of(base, ["a@x.test"]) is None
    given = base._replace(dsn_recipients={"a@x.test": {"notify": ["NEVER"], "orcpt": None}})
    assert delivery_queue.dsn_of(given, ["a@x.test", "b@x.test"]) == {
        "a@x.test": {"notify": ["NEVER"], "orcpt": None}
    }
    assert delivery_queue.dsn_of(given, ["b@x.test"]) is None
