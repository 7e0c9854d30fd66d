#!/usr/bin/env python3
"""Benchmark of the queue worker; prints its figures.

Run from the repository root after ./scripts/test has made the venv:

    .venv/bin/python scripts/bench_worker.py [--messages 5000] [--claims 300] [--large 1000000]
        [--phases one,two,claim,noisy,dkim,webhooks,bounces] [--idle-accounts 0]

It starts a throwaway PostgreSQL cluster (fsync on: every outcome the worker
commits is durable, as in production) and a local SMTP sink (aiosmtpd in a
process of its own, answering 250 to everything), stores one tenant whose
only routing rule sends to the sink, and measures:

1. messages/s from queued to delivered with ONE `smtp-proxy serve worker`
   process (8 threads, batches of 50, polling every 200 ms): --messages
   messages of about 2 KiB are queued, the worker is started, and the run ends
   when the sink has them all and the database shows them all delivered. The
   rate is counted from the first to the last arrival at the sink (the
   worker's start-up is left out), and the wall time from the process start is
   shown beside it. Each message carries a unique token, so duplicates and
   losses are counted, not assumed away. The CPU seconds of the worker, the
   sink and PostgreSQL show which of them was the bottleneck.
2. the same with TWO worker processes on the same queue; each one's share is
   read from its own metrics endpoint (smtp_proxy_delivery_messages_total).
3. the latency of one claim (`storage.delivery_queue.claim`, 50 messages, in a
   transaction that is rolled back so that the queue never drains) with
   --small rows in `messages` and with --large rows: two databases, mostly
   finished messages, plus the same few thousand queued ones in both. The
   claims alternate between the two, so that whatever else the machine does
   meanwhile weighs on both alike. The claim walks the (account_id, status,
   next_attempt_at) index once per active account, so the two must be about
   equal; --idle-accounts adds that many accounts with nothing queued to both
   databases, to show what each account costs a claim.
4. noisy neighbour: tenant A has --noisy messages and an smtp provider whose
   server (a process of the bench's own on 127.0.0.1) accepts connections and
   then answers one byte per second; tenant B has --noisy messages to the
   sink. B's messages/s (first to last arrival) and p99 latency (created_at to
   processed_at) are measured alone, then with A's queued before B's. The
   target: with A, B keeps at least 80% of its throughput and at most twice
   its p99. Timeouts are short here (1 s connect, 2 s send) so that each of A's
   attempts ends in 3 s and the run in well under a minute.
5. DKIM: the one-process run again three times, the tenant's domain with no
   DKIM key (off), with an enabled RSA 2048 key, and with an Ed25519 key: every
   message is then signed before it goes to the sink.
6. webhooks: the one-process run without an endpoint and with one (a local
   receiver) that wants message.delivered; the lag from outcome to its 2xx.
7. bounces: the one-process run with every message delivered, then with one
   in ten addressed to a recipient the sink refuses for good (550 5.1.1): each
   of those fails and the worker sends its sender a delivery status
   notification through the same route, whose returned header section carries
   the token; so every token arrives once either way.

Everything listens on 127.0.0.1 only, every wait is bounded in time, and every
process started is stopped by its pid, also on failure.
"""

from __future__ import annotations

import argparse
import enum
import http.server
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchlib import (  # also puts the checkout on sys.path
    cpu_seconds,
    machine_ticks,
    migrated_database,
    postgres_cpu_seconds,
    stop,
)
from sqlalchemy import text
from sqlalchemy.engine import Engine

from smtp_proxy.config import Config, config_from_dict
from smtp_proxy.crypto import Cipher, generate_encryption_key
from smtp_proxy.db.models import MessageStatus
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.storage import (
    accounts,
    delivery_queue,
    dkim_keys,
    messages,
    providers,
    routing_rules,
    webhooks,
)
from smtp_proxy.storage.audit import CLI
from tests.pgcluster import PgCluster, free_port

ENQUEUE_BATCH = 500
FILLER_LINE = b"x" * 76 + b"\r\n"
TOKEN = re.compile(rb"^X-Bench-Token: (\S+)\r?$", re.MULTILINE)
CLAIM_LIMIT = 50
PHASES = ("one", "two", "claim", "noisy", "dkim", "webhooks", "bounces")
REFUSED_PREFIX = "bounce-"  # recipients the sink refuses for good (the bounces phase)
CLAIM_WARMUP = 20
FILL_TIMEOUT = "5min"  # per statement that stores or settles the claim tests' rows


# --- the sink ----------------------------------------------------------------------------------------


class _CountingHandler:
    """aiosmtpd handler: note each message's token and arrival time, answer 250, keep nothing else."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, float]] = []

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address.startswith(REFUSED_PREFIX):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd hook
        match = TOKEN.search(envelope.content)
        token = match.group(1).decode("ascii") if match else "?"
        self.arrivals.append((token, time.monotonic()))  # CLOCK_MONOTONIC is system-wide on Linux
        return "250 2.0.0 OK"


def _sink_main(port: int, control: Connection, parent_end: Connection) -> None:
    """The sink process: aiosmtpd's server thread counts, this thread answers the bench's questions.

    A process of its own so that its CPU time is measurable apart from the bench, and so that
    the GIL it holds is not the bench's.
    """
    from aiosmtpd.controller import Controller

    parent_end.close()  # else the bench's death would never reach recv() below as EOF
    handler = _CountingHandler()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, server_hostname="sink.bench.test", enable_SMTPUTF8=True
    )
    controller.start()
    control.send("ready")
    try:
        while True:
            try:
                command = control.recv()
            except EOFError:  # the bench died
                return
            if command == "count":
                arrivals = handler.arrivals
                control.send(len(arrivals))
            elif command == "take":
                taken, handler.arrivals = handler.arrivals, []
                control.send(taken)
            else:
                return
    finally:
        controller.stop()


class ServerProcess:
    """The parent's handle on a test server running in a child process, steered over a pipe."""

    what = "server"

    def __init__(self, target: Callable[..., None]) -> None:
        self.port = free_port()
        self._control, child = multiprocessing.Pipe()
        # fork: the bench has started nothing yet, and the child needs none of its state
        self.process = multiprocessing.get_context("fork").Process(
            target=target, args=(self.port, child, self._control), name=f"bench-{self.what}", daemon=True
        )
        self.process.start()
        child.close()
        if not self._control.poll(30) or self._control.recv() != "ready":
            self.stop()
            raise SystemExit(f"the {self.what} did not start")

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def _ask(self, command: str) -> Any:
        self._control.send(command)
        if not self._control.poll(30):
            raise SystemExit(f"the {self.what} stopped answering")
        return self._control.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self._control.send("stop")
            except OSError:
                pass
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)


