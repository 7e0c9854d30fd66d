"""The queue worker: claim due messages, route each, hand it to providers, write the outcome.

One claim thread takes batches from the queue (``storage.delivery_queue.claim``) while
``delivery.workers`` threads deliver them, one message at a time each. A
message's outcome is committed on its own, right after the provider answered,
so that a crash re-sends as little as possible. A claim that outlives its
worker runs out after ``delivery.lease`` and the message is claimed again:
delivery is at least once, never lost.

SIGTERM (``stop``) stops claiming, lets deliveries in flight finish for up to
``DRAIN_SECONDS``, and gives the claimed messages that had not started back to
the queue.

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
"""

from __future__ import annotations

import logging
import queue as thread_queue
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from smtp_proxy.config import Config, DeliveryConfig
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import DeliveryStatus, MessageStatus
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.delivery import backoff, metrics, routing, transports
from smtp_proxy.delivery.outcome import Outcome, Outgoing, Target, deferred
from smtp_proxy.errors import DatabaseUnavailable, DecryptionError
from smtp_proxy.logs import correlation
from smtp_proxy.storage import delivery_queue
from smtp_proxy.storage.messages import body_aad, enqueue_message
from smtp_proxy.storage.providers import provider_secrets

log = logging.getLogger("smtp_proxy.delivery")

DRAIN_SECONDS = 30.0
# How long an account's rules and providers are reused before they are read again.
ROUTES_TTL = 5.0
DEPTH_INTERVAL = 15.0
PURGE_INTERVAL = 600.0
PURGE_BATCH = 1000
HOLD_BATCH = 1000
# The lease covers the running provider and this long to write the outcome after it.
LEASE_MARGIN = timedelta(seconds=5)


@dataclass(frozen=True)
class _Route:
    rule: routing.Rule
    target: Target | None  # None: its secrets cannot be opened
    provider_type: str


