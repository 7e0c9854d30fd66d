"""The webhook sender: claims owed deliveries from the outbox and POSTs them, signed.

One claim thread takes due deliveries (``storage.webhooks.claim_due``) while a bounded
pool POSTs them. No endpoint has more than ``per_endpoint`` requests in flight from this
process, and the claim skips an endpoint at that bound, so a slow or dead endpoint of
one tenant holds its own share of the pool and never delays other endpoints' events.

Each answer is written under the claim that sent it (``settle``): a 2xx is delivered,
anything else is tried again with backoff until the delivery has been owed for 24 hours,
then dropped and logged. A sender that dies mid-POST leaves its claim to run out after
``lease`` seconds; the delivery is then claimed again: at least once, never lost. The
event's id is in the body and in ``Webhook-Id``, so a receiver drops a duplicate.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import WebhookEndpoint
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.delivery.backoff import retry_delay
from smtp_proxy.errors import DatabaseUnavailable
from smtp_proxy.storage import webhooks as store
from smtp_proxy.webhooks import signature
from smtp_proxy.webhooks.post import Answer, post

log = logging.getLogger("smtp_proxy.webhooks")

THREADS = 4
PER_ENDPOINT = 2
LEASE_SECONDS = 60.0  # longer than one POST's timeout, with room
WEBHOOK_MIN_LEASE = 15.0  # the shortest claim that outlasts one POST (10 s) and its settle
POLL_SECONDS = 1.0
RETRY_BASE = 10.0
RETRY_CAP = 3600.0


class WebhookSender:
    """Sends what the outbox owes until ``stop``; thread-safe."""

    def __init__(
        self,
        database: Database,
        cipher: Cipher,
        *,
        allow_private: Callable[[], bool],
        threads: int = THREADS,
        per_endpoint: int = PER_ENDPOINT,
        lease: float = LEASE_SECONDS,
        poll: float = POLL_SECONDS,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        post_: Callable[..., Answer] = post,
    ) -> None:
        """``allow_private`` reads ``delivery.allow_private_networks`` from the live config."""
        self._database = database
        self._cipher = cipher
        self._allow_private = allow_private
        self._threads = threads
        self._per_endpoint = per_endpoint
        self._lease = lease
        self._poll = poll
        self._retry = (retry_base, retry_cap)
        self._post = post_
        self._rng = random.Random()
        self._in_flight: Counter[uuid.UUID] = Counter()
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhook-claims", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop claiming; POSTs in flight finish (each is bounded by its timeout)."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=False)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                claimed = self._claim()
            except DatabaseUnavailable:
                claimed = []
            except Exception:  # noqa: BLE001 - the claim thread must outlive any one error
                log.exception("webhook claim failed", extra={"event": "webhook.claim_failed"})
                claimed = []
            finally:
                self._database.remove_session()
            for owed in claimed:
                self._pool.submit(self._send, owed)
            with self._changed:
                if not claimed and not self._stopping.is_set():
                    # Nothing due, or every endpoint with something due is at its bound: a finished
                    # POST wakes this at once (its endpoint may take the next), else the poll does.
                    self._changed.wait(self._poll)
                while not self._stopping.is_set() and sum(self._in_flight.values()) >= self._threads:
                    self._changed.wait(self._poll)

    def _claim(self) -> list[store.Owed]:
        with self._changed:
            free = self._threads - sum(self._in_flight.values())
            busy = [endpoint for endpoint, count in self._in_flight.items() if count >= self._per_endpoint]
        if free <= 0:
            return []
        with self._database.transaction() as session:
            owed = store.claim_due(session, now=utcnow(), limit=free, lease=self._lease, skip_endpoints=busy)
            taken: list[store.Owed] = []
            back: list[store.Owed] = []
            with self._changed:
                for item in owed:
                    if self._in_flight[item.endpoint_id] < self._per_endpoint:
                        self._in_flight[item.endpoint_id] += 1
                        taken.append(item)
                    else:
                        back.append(item)
            store.give_back(session, back, now=utcnow())
        return taken

    def _send(self, owed: store.Owed) -> None:
        try:
            answer = self._deliver(owed)
            retry_in = retry_delay(owed.attempts + 1, *self._retry, self._rng)
            with self._database.transaction() as session:
                status = store.settle(
                    session,
                    owed,
                    now=utcnow(),
                    status_code=answer.status,
                    error=answer.error,
                    retry_in=retry_in,
                )
            level = logging.WARNING if status == "dropped" else logging.INFO
            log.log(
                level,
                "webhook sent" if status == "delivered" else f"webhook {status}",
                extra={
                    "event": f"webhook.{status}",
                    "event_id": str(owed.event_id),
                    "endpoint_id": str(owed.endpoint_id),
                    "status_code": answer.status,
                    "error": answer.error,
                    "attempts": owed.attempts + 1,
                },
            )
        except Exception:  # noqa: BLE001 - the claim runs out and the delivery is tried again
            log.exception("webhook delivery failed", extra={"event": "webhook.send_failed"})
        finally:
            self._database.remove_session()
            with self._changed:
                self._in_flight[owed.endpoint_id] -= 1
                if self._in_flight[owed.endpoint_id] <= 0:
                    del self._in_flight[owed.endpoint_id]
                self._changed.notify_all()

    def _deliver(self, owed: store.Owed) -> Answer:
        with self._database.read() as session:
            endpoint = session.get(WebhookEndpoint, owed.endpoint_id)
            if endpoint is None:
                return Answer(None, "the endpoint was deleted")
            secrets = store.signing_secrets(self._cipher, endpoint, now=utcnow())
        body = json.dumps(owed.payload, separators=(",", ":"), sort_keys=True).encode()
        headers = {
            signature.HEADER: signature.sign(secrets, int(time.time()), body),
            "Webhook-Id": str(owed.event_id),
        }
        return self._post(owed.url, body, headers, allow_private=self._allow_private())