class Sink(ServerProcess):
    """The local SMTP sink every fast provider delivers to."""

    what = "SMTP sink"

    def __init__(self) -> None:
        super().__init__(_sink_main)

    def count(self) -> int:
        return self._ask("count")

    def take(self) -> list[tuple[str, float]]:
        """Every arrival since the last take, as (token, monotonic time); the sink forgets them."""
        return self._ask("take")


# --- the slow provider ---------------------------------------------------------------------------------

SLOW_GREETING = b"220 slow.bench.test ESMTP at one byte per second, to every client, for ever\r\n"


def _slow_main(port: int, control: Connection, parent_end: Connection) -> None:
    """The noisy tenant's SMTP host: accept, then send one byte a second until the client hangs up.

    Counts connections, and the most open at once: how many delivery threads tenant A held.
    """
    import asyncio

    parent_end.close()
    counts = {"accepted": 0, "open": 0, "most_open": 0}

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts["accepted"] += 1
        counts["open"] += 1
        counts["most_open"] = max(counts["most_open"], counts["open"])
        hung_up = asyncio.ensure_future(reader.read())  # EOF (or a reset) when the client closes
        try:
            while not hung_up.done():
                for byte in SLOW_GREETING:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.wait([hung_up], timeout=1.0)
                    if hung_up.done():
                        break
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the client hung up, or the bench is stopping
        finally:
            counts["open"] -= 1
            hung_up.cancel()
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(trickle, "127.0.0.1", port, backlog=256)
        loop = asyncio.get_running_loop()
        control.send("ready")
        async with server:
            while True:
                ready = await loop.run_in_executor(None, control.poll, 0.5)
                if not ready:
                    continue
                try:
                    command = control.recv()
                except EOFError:  # the bench died
                    return
                if command == "counts":
                    control.send(dict(counts))
                elif command == "reset":
                    counts.update(accepted=0, most_open=counts["open"])
                    control.send("ok")
                else:
                    return

    asyncio.run(serve())


class SlowServer(ServerProcess):
    """The provider that answers one byte a second."""

    what = "slow SMTP server"

    def __init__(self) -> None:
        super().__init__(_slow_main)

    def counts(self) -> dict[str, int]:
        return self._ask("counts")

    def reset(self) -> None:
        self._ask("reset")


# --- processes and their CPU time ----------------------------------------------------------------------


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    metrics_port: int
    log: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def delivered(self) -> int | None:
        """This process's delivered count from its metrics endpoint; None if it does not answer."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own 127.0.0.1 child
                body = response.read().decode()
        except OSError:
            return None
        match = re.search(r'^smtp_proxy_delivery_messages_total\{status="delivered"\} (\S+)$', body, re.M)
        return int(float(match.group(1))) if match else 0


def start_worker(workdir: Path, base: dict[str, Any], label: str) -> WorkerProcess:
    """`smtp-proxy serve worker` with a config of its own (its own metrics port); stderr to a file.

    benchlib.serve waits for a port and throws stderr away; here the log is kept so that a failed
    run can show why.
    """
    metrics_port = free_port()
    config = workdir / f"worker-{label}.yaml"
    config.write_text(_config_yaml(base, metrics_port))
    log = workdir / f"worker-{label}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_PROXY_", "DATABASE_URL"))}
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "smtp-proxy"), "--config", str(config), "serve", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return WorkerProcess(process, metrics_port, log)


def _config_yaml(base: dict[str, Any], metrics_port: int) -> str:
    extra = "".join(f"  {key}: {value}\n" for key, value in base.get("delivery", {}).items())
    return f"""
database:
  url: {base["url"]}
logging:
  level: warning
security:
  encryption_key: {base["key"]}