class RouteCache:
    """Each account's usable routes and whether it is active, read at most every ``ROUTES_TTL`` seconds."""

    def __init__(self, database: Database, cipher: Cipher, ttl: float = ROUTES_TTL) -> None:
        self.database, self.cipher, self.ttl = database, cipher, ttl
        self._entries: dict[uuid.UUID, tuple[float, bool, list[_Route]]] = {}
        self._lock = threading.Lock()

    def get(self, account_id: uuid.UUID, *, fresh: bool = False) -> list[_Route]:
        """The account's routes; ``fresh`` reads them again whatever the cache holds."""
        return self._entry(account_id, fresh)[2]

    def active(self, account_id: uuid.UUID) -> bool:
        """Whether the account is active (False once it is deactivated or gone)."""
        return self._entry(account_id, False)[1]

    def _entry(self, account_id: uuid.UUID, fresh: bool) -> tuple[float, bool, list[_Route]]:
        now = time.monotonic()
        entry = self._entries.get(account_id)
        if entry is not None and entry[0] > now and not fresh:
            return entry
        with self.database.read() as session:
            active = delivery_queue.account_active(session, account_id)
            rows = delivery_queue.routes(session, account_id)
        entry = (now + self.ttl, active, [self._route(row) for row in rows])
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[account_id] = entry
        return entry

    def _route(self, row: delivery_queue.Route) -> _Route:
        provider = row.provider
        rule = routing.Rule(row.rule_id, row.priority, row.conditions, provider.id)
        try:
            secrets = provider_secrets(self.cipher, provider)
        except DecryptionError:
            log.error(
                "provider secrets cannot be opened",
                extra={"event": "delivery.provider_secrets_unreadable", "provider_id": str(provider.id)},
            )
            return _Route(rule, None, str(provider.provider_type))
        target = Target(
            id=provider.id,
            name=provider.name,
            provider_type=provider.provider_type,
            settings=dict(provider.settings or {}),
            smtp_config=dict(provider.smtp_config) if provider.smtp_config else None,
            api_key=secrets.api_key,
            smtp_password=secrets.smtp_password,
        )
        return _Route(rule, target, str(provider.provider_type))


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
        self.threads = config().delivery.workers
        self._work: thread_queue.SimpleQueue[tuple[uuid.UUID, datetime, delivery_queue.Claimed] | None] = (
            thread_queue.SimpleQueue()
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
        # Deactivated accounts whose waiting messages have their held line, as of their updated_at.
        self._swept: dict[uuid.UUID, datetime] = {}
        self._stopping = threading.Event()
        self._drain_deadline = float("inf")
        self._threads: list[threading.Thread] = []

    @property
    def settings(self) -> DeliveryConfig:
        return self._config().delivery

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._deliver_loop, name=f"delivery-{n}", daemon=True)
            for n in range(self.threads)
        ]
        self._threads.append(threading.Thread(target=self._claim_loop, name="delivery-claim", daemon=True))
        self._threads.append(threading.Thread(target=self._housekeeping, name="delivery-upkeep", daemon=True))
        for thread in self._threads:
            thread.start()
        log.info("worker started", extra={"event": "worker.started", "threads": self.threads})

    def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Stop claiming, wait up to ``drain`` seconds for deliveries in flight, release the rest."""
        deadline = time.monotonic() + drain
        with self._cond:
            self._drain_deadline = deadline
            self._stopping.set()
            self._cond.notify_all()
        for thread in self._threads[self.threads :]:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._cond:
            while self._running and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            running, unstarted = self._running, dict(self._unstarted)
            self._unstarted.clear()
        for _ in range(self.threads):
            self._work.put(None)
        released = self._release(unstarted)
        log.info(
            "worker stopped",
            extra={"event": "worker.stopped", "released": released, "abandoned_in_flight": running},
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
                while len(self._unstarted) >= max(settings.batch_size, self.threads) and not self.stopping:
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
        """Route one claimed message, try its providers in order, and write the outcome."""
        settings = self.settings
        budget = settings.effective_attempt_budget
        deadline = time.monotonic() + budget
        ends = utcnow() + timedelta(seconds=budget)
        try:
            routes = self.routes.get(message.account_id)
            active = self.routes.active(message.account_id)
        except DatabaseUnavailable:
            return  # claimed again after the lease
        if not active:
            self._hold(lease_id, message)
            return
        attempts: list[delivery_queue.Attempt] = []
        final: Outcome | None = None
        final_route: _Route | None = None
        body = self._body(message)
        if isinstance(body, Outcome):
            final = body
            attempts.append(delivery_queue.Attempt(None, body.status, body.code, body.text, utcnow()))
        else:
            outgoing = Outgoing(message.id, message.sender, tuple(message.recipients), body)
            envelope = routing.Envelope(message.sender, message.recipients, message.headers or [])
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
                    attempts.append(delivery_queue.Attempt(None, DeliveryStatus.DEFERRED, None, stop, utcnow()))
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
                final, final_route = self._attempt(route, outgoing, settings, deadline), route
                attempts.append(
                    delivery_queue.Attempt(rule.provider_id, final.status, final.code, final.text, utcnow())
                )
                if not final.temporary:
                    break
        assert final is not None
        self._conclude(message, lease_id, until, final, final_route, attempts, settings, body)

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
        self, route: _Route, outgoing: Outgoing, settings: DeliveryConfig, deadline: float
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
        self,
        message: delivery_queue.Claimed,
        lease_id: uuid.UUID,
        until: datetime,
        final: Outcome,
        route: _Route | None,
        attempts: list[delivery_queue.Attempt],
        settings: DeliveryConfig,
        body: bytes | Outcome,
    ) -> None:
        now = utcnow()
        provider_id = route.target.id if route is not None and route.target is not None else None
        retry_at: datetime | None = None
        if final.delivered:
            status = MessageStatus.DELIVERED
        elif final.temporary:
            retry = backoff.next_try(message.attempts, message.created_at, now, settings, self.rng)
            if retry.at is None:
                status = MessageStatus.FAILED
                attempts.append(delivery_queue.Attempt(None, DeliveryStatus.FAILED, None, retry.reason, now))
            else:
                status, retry_at = MessageStatus.QUEUED, retry.at
        else:
            status = MessageStatus.FAILED
        # Recipients the provider refused for now while it took the others: their own message.
        pending = final.retry_recipients if final.delivered and isinstance(body, bytes) else ()
        follow_up = backoff.next_try(message.attempts, message.created_at, now, settings, self.rng)
        if pending and follow_up.at is None:
            text = f"{len(pending)} recipient(s) refused for now, not retried: {follow_up.reason}"
            attempts.append(delivery_queue.Attempt(None, DeliveryStatus.FAILED, None, text, now))

        def write(session: Any) -> bool:
            held = delivery_queue.finish(
                session,
                message.id,
                lease_id,
                status=status,
                attempts=attempts,
                now=now,
                provider_id=provider_id,
                next_attempt_at=retry_at,
            )
            if held and pending and follow_up.at is not None:
                assert isinstance(body, bytes)
                extra = enqueue_message(
                    session,
                    self.cipher,
                    account_id=message.account_id,
                    sender=message.sender,
                    recipients=list(pending),
                    data=body,
                    correlation_id=message.correlation_id,
                    attempts=message.attempts,
                    created_at=message.created_at,
                    next_attempt_at=follow_up.at,
                )
                text = f"{len(pending)} recipient(s) refused for now: retried as message {extra.id}"
                delivery_queue.log_attempts(
                    session, message.id, [delivery_queue.Attempt(None, DeliveryStatus.DEFERRED, None, text, now)]
                )
            return held

        held = self._persist(write, until)
        if held is None:
            return
        if not held:
            metrics.LEASES_LOST.inc()
            log.warning(
                "lease ran out before the outcome was written",
                extra={"event": "delivery.lease_lost", "message_id": str(message.id)},
            )
            return
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
                "provider_id": str(provider_id) if provider_id else None,
                "response_code": final.code,
                "retry_at": retry_at.isoformat() if retry_at else None,
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

    # --- housekeeping ------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        next_purge = time.monotonic()
        while not self.stopping:
            self.refresh_depth()
            if time.monotonic() >= next_purge:
                self._swept.clear()  # a message requeued after its account's sweep gets its line now
                self.purge()
                next_purge = time.monotonic() + PURGE_INTERVAL
            self.sweep_held()
            self._stopping.wait(DEPTH_INTERVAL)

    def sweep_held(self) -> tuple[int, int]:
        """Deactivated accounts' waiting messages: fail those past max_age, write the held line on the rest.

        Each account is swept once after its deactivation (and again every ``PURGE_INTERVAL``, for
        a message that came back to the queue meanwhile), not at every pass: a held message gets
        one line, not one every few seconds. Returns (held, failed).
        """
        settings = self.settings
        try:
            with self.database.read() as session:
                inactive = delivery_queue.inactive_accounts(session)
        except DatabaseUnavailable:
            return 0, 0
        self._swept = {account: at for account, at in self._swept.items() if inactive.get(account) == at}
        if not inactive:
            return 0, 0
        now = utcnow()
        reason = f"{delivery_queue.HELD_TEXT}; gave up: not delivered within delivery.max_age ({settings.max_age:g}s)"
        cutoff = now - timedelta(seconds=settings.max_age)
        failed = self._sweep(
            lambda session: delivery_queue.fail_held(session, list(inactive), cutoff, now, reason, HOLD_BATCH)
        )
        held = 0
        for account, changed_at in inactive.items():
            if account in self._swept or self.stopping:
                continue
            count = self._sweep(lambda session, a=account: delivery_queue.hold_waiting(session, a, now, HOLD_BATCH))
            if count is None:
                break  # another process sweeps, or the database is away: next pass
            held += count
            self._swept[account] = changed_at
        if held or failed:
            log.info(
                "messages of deactivated accounts held or failed",
                extra={"event": "delivery.held_swept", "held": held, "failed": failed or 0},
            )
        metrics.HELD.inc(held)
        return held, failed or 0

    def _sweep(self, batch: Callable[[Any], int]) -> int | None:
        """Run one sweep in batches of HOLD_BATCH; None when another process has the sweep lock."""
        total = 0
        while not self.stopping:
            try:
                with self.database.transaction() as session:
                    if not delivery_queue.sweep_lock(session):
                        return None
                    count = batch(session)
            except DatabaseUnavailable:
                return None
            total += count
            if count < HOLD_BATCH:
                break
        return total

    def refresh_depth(self) -> None:
        try:
            with self.database.read() as session:
                counts = delivery_queue.depth(session)
        except DatabaseUnavailable:
            return
        for status, count in counts.items():
            metrics.QUEUE_DEPTH.labels(status).set(count)

    def purge(self) -> int:
        """Drop the bodies of messages finished more than ``delivery.retention`` ago, in batches."""
        cutoff = utcnow() - timedelta(seconds=self.settings.retention)
        total = 0
        while not self.stopping:
            try:
                with self.database.transaction() as session:
                    purged = delivery_queue.purge_bodies(session, cutoff, PURGE_BATCH)
            except DatabaseUnavailable:
                break
            total += purged
            metrics.PURGED.inc(purged)
            if purged < PURGE_BATCH:
                break
        if total:
            log.info("bodies purged", extra={"event": "retention.purged", "messages": total})
        return total
