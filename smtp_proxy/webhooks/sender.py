"""The webhook sender: claims owed deliveries from the outbox and POSTs them, signed.

One claim thread takes due deliveries in lanes (``storage.webhooks.claim_due``): a lane is
up to ``batch`` deliveries of one endpoint, POSTed one after another over one kept-alive
connection by a bounded pool. No endpoint has more than ``per_endpoint`` lanes running in
this process, and the claim skips an endpoint at that bound, so a slow or dead endpoint of
one tenant holds its own share of the pool and never delays other endpoints' events.

Answers are written under the claim that sent them (``settle``), a batch at a time (at least
every ``SETTLE_EVERY`` seconds): a 2xx is delivered, anything else is tried again with
backoff until the delivery has been owed for 24 hours, then dropped and logged. A lane stops
early, giving the rest back unsent and uncounted, when the claim's lease could run out
during the next POST, when the sender stops, when it has held its thread ``lane_seconds``
(a slow endpoint's backlog waits its turn behind older events of other endpoints), and when
the endpoint gave no HTTP answer (the rest wait the same backoff: a dead endpoint is not
called once per event). A sender that
dies mid-lane leaves its claim to run out after ``lease`` seconds; the deliveries are then
claimed again: at least once, never lost. The event's id is in the body and in
``Webhook-Id``, so a receiver drops a duplicate.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import WebhookEndpoint
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.delivery.backoff import retry_delay
from smtp_proxy.errors import DatabaseUnavailable
from smtp_proxy.storage import webhooks as store
from smtp_proxy.webhooks import signature
from smtp_proxy.webhooks.post import TIMEOUT, Answer, Endpoint

log = logging.getLogger("smtp_proxy.webhooks")

THREADS = 8
PER_ENDPOINT = 2
LANE_SECONDS = 5.0  # how long a lane keeps its thread before it gives the rest back (a slow endpoint)
BATCH = 25  # deliveries per lane: one endpoint's, sent over one connection
LEASE_SECONDS = 60.0  # longer than one POST's timeout, with room
WEBHOOK_MIN_LEASE = 15.0  # the shortest claim that outlasts one POST (10 s) and its settle
POLL_SECONDS = 1.0
COALESCE_SECONDS = 0.05  # after a wake-up, how long new events may gather before a claim
SETTLE_EVERY = 1.0  # seconds of answers a lane holds before writing them
SETTLE_ROOM = 2.0  # what a lane keeps of its lease, beyond one POST's timeout, to write its answers
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
        batch: int = BATCH,
        lane_seconds: float = LANE_SECONDS,
        lease: float = LEASE_SECONDS,
        poll: float = POLL_SECONDS,
        timeout: float = TIMEOUT,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
    ) -> None:
        """``allow_private`` reads ``delivery.allow_private_networks`` from the live config."""
        if lease < timeout + SETTLE_ROOM:
            raise ValueError(f"a lease of {lease} s leaves no time to POST (timeout {timeout} s)")
        self._database = database
        self._cipher = cipher
        self._allow_private = allow_private
        self._threads = threads
        self._per_endpoint = per_endpoint
        self._batch = batch
        self._lane_seconds = lane_seconds
        self._lease = lease
        self._poll = poll
        self._timeout = timeout
        self._retry = (retry_base, retry_cap)
        self._rng = random.Random()
        self._lanes: Counter[uuid.UUID] = Counter()  # lanes running, per endpoint
        self._changed = threading.Condition()
        self._woken = False  # something may be due: claim without waiting for the poll
        self._skipped = False  # the last claim skipped endpoints at their bound
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhook-claims", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New events were committed by this process: claim soon instead of at the next poll."""
        with self._changed:
            self._woken = True
            self._changed.notify_all()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop claiming; lanes finish the POST in flight (bounded by its timeout), give back the rest."""
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
            for lane in claimed:
                self._pool.submit(self._send, lane, time.monotonic() + self._lease)
            with self._changed:
                if not any(len(lane) >= self._batch for lane in claimed):
                    # Nothing more is known to be due: wait for new events (then let those of a
                    # busy moment gather, so claims stay batches), a lane that may leave more
                    # behind, or the poll, which finds what other processes wrote.
                    self._wait(lambda: self._woken, self._poll)
                    if self._woken:
                        self._wait(lambda: False, COALESCE_SECONDS)
                self._woken = False
                self._wait(lambda: self._lanes.total() < self._threads, float("inf"))

    def _wait(self, done: Callable[[], bool], seconds: float) -> None:
        """Wait on ``_changed`` (held) until ``done()``, the sender stops, or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while not done() and not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._changed.wait(min(left, self._poll))

    def _claim(self) -> list[list[store.Owed]]:
        with self._changed:
            free = self._threads - self._lanes.total()
            busy = [endpoint for endpoint, count in self._lanes.items() if count >= self._per_endpoint]
            self._skipped = bool(busy)
        if free <= 0:
            return []
        with self._database.transaction() as session:
            lanes = store.claim_due(
                session, now=utcnow(), lanes=free, batch=self._batch, lease=self._lease, skip_endpoints=busy
            )
        with self._changed:
            for lane in lanes:
                self._lanes[lane[0].endpoint_id] += 1
        return lanes

    def _send(self, lane: list[store.Owed], lease_ends: float) -> None:
        """POST a lane's deliveries in order over one connection, writing the answers as it goes."""
        endpoint_id = lane[0].endpoint_id
        answered: list[store.Answered] = []
        started = written = time.monotonic()
        connection: Endpoint | None = None
        try:
            secrets = self._secrets(endpoint_id)
            connection = Endpoint(lane[0].url, allow_private=self._allow_private(), timeout=self._timeout)
            for n, owed in enumerate(lane):
                now = time.monotonic()
                if (
                    self._stopping.is_set()
                    or now + self._timeout + SETTLE_ROOM > lease_ends
                    or (n and now - started >= self._lane_seconds)  # a slow endpoint: others' turn
                ):
                    self._write(answered, give_back=lane[n:])
                    return
                answer = self._post(connection, owed, secrets)
                retry_in = retry_delay(owed.attempts + 1, *self._retry, self._rng)
                answered.append(store.Answered(owed, answer.status, answer.error, retry_in))
                if answer.status is None and n + 1 < len(lane):  # no HTTP answer: the rest wait too
                    self._write(answered, give_back=lane[n + 1 :], delay=retry_in)
                    return
                if time.monotonic() - written >= SETTLE_EVERY:
                    self._write(answered)
                    answered, written = [], time.monotonic()
            self._write(answered)
        except Exception:  # noqa: BLE001 - the claim runs out and the lane is tried again
            log.exception("webhook delivery failed", extra={"event": "webhook.send_failed"})
        finally:
            if connection is not None:
                connection.close()
            self._database.remove_session()
            with self._changed:
                self._lanes[endpoint_id] -= 1
                if self._lanes[endpoint_id] <= 0:
                    del self._lanes[endpoint_id]
                # A full lane, or an endpoint skipped as busy at the last claim: more may be due.
                self._woken = self._woken or len(lane) >= self._batch or self._skipped
                self._changed.notify_all()

    def _secrets(self, endpoint_id: uuid.UUID) -> list[str] | None:
        """What signs the endpoint's requests now; None when it was deleted since the claim."""
        with self._database.read() as session:
            endpoint = session.get(WebhookEndpoint, endpoint_id)
            return None if endpoint is None else store.signing_secrets(self._cipher, endpoint, now=utcnow())

    def _post(self, connection: Endpoint, owed: store.Owed, secrets: list[str] | None) -> Answer:
        if secrets is None:
            return Answer(None, "the endpoint was deleted")
        body = json.dumps(owed.payload, separators=(",", ":"), sort_keys=True).encode()
        headers = {
            signature.HEADER: signature.sign(secrets, int(time.time()), body),
            "Webhook-Id": str(owed.event_id),
        }
        return connection.post(body, headers)

    def _write(
        self, answered: list[store.Answered], *, give_back: Sequence[store.Owed] = (), delay: float = 0.0
    ) -> None:
        """Settle ``answered`` and give ``give_back`` back (due after ``delay``), in one transaction."""
        if not answered and not give_back:
            return
        now = utcnow()
        with self._database.transaction() as session:
            statuses = store.settle(session, answered, now=now)
            store.give_back(session, give_back, now=now, delay=delay)
        for owed, status_code, error, _retry_in in answered:
            status = statuses[owed.id]
            level = logging.WARNING if status == "dropped" else logging.INFO
            log.log(
                level,
                "webhook sent" if status == "delivered" else f"webhook {status}",
                extra={
                    "event": f"webhook.{status}",
                    "event_id": str(owed.event_id),
                    "endpoint_id": str(owed.endpoint_id),
                    "status_code": status_code,
                    "error": error,
                    "attempts": owed.attempts + 1,
                },
            )