delivery:
  workers: {base["threads"]}
  batch_size: {base["batch"]}
  poll_interval: 200ms
  lease: 5m
  allow_private_networks: true
  metrics_host: 127.0.0.1
  metrics_port: {metrics_port}
{extra}"""


# --- data --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    account_id: uuid.UUID
    provider_id: uuid.UUID


def seed_tenant(
    database: Database, cipher: Cipher, sink_port: int, name: str = "bench", domain: str = "example.com"
) -> Tenant:
    """One account whose single rule sends everything to 127.0.0.1:sink_port over plain SMTP."""
    with database.transaction() as session:
        account = accounts.create_account(
            session, name=name, email=f"bench@{domain}", allowed_domains=[domain], bcrypt_cost=4, actor=CLI
        ).account
        provider = providers.create_provider(
            session,
            cipher,
            account_id=account.id,
            name="sink",
            provider_type="smtp",
            smtp_config={"host": "127.0.0.1", "port": sink_port, "tls": "none"},
            actor=CLI,
        )
        routing_rules.create_rule(
            session,
            account_id=account.id,
            provider_id=provider.id,
            name="all to the sink",
            priority=0,
            actor=CLI,
        )
        return Tenant(account.id, provider.id)


def bench_message(token: str) -> bytes:
    """About 2 KiB; the token header is what the sink counts, so duplicates and losses show."""
    head = (
        "From: bench@example.com\r\nTo: sink@example.net\r\n"
        f"Subject: bench {token}\r\nMessage-ID: <{token}@bench.test>\r\nX-Bench-Token: {token}\r\n\r\n"
    ).encode()
    return head + FILLER_LINE * ((2048 - len(head)) // len(FILLER_LINE))


def enqueue(
    database: Database, cipher: Cipher, tenant: Tenant, run: str, count: int, refused_every: int = 0
) -> set[str]:
    """Queue `count` messages, ENQUEUE_BATCH per transaction; returns their tokens.

    With ``refused_every`` N, every Nth message goes to a recipient the sink refuses for good.
    """
    tokens = [f"{run}-{n}" for n in range(count)]
    for start in range(0, count, ENQUEUE_BATCH):
        with database.transaction() as session:
            for n, token in enumerate(tokens[start : start + ENQUEUE_BATCH], start):
                refused = refused_every and n % refused_every == refused_every - 1
                messages.enqueue_message(
                    session,
                    cipher,
                    account_id=tenant.account_id,
                    sender="bench@example.com",
                    recipients=[f"{REFUSED_PREFIX}{n}@example.net" if refused else "sink@example.net"],
                    data=bench_message(token),
                    correlation_id=token,
                )
    return set(tokens)


def idle_accounts(database: Database, count: int) -> None:
    """Accounts with nothing queued: each one is an index probe in every claim."""
    for start in range(0, count, ENQUEUE_BATCH):
        with database.transaction() as session:
            for n in range(start, min(count, start + ENQUEUE_BATCH)):
                accounts.create_account(
                    session,
                    name=f"idle-{n}",
                    email="idle@example.com",
                    allowed_domains=[f"idle-{n}.example"],
                    bcrypt_cost=4,
                    actor=CLI,
                )


def empty_queue(engine: Engine) -> None:
    with engine.begin() as connection:
        # CASCADE: what refers to a message goes with it (a suppression entry's message).
        connection.exec_driver_sql("TRUNCATE messages, delivery_logs CASCADE")


def status_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT status::text, count(*) FROM messages GROUP BY status")
        return {status: count for status, count in rows}


def last_attempts(engine: Engine, limit: int = 5) -> list[str]:
    """The newest delivery-log texts, to say why a run did not finish."""
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT status::text, response_code, response_text FROM delivery_logs "
                "WHERE status <> 'delivered' ORDER BY created_at DESC LIMIT :limit"
            ),
            {"limit": limit},
        )
        return [f"{status} {code} {text_}" for status, code, text_ in rows]


# --- throughput --------------------------------------------------------------------------------------


@dataclass
class Run:
    processes: int
    messages: int
    seconds: float  # first to last arrival
    wall: float  # first process start to last arrival
    first_after: float  # first process start to first arrival
    duplicates: int
    lost: int
    unexpected: int
    worker_cpu: float
    sink_cpu: float
    postgres_cpu: float | None
    machine_busy: float  # share of all cores busy during the run, whoever used them
    shares: list[int | None]
    stop_seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("nan")


def throughput(
    *,
    processes: int,
    count: int,
    timeout: float,
    base: dict[str, Any],
    workdir: Path,
    sink: Sink,
    cluster: PgCluster,
    database: Database,
    cipher: Cipher,
    tenant: Tenant,
    running: list[WorkerProcess],
    label: str | None = None,
    also_until: Callable[[], bool] | None = None,
    refused_every: int = 0,
) -> Run:
    """Queue `count` messages, start `processes` workers, wait until all are delivered, stop them.

    ``also_until``: what else must have happened before they are stopped (webhook events received).
    ``refused_every``: every Nth message is refused for good; its bounce arrives in its place.
    """
    label = label or f"run{processes}"
    empty_queue(database.engine)
    sink.take()
    expected = enqueue(database, cipher, tenant, label, count, refused_every)
    sink_cpu, pg_cpu, ticks = cpu_seconds(sink.pid), postgres_cpu_seconds(cluster), machine_ticks()
    started = time.monotonic()
    for n in range(processes):
        running.append(start_worker(workdir, base, f"{label}-{n}"))
    workers = running[-processes:]
    deadline = started + timeout
    settled_at, last_seen = time.monotonic(), -1
    while True:
        time.sleep(0.25)
        for worker in workers:
            if worker.process.poll() is not None:
                raise SystemExit(
                    f"a worker exited with status {worker.process.returncode}:\n{worker.log_tail()}"
                )
        arrived = sink.count()
        if arrived != last_seen:
            settled_at, last_seen = time.monotonic(), arrived
        if arrived >= count and (also_until is None or also_until()):
            counts = status_counts(database.engine)
            if counts.get("delivered", 0) + counts.get("failed", 0) >= count:
                break
        if arrived < count and time.monotonic() - settled_at > 10:
            counts = status_counts(database.engine)
            if counts.get("delivered", 0) + counts.get("failed", 0) >= count:
                break  # every message is finished, yet some never arrived: counted as lost below
        if time.monotonic() > deadline:
            counts = status_counts(database.engine)
            detail = "\n".join(last_attempts(database.engine)) or "(no failed attempts logged)"
            with database.engine.connect() as connection:
                owed = connection.execute(
                    text("SELECT status, count(*), max(last_error) FROM webhook_deliveries GROUP BY status")
                ).all()
            detail += f"\nwebhook deliveries (status, count, an error): {[tuple(row) for row in owed]}"
            raise SystemExit(
                f"{processes} worker(s) did not deliver {count} messages in {timeout:.0f} s: the sink has "
                f"{arrived}, the database says {counts}\nlast failed attempts:\n{detail}\n"
                f"worker log:\n{workers[0].log_tail() or '(empty)'}"
            )
    time.sleep(0.5)  # a straggling duplicate would arrive now
    worker_cpu = sum(cpu_seconds(worker.process.pid) for worker in workers)
    busy, total = (now - then for now, then in zip(machine_ticks(), ticks, strict=True))
    shares = [worker.delivered() for worker in workers]
    sink_cpu = cpu_seconds(sink.pid) - sink_cpu
    pg_now = postgres_cpu_seconds(cluster)
    postgres_cpu = pg_now - pg_cpu if pg_now is not None and pg_cpu is not None else None
    stopping = time.monotonic()
    for worker in workers:
        worker.process.send_signal(signal.SIGTERM)  # all drain at once
    for worker in workers:
        stop(worker.process)
        running.remove(worker)
    stop_seconds = time.monotonic() - stopping
    arrivals = sink.take()
    counts = status_counts(database.engine)
    if counts.get("delivered", 0) != count:
        print(f"  note: the database says {counts}", file=sys.stderr)
    tokens = [token for token, _ in arrivals]
    distinct = set(tokens)
    times = sorted(at for _, at in arrivals)
    return Run(
        processes=processes,
        messages=len(distinct & expected),
        seconds=times[-1] - times[0] if times else float("nan"),
        wall=times[-1] - started if times else float("nan"),
        first_after=times[0] - started if times else float("nan"),
        duplicates=len(tokens) - len(distinct),
        lost=len(expected - distinct),
        unexpected=len(distinct - expected),
        worker_cpu=worker_cpu,
        sink_cpu=sink_cpu,
        postgres_cpu=postgres_cpu,
        machine_busy=busy / total if total else float("nan"),
        shares=shares,
        stop_seconds=stop_seconds,
    )


DKIM_SETTINGS = ("off", "rsa-sha256", "ed25519-sha256")


def use_dkim(database: Database, cipher: Cipher, tenant: Tenant, setting: str) -> None:
    """Leave the tenant's domain with one enabled DKIM key of ``setting``'s algorithm, or none ("off")."""
    with database.transaction() as session:
        for key in dkim_keys.list_keys(session, tenant.account_id):
            dkim_keys.delete_key(session, key, actor=CLI)
        if setting != "off":
            account = accounts.get_account(session, tenant.account_id)
            dkim_keys.create_key(
                session, cipher, account=account, domain="example.com", algorithm=setting, actor=CLI
            )


class EventReceiver:
    """A local webhook receiver: answers 204 and notes when each message's event arrived."""

    def __init__(self) -> None:
        arrivals: dict[str, float] = {}
        self.arrivals = arrivals

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps connections open, as receivers in production do

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                arrivals.setdefault(json.loads(body)["message_id"], time.time())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def use_webhook(database: Database, cipher: Cipher, tenant: Tenant, url: str | None) -> None:
    """Leave the tenant with one endpoint wanting message.delivered at ``url``, or none."""
    with database.transaction() as session:
        for endpoint in webhooks.list_endpoints(session, tenant.account_id):
            webhooks.delete_endpoint(session, endpoint, actor=CLI)
        if url is not None:
            webhooks.create_endpoint(
                session,
                cipher,
                account_id=tenant.account_id,
                url_=url,
                events=["message.delivered"],
                allow_http=True,
                actor=CLI,
            )


