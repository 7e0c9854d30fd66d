"""The delivery worker end to end: real PostgreSQL, real SMTP sinks, real worker threads and processes."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select, update

from smtp_proxy.config import Config
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import (
    Account,
    DeliveryLog,
    DeliveryStatus,
    Message,
    MessageStatus,
    ProviderType,
    WebhookEvent,
)
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.delivery.routes import RouteCache
from smtp_proxy.delivery.worker import Worker
from smtp_proxy.storage import accounts, providers, routing_rules, suppressions, webhooks
from smtp_proxy.storage.audit import CLI
from smtp_proxy.storage.messages import enqueue_message, message_body
from smtp_proxy.webhooks import signature
from tests import fake_esp
from tests.conftest import free_port, wait_until_accepting
from tests.console import SMTP_PROXY
from tests.e2e.conftest import Listener, ServeProcess
from tests.fake_esp import FakeEsp
from tests.smtp_sink import SmtpSink
from tests.waiting import wait_for
from tests.webhook_receiver import Receiver

# Short enough for tests, long enough that a loaded 2-core machine does not time out by accident.
DELIVERY = {
    "workers": 4,
    "batch_size": 20,
    "poll_interval": "50ms",
    "lease": "5s",
    "retry_base": "300ms",
    "retry_max": "10s",
    "connect_timeout": "1s",
    "send_timeout": "1s",
    "allow_private_networks": True,
    "metrics_port": None,
}


class Queue:
    """A tenant on the test database, with helpers to give it providers, rules and messages."""

    def __init__(
        self, config: Config, account_name: str = "tenant", domains: tuple[str, ...] = ("example.com",)
    ) -> None:
        self.config = config
        self.database = Database(config.database)
        self.cipher = Cipher.from_config(config.security)
        with self.database.transaction() as session:
            found = [a for a in accounts.list_accounts(session) if a.name == account_name]
            if found:
                self.account_id = found[0].id
            else:
                self.account_id = accounts.create_account(
                    session,
                    name=account_name,
                    email="ops@example.com",
                    allowed_domains=list(domains),
                    bcrypt_cost=4,
                    actor=CLI,
                ).account.id
        self.database.remove_session()

    def smtp_provider(self, sink: SmtpSink, name: str, **kw: Any) -> uuid.UUID:
        return self.provider(name, ProviderType.SMTP, smtp_config=sink.provider_config(), **kw)

    def provider(self, name: str, provider_type: ProviderType, **kw: Any) -> uuid.UUID:
        with self.database.transaction() as session:
            provider = providers.create_provider(
                session,
                self.cipher,
                account_id=self.account_id,
                name=name,
                provider_type=provider_type,
                **kw,
                actor=CLI,
            )
            return provider.id

    def rule(self, provider_id: uuid.UUID, priority: int, **conditions: Any) -> uuid.UUID:
        with self.database.transaction() as session:
            return routing_rules.create_rule(
                session,
                account_id=self.account_id,
                provider_id=provider_id,
                name=f"rule-{priority}-{uuid.uuid4().hex[:6]}",
                priority=priority,
                conditions=conditions,
                actor=CLI,
            ).id

    def enqueue(
        self, count: int = 1, recipients: tuple[str, ...] = ("rcpt@example.net",), **dsn: Any
    ) -> list[uuid.UUID]:
        """``dsn``: enqueue_message's dsn_* and is_bounce arguments."""
        ids = []
        with self.database.transaction() as session:
            for n in range(count):
                data = f"Subject: message {n}\r\nX-Token: {uuid.uuid4()}\r\n\r\nbody {n}\r\n".encode()
                ids.append(
                    enqueue_message(
                        session,
                        self.cipher,
                        account_id=self.account_id,
                        sender="app@example.com",
                        recipients=list(recipients),
                        data=data,
                        correlation_id=f"test-{n}",
                        **dsn,
                    ).id
                )
        return ids

    def message(self, message_id: uuid.UUID) -> Message:
        with self.database.transaction() as session:
            message = session.get(Message, message_id)
            session.expunge(message)
        self.database.remove_session()
        return message

    def logs(self, message_id: uuid.UUID) -> list[DeliveryLog]:
        with self.database.transaction() as session:
            query = select(DeliveryLog).where(DeliveryLog.message_id == message_id)
            rows = list(session.scalars(query.order_by(DeliveryLog.created_at, DeliveryLog.id)))
            session.expunge_all()
        self.database.remove_session()
        return rows

    def statuses(self) -> Counter[str]:
        with self.database.read() as session:
            rows = session.execute(select(Message.status, func.count()).group_by(Message.status)).all()
        return Counter({str(MessageStatus(status)): count for status, count in rows})

    def finished(self, count: int) -> bool:
        statuses = self.statuses()
        return statuses["delivered"] + statuses["failed"] >= count


@pytest.fixture
def delivery_config(pg_url: str, make_config) -> Callable[..., Config]:
    def make(**delivery: Any) -> Config:
        return make_config(pg_url, delivery={**DELIVERY, **delivery}, logging={"level": "warning"})

    return make


@pytest.fixture
def tenant(delivery_config) -> Iterator[Queue]:
    queue = Queue(delivery_config())
    yield queue
    queue.database.dispose()


@pytest.fixture
def start_worker(delivery_config) -> Iterator[Callable[..., Worker]]:
    """An in-process Worker with the real transports on the test database."""
    started: list[tuple[Worker, Database]] = []

    def start(**delivery: Any) -> Worker:
        config = delivery_config(**delivery)
        database = Database(config.database)
        worker = Worker(lambda: config, database, Cipher.from_config(config.security))
        worker.start()
        started.append((worker, database))
        return worker

    yield start
    for worker, database in started:
        worker.stop(drain=5)
        database.dispose()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running
    assert running.errors == []


# --- one message through -------------------------------------------------------------------------


