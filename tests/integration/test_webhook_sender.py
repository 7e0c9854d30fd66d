"""The webhook sender against a real HTTP receiver on 127.0.0.1: signed POSTs, retries, the 24-hour
limit, no redirects, the address guard, at-least-once after a lost claim, and per-endpoint bounds."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import WebhookDelivery
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.storage import webhooks as store
from smtp_proxy.storage.audit import CLI
from smtp_proxy.webhooks import signature
from smtp_proxy.webhooks.post import post
from smtp_proxy.webhooks.sender import WebhookSender
from tests.integration.test_webhooks_storage import tenant
from tests.waiting import wait_for


def endpoint(database: Database, cipher: Cipher, account_id: uuid.UUID, url: str) -> store.NewSecret:
    with database.transaction() as session:
        made = store.create_endpoint(
            session,
            cipher,
            account_id=account_id,
            url_=url,
            events=list(store.EVENT_TYPES),
            allow_http=True,
            actor=CLI,
        )
    database.remove_session()
    return made


def event(database: Database, account_id: uuid.UUID, n: int = 0) -> uuid.UUID:
    with database.transaction() as session:
        event_id = store.record_event(
            session,
            account_id=account_id,
            kind="message.delivered",
            payload={"message_id": f"m{n}", "recipients": ["x@example.org"]},
        )
    database.remove_session()
    assert event_id is not None
    return event_id


def statuses(database: Database) -> list[tuple[str, int]]:
    with database.read() as session:
        rows = session.execute(select(WebhookDelivery.status, WebhookDelivery.attempts)).all()
    database.remove_session()
    return sorted((status, attempts) for status, attempts in rows)


@pytest.fixture
def sender(database: Database, cipher: Cipher) -> Iterator[Callable[..., WebhookSender]]:
    made: list[WebhookSender] = []

    def start(**options) -> WebhookSender:
        values = {
            "allow_private": lambda: True,
            "poll": 0.05,
            "retry_base": 0.05,
            "retry_cap": 0.2,
            **options,
        }
        running = WebhookSender(database, cipher, **values)
        running.start()
        made.append(running)
        return running

    yield start
    for running in made:
        running.stop()


def test_an_event_is_posted_signed_and_settled_delivered(database, cipher, receiver, sender) -> None:
    account_id = tenant(database)
    hook = receiver()
    made = endpoint(database, cipher, account_id, hook.url)
    event_id = event(database, account_id)
    sender()
    wait_for(lambda: statuses(database) == [("delivered", 1)], "the delivery to be settled")
    [(path, headers, body)] = hook.requests
    assert path == "/hook" and headers["Content-Type"] == "application/json"
    assert headers["Webhook-Id"] == str(event_id)
    assert json.loads(body) == {
        "id": str(event_id),
        "type": "message.delivered",
        "message_id": "m0",
        "recipients": ["x@example.org"],
    }
    assert signature.verify(headers[signature.HEADER], body, [made.secret], now=int(time.time()))


def test_a_failed_post_is_retried_until_a_2xx(database, cipher, receiver, sender) -> None:
    account_id = tenant(database)
    hook = receiver(statuses=[500, 503, 404])
    endpoint(database, cipher, account_id, hook.url)
    event(database, account_id)
    sender()
    wait_for(lambda: statuses(database) == [("delivered", 4)], "four attempts, the last a 200", timeout=10)
    assert len({body for _p, _h, body in hook.requests}) == 1  # the same event each time


def test_a_redirect_is_not_followed(database, cipher, receiver, sender) -> None:
    account_id = tenant(database)
    hook = receiver(statuses=[302])
    endpoint(database, cipher, account_id, hook.url)
    event(database, account_id)
    sender()
    wait_for(lambda: statuses(database) == [("delivered", 2)], "a retry after the redirect", timeout=10)
    assert [path for path, _h, _b in hook.requests] == ["/hook", "/hook"]


def test_a_delivery_owed_for_24_hours_is_dropped_at_its_next_failure(
    database, cipher, receiver, sender
) -> None:
    account_id = tenant(database)
    hook = receiver(statuses=[500] * 50)
    endpoint(database, cipher, account_id, hook.url)
    event(database, account_id)
    with database.transaction() as session:
        session.execute(update(WebhookDelivery).values(created_at=utcnow() - timedelta(hours=24)))
    database.remove_session()
    sender()
    wait_for(lambda: statuses(database) == [("dropped", 1)], "the delivery to be dropped")


def test_private_addresses_are_refused_unless_allowed(receiver) -> None:
    hook = receiver()
    refused = post(hook.url.replace("http:", "https:"), b"{}", {}, allow_private=False)
    assert refused.status is None and "not a public address" in (refused.error or "")
    plain = post(hook.url, b"{}", {}, allow_private=False)
    assert plain.status is None and "http is allowed only" in (plain.error or "")
    assert hook.requests == []
    assert post(hook.url, b"{}", {}, allow_private=True).delivered


def test_a_claim_that_runs_out_is_sent_again(database, cipher, receiver, sender) -> None:
    """What a worker killed mid-POST leaves behind: at least once, never lost."""
    account_id = tenant(database)
    hook = receiver()
    endpoint(database, cipher, account_id, hook.url)
    event(database, account_id)
    with database.transaction() as session:
        [lost] = store.claim_due(session, now=utcnow(), limit=10, lease=0.2)
    database.remove_session()
    sender()
    wait_for(lambda: statuses(database) == [("delivered", 1)], "the delivery to be sent after the lease")
    with database.transaction() as session:  # the dead claim's late answer changes nothing
        assert store.settle(session, lost, now=utcnow(), status_code=500, error=None, retry_in=1) == "lost"
    assert statuses(database) == [("delivered", 1)]


def test_a_slow_endpoint_holds_only_its_own_share(database, cipher, receiver, sender) -> None:
    account_id = tenant(database)
    release = threading.Event()
    slow = receiver(hold=release)
    fast = receiver()
    endpoint(database, cipher, account_id, slow.url)
    endpoint(database, cipher, tenant(database, "bob"), fast.url)
    for n in range(6):
        event(database, account_id, n)
    sender(threads=4, per_endpoint=2)
    wait_for(lambda: len(slow.requests) == 2, "the slow endpoint's two requests in flight")
    bob = event(database, tenant_id_of(database, "bob"))
    wait_for(lambda: [b["id"] for b in fast.bodies()] == [str(bob)], "bob's event past the slow endpoint")
    assert len(slow.requests) == 2  # never more than its share at once
    release.set()
    wait_for(lambda: len(slow.requests) == 6, "the slow endpoint's backlog once it answers", timeout=10)


def tenant_id_of(database: Database, name: str) -> uuid.UUID:
    from smtp_proxy.storage import accounts

    with database.read() as session:
        found = accounts.get_account_by_name(session, name).id
    database.remove_session()
    return found