def count_bounces(engine: Engine) -> int:
    """The delivery status notifications the worker queued in the last run."""
    with engine.connect() as connection:
        return connection.execute(text("SELECT count(*) FROM messages WHERE is_bounce")).scalar_one()


def event_lags(database: Database, arrivals: dict[str, float]) -> list[float]:
    """Seconds from each delivered message's outcome to its event's arrival at the receiver."""
    with database.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, processed_at FROM messages WHERE status = 'delivered'")
        ).all()
    return sorted(
        arrivals[str(message_id)] - processed.timestamp()
        for message_id, processed in rows
        if str(message_id) in arrivals
    )


def print_run(run: Run) -> None:
    window = run.wall if run.wall > 0 else float("nan")  # the CPU figures cover about this much time
    pg = (
        f"{run.postgres_cpu:.1f} s ({run.postgres_cpu / window:.0%})"
        if run.postgres_cpu is not None
        else "n/a"
    )
    print(
        f"{run.processes} worker process(es): {run.rate:7.1f} messages/s first to last arrival "
        f"({run.messages} in {run.seconds:.2f} s); wall from start {run.wall:.2f} s "
        f"({run.messages / run.wall:.1f}/s, first arrival after {run.first_after:.2f} s)"
    )
    print(f"  exactly once: {run.duplicates} duplicates, {run.lost} lost, {run.unexpected} unexpected")
    print(
        f"  CPU (share of one core): worker {run.worker_cpu:.1f} s ({run.worker_cpu / window:.0%}, "
        f"{run.worker_cpu * 1000 / max(run.messages, 1):.2f} ms/message with start-up), "
        f"sink {run.sink_cpu:.1f} s ({run.sink_cpu / window:.0%}), PostgreSQL {pg}; "
        f"all {os.cpu_count()} cores {run.machine_busy:.0%} busy"
    )
    if run.processes > 1:
        shares = ", ".join("?" if s is None else str(s) for s in run.shares)
        print(f"  delivered by each process: {shares};  SIGTERM to exit: {run.stop_seconds:.2f} s")
    else:
        print(f"  SIGTERM to exit: {run.stop_seconds:.2f} s")


# --- claim latency -----------------------------------------------------------------------------------