def test_a_submission_goes_through_the_worker_to_the_sink_byte_for_byte(
    start_listener, client_tls, sink: SmtpSink, delivery_config, start_worker
) -> None:
    listener: Listener = start_listener()
    tenant = Queue(delivery_config(), account_name=listener.tenant)
    tenant.rule(tenant.smtp_provider(sink, "sink"), 0)
    data = (
        b"From: App <app@example.com>\r\nTo: someone@example.net\r\nSubject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b".a line that starts with a dot\r\n..two dots\r\n.\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
        + b"x" * 990
        + b"\r\n\r\n-- \r\nend\r\n"
    )
    with smtplib.SMTP(listener.host, listener.port, timeout=10) as client:
        client.starttls(context=client_tls)
        client.login(listener.tenant, listener.password)
        client.sendmail("app@example.com", ["someone@example.net", "other@example.org"], data)
    start_worker()
    (received,) = sink.wait_for(1, timeout=20)
    (stored,) = listener.stored()
    assert received.data == message_body(listener.cipher, stored)
    trace, content = listener.received_and_content(stored)
    assert content == data and trace.startswith("Received: from ")  # our trace field, then the message
    assert received.data.endswith(b"-- \r\nend\r\n") and b"\r\n..two dots\r\n" in received.data
    assert (received.mail_from, list(received.rcpt_tos)) == (
        "app@example.com",
        ["someone@example.net", "other@example.org"],
    )
    wait_for(
        lambda: tenant.message(stored.id).status is MessageStatus.DELIVERED, what="delivered", timeout=20
    )
    message = tenant.message(stored.id)
    assert message.processed_at is not None and message.provider_id is not None and message.lease_id is None
    (log,) = tenant.logs(stored.id)
    assert (log.status, log.response_code, log.provider_id) == (
        DeliveryStatus.DELIVERED,
        250,
        message.provider_id,
    )
    tenant.database.dispose()


# --- outcomes -------------------------------------------------------------------------------------


