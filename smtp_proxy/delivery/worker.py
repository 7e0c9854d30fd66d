"""The queue worker: claim due messages, route each, hand it to providers, write the verdict.

One claim thread takes batches from the queue (``storage.delivery_queue.claim``) while
``delivery.workers`` threads deliver them, one message at a time each. A
message's outcome is committed on its own, right after the provider answered,
so that a crash re-sends as little as possible. A claim that outlives its
worker runs out after ``delivery.lease`` and the message is claimed again:
delivery is at least once, never lost.

SIGTERM (``stop``) stops claiming, lets deliveries in flight finish for up to
``DRAIN_SECONDS``, and gives the claimed messages that had not started back to
the queue. A second signal (``hurry``) ends that wait at once: the deliveries
still in flight are abandoned with the process, and claimed again after their lease.

Fair delivery: one tenant must not be able to stop delivery for the others.

- An attempt tries each provider once (two rules naming one provider: once), at
  most ``delivery.max_failover`` of them, within ``effective_attempt_budget``
  seconds: no provider is started with less than ``connect_timeout`` of the
  budget left (it could not even connect), and the one running is cut at the
  budget's end. What is left waits for the next attempt (backoff), and the
  delivery log says why. The lease is extended only as far as the budget's end.
- This process holds at most ``effective_max_in_flight_per_account`` messages
  of one account, running or claimed and waiting here; the claim hands out due
  messages fairly across accounts (``storage.delivery_queue``). A slow tenant fills its
  own share of the threads, not everyone's.
- A deactivated account's messages are not claimed. Housekeeping writes one
  "held" line on each and fails those older than ``delivery.max_age``; a message
  claimed just before the deactivation is given back when its turn comes.

Suppression list (``storage.suppressions``): recipients on the account's list are
left out of the attempt (one delivery-log line names them); a message with no
recipient left fails without contacting any provider. Hard bounces in the
providers' outcomes (``Outcome.bounced``) join the list in the transaction that
writes the outcome. A notice's refused recipient does not: that is the tenant's own sender
address, which the tenant never chose to send to. The tenant's webhook events
(``webhooks.events``) are written in that transaction too, among them
``message.suppressed`` for the recipients left out.

Lines over 998 octets are folded or re-encoded (``long_lines``) before a message is signed
and sent, so a provider that enforces the limit does not refuse, for good, mail we took.

What an outcome means for the message (status, retry, follow-up) is ``verdict``'s
decision; the accounts' routes come from ``routes``, the upkeep thread is
``housekeeping``.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from smtp_proxy import long_lines
from smtp_proxy.config import Config, DeliveryConfig
from smtp_proxy.contract import DeliveryStatus, MessageStatus, ProviderType
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.delivery import metrics, notices, routing, signing, transports, verdict
from smtp_proxy.delivery.housekeeping import Housekeeping
from smtp_proxy.delivery.outcome import Outcome, Outgoing, deferred, short_text
from smtp_proxy.delivery.routes import Route, RouteCache
from smtp_proxy.errors import DatabaseUnavailable, DecryptionError
from smtp_proxy.logs import correlation
from smtp_proxy.storage import delivery_queue, suppressions
from smtp_proxy.storage.messages import body_aad, enqueue_message
from smtp_proxy.webhooks import events
from smtp_proxy.webhooks.sender import WEBHOOK_MIN_LEASE, WebhookSender

log = logging.getLogger("smtp_proxy.delivery")

DRAIN_SECONDS = 30.0
# The delivery log's last line for a message whose every recipient is suppressed.
SUPPRESSED_TEXT = "suppressed: every recipient is on the suppression list"
# The lease covers the running provider and this long to write the outcome after it.
LEASE_MARGIN = timedelta(seconds=5)


class _Tried(NamedTuple):
    """What dispatching one claimed message came to, before the verdict."""

    final: Outcome
    provider_id: uuid.UUID | None  # the provider that gave ``final``, if one did
    attempts: list[delivery_queue.Attempt]  # the delivery log's lines so far
    until: datetime  # the lease's end, as extended
    suppressed: tuple[str, ...] = ()  # recipients left out: on the account's suppression list
    bounced: tuple[suppressions.Bounce, ...] = ()  # refused for good: they join the list
    provider_name: str | None = None  # the name of the provider that gave ``final``
    remote_mta: str | None = None  # the host that gave ``final``, when it was an smtp provider


class Worker:
    """Delivery threads fed by one claim thread; ``start`` then ``stop``."""

    def __init__(
        self,
        config: Callable[[], Config],
        database: Database,
        cipher: Cipher,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self.database = database
        self.cipher = cipher
        self.rng = rng or random.Random()
        self.routes = RouteCache(database, cipher)
        self.signer = signing.Signer(database, cipher)
        self.delivery_thread_count = config().delivery.workers
        self._work: queue.SimpleQueue[tuple[uuid.UUID, datetime, delivery_queue.Claimed] | None] = (
            queue.SimpleQueue()
        )
        self._cond = threading.Condition()
        self._unstarted: dict[uuid.UUID, uuid.UUID] = {}  # message id -> lease id
        self._running = 0
        # Per account: messages claimed by this process and not finished (running or waiting here).
        self._in_flight: Counter[uuid.UUID] = Counter()
        # Accounts the last claim gave all it could (they may have more due), and whether one of
        # them finished a message since: then a claim is worth making before the poll interval.
        self._capped: set[uuid.UUID] = set()
        self._slot_freed = False
        self._expired_checked = 0.0  # time.monotonic() of the last claim that looked for run-out leases
        self._stopping = threading.Event()
        self.housekeeping = Housekeeping(database, lambda: self.settings, self._stopping)
        # Tenants' delivery events, from the outbox the outcomes write (``webhooks.sender``).
        self.webhooks = WebhookSender(
            database,
            cipher,
            allow_private=lambda: self.settings.allow_private_networks,
            # A sender that dies mid-POST holds its claims this long: delivery.lease, but never
            # less than one POST's timeout with room to write its answer.
            lease=max(WEBHOOK_MIN_LEASE, config().delivery.lease),
        )
        self._drain_deadline = float("inf")
        self._threads: list[threading.Thread] = []

    @property
    def settings(self) -> DeliveryConfig:
        return self._config().delivery

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._deliver_loop, name=f"delivery-{n}", daemon=True)
            for n in range(self.delivery_thread_count)
        ]
        self._threads.append(threading.Thread(target=self._claim_loop, name="delivery-claim", daemon=True))
        self._threads.append(
            threading.Thread(target=self.housekeeping.run, name="delivery-upkeep", daemon=True)
        )
        for thread in self._threads:
            thread.start()
        self.webhooks.start()
        log.info("worker started", extra={"event": "worker.started", "threads": self.delivery_thread_count})

    def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Stop claiming, wait up to ``drain`` seconds for deliveries in flight, release the rest.

        ``hurry`` (from another thread) ends the wait at once.
        """
        with self._cond:
            self._drain_deadline = min(self._drain_deadline, time.monotonic() + drain)
            self._stopping.set()
            self._cond.notify_all()
            running = self._running
        log.info(
            f"worker draining: waiting up to {drain:g} s for {running} deliveries in flight; claimed "
            "messages not started go back to the queue (a second SIGINT or SIGTERM stops at once)",
            extra={"event": "worker.draining", "seconds": drain, "in_flight": running},
        )
        for thread in self._threads[self.delivery_thread_count :]:
            while thread.is_alive() and time.monotonic() < self._drain_deadline:
                thread.join(timeout=min(0.1, max(0.0, self._drain_deadline - time.monotonic())))
        with self._cond:
            while self._running and time.monotonic() < self._drain_deadline:
                self._cond.wait(self._drain_deadline - time.monotonic())
            running, unstarted = self._running, dict(self._unstarted)
            self._unstarted.clear()
        for _ in range(self.delivery_thread_count):
            self._work.put(None)
        released = self._release(unstarted)
        self.webhooks.stop(max(1.0, self._drain_deadline - time.monotonic()))
        log.info(
            "worker stopped",
            extra={"event": "worker.stopped", "released": released, "abandoned_in_flight": running},
        )

    def hurry(self) -> None:
        """End ``stop``'s wait now: claims not started go back at once, deliveries in flight are left."""
        with self._cond:
            self._drain_deadline = time.monotonic()
            self._stopping.set()
            self._cond.notify_all()
            running, unstarted = self._running, len(self._unstarted)
        log.warning(
            f"worker stopping now: {unstarted} claimed messages not started go back to the queue; "
            f"{running} deliveries in flight are claimed again once their lease runs out "
            f"(delivery.lease, {self.settings.lease:g} s), and may then be sent twice",
            extra={"event": "worker.stopping_now", "in_flight": running, "unstarted": unstarted},
        )

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # --- claiming ----------------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        while not self.stopping:
            settings = self.settings
            with self._cond:
                # Keep about one claim's worth waiting locally; more would only age under its lease.
                while (
                    len(self._unstarted) >= max(settings.batch_size, self.delivery_thread_count)
                    and not self.stopping
                ):
                    self._cond.wait(settings.poll_interval)
            if self.stopping:
                return
            claimed = self.claim_once(settings)
            if claimed is None:
                self._stopping.wait(settings.poll_interval)
            elif len(claimed) < settings.batch_size:
                # Nothing more is due, or the accounts with due messages are at their cap: claim
                # again after the poll interval, or as soon as such an account has a free slot.
                with self._cond:
                    self._cond.wait_for(lambda: self._slot_freed or self.stopping, settings.poll_interval)

    def claim_once(self, settings: DeliveryConfig) -> list[delivery_queue.Claimed] | None:
        """Claim one batch and queue it for the delivery threads; None when the database is away."""
        with self._cond:
            in_flight = dict(self._in_flight)
            self._slot_freed = False
        # Leases run out after minutes: looking for them once a poll interval is soon enough, and
        # spares a statement to the claims made each time a capped account finishes a message.
        expired = time.monotonic() - self._expired_checked >= settings.poll_interval
        try:
            with self.database.transaction() as session:
                claim = delivery_queue.claim(
                    session,
                    limit=settings.batch_size,
                    lease=settings.lease,
                    now=utcnow(),
                    per_account=settings.effective_max_in_flight_per_account,
                    in_flight=in_flight,
                    expired=expired,
                    bounces_default=settings.bounces,
                )
        except DatabaseUnavailable:
            return None
        except Exception:
            log.exception("claim failed", extra={"event": "worker.claim_error"})
            return None
        if expired:
            self._expired_checked = time.monotonic()
        cap = settings.effective_max_in_flight_per_account
        taken = Counter(message.account_id for message in claim.messages)
        with self._cond:
            for message in claim.messages:
                self._unstarted[message.id] = claim.lease_id
                self._in_flight[message.account_id] += 1
                self._work.put((claim.lease_id, claim.until, message))
            accounts = in_flight.keys() | taken.keys()
            self._capped = {a for a in accounts if in_flight.get(a, 0) + taken[a] >= cap}
        return claim.messages

    def _finished(self, account_id: uuid.UUID) -> None:
        """One of the account's messages is no longer in flight here; the caller holds ``_cond``."""
        count = self._in_flight[account_id]
        if count <= 1:
            del self._in_flight[account_id]
        else:
            self._in_flight[account_id] = count - 1
        if account_id in self._capped:
            self._slot_freed = True
        self._cond.notify_all()

    def in_flight(self) -> dict[uuid.UUID, int]:
        """Per account, the messages this process has claimed and not finished (for tests and metrics)."""
        with self._cond:
            return dict(self._in_flight)

    def _release(self, unstarted: dict[uuid.UUID, uuid.UUID]) -> int:
        by_lease: dict[uuid.UUID, list[uuid.UUID]] = {}
        for message_id, lease_id in unstarted.items():
            by_lease.setdefault(lease_id, []).append(message_id)
        released = 0
        for lease_id, ids in by_lease.items():
            try:
                with self.database.transaction() as session:
                    released += delivery_queue.release(session, lease_id, ids, utcnow())
            except DatabaseUnavailable:
                log.warning(
                    "claimed messages not released; their lease will run out",
                    extra={"event": "worker.release_failed", "messages": len(ids)},
                )
        return released

    # --- delivering --------------------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            lease_id, until, message = item
            with self._cond:
                if self.stopping or self._unstarted.pop(message.id, None) is None:
                    self._finished(message.account_id)
                    continue  # released, or to be released by stop()
                self._running += 1
            try:
                with correlation(message.correlation_id):
                    self.deliver(lease_id, until, message)
            except Exception:
                log.exception(
                    "delivery error; the message is tried again after its lease",
                    extra={"event": "delivery.error", "message_id": str(message.id)},
                )
            finally:
                with self._cond:
                    self._running -= 1
                    self._finished(message.account_id)

    def deliver(self, lease_id: uuid.UUID, until: datetime, message: delivery_queue.Claimed) -> None:
        """Route one claimed message, try its providers in order, and write the verdict on the outcome."""
        settings = self.settings
        budget = settings.effective_attempt_budget
        deadline = time.monotonic() + budget
        ends = utcnow() + timedelta(seconds=budget)
        try:
            routes = self.routes.get(message.account_id)
            active = self.routes.active(message.account_id)
            dkim_keys = self.signer.keys(message.account_id)
        except DatabaseUnavailable:
            return  # claimed again after the lease
        if not active:
            self._hold(lease_id, message)
            return
        try:
            with self.database.read() as session:
                left_out = suppressions.suppressed(session, message.account_id, message.recipients)
        except DatabaseUnavailable:
            return  # claimed again after the lease
        recipients = tuple(r for r in message.recipients if r not in left_out)
        suppressed = tuple(r for r in message.recipients if r in left_out)
        attempts: list[delivery_queue.Attempt] = []
        bounced: list[suppressions.Bounce] = []
        final: Outcome | None = None
        provider_id: uuid.UUID | None = None
        provider_name: str | None = None
        remote_mta: str | None = None
        body: bytes | Outcome
        if suppressed:
            text = (
                f"{len(suppressed)} recipient(s) left out, on the suppression list: {', '.join(suppressed)}"
            )
            attempts.append(
                delivery_queue.Attempt(None, DeliveryStatus.FAILED, None, short_text(text), utcnow())
            )
        if not recipients:
            # Nothing to send: no provider is contacted, and the body is not even read.
            body = final = Outcome(DeliveryStatus.FAILED, None, SUPPRESSED_TEXT)
            attempts.append(delivery_queue.Attempt(None, final.status, None, final.text, utcnow()))
        else:
            body = self._body(message)
            if isinstance(body, Outcome):
                final = body
                attempts.append(delivery_queue.Attempt(None, body.status, body.code, body.text, utcnow()))
        if isinstance(body, bytes):
            outgoing = Outgoing(message.id, message.sender, recipients, _fitted(message.id, body))
            signed = self.signer.once(dkim_keys, outgoing)
            envelope = routing.Envelope(message.sender, list(recipients), message.headers or [])
            plan = routing.plan([route.rule for route in routes], envelope, self.rng)
            if not plan:
                # Before failing a message for want of a rule, make sure the rules are not stale.
                try:
                    routes = self.routes.get(message.account_id, fresh=True)
                except DatabaseUnavailable:
                    return
                plan = routing.plan([route.rule for route in routes], envelope, self.rng)
            by_rule = {route.rule.id: route for route in routes}
            if not plan:
                final = Outcome(DeliveryStatus.FAILED, None, "no routing rule matches this message")
                attempts.append(delivery_queue.Attempt(None, final.status, None, final.text, utcnow()))
            providers = routing.once_per_provider(plan)
            for tried, rule in enumerate(providers):
                stop = self._stop_failover(tried, deadline, budget, settings)
                if stop is not None:
                    attempts.append(
                        delivery_queue.Attempt(None, DeliveryStatus.DEFERRED, None, stop, utcnow())
                    )
                    log.info(
                        "failover stopped",
                        extra={
                            "event": "delivery.failover_stopped",
                            "message_id": str(message.id),
                            "reason": stop,
                            "providers_left": len(providers) - tried,
                        },
                    )
                    break
                route = by_rule[rule.id]
                until = self._keep_lease(message.id, lease_id, until, settings, ends)
                if until is None:
                    metrics.LEASES_LOST.inc()
                    log.warning(
                        "lease lost before sending; another worker has the message",
                        extra={"event": "delivery.lease_lost", "message_id": str(message.id)},
                    )
                    return
                raw = route.target is not None and route.target.provider_type in signing.RAW_PROVIDERS
                final = self._attempt(route, signed() if raw else outgoing, settings, deadline)
                provider_id = route.target.id if route.target is not None else None
                provider_name = route.target.name if route.target is not None else None
                remote_mta = _remote_mta(route)
                attempts.append(
                    delivery_queue.Attempt(rule.provider_id, final.status, final.code, final.text, utcnow())
                )
                bounced.extend(
                    suppressions.Bounce(r.recipient, rule.provider_id, r.code, r.text) for r in final.bounced
                )
                if not final.temporary:
                    break
        assert final is not None
        tried = _Tried(
            final, provider_id, attempts, until, suppressed, tuple(bounced), provider_name, remote_mta
        )
        self._conclude(message, lease_id, tried, body)

    @staticmethod
    def _stop_failover(tried: int, deadline: float, budget: float, settings: DeliveryConfig) -> str | None:
        """Why no further provider is started in this attempt, or None to go on.

        The first provider always starts. A later one needs ``connect_timeout`` of the budget
        left: with less it could not even connect, and would only be cut short by the budget.
        """
        if tried == 0:
            return None
        if tried >= settings.max_failover:
            metrics.FAILOVER_STOPPED.labels("max_failover").inc()
            return f"failover stopped after {tried} providers (delivery.max_failover); the rest wait"
        if deadline - time.monotonic() < settings.connect_timeout:
            metrics.FAILOVER_STOPPED.labels("attempt_budget").inc()
            return f"failover stopped: attempt budget of {budget:g}s spent (delivery.attempt_budget)"
        return None

    def _hold(self, lease_id: uuid.UUID, message: delivery_queue.Claimed) -> None:
        """Give back a message claimed before its account was deactivated, uncounted, with the held line."""
        try:
            with self.database.transaction() as session:
                held = delivery_queue.hold(session, message.id, lease_id, utcnow())
        except DatabaseUnavailable:
            return  # its lease runs out; the claim passes it over while the account is inactive
        if held:
            metrics.HELD.inc()
            log.info(
                "message held: the account is deactivated",
                extra={"event": "delivery.held", "message_id": str(message.id)},
            )

    def _body(self, message: delivery_queue.Claimed) -> bytes | Outcome:
        if message.body_encrypted is None:
            return Outcome(DeliveryStatus.FAILED, None, "the message body is gone (purged)")
        try:
            return self.cipher.decrypt(message.body_encrypted, body_aad(message.id))
        except DecryptionError:
            log.error(
                "message body cannot be decrypted",
                extra={"event": "delivery.body_unreadable", "message_id": str(message.id)},
            )
            return deferred(None, "the stored message cannot be decrypted (check the encryption keys)")

    def _attempt(
        self, route: Route, outgoing: Outgoing, settings: DeliveryConfig, deadline: float
    ) -> Outcome:
        if route.target is None:
            outcome = deferred(None, "the provider's stored secrets cannot be decrypted")
        else:
            started = time.monotonic()
            outcome = transports.send(route.target, outgoing, settings, deadline)
            metrics.ATTEMPT_SECONDS.labels(route.provider_type).observe(time.monotonic() - started)
        metrics.ATTEMPTS.labels(route.provider_type, str(outcome.status)).inc()
        return outcome

    def _keep_lease(
        self,
        message_id: uuid.UUID,
        lease_id: uuid.UUID,
        until: datetime,
        settings: DeliveryConfig,
        ends: datetime,
    ) -> datetime | None:
        """The lease's end, extended first when the next provider could outlast it; None if lost.

        The next provider takes ``connect_timeout + send_timeout`` at most, and never runs past
        ``ends``, the attempt budget's end: the lease is extended by ``delivery.lease`` at most,
        and never beyond the budget's end plus the time to write the outcome.
        """
        now = utcnow()
        needed = min(ends, now + timedelta(seconds=settings.connect_timeout + settings.send_timeout))
        if until >= needed + LEASE_MARGIN:
            return until
        longer = max(needed, min(now + timedelta(seconds=settings.lease), ends)) + LEASE_MARGIN
        try:
            with self.database.autocommit() as connection:
                held = delivery_queue.extend(connection, message_id, lease_id, longer)
        except DatabaseUnavailable:
            return until if until > now else None
        return longer if held else None

    def _conclude(
        self, message: delivery_queue.Claimed, lease_id: uuid.UUID, tried: _Tried, body: bytes | Outcome
    ) -> None:
        """Write the verdict on the attempt (and any follow-up message) under the claim, then report it."""
        now = utcnow()
        facts = verdict.MessageFacts(message.attempts, message.created_at, isinstance(body, bytes))
        decided = verdict.decide(tried.final, facts, now, self.settings, self.rng)
        attempts = tried.attempts + [_logged(note, now) for note in decided.notes]
        follow_up = decided.follow_up
        wrote_events = False  # some endpoint wants an event of this outcome: wake the sender
        queued_notices: list[notices.Queued] = []

        def write(session: Any) -> bool:
            nonlocal wrote_events, queued_notices
            held = delivery_queue.finish(
                session,
                message.id,
                lease_id,
                status=decided.status,
                attempts=attempts,
                now=now,
                provider_id=tried.provider_id,
                next_attempt_at=decided.retry_at,
            )
            if held and follow_up is not None:
                assert isinstance(body, bytes)
                extra = enqueue_message(
                    session,
                    self.cipher,
                    account_id=message.account_id,
                    sender=message.sender,
                    recipients=list(follow_up.recipients),
                    data=body,
                    correlation_id=message.correlation_id,
                    attempts=message.attempts,
                    created_at=message.created_at,
                    next_attempt_at=follow_up.next_attempt_at,
                    dsn_ret=message.dsn_ret,
                    dsn_envid=message.dsn_envid,
                    dsn_recipients=delivery_queue.dsn_of(message, follow_up.recipients),
                    is_bounce=message.is_bounce,
                    delay_notified=message.delay_notified,  # the sender heard of the delay once
                )
                delivery_queue.log_attempts(
                    session, message.id, [_logged(follow_up.queued_as(extra.id), now)]
                )
            if held and tried.bounced and not message.is_bounce:
                suppressions.add_bounces(session, message.account_id, message.id, tried.bounced, now)
            if held:  # the tenant's webhook events, committed with the outcome they report
                wrote_events = events.record_outcome(
                    session,
                    message,
                    status=decided.status,
                    outcome=tried.final,
                    provider=tried.provider_name,
                    now=now,
                    deferred_recipients=follow_up.recipients if follow_up is not None else (),
                    suppressed=tried.suppressed,
                    bounced=tuple(b.recipient for b in tried.bounced),
                )
            if held:  # the sender's delivery status notifications, committed with the outcome
                queued_notices = notices.queue_notices(
                    session,
                    self.cipher,
                    message,
                    status=decided.status,
                    final=tried.final,
                    suppressed=tried.suppressed,
                    following_up=follow_up.recipients if follow_up is not None else (),
                    data=body if isinstance(body, bytes) else None,
                    remote_mta=tried.remote_mta,
                    reporting_mta=self._config().smtp.hostname,
                    settings=self.settings,
                    now=now,
                )
            return held

        held = self._persist(write, tried.until)
        if held is None:
            return
        if not held:
            metrics.LEASES_LOST.inc()
            log.warning(
                "lease ran out before the outcome was written",
                extra={"event": "delivery.lease_lost", "message_id": str(message.id)},
            )
            return
        if wrote_events:
            self.webhooks.wake()
        self._log_notices(message, queued_notices)
        if tried.suppressed:
            self._log_suppressed(message, tried.suppressed, decided.status)
        status, retry_at = decided.status, decided.retry_at
        if status is MessageStatus.QUEUED:
            metrics.RETRIES.inc()
        else:
            metrics.FINISHED.labels(str(status)).inc()
            if status is MessageStatus.DELIVERED:
                metrics.LATENCY.observe(max(0.0, (now - message.created_at).total_seconds()))
        log.info(
            "message " + ("deferred" if status is MessageStatus.QUEUED else str(status)),
            extra={
                "event": f"delivery.{'deferred' if status is MessageStatus.QUEUED else status}",
                "message_id": str(message.id),
                "attempt": message.attempts,
                "provider_id": str(tried.provider_id) if tried.provider_id else None,
                "response_code": tried.final.code,
                "retry_at": retry_at.isoformat() if retry_at else None,
            },
        )

    def _log_notices(self, message: delivery_queue.Claimed, queued: list[notices.Queued]) -> None:
        for notice in queued:
            metrics.NOTICES.labels(str(notice.action)).inc()
            log.info(
                f"delivery status notification queued ({notice.action})",
                extra={
                    "event": "delivery.notice_queued",
                    "message_id": str(message.id),
                    "notice_id": str(notice.id),
                    "action": str(notice.action),
                    "to": message.sender,
                    "recipients": list(notice.recipients),
                },
            )

    def _log_suppressed(
        self, message: delivery_queue.Claimed, recipients: tuple[str, ...], status: MessageStatus
    ) -> None:
        """The log line of recipients left out; their ``message.suppressed`` webhook event was
        written with the outcome (``webhooks.events``)."""
        log.info(
            "recipients left out: on the suppression list",
            extra={
                "event": "message.suppressed",
                "message_id": str(message.id),
                "account_id": str(message.account_id),
                "recipients": list(recipients),
                "status": str(status),
            },
        )

    def _persist(self, write: Callable[[Any], bool], until: datetime) -> bool | None:
        """Commit an outcome, retrying while the database is away and the lease still holds.

        None when it could not be written: the message is claimed again once
        its lease runs out, and sent again (at least once, never lost).
        """
        delay = 0.2
        while True:
            try:
                with self.database.transaction() as session:
                    return write(session)
            except DatabaseUnavailable:
                out_of_time = utcnow() + timedelta(seconds=delay) >= until or (
                    self.stopping and time.monotonic() + delay >= self._drain_deadline
                )
                if out_of_time:
                    log.error(
                        "outcome not written: the database is unavailable",
                        extra={"event": "delivery.outcome_lost"},
                    )
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def _remote_mta(route: Route) -> str | None:
    """The host an smtp provider's reply came from (a DSN's Remote-MTA); None for HTTP APIs."""
    target = route.target
    if target is None or target.provider_type is not ProviderType.SMTP or not target.smtp_config:
        return None
    return str(target.smtp_config.get("host") or "") or None


def _fitted(message_id: uuid.UUID, body: bytes) -> bytes:
    """``body`` with its lines over 998 octets folded or re-encoded (``long_lines``), before it is
    signed: a provider that enforces RFC 5321 4.5.3.1.6 would refuse it for good otherwise. The
    listener refuses what cannot be fixed; a message queued before it did goes out as stored."""
    try:
        fitted = long_lines.fit(body)
    except long_lines.Unfixable as error:
        metrics.LONG_LINES.labels("unfixable").inc()
        log.warning(
            "a line over 998 octets cannot be shortened; sending the message as stored",
            extra={
                "event": "delivery.long_line_unfixable",
                "message_id": str(message_id),
                "detail": str(error),
            },
        )
        return body
    if fitted is not body:
        metrics.LONG_LINES.labels("fitted").inc()
    return fitted


def _logged(note: verdict.Note, at: datetime) -> delivery_queue.Attempt:
    """A verdict's note as a delivery-log line."""
    return delivery_queue.Attempt(None, note.status, None, note.text, at)