# Finished messages, one every 2.5 s back from now (1,000,000 of them span a month); one in a
# hundred failed. No bodies: the retention purge would have dropped most, and claims never read them.
_FILL_FINISHED = """
INSERT INTO messages (id, account_id, sender, recipients, subject, headers, body_encrypted, size, status,
                      provider_id, correlation_id, attempts, next_attempt_at, lease_id, processed_at,
                      created_at, updated_at)
SELECT gen_random_uuid(), CAST(:account AS uuid), 'app@example.com', '["user@example.net"]'::jsonb,
       'filler ' || i, jsonb_build_array(jsonb_build_array('Subject', 'filler ' || i)), NULL, 2000,
       (CASE WHEN i % 100 = 0 THEN 'failed' ELSE 'delivered' END)::message_status,
       CAST(:provider AS uuid), md5(i::text), 1, t + interval '300 seconds', NULL,
       t + interval '2 seconds', t, t + interval '2 seconds'
FROM generate_series(1, CAST(:count AS bigint)) AS i,
     LATERAL (SELECT now() - i * interval '2.5 seconds' AS t) AS stamp
"""

# The queue itself: :due messages due now (oldest a few minutes late), :deferred waiting for a retry.
_FILL_QUEUED = """
INSERT INTO messages (id, account_id, sender, recipients, subject, headers, body_encrypted, size, status,
                      provider_id, correlation_id, attempts, next_attempt_at, lease_id, processed_at,
                      created_at, updated_at)
SELECT gen_random_uuid(), CAST(:account AS uuid), 'app@example.com', '["user@example.net"]'::jsonb,
       'queued ' || i, jsonb_build_array(jsonb_build_array('Subject', 'queued ' || i)),
       convert_to(repeat('x', 2048), 'UTF8'), 2048, 'queued'::message_status, NULL, md5('q' || i), a,
       CASE WHEN i <= :due THEN now() - i * interval '100 milliseconds'
            ELSE now() + (i % 3600) * interval '1 second' END,
       NULL, NULL, now() - i * interval '100 milliseconds', now() - i * interval '100 milliseconds'
FROM generate_series(1, :due + :deferred) AS i,
     LATERAL (SELECT CASE WHEN i <= :due THEN 0 ELSE 1 + i % 5 END AS a) AS tries
"""


def fill(engine: Engine, tenant: Tenant, *, finished: int, due: int, deferred: int) -> None:
    """`finished` delivered or failed rows and the queue, two INSERT ... SELECT; then settle.

    VACUUM as autovacuum would have done long before a table grows to a million rows in production
    (without it the first scans pay for setting hint bits on fresh pages), and a CHECKPOINT so that
    the gigabyte of WAL the fill wrote is not being flushed while claims are timed.
    """
    params = {"account": str(tenant.account_id), "provider": str(tenant.provider_id)}
    with engine.begin() as connection:
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = '{FILL_TIMEOUT}'")
        connection.execute(text(_FILL_FINISHED), {**params, "count": finished})
        connection.execute(text(_FILL_QUEUED), {**params, "due": due, "deferred": deferred})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql(f"SET statement_timeout = '{FILL_TIMEOUT}'")
        connection.exec_driver_sql("VACUUM (ANALYZE) messages")
        connection.exec_driver_sql("CHECKPOINT")


def claim_latency(databases: list[Database], iterations: int) -> list[tuple[list[float], int]]:
    """Per database: milliseconds per claim of CLAIM_LIMIT messages (sorted), and the smallest batch.

    The databases take turns, claim by claim, in an order that flips each round: whatever else the
    machine does meanwhile (a checkpoint, another process) falls on every table size alike, so the
    comparison holds even when the absolute figures wobble. Each claim is rolled back.
    """
    sessions = [database.sessions() for database in databases]
    samples: list[list[float]] = [[] for _ in databases]
    smallest = [CLAIM_LIMIT] * len(databases)
    try:
        for n in range(CLAIM_WARMUP + iterations):
            order = range(len(sessions)) if n % 2 == 0 else reversed(range(len(sessions)))
            for index in order:
                session = sessions[index]
                started = time.perf_counter()
                claim = delivery_queue.claim(session, limit=CLAIM_LIMIT, lease=300, now=utcnow())
                elapsed = time.perf_counter() - started
                session.rollback()
                smallest[index] = min(smallest[index], len(claim.messages))
                if n >= CLAIM_WARMUP:
                    samples[index].append(elapsed * 1000)
    finally:
        for database, session in zip(databases, sessions, strict=True):
            session.rollback()
            database.sessions.remove()
    return [(sorted(times), least) for times, least in zip(samples, smallest, strict=True)]


def claim_database(
    cluster: PgCluster,
    name: str,
    key: str,
    sink_port: int,
    *,
    rows: int,
    due: int,
    deferred: int,
    idle: int = 0,
) -> Database:
    """A database of its own with `rows` messages: `due` and `deferred` queued, the rest finished."""
    database = Database(
        config_from_dict({"database": {"url": migrated_database(cluster, name)}}, env={}).database
    )
    cipher = Cipher.from_config(config_from_dict({"security": {"encryption_key": key}}, env={}).security)
    tenant = seed_tenant(database, cipher, sink_port)
    idle_accounts(database, idle)
    fill(database.engine, tenant, finished=rows - due - deferred, due=due, deferred=deferred)
    return database