def test_failover_to_the_next_rule_when_a_provider_fails_temporarily(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    with SmtpSink() as busy:
        busy.reply_to_rcpt(451, "4.3.2 try again later")
        first = tenant.smtp_provider(busy, "busy")
        second = tenant.smtp_provider(sink, "spare")
        tenant.rule(first, 1)
        tenant.rule(second, 2)
        (message_id,) = tenant.enqueue()
        start_worker()
        sink.wait_for(1, timeout=20)
        wait_for(
            lambda: tenant.message(message_id).status is MessageStatus.DELIVERED, what="delivered", timeout=20
        )
    message = tenant.message(message_id)
    assert message.provider_id == second and message.attempts == 1  # both providers in one attempt
    logs = tenant.logs(message_id)
    assert [(entry.provider_id, entry.status, entry.response_code) for entry in logs] == [
        (first, DeliveryStatus.DEFERRED, 451),
        (second, DeliveryStatus.DELIVERED, 250),
    ]
    assert "try again later" in logs[0].response_text


def test_a_permanent_failure_fails_the_message_without_retry_or_failover(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    with SmtpSink() as spare:
        sink.reply_to_rcpt(550, "5.1.1 no such user")
        tenant.rule(tenant.smtp_provider(sink, "main"), 1)
        tenant.rule(tenant.smtp_provider(spare, "spare"), 2)
        (message_id,) = tenant.enqueue()
        start_worker()
        wait_for(lambda: tenant.message(message_id).status is MessageStatus.FAILED, what="failed", timeout=20)
        # A failover would have come before the verdict was stored, and a failed message is never
        # claimed again.
        assert spare.connections == 0
    message = tenant.message(message_id)
    assert message.attempts == 1 and message.processed_at is not None
    (log,) = tenant.logs(message_id)
    assert (log.status, log.response_code) == (DeliveryStatus.FAILED, 550)
    assert "no such user" in log.response_text


def test_temporary_failures_back_off_exponentially_then_give_up(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    sink.reply_to_data(451, "4.3.0 queue full")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    (message_id,) = tenant.enqueue()
    start_worker(retry_base="400ms", max_attempts=4)
    wait_for(lambda: tenant.message(message_id).status is MessageStatus.FAILED, timeout=30, what="given up")
    logs = tenant.logs(message_id)
    assert [entry.status for entry in logs] == [DeliveryStatus.DEFERRED] * 4 + [DeliveryStatus.FAILED]
    assert logs[-1].response_text == "gave up after 4 attempts" and logs[-1].provider_id is None
    assert tenant.message(message_id).attempts == 4
    gaps = [(b.created_at - a.created_at).total_seconds() for a, b in zip(logs[:3], logs[1:4], strict=True)]
    # 400 ms, 800 ms, 1.6 s nominal; jitter takes off up to 20%; polling and the attempt add a little.
    for gap, nominal in zip(gaps, (0.4, 0.8, 1.6), strict=True):
        assert nominal * 0.8 - 0.01 <= gap <= nominal + 0.5, gaps


def test_a_message_too_old_to_retry_fails_with_max_age(tenant: Queue, sink: SmtpSink, start_worker) -> None:
    sink.reply_to_rcpt(421, "4.7.0 closing")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    (message_id,) = tenant.enqueue()
    with tenant.database.transaction() as session:
        session.execute(update(Message).values(created_at=utcnow() - timedelta(days=5)))
    start_worker()
    wait_for(lambda: tenant.message(message_id).status is MessageStatus.FAILED, what="failed", timeout=20)
    assert "max_age" in tenant.logs(message_id)[-1].response_text


def test_a_message_no_rule_matches_fails_with_that_reason(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    tenant.rule(tenant.smtp_provider(sink, "gmail only"), 0, recipient_domains=["gmail.com"])
    (message_id,) = tenant.enqueue(recipients=("someone@example.net",))
    start_worker()
    wait_for(lambda: tenant.message(message_id).status is MessageStatus.FAILED, what="failed", timeout=20)
    (log,) = tenant.logs(message_id)
    assert (log.provider_id, log.response_text) == (None, "no routing rule matches this message")
    assert sink.connections == 0


def test_rules_route_by_recipient_domain_and_skip_disabled_providers(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    with SmtpSink() as other, SmtpSink() as disabled:
        tenant.rule(tenant.smtp_provider(disabled, "off", enabled=False), 0)
        tenant.rule(tenant.smtp_provider(other, "gmail"), 1, recipient_domains=["gmail.com"])
        tenant.rule(tenant.smtp_provider(sink, "default"), 2)
        tenant.enqueue(2, recipients=("a@gmail.com",))
        tenant.enqueue(3, recipients=("a@example.net",))
        start_worker()
        other.wait_for(2)
        sink.wait_for(3)
        wait_for(lambda: tenant.finished(5), what="all finished", timeout=20)
        assert disabled.connections == 0
        assert all(list(m.rcpt_tos) == ["a@gmail.com"] for m in other.messages)


def test_a_private_provider_host_is_refused_unless_allowed(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    """Deferred with the text of any failure to connect: the tenant cannot tell it is private."""
    tenant.rule(tenant.smtp_provider(sink, "internal"), 0)
    (message_id,) = tenant.enqueue()
    start_worker(allow_private_networks=False, retry_base="1h", retry_max="1h")
    (log,) = wait_for(lambda: tenant.logs(message_id), what="an attempt", timeout=20)
    assert (log.status, log.response_text) == (
        DeliveryStatus.DEFERRED,
        f"could not connect to {sink.host}:{sink.port}",
    )
    assert tenant.message(message_id).status is MessageStatus.QUEUED
    assert sink.connections == 0


def test_a_provider_nobody_listens_for_reads_could_not_connect(tenant: Queue, start_worker) -> None:
    port = free_port()  # nothing listens there
    provider = tenant.provider(
        "gone", ProviderType.SMTP, smtp_config={"host": "127.0.0.1", "port": port, "tls": "none"}
    )
    tenant.rule(provider, 0)
    (message_id,) = tenant.enqueue()
    start_worker(retry_base="1h", retry_max="1h")
    (log,) = wait_for(lambda: tenant.logs(message_id), what="an attempt", timeout=20)
    assert (log.status, log.response_text, log.provider_id) == (
        DeliveryStatus.DEFERRED,
        f"could not connect to 127.0.0.1:{port}",
        provider,
    )


def test_retention_drops_old_bodies_and_keeps_the_rest(tenant: Queue, sink: SmtpSink, start_worker) -> None:
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    old, recent = tenant.enqueue(2)
    worker = start_worker()
    wait_for(lambda: tenant.finished(2), what="delivered", timeout=20)
    with tenant.database.transaction() as session:
        session.execute(
            update(Message).where(Message.id == old).values(processed_at=utcnow() - timedelta(days=31))
        )
    assert worker.housekeeping.purge() == 1
    assert tenant.message(old).body_encrypted is None and tenant.message(old).sender == "app@example.com"
    assert tenant.message(recent).body_encrypted is not None
    assert len(tenant.logs(old)) == 1


def test_the_database_pulled_away_mid_send_loses_nothing_and_sends_once(
    tenant: Queue, sink: SmtpSink, start_worker, postgresql_server, caplog: pytest.LogCaptureFixture
) -> None:
    sink.delay_data(1.5)
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    (message_id,) = tenant.enqueue()
    workers = [start_worker(send_timeout="3s", lease="20s")]
    wait_for(lambda: sink.connections >= 1, what="a send in progress", timeout=20)
    postgresql_server.stop()
    try:
        sink.wait_for(1, timeout=10)  # the provider took it while the database was away
        wait_for(
            lambda: [
                r
                for r in caplog.records
                if r.threadName.startswith("delivery-")
                and r.threadName[-1].isdigit()
                and getattr(r, "event", None) == "db.unavailable"
            ],
            "the worker's outcome write to fail",
            timeout=10,
        )
    finally:
        postgresql_server.start()
        wait_until_accepting(postgresql_server)
    wait_for(
        lambda: tenant.message(message_id).status is MessageStatus.DELIVERED, what="delivered", timeout=20
    )
    for worker in workers:  # drained: a second send in flight would have reached the sink now
        worker.stop(drain=5)
    assert len(sink.messages) == 1
    assert [entry.status for entry in tenant.logs(message_id)] == [DeliveryStatus.DELIVERED]


# --- worker processes -----------------------------------------------------------------------------


class WorkerProcess(ServeProcess):
    """`smtp-proxy serve worker` as a child process; ready once its metrics port answers."""

    def __init__(self, tmp_path: Path, pg_url: str, encryption_key: str, name: str, **delivery: Any) -> None:
        self.metrics_port = free_port()
        settings = {**DELIVERY, **delivery, "metrics_host": "127.0.0.1", "metrics_port": self.metrics_port}
        config = {
            "database": {"url": pg_url, "pool_min": 2, "pool_max": 20, "connect_timeout": "2s"},
            "security": {"encryption_key": encryption_key, "bcrypt_cost": 4},
            "logging": {"level": "info", "format": "json"},
            "delivery": settings,
        }
        self.config = tmp_path / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(config))
        super().__init__("worker", self.config, tmp_path / f"{name}.log")
        self.wait_accepting(self.metrics_port)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()


@pytest.fixture
def worker_process(
    tmp_path: Path, pg_url: str, encryption_key: str
) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(name: str = "worker", **delivery: Any) -> WorkerProcess:
        process = WorkerProcess(tmp_path, pg_url, encryption_key, name, **delivery)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def tokens(sink: SmtpSink) -> Counter[str]:
    """How many times each message (by its unique X-Token) reached the sink."""
    found: Counter[str] = Counter()
    for received in sink.messages:
        line = next(line for line in received.data.split(b"\r\n") if line.startswith(b"X-Token: "))
        found[line.decode()] += 1
    return found


def test_two_worker_processes_deliver_1000_messages_exactly_once(
    tenant: Queue, sink: SmtpSink, worker_process
) -> None:
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    tenant.enqueue(1000)
    first, second = worker_process("one", workers=4), worker_process("two", workers=4)
    sink.wait_for(1000, timeout=120)
    wait_for(lambda: tenant.statuses()["delivered"] == 1000, timeout=30, what="1000 delivered")
    metrics = first.metrics()
    # Both drain and exit: a wrong second delivery in flight would have reached the sink now.
    assert first.terminate() == 0 and second.terminate() == 0
    sent = tokens(sink)
    with tenant.database.read() as session:
        logs = session.execute(
            select(DeliveryLog.message_id, DeliveryLog.status, DeliveryLog.response_text)
        ).all()
    per_message = Counter(message_id for message_id, _status, _text in logs)
    extra = [row for row in logs if per_message[row[0]] > 1]
    assert len(sent) == 1000 and set(sent.values()) == {1}, (extra, [t for t, n in sent.items() if n > 1])
    assert len(logs) == 1000 and {row[1] for row in logs} == {DeliveryStatus.DELIVERED}, extra
    shares = [len(process.events("delivery.delivered")) for process in (first, second)]
    assert sum(shares) == 1000 and min(shares) > 0, shares  # both took part
    assert (
        f'smtp_proxy_delivery_attempts_total{{outcome="delivered",provider_type="smtp"}} {float(shares[0])}'
        in metrics
    )
    assert "smtp_proxy_delivery_latency_seconds_count" in metrics and "smtp_proxy_queue_messages" in metrics
    assert first.terminate() == 0 and second.terminate() == 0


def test_kill_9_mid_batch_then_its_messages_are_delivered_after_the_lease(
    tenant: Queue, sink: SmtpSink, worker_process
) -> None:
    sink.delay_data(0.2)
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    tenant.enqueue(40)
    doomed = worker_process("doomed", workers=2, batch_size=20, lease="3s", connect_timeout="500ms")
    sink.wait_for(3, timeout=20)
    doomed.process.kill()
    doomed.process.wait(timeout=10)
    killed_at = time.monotonic()
    assert tenant.statuses()["processing"] > 0  # its claim is still held
    worker_process("rescuer", workers=2, batch_size=20, lease="3s", connect_timeout="500ms")
    wait_for(lambda: tenant.statuses()["delivered"] == 40, timeout=60, what="all 40 delivered")
    sent = tokens(sink)
    assert len(sent) == 40  # nothing lost
    # At least once: only what the killed worker had in flight (2 threads) can arrive twice.
    assert sum(sent.values()) - 40 <= 2
    assert time.monotonic() - killed_at >= 2.0  # its messages waited for the lease to run out


def test_sigterm_finishes_deliveries_in_flight_and_releases_the_rest(
    tenant: Queue, sink: SmtpSink, worker_process
) -> None:
    sink.delay_data(1.0)
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    tenant.enqueue(20)
    # The cap lets the whole batch be claimed: some of it waits locally, to be released.
    process = worker_process(
        workers=2, batch_size=20, send_timeout="5s", lease="20s", max_in_flight_per_account=20
    )
    wait_for(lambda: sink.connections >= 2, what="two sends in flight", timeout=20)
    assert process.terminate(timeout=20) == 0
    statuses = tenant.statuses()
    assert statuses["processing"] == 0
    assert statuses["delivered"] == len(sink.messages) >= 2  # in flight were finished, not dropped
    assert statuses["queued"] == 20 - statuses["delivered"]
    with tenant.database.read() as session:
        attempts = session.scalars(
            select(Message.attempts).where(Message.status == MessageStatus.QUEUED)
        ).all()
    assert set(attempts) == {0}  # released, not counted as tries
    (stopped,) = process.events("worker.stopped")
    assert stopped["released"] == statuses["queued"]


def test_a_second_sigint_ends_the_drain_at_once_and_leaves_deliveries_in_flight_to_their_lease(
    tenant: Queue, sink: SmtpSink, worker_process
) -> None:
    # Ctrl-C twice: the first drains and says how many deliveries it waits for; the second gives
    # the claimed messages not started back at once and exits 130, well before the 30 s drain.
    sink.delay_data(60.0)  # the provider sits on DATA until the worker hangs up
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    tenant.enqueue(20)
    process = worker_process(
        workers=2, batch_size=20, send_timeout="60s", lease="150s", max_in_flight_per_account=20
    )
    wait_for(lambda: sink.connections >= 2, what="two sends in flight", timeout=20)
    process.process.send_signal(signal.SIGINT)
    draining = process.wait_for_event("worker.draining")
    assert draining["in_flight"] == 2 and "second SIGINT or SIGTERM stops at once" in draining["message"]
    process.process.send_signal(signal.SIGINT)
    assert process.process.wait(timeout=10) == 130
    (hurried,) = process.events("worker.stopping_now")
    assert hurried["in_flight"] == 2 and "lease" in hurried["message"]
    (stopped,) = process.events("worker.stopped")
    statuses = tenant.statuses()
    # The two in flight keep their claim until the lease runs out; the rest are queued again, untried.
    assert (statuses["processing"], statuses["queued"], statuses["delivered"]) == (2, 18, 0)
    assert stopped["released"] == 18 and stopped["abandoned_in_flight"] == 2
    assert not sink.messages


def test_worker_refuses_to_start_without_an_encryption_key(tmp_path: Path, pg_url: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": pg_url}, "delivery": {"metrics_port": None}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_PROXY_", "DATABASE_URL"))}
    result = subprocess.run(
        [SMTP_PROXY, "--config", str(config), "serve", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "encryption_key" in result.stderr


def test_concurrent_in_process_workers_never_deliver_twice(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    tenant.enqueue(200)
    workers: list[Worker] = []
    threads = [threading.Thread(target=lambda: workers.append(start_worker())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sink.wait_for(200, timeout=60)
    wait_for(lambda: tenant.statuses()["delivered"] == 200, what="200 delivered", timeout=20)
    for worker in workers:  # drained: a wrong second delivery in flight would have reached the sink now
        worker.stop(drain=5)
    assert set(tokens(sink).values()) == {1} and len(tokens(sink)) == 200


def test_failover_across_http_providers_sendgrid_503_then_mailgun_then_ses(
    tenant: Queue, start_worker
) -> None:
    """A 503 from SendGrid and a 429 from Mailgun fail over to SES, which gets the raw message as received."""
    with FakeEsp() as down, FakeEsp() as throttled, FakeEsp() as ses:
        down.respond(503)
        throttled.respond(429)
        sendgrid = tenant.provider("sg", ProviderType.SENDGRID, api_key=fake_esp.API_KEY)
        mailgun = tenant.provider(
            "mg", ProviderType.MAILGUN, api_key=fake_esp.API_KEY, settings={"domain": "mg.example.com"}
        )
        amazon = tenant.provider(
            "ses", ProviderType.SES, api_key=fake_esp.SES_API_KEY, settings={"region": "eu-west-1"}
        )
        for priority, provider in enumerate((sendgrid, mailgun, amazon)):
            tenant.rule(provider, priority)
        (message_id,) = tenant.enqueue()
        # Each provider type points at its own fake; SES's base URL keeps the {region} placeholder.
        endpoints = {
            "sendgrid": down.endpoints()["sendgrid"],
            "mailgun": throttled.endpoints()["mailgun"],
            "ses": ses.endpoints()["ses"],
        }
        start_worker(endpoints=endpoints)
        wait_for(
            lambda: tenant.message(message_id).status is MessageStatus.DELIVERED, what="delivered", timeout=20
        )
        (delivery,) = ses.messages("ses")
        assert down.invalid() == [] and throttled.invalid() == []
    with tenant.database.transaction() as session:
        stored = message_body(tenant.cipher, session.get(Message, message_id))
    tenant.database.remove_session()
    assert delivery.raw == stored and delivery.sender == "app@example.com"
    assert delivery.recipients == ("rcpt@example.net",) and delivery.request.region == "eu-west-1"
    logs = tenant.logs(message_id)
    assert [(e.provider_id, e.status, e.response_code) for e in logs] == [
        (sendgrid, DeliveryStatus.DEFERRED, 503),
        (mailgun, DeliveryStatus.DEFERRED, 429),
        (amazon, DeliveryStatus.DELIVERED, 200),
    ]
    assert all(fake_esp.API_KEY not in (e.response_text or "") for e in logs)


def test_a_slow_failover_chain_keeps_its_lease_so_no_other_worker_takes_the_message(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    """Three providers that each take most of the lease: the claim is extended, not taken over."""
    slow = [SmtpSink().start() for _ in range(3)]
    try:
        for n, each in enumerate(slow):
            each.delay_data(1.2)
            each.reply_to_data(451, "4.4.5 slow and busy")
            tenant.rule(tenant.smtp_provider(each, f"slow-{n}"), n)
        tenant.rule(tenant.smtp_provider(sink, "last"), 9)
        (message_id,) = tenant.enqueue()
        settings = {
            "lease": "3s",
            "connect_timeout": "500ms",
            "send_timeout": "1s",
            "max_failover": 4,
            "attempt_budget": "20s",
        }
        start_worker(**settings)
        wait_for(lambda: slow[0].connections >= 1, what="the first worker at the first provider", timeout=20)
        start_worker(**settings)  # would re-claim the message if its lease ran out
        sink.wait_for(1, timeout=20)
        wait_for(
            lambda: tenant.message(message_id).status is MessageStatus.DELIVERED, what="delivered", timeout=20
        )
    finally:
        for each in slow:
            each.stop()
    message = tenant.message(message_id)
    assert message.attempts == 1
    assert [e.status for e in tenant.logs(message_id)] == [DeliveryStatus.DEFERRED] * 3 + [
        DeliveryStatus.DELIVERED
    ]


def test_one_worker_on_the_embedded_sqlite_database(sqlite_url: str, make_config, sink: SmtpSink) -> None:
    config = make_config(sqlite_url, delivery=DELIVERY, logging={"level": "warning"})
    tenant = Queue(config)
    worker = Worker(lambda: config, tenant.database, tenant.cipher)
    try:
        tenant.rule(tenant.smtp_provider(sink, "main"), 0)
        tenant.enqueue(100)
        worker.start()
        tenant.enqueue(50)  # while it delivers: the embedded database takes both writers
        sink.wait_for(150, timeout=60)
        wait_for(lambda: tenant.statuses()["delivered"] == 150, what="150 delivered", timeout=20)
        assert len(tokens(sink)) == 150 and set(tokens(sink).values()) == {1}
    finally:
        worker.stop(drain=5)
        tenant.database.dispose()


def test_recipients_refused_for_now_are_retried_as_a_follow_up_message(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    """One 451 among accepted recipients: the others get it now, that one later; a 550 is not retried."""
    sink.queue_reply("RCPT", 451, "4.2.1 mailbox busy")  # the first RCPT only: later@
    sink.refuse("never@example.net", 550, "5.1.1 no such user")
    recipients = ("later@example.net", "ok@example.net", "never@example.net")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    dsn = {
        "later@example.net": {"notify": ["FAILURE", "DELAY"], "orcpt": "rfc822;Later@example.net"},
        "ok@example.net": {"notify": ["NEVER"], "orcpt": None},
    }
    (message_id,) = tenant.enqueue(recipients=recipients, dsn_ret="HDRS", dsn_envid="E1", dsn_recipients=dsn)
    start_worker()
    received = sink.wait_for(3, timeout=20)  # ok@ now, later@ in its follow-up, and the sender's notice
    (notice,) = [m for m in received if m.mail_from == ""]  # of never@'s 550 (delivery.notices)
    assert notice.rcpt_tos == ("app@example.com",) and b"never@example.net" in notice.data
    first, second = [m for m in received if m.mail_from]
    assert list(first.rcpt_tos) == ["ok@example.net"] and list(second.rcpt_tos) == ["later@example.net"]
    assert first.data == second.data
    wait_for(lambda: tenant.statuses()["delivered"] == 3, what="both messages and the notice", timeout=20)
    original = tenant.message(message_id)
    assert original.status is MessageStatus.DELIVERED
    logs = tenant.logs(message_id)
    assert [e.status for e in logs] == [DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED]
    assert "2 of 3 refused" in logs[0].response_text and "no such user" in logs[0].response_text
    follow_up_id = uuid.UUID(logs[1].response_text.rsplit(" ", 1)[1])
    follow_up = tenant.message(follow_up_id)
    assert follow_up.recipients == ["later@example.net"] and follow_up.account_id == tenant.account_id
    assert follow_up.correlation_id == original.correlation_id and follow_up.created_at == original.created_at
    assert follow_up.attempts == 2  # the original's try counts toward max_attempts
    # The RFC 3461 parameters go with it: the envelope's, and its own recipient's only.
    assert (follow_up.dsn_ret, follow_up.dsn_envid, follow_up.is_bounce) == ("HDRS", "E1", False)
    assert follow_up.dsn_recipients == {"later@example.net": dsn["later@example.net"]}
    assert len(sink.messages) == 3  # never@ was not tried again


def test_a_rule_added_just_now_is_seen_before_a_message_fails_for_want_of_one(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    (lonely,) = tenant.enqueue()
    start_worker()
    wait_for(
        lambda: tenant.message(lonely).status is MessageStatus.FAILED, what="failed: no rule yet", timeout=20
    )
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)  # within the route cache's lifetime
    (routed,) = tenant.enqueue()
    sink.wait_for(1, timeout=20)
    wait_for(lambda: tenant.message(routed).status is MessageStatus.DELIVERED, what="delivered", timeout=20)


# --- fair delivery --------------------------------------------------------------------------------


class HoldingServer:
    """A provider's SMTP host that accepts connections and says nothing until ``release``, then 421.

    Counts the connections open at once, so a test can see how many delivery threads one
    tenant's messages hold.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.released = threading.Event()
        self._lock = threading.Lock()
        self.open = self.most_open = self.accepted = 0
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def provider_config(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "tls": "none"}

    def _accept(self) -> None:
        while not self._closing:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.open += 1
                self.accepted += 1
                self.most_open = max(self.most_open, self.open)
            threading.Thread(target=self._hold, args=(connection,), daemon=True).start()

    def _hold(self, connection: socket.socket) -> None:
        with connection:
            self.released.wait(30)
            try:
                connection.sendall(b"421 4.3.2 busy, try later\r\n")
            except OSError:
                pass
            with self._lock:
                self.open -= 1

    def close(self) -> None:
        self.released.set()
        self._closing = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread
        except OSError:
            pass
        self.listener.close()
        self._thread.join(5)


def test_one_provider_per_attempt_once_each_and_at_most_max_failover(tenant: Queue, start_worker) -> None:
    """Five rules, all failing for now, two naming one provider: three distinct providers are tried."""
    sinks = [SmtpSink().start() for _ in range(4)]
    try:
        for each in sinks:
            each.reply_to_rcpt(451, "4.3.2 try again later")
        ids = [tenant.smtp_provider(each, f"busy-{n}") for n, each in enumerate(sinks)]
        for priority, provider in enumerate([ids[0], ids[0], ids[1], ids[2], ids[3]]):
            tenant.rule(provider, priority)
        (message_id,) = tenant.enqueue()
        start_worker(max_failover=3, retry_base="1h", retry_max="1h")
        logs = wait_for(
            lambda: len(tenant.logs(message_id)) >= 4 and tenant.logs(message_id), what="4 lines", timeout=20
        )
        message = tenant.message(message_id)
        assert (message.status, message.attempts) == (MessageStatus.QUEUED, 1)
        assert [(entry.provider_id, entry.status) for entry in logs] == [
            (ids[0], DeliveryStatus.DEFERRED),
            (ids[1], DeliveryStatus.DEFERRED),
            (ids[2], DeliveryStatus.DEFERRED),
            (None, DeliveryStatus.DEFERRED),
        ]
        assert (
            logs[-1].response_text
            == "failover stopped after 3 providers (delivery.max_failover); the rest wait"
        )
        assert [each.connections for each in sinks] == [1, 1, 1, 0]
    finally:
        for each in sinks:
            each.stop()


def test_the_attempt_budget_cuts_a_slow_provider_and_stops_failover(
    tenant: Queue, sink: SmtpSink, start_worker
) -> None:
    """A provider slower than the whole budget is cut at its end; the next one is not started."""
    with SmtpSink() as slow:
        slow.delay_data(10.0)
        slow_id = tenant.smtp_provider(slow, "slow")
        tenant.rule(slow_id, 0)
        tenant.rule(tenant.smtp_provider(sink, "spare"), 1)
        (message_id,) = tenant.enqueue()
        started = time.monotonic()
        start_worker(
            attempt_budget="1500ms",
            connect_timeout="500ms",
            send_timeout="5s",
            lease="12s",
            retry_base="1h",
            retry_max="1h",
        )
        logs = wait_for(
            lambda: len(tenant.logs(message_id)) >= 2 and tenant.logs(message_id), what="2 lines", timeout=20
        )
        elapsed = time.monotonic() - started
    assert [(entry.provider_id, entry.status) for entry in logs] == [
        (slow_id, DeliveryStatus.DEFERRED),
        (None, DeliveryStatus.DEFERRED),
    ]
    assert logs[0].response_text.startswith("gave up during end of DATA with 127.0.0.1:")
    assert logs[0].response_text.endswith("(the rest of the attempt budget)")
    assert logs[1].response_text == "failover stopped: attempt budget of 1.5s spent (delivery.attempt_budget)"
    assert 1.5 <= (logs[1].created_at - tenant.message(message_id).created_at).total_seconds()
    assert elapsed < 5.0  # not the provider's 10 s, nor its 5 s send_timeout
    assert sink.connections == 0 and tenant.message(message_id).status is MessageStatus.QUEUED


def test_one_account_holds_at_most_its_share_of_the_threads(
    tenant: Queue, sink: SmtpSink, delivery_config, start_worker
) -> None:
    """Account A's provider holds every connection; B's messages still go out on the other threads."""
    holding = HoldingServer()
    other = Queue(delivery_config(), account_name="other", domains=("other.example",))
    try:
        tenant.rule(tenant.provider("holding", ProviderType.SMTP, smtp_config=holding.provider_config()), 0)
        other.rule(other.smtp_provider(sink, "sink"), 0)
        tenant.enqueue(10)  # A's, older than B's
        theirs = other.enqueue(10)
        worker = start_worker(workers=4, max_in_flight_per_account=2, send_timeout="20s", lease="60s")
        sink.wait_for(10, timeout=30)
        wait_for(
            lambda: all(other.message(i).status is MessageStatus.DELIVERED for i in theirs),
            what="B's",
            timeout=20,
        )
        assert holding.open == 2 and holding.most_open == 2  # A's two, held all along
        assert worker.in_flight() == {tenant.account_id: 2}
        holding.released.set()
        wait_for(lambda: holding.accepted >= 4, what="A's next messages", timeout=20)
        assert holding.most_open == 2
    finally:
        holding.close()
        other.database.dispose()


def test_a_deactivated_accounts_mail_is_held_then_delivered_or_failed_at_max_age(
    tenant: Queue, sink: SmtpSink, delivery_config, start_worker
) -> None:
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    old, *held = tenant.enqueue(3)
    with tenant.database.transaction() as session:
        session.execute(
            update(Message).where(Message.id == old).values(created_at=utcnow() - timedelta(days=6))
        )
        session.execute(update(Account).where(Account.id == tenant.account_id).values(active=False))
    start_worker(max_age="5d")
    wait_for(lambda: all(tenant.logs(i) for i in held), what="the held lines", timeout=20)
    wait_for(
        lambda: tenant.message(old).status is MessageStatus.FAILED, what="the old one failed", timeout=20
    )
    (failure,) = tenant.logs(old)
    assert failure.status is DeliveryStatus.FAILED
    assert failure.response_text == (
        "held: the account is deactivated; gave up: not delivered within delivery.max_age (432000s)"
    )
    # An active tenant's message queued now: the claim that takes it walks every account with
    # due mail, so it would have taken the held ones too.
    other = Queue(delivery_config(), account_name="other", domains=("other.example",))
    try:
        other.rule(other.smtp_provider(sink, "sink"), 0)
        (theirs,) = other.enqueue(1)
        wait_for(
            lambda: other.message(theirs).status is MessageStatus.DELIVERED,
            what="the active tenant's",
            timeout=20,
        )
    finally:
        other.database.dispose()
    for message_id in held:
        message = tenant.message(message_id)
        assert (message.status, message.attempts) == (MessageStatus.QUEUED, 0)  # no attempt spent
        assert [(e.status, e.response_text) for e in tenant.logs(message_id)] == [
            (DeliveryStatus.DEFERRED, "held: the account is deactivated")
        ]
    assert sink.connections == 1  # the active tenant's only
    with tenant.database.transaction() as session:
        session.execute(update(Account).where(Account.id == tenant.account_id).values(active=True))
    reactivated = time.monotonic()
    sink.wait_for(3, timeout=20)
    assert time.monotonic() - reactivated < 5.0  # within a few polls, not after a backoff
    wait_for(
        lambda: all(tenant.message(i).status is MessageStatus.DELIVERED for i in held),
        what="delivered",
        timeout=20,
    )
    assert [e.status for e in tenant.logs(held[0])] == [DeliveryStatus.DEFERRED, DeliveryStatus.DELIVERED]
    assert tenant.message(held[0]).attempts == 1


def test_a_message_claimed_before_its_account_was_deactivated_is_given_back_uncounted(
    tenant: Queue, start_worker
) -> None:
    holding = HoldingServer()
    try:
        tenant.rule(tenant.provider("holding", ProviderType.SMTP, smtp_config=holding.provider_config()), 0)
        ids = tenant.enqueue(2)
        worker = start_worker(workers=1, max_in_flight_per_account=2, send_timeout="20s", lease="60s")
        # Read the account's state for every message.
        worker.routes = RouteCache(worker.database, worker.cipher, ttl=0)
        wait_for(lambda: holding.open == 1, what="the first message at the provider", timeout=20)
        wait_for(
            lambda: tenant.statuses()["processing"] == 2, what="the second claimed, waiting here", timeout=20
        )
        with tenant.database.transaction() as session:
            session.execute(update(Account).where(Account.id == tenant.account_id).values(active=False))
        holding.released.set()  # the first one is deferred; then the second one's turn comes
        wait_for(lambda: tenant.statuses()["queued"] == 2, what="both back in the queue", timeout=20)
    finally:
        holding.close()
    sent, waiting = sorted((tenant.message(i) for i in ids), key=lambda m: -m.attempts)
    assert (sent.attempts, waiting.attempts) == (1, 0)  # holding did not count as an attempt
    assert [(e.status, e.response_text) for e in tenant.logs(waiting.id)] == [
        (DeliveryStatus.DEFERRED, "held: the account is deactivated")
    ]
    assert holding.accepted == 1


# --- delivery events (webhooks) ------------------------------------------------------------------


@pytest.fixture
def hooks(tenant: Queue, receiver: Callable[..., Receiver]) -> tuple[Receiver, str]:
    """The tenant's endpoint (every event type) on a local receiver (the worker sends); the secret."""
    hook = receiver()
    with tenant.database.transaction() as session:
        made = webhooks.create_endpoint(
            session,
            tenant.cipher,
            account_id=tenant.account_id,
            url_=hook.url,
            events=list(webhooks.EVENT_TYPES),
            allow_http=True,
            actor=CLI,
        )
    tenant.database.remove_session()
    return hook, made.secret


def events_of(hook: Receiver, message_id: uuid.UUID | None = None) -> list[dict]:
    """The events received, or those of one message (a failure's notice to the sender has its own)."""
    return [body for body in hook.bodies() if message_id is None or body["message_id"] == str(message_id)]


def test_a_delivered_message_fires_one_signed_message_delivered(
    tenant: Queue, sink: SmtpSink, start_worker, hooks
) -> None:
    hook, secret = hooks
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    (message_id,) = tenant.enqueue(recipients=("a@example.net", "b@example.net"))
    start_worker()
    [event] = wait_for(lambda: events_of(hook), "the event at the receiver", timeout=20)
    assert event["type"] == "message.delivered"
    assert event["message_id"] == str(message_id) and event["correlation_id"] == "test-0"
    assert event["recipients"] == ["a@example.net", "b@example.net"]
    assert event["provider"] == "main" and event["reply"]["code"] == 250
    uuid.UUID(event["id"])
    (_path, headers, body) = hook.requests[0]
    assert signature.verify(headers[signature.HEADER], body, [secret], now=int(time.time()))


def test_a_permanent_failure_fires_message_failed_with_the_providers_reply(
    tenant: Queue, sink: SmtpSink, start_worker, hooks
) -> None:
    hook, _secret = hooks
    sink.reply_to_rcpt(550, "5.1.1 no such user")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    (message_id,) = tenant.enqueue()
    start_worker()
    [event] = wait_for(lambda: events_of(hook, message_id), "the event at the receiver", timeout=20)
    assert (event["type"], event["message_id"]) == ("message.failed", str(message_id))
    assert event["reply"]["code"] == 550 and "no such user" in event["reply"]["text"]


def test_recipients_refused_for_now_fire_message_deferred_beside_message_delivered(
    tenant: Queue, sink: SmtpSink, start_worker, hooks
) -> None:
    hook, _secret = hooks
    sink.queue_reply("RCPT", 451, "4.2.1 mailbox busy")  # the first RCPT only
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    tenant.enqueue(recipients=("later@example.net", "ok@example.net"))
    start_worker()
    wait_for(lambda: len(events_of(hook)) >= 3, "delivered, deferred, the follow-up delivered", timeout=20)
    kinds = [(e["type"], e["recipients"], e["reply"]["code"]) for e in events_of(hook)]
    assert ("message.delivered", ["ok@example.net"], 250) in kinds
    assert ("message.delivered", ["later@example.net"], 250) in kinds
    # The deferred recipient's event carries its own refusal, not the 250 the other got.
    (deferred,) = [e for e in events_of(hook) if e["type"] == "message.deferred"]
    assert deferred["recipients"] == ["later@example.net"]
    assert deferred["reply"] == {"code": 451, "text": "4.2.1 mailbox busy"}


def test_suppressed_recipients_fire_message_suppressed_and_hard_bounces_message_failed(
    tenant: Queue, sink: SmtpSink, start_worker, hooks
) -> None:
    """One message: a listed recipient left out, one refused for good, one delivered; an event each."""
    hook, _secret = hooks
    with tenant.database.transaction() as session:
        suppressions.add_manual(session, tenant.account_id, "listed@example.net", actor=CLI)
    tenant.database.remove_session()
    sink.refuse("gone@example.net", 550, "5.1.1 no such user")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    recipients = ("listed@example.net", "gone@example.net", "ok@example.net")
    (message_id,) = tenant.enqueue(recipients=recipients)
    start_worker()
    wait_for(lambda: len(events_of(hook, message_id)) >= 3, "three events", timeout=20)
    kinds = sorted(
        (e["type"], tuple(e["recipients"]), e["provider"], e["reply"]["code"], e["reply"]["text"])
        for e in events_of(hook, message_id)
    )
    assert kinds == [
        (
            "message.delivered",
            ("ok@example.net",),
            "main",
            250,
            "2.0.0 OK: queued; 1 of 2 refused: <gone@example.net> 550 5.1.1 no such user",
        ),
        ("message.failed", ("gone@example.net",), "main", 550, "5.1.1 no such user"),
        ("message.suppressed", ("listed@example.net",), None, None, "on the suppression list"),
    ]
    # The sender's notice of the two is a message of its own, with its own event.
    (notice,) = wait_for(lambda: [e for e in events_of(hook) if e["message_id"] != str(message_id)], "notice")
    assert (notice["type"], notice["recipients"]) == ("message.delivered", ["app@example.com"])


def test_kill_9_with_events_owed_then_every_event_arrives_after_restart(
    tenant: Queue, sink: SmtpSink, worker_process, receiver: Callable[..., Receiver]
) -> None:
    """At least once, none invented: the events a killed worker owed (or had in flight) all arrive."""
    held = threading.Event()
    hook = receiver(hold=held)
    with tenant.database.transaction() as session:
        webhooks.create_endpoint(
            session,
            tenant.cipher,
            account_id=tenant.account_id,
            url_=hook.url,
            events=["message.delivered"],
            allow_http=True,
            actor=CLI,
        )
    tenant.database.remove_session()
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    ids = tenant.enqueue(10)
    doomed = worker_process("doomed", workers=2, batch_size=20, lease="3s", connect_timeout="500ms")
    wait_for(lambda: len(hook.requests) >= 2, "two events held at the receiver", timeout=20)
    wait_for(lambda: tenant.statuses()["delivered"] == 10, "every message delivered", timeout=20)
    doomed.process.kill()
    doomed.process.wait(timeout=10)
    held.set()  # from now on the receiver answers at once
    worker_process("rescuer", workers=2, batch_size=20, lease="3s", connect_timeout="500ms")
    wanted = {str(message_id) for message_id in ids}
    wait_for(
        lambda: {event["message_id"] for event in hook.bodies()} == wanted,
        "an event for every message, after the killed worker's claims ran out",
        timeout=60,
        interval=0.2,
    )
    received = {event["id"] for event in hook.bodies()}
    with tenant.database.read() as session:
        written = {str(event_id) for event_id in session.scalars(select(WebhookEvent.id))}
    tenant.database.remove_session()
    assert received == written  # every event written arrived, and none arrived that was not written
    assert len(hook.bodies()) - len(received) <= 2  # again: only what was in flight when it died
