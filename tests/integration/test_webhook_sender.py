"""The webhook sender against a real HTTP receiver on 127.0.0.1: signed POSTs, retries, the 24-hour
limit, no redirects, the address guard, at-least-once after a lost claim, and per-endpoint bounds."""

from __future__ import annotations

import json
import socket
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
        [[lost]] = store.claim_due(session, now=utcnow(), lanes=4, batch=10, lease=0.2)
    database.remove_session()
    sender()
    wait_for(lambda: statuses(database) == [("delivered", 1)], "the delivery to be sent after the lease")
    with database.transaction() as session:  # the dead claim's late answer changes nothing
        late = store.Answered(lost, 500, None, 1.0)
        assert store.settle(session, [late], now=utcnow()) == {lost.id: "lost"}
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
    sender(threads=4, per_endpoint=2, batch=1)  # a lane per event: two of them in flight at once
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


@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "one-request-per-connection"])
def test_a_backlog_goes_in_batches_over_one_connection_each(
    database, cipher, receiver, sender, keep_alive
) -> None:
    account_id = tenant(database)
    hook = receiver(keep_alive=keep_alive)
    endpoint(database, cipher, account_id, hook.url)
    written = {str(event(database, account_id, n)) for n in range(30)}
    sender(per_endpoint=1, batch=25)
    wait_for(lambda: statuses(database) == [("delivered", 1)] * 30, "every event delivered once")
    assert sorted(body["id"] for body in hook.bodies()) == sorted(written)  # each once, none invented
    # Two lanes (25 and 5 events); a receiver that closes after each answer gets a connection each.
    assert len(hook.connections) == (2 if keep_alive else 30)


def test_an_endpoint_that_does_not_answer_is_called_once_per_lane_not_once_per_event(
    database, cipher, sender
) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    account_id = tenant(database)
    endpoint(database, cipher, account_id, f"http://127.0.0.1:{port}/hook")
    for n in range(5):
        event(database, account_id, n)
    sender(retry_base=60, retry_cap=60)
    wait_for(lambda: ("pending", 1) in statuses(database), "the first delivery's failed attempt")
    with database.read() as session:
        rows = session.execute(
            select(WebhookDelivery.attempts, WebhookDelivery.next_attempt_at, WebhookDelivery.last_error)
        ).all()
    database.remove_session()
    tried = [row for row in rows if row.attempts == 1]
    assert len(tried) == 1 and "cannot connect" in tried[0].last_error
    # The rest were not called, not counted, and wait as long as the failed one does.
    later = utcnow() + timedelta(seconds=30)
    assert all(row.attempts == 0 and row.next_attempt_at > later for row in rows if row.attempts == 0)


def test_a_claim_takes_a_batch_from_each_of_at_most_lanes_endpoints(database, cipher, receiver) -> None:
    account_id = tenant(database)
    urls = [receiver().url for _ in range(3)]
    first, second, third = (endpoint(database, cipher, account_id, url).endpoint.id for url in urls)
    for n in range(5):  # each event is owed to all three endpoints
        event(database, account_id, n)
    with database.transaction() as session:
        session.execute(  # the third endpoint's are the oldest, then the first's, then the second's
            update(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == third)
            .values(next_attempt_at=utcnow() - timedelta(minutes=3))
        )
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == first)
            .values(next_attempt_at=utcnow() - timedelta(minutes=2))
        )
    with database.transaction() as session:
        lanes = store.claim_due(session, now=utcnow(), lanes=2, batch=4, lease=60)
    # The 8 oldest due are the third's 5 and the first's 3: a batch of 4 of each; the second waits.
    assert [[owed.endpoint_id for owed in lane] for lane in lanes] == [[third] * 4, [first] * 3]
    with database.read() as session:
        unclaimed = session.execute(
            select(WebhookDelivery.endpoint_id).where(WebhookDelivery.lease_id.is_(None))
        ).scalars()
        assert sorted(map(str, unclaimed)) == sorted(map(str, [third, first, first, *[second] * 5]))
    database.remove_session()


def test_answers_are_settled_together_each_under_its_claim(database, cipher, receiver) -> None:
    account_id = tenant(database)
    endpoint(database, cipher, account_id, receiver().url)
    for n in range(3):
        event(database, account_id, n)
    with database.transaction() as session:
        [lane] = store.claim_due(session, now=utcnow(), lanes=1, batch=3, lease=60)
    ok, refused, unsent = lane
    with database.transaction() as session:
        settled = store.settle(
            session,
            [store.Answered(ok, 204, None, 5), store.Answered(refused, 500, "HTTP 500", 5)],
            now=utcnow(),
        )
        store.give_back(session, [unsent], now=utcnow())
    assert settled == {ok.id: "delivered", refused.id: "pending"}
    assert statuses(database) == [("delivered", 1), ("pending", 0), ("pending", 1)]


def test_a_lane_past_its_time_gives_the_rest_back_to_be_claimed_again(
    database, cipher, receiver, sender
) -> None:
    """With no time for more than one POST a lane, each event goes in a lane of its own, uncounted."""
    account_id = tenant(database)
    hook = receiver()
    endpoint(database, cipher, account_id, hook.url)
    written = {str(event(database, account_id, n)) for n in range(3)}
    sender(per_endpoint=1, lane_seconds=0)
    wait_for(lambda: statuses(database) == [("delivered", 1)] * 3, "every event delivered once")
    assert sorted(body["id"] for body in hook.bodies()) == sorted(written)
    assert len(hook.connections) == 3  # a lane, and a connection, each