def claim_plan(engine: Engine) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the queued-message claim, run in a transaction rolled back."""
    compiled = delivery_queue._CLAIMS["postgresql"].compile(dialect=engine.dialect)
    now = utcnow()
    params = compiled.construct_params(
        {
            "now": now,
            "until": now,
            "lease_id": uuid.uuid4(),
            "status": MessageStatus.QUEUED,
            "per_account": CLAIM_LIMIT,
            "limit": CLAIM_LIMIT,
            "busy_ids": [],
            "busy_counts": [],
        }
    )
    # The driver gets the raw values (no bind processors here): UUID and enum members as text.
    params = {k: str(v) if isinstance(v, (uuid.UUID, enum.Enum)) else v for k, v in params.items()}
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + compiled.string, params)
        lines = [row[0].strip() for row in rows]
        connection.rollback()
    return lines


def plan_summary(lines: list[str]) -> str:
    """One line: the plan's nodes in EXPLAIN's order, the top node's buffers, the execution time."""
    nodes = [re.sub(r"\s*\(actual .*\)$", "", line.removeprefix("->  ")) for line in lines]
    nodes = [node for node in nodes if node and ":" not in node]  # not Buffers:, Index Cond:, ...
    buffers = next((line for line in lines if line.startswith("Buffers")), "")
    timing = next((line for line in lines if line.startswith("Execution Time")), "")
    return " / ".join(nodes) + f"; {buffers}; {timing}"


def percentile(ordered: list[float], q: float) -> float:
    return ordered[max(0, int(len(ordered) * q) - 1)]


# --- noisy neighbour ---------------------------------------------------------------------------------


@dataclass
class NoisyRun:
    label: str
    messages: int  # B's messages that reached the sink
    seconds: float  # B: first to last arrival
    latencies: list[float]  # B: created_at to processed_at, seconds, sorted
    slow_accepted: int  # connections A's provider took during the run
    slow_most_open: int  # the most of them open at once: A's delivery threads
    a_attempts: int  # delivery-log lines of A's messages

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("nan")

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99) if self.latencies else float("nan")

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


def account_counts(engine: Engine, account_id: uuid.UUID) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT status::text, count(*) FROM messages WHERE account_id = :a GROUP BY status"),
            {"a": account_id},
        )
        return {status: count for status, count in rows}


def noisy_run(
    *,
    with_a: bool,
    count: int,
    timeout: float,
    base: dict[str, Any],
    workdir: Path,
    sink: Sink,
    slow: SlowServer,
    database: Database,
    cipher: Cipher,
    a: Tenant,
    b: Tenant,
    running: list[WorkerProcess],
) -> NoisyRun:
    """Queue B's messages (after A's, when with_a), run one worker until B's are all delivered."""
    label = "a-and-b" if with_a else "b-alone"
    empty_queue(database.engine)
    sink.take()
    slow.reset()
    if with_a:
        enqueue(database, cipher, a, f"{label}-a", count)  # older than B's: first in line by age
    expected = enqueue(database, cipher, b, f"{label}-b", count)
    started = time.monotonic()
    worker = start_worker(workdir, base, label)
    running.append(worker)
    try:
        while True:
            time.sleep(0.25)
            if worker.process.poll() is not None:
                raise SystemExit(f"the worker exited with {worker.process.returncode}:\n{worker.log_tail()}")
            counts = account_counts(database.engine, b.account_id)
            if counts.get("delivered", 0) + counts.get("failed", 0) >= count:
                break
            if time.monotonic() - started > timeout:
                detail = "\n".join(last_attempts(database.engine)) or "(no failed attempts logged)"
                raise SystemExit(
                    f"noisy phase ({label}): B's {count} messages not delivered in {timeout:.0f} s: "
                    f"{counts}\nlast failed attempts:\n{detail}\n"
                    f"worker log:\n{worker.log_tail() or '(empty)'}"
                )
        slow_counts = slow.counts()
    finally:
        stop(worker.process)
        running.remove(worker)
    arrivals = [(token, at) for token, at in sink.take() if token in expected]
    times = sorted(at for _, at in arrivals)
    with database.engine.connect() as connection:
        latencies = sorted(
            float(seconds)
            for (seconds,) in connection.execute(
                text(
                    "SELECT EXTRACT(EPOCH FROM processed_at - created_at) FROM messages "
                    "WHERE account_id = :b AND status = 'delivered'"
                ),
                {"b": b.account_id},
            )
        )
        a_attempts = connection.execute(
            text(
                "SELECT count(*) FROM delivery_logs JOIN messages ON messages.id = delivery_logs.message_id "
                "WHERE messages.account_id = :a"
            ),
            {"a": a.account_id},
        ).scalar_one()
    return NoisyRun(
        label=label,
        messages=len({token for token, _ in arrivals}),
        seconds=times[-1] - times[0] if len(times) > 1 else float("nan"),
        latencies=latencies,
        slow_accepted=slow_counts["accepted"],
        slow_most_open=slow_counts["most_open"],
        a_attempts=a_attempts,
    )


def noisy(
    *,
    cluster: PgCluster,
    key: str,
    count: int,
    timeout: float,
    threads: int,
    batch: int,
    workdir: Path,
    sink: Sink,
    slow: SlowServer,
    running: list[WorkerProcess],
) -> tuple[NoisyRun, NoisyRun]:
    """B alone, then A and B together, on a database of their own."""
    url = migrated_database(cluster, "noisy")
    config = config_from_dict({"database": {"url": url}, "security": {"encryption_key": key}}, env={})
    database = Database(config.database)
    cipher = Cipher.from_config(config.security)
    try:
        a = seed_tenant(database, cipher, slow.port, name="noisy-a", domain="a.example.com")
        b = seed_tenant(database, cipher, sink.port, name="quiet-b", domain="b.example.com")
        delivery = {"connect_timeout": "1s", "send_timeout": "2s", "retry_base": "1s", "retry_max": "5s"}
        base = {"url": url, "key": key, "threads": threads, "batch": batch, "delivery": delivery}
        common = {
            "count": count,
            "timeout": timeout,
            "base": base,
            "workdir": workdir,
            "sink": sink,
            "slow": slow,
            "database": database,
            "cipher": cipher,
            "a": a,
            "b": b,
            "running": running,
        }
        return noisy_run(with_a=False, **common), noisy_run(with_a=True, **common)
    finally:
        database.dispose()


def print_noisy(alone: NoisyRun, together: NoisyRun) -> None:
    for run in (alone, together):
        print(
            f"noisy neighbour, {run.label:7}: B {run.messages} delivered, {run.rate:6.1f} messages/s "
            f"first to last arrival; B latency p50 {run.p50:5.2f} s p99 {run.p99:5.2f} s; A's provider: "
            f"{run.slow_accepted} connections, at most {run.slow_most_open} at once "
            f"({run.a_attempts} log lines)"
        )


# --- main --------------------------------------------------------------------------------------------


def _terminated(_signum: int, _frame: Any) -> None:
    raise SystemExit("bench_worker: terminated")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000, help="messages per throughput run")
    parser.add_argument("--threads", type=int, default=8, help="delivery.workers of each worker process")
    parser.add_argument("--batch", type=int, default=50, help="delivery.batch_size")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="delivery.max_in_flight_per_account of phases one and two (default: half of --threads)",
    )
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds a throughput run may take")
    parser.add_argument("--claims", type=int, default=300, help="claims timed at each table size")
    parser.add_argument("--small", type=int, default=10_000, help="rows in messages, first claim test")
    parser.add_argument("--large", type=int, default=1_000_000, help="rows in messages, second claim test")
    parser.add_argument("--due", type=int, default=2000, help="queued messages due now, in both tables")
    parser.add_argument("--deferred", type=int, default=1000, help="queued messages due later, in both")
    parser.add_argument(
        "--idle-accounts", type=int, default=0, help="accounts with nothing queued, in both claim tests"
    )
    parser.add_argument("--noisy", type=int, default=1000, help="messages of each tenant, noisy phase")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    parser.add_argument("--refused-every", type=int, default=10, help="bounces phase: every Nth is refused")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if not phases or not phases <= set(PHASES):
        parser.error(f"--phases takes a comma-separated subset of {','.join(PHASES)}")
    if args.messages < 1 or args.claims < 1:
        parser.error("--messages and --claims must be positive")
    if not args.due + args.deferred < args.small < args.large:
        parser.error("need --due + --deferred < --small < --large")
    if args.due < CLAIM_LIMIT * 2:
        parser.error(f"--due must be at least {CLAIM_LIMIT * 2}")

    sink = Sink()  # first: forked before the bench holds any connection or thread
    slow = SlowServer() if "noisy" in phases else None
    # SIGTERM (a CI timeout, kill PID) ends the bench through the finally below, which stops its children.
    signal.signal(signal.SIGTERM, _terminated)
    cluster: PgCluster | None = None
    running: list[WorkerProcess] = []
    database: Database | None = None
    claim_databases: list[Database] = []
    workdir = Path(tempfile.mkdtemp(prefix="smtp-proxy-bench-worker-"))
    runs: list[Run] = []
    claims: dict[int, tuple[float, float, int]] = {}
    noisy_runs: tuple[NoisyRun, NoisyRun] | None = None
    dkim_runs: dict[str, Run] = {}
    webhook_runs: dict[str, Run] = {}
    webhook_lags: list[float] = []
    bounce_runs: dict[str, Run] = {}
    bounce_count = 0
    try:
        cluster = PgCluster.start(durable=True)
        url = migrated_database(cluster)
        key = generate_encryption_key()
        config: Config = config_from_dict(
            {"database": {"url": url}, "security": {"encryption_key": key}}, env={}
        )
        database = Database(config.database)
        cipher = Cipher.from_config(config.security)
        tenant = seed_tenant(database, cipher, sink.port)
        base: dict[str, Any] = {"url": url, "key": key, "threads": args.threads, "batch": args.batch}
        if args.max_in_flight is not None:
            base["delivery"] = {"max_in_flight_per_account": args.max_in_flight}
        print(
            f"smtp-proxy worker benchmark: {os.cpu_count()} cores, {args.messages} messages of 2 KiB "
            f"per run, {args.threads} threads x batches of {args.batch} per worker process, fsync on"
        )

        def measured(
            processes: int,
            label: str | None = None,
            also_until: Callable[[], bool] | None = None,
            refused_every: int = 0,
        ) -> Run:
            """``processes`` workers through args.messages messages, printed and kept for the summary."""
            run = throughput(
                processes=processes,
                count=args.messages,
                timeout=args.timeout,
                base=base,
                workdir=workdir,
                sink=sink,
                cluster=cluster,
                database=database,
                cipher=cipher,
                tenant=tenant,
                running=running,
                label=label,
                also_until=also_until,
                refused_every=refused_every,
            )
            print_run(run)
            runs.append(run)
            return run

        for processes, phase in ((1, "one"), (2, "two")):
            if phase in phases:
                measured(processes)

        if "dkim" in phases:
            for setting in DKIM_SETTINGS:
                use_dkim(database, cipher, tenant, setting)
                print(f"DKIM {setting}:")
                dkim_runs[setting] = measured(1, f"dkim-{setting}")
            use_dkim(database, cipher, tenant, "off")
        if "webhooks" in phases:
            receiver = EventReceiver()

            def received_all() -> bool:
                return len(receiver.arrivals) >= args.messages

            try:
                for setting in ("off", "on"):
                    use_webhook(database, cipher, tenant, receiver.url if setting == "on" else None)
                    receiver.arrivals.clear()
                    print(f"webhooks {setting}:")
                    until = received_all if setting == "on" else None
                    webhook_runs[setting] = measured(1, f"webhooks-{setting}", until)
                webhook_lags = event_lags(database, receiver.arrivals)
            finally:
                use_webhook(database, cipher, tenant, None)
                receiver.close()
        if "bounces" in phases:
            for setting, every in (("none", 0), ("refused", args.refused_every)):
                print(f"bounces: {'every message delivered' if not every else f'1 in {every} refused'}:")
                bounce_runs[setting] = measured(1, f"bounces-{setting}", refused_every=every)
            bounce_count = count_bounces(database.engine)
        if "claim" in phases:
            database.dispose()  # the throughput runs' database is done with
            for size in (args.small, args.large):
                started = time.monotonic()
                name = f"claims_{size}"
                claim_databases.append(
                    claim_database(
                        cluster,
                        name,
                        key,
                        sink.port,
                        rows=size,
                        due=args.due,
                        deferred=args.deferred,
                        idle=args.idle_accounts,
                    )
                )
                print(f"{size:,} rows stored in {time.monotonic() - started:.1f} s")
            results = claim_latency(claim_databases, args.claims)
            for size, claim_db, (samples, smallest) in zip(
                (args.small, args.large), claim_databases, results, strict=True
            ):
                median, p99 = statistics.median(samples), percentile(samples, 0.99)
                claims[size] = (median, p99, smallest)
                print(
                    f"claim of {CLAIM_LIMIT} with {size:>9,} rows ({args.due} due): "
                    f"median {median:6.2f} ms   p99 {p99:6.2f} ms   ({args.claims} claims, rolled back)"
                )
                if smallest < CLAIM_LIMIT:
                    print(f"  note: a claim took only {smallest} messages", file=sys.stderr)
                print(f"  plan: {plan_summary(claim_plan(claim_db.engine))}")
        if slow is not None:
            noisy_runs = noisy(
                cluster=cluster,
                key=key,
                count=args.noisy,
                timeout=args.timeout,
                threads=args.threads,
                batch=args.batch,
                workdir=workdir,
                sink=sink,
                slow=slow,
                running=running,
            )
            print_noisy(*noisy_runs)
    finally:
        for worker in running:
            stop(worker.process)
        sink.stop()
        if slow is not None:
            slow.stop()
        for open_database in [database, *claim_databases]:
            if open_database is not None:
                open_database.dispose()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # configs holding the throwaway key, worker logs

    print("\nsummary")
    for run in runs:
        flags = "exactly once" if not (run.duplicates or run.lost or run.unexpected) else "NOT exactly once"
        print(
            f"  {run.processes} worker process(es) : {run.rate:7.1f} messages/s  ({flags}; worker CPU "
            f"{run.worker_cpu * 1000 / max(run.messages, 1):.2f} ms/message, sink "
            f"{run.sink_cpu / run.wall:.0%} of a core, all cores {run.machine_busy:.0%} busy)"
        )
    if dkim_runs:
        off = dkim_runs["off"].rate
        print(
            "  DKIM signing (1 process): "
            + "; ".join(
                f"{setting} {run.rate:.1f} messages/s (x{run.rate / off:.2f}, worker CPU "
                f"{run.worker_cpu * 1000 / max(run.messages, 1):.2f} ms/message)"
                for setting, run in dkim_runs.items()
            )
        )
    if webhook_runs:
        off, on = webhook_runs["off"], webhook_runs["on"]
        p99 = webhook_lags[max(0, int(len(webhook_lags) * 0.99) - 1)] if webhook_lags else 0.0
        lag = (
            f"event lag from outcome to the receiver's 2xx p50 "
            f"{statistics.median(webhook_lags) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
            f"({len(webhook_lags)} events)"
            if webhook_lags
            else "no event arrived"
        )
        print(
            f"  webhooks (1 process): off {off.rate:.1f} messages/s, "
            f"on {on.rate:.1f} (x{on.rate / off.rate:.2f}, "
            f"worker CPU {on.worker_cpu * 1000 / max(on.messages, 1):.2f} ms/message); {lag}"
        )
    if bounce_runs:
        none, refused = bounce_runs["none"], bounce_runs["refused"]
        print(
            f"  bounces (1 process): all delivered {none.rate:.1f} messages/s; 1 in {args.refused_every} "
            f"refused {refused.rate:.1f} (x{refused.rate / none.rate:.2f}, worker CPU "
            f"{refused.worker_cpu * 1000 / max(refused.messages, 1):.2f} ms/message, "
            f"{bounce_count} notices sent)"
        )
    if len(claims) == 2:
        (small, (m1, p1, _)), (large, (m2, p2, _)) = sorted(claims.items())
        verdict = "flat" if m2 <= 1.5 * m1 + 0.5 else "NOT flat"
        print(
            f"  claim latency      : {small:,} rows median {m1:.2f} ms p99 {p1:.2f} ms; "
            f"{large:,} rows median {m2:.2f} ms p99 {p2:.2f} ms  ({verdict}, x{m2 / m1:.2f})"
        )
    if noisy_runs is not None:
        alone, together = noisy_runs
        throughput_ratio, p99_ratio = together.rate / alone.rate, together.p99 / alone.p99
        verdict = "met" if throughput_ratio >= 0.8 and p99_ratio <= 2.0 else "NOT met"
        print(
            f"  noisy neighbour    : B alone {alone.rate:.1f} messages/s p99 {alone.p99:.2f} s; with A "
            f"{together.rate:.1f} messages/s p99 {together.p99:.2f} s; throughput x{throughput_ratio:.2f} "
            f"(target >= 0.80), p99 x{p99_ratio:.2f} (target <= 2): {verdict}"
        )
    bad = [run for run in runs if run.duplicates or run.lost or run.unexpected]
    if bad:
        raise SystemExit("some messages were lost or duplicated (see above)")


if __name__ == "__main__":
    main()
