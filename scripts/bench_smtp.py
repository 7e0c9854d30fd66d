#!/usr/bin/env python3
"""Benchmark of the SMTP submission listener; prints its figures.

Run from the repository root after ./scripts/test has made the venv:

    .venv/bin/python scripts/bench_smtp.py [--seconds 10] [--clients 50] [--idle 5000]

It starts a throwaway PostgreSQL cluster (fsync on: commits are durable, as in
production) and `smtp-proxy serve smtp` on 127.0.0.1, then drives it with its
own load generator: several processes of client threads, each session
STARTTLS + AUTH PLAIN + messages of 10 KB, for a bounded time. Measured:

1. sessions/s and p50/p99 session latency, one message per session;
2. messages/s with ten messages per session;
3. AUTH with a cold credential cache (bcrypt cost 12 each time), and the
   latency of an already-verified account's sessions meanwhile;
4. the listener's RSS while it holds --idle idle connections, and the latency
   of new full sessions meanwhile; then the same with 2 x --idle (10,000 by
   default) held, counting errors. After each, all held connections close at
   once: the time until a new client gets its greeting, and until all their
   sessions have ended;
5. flood: --flood connections (2,000 by default) opened from 127.0.0.1, paced
   evenly over --seconds, each reading its greeting or 421 (a greeted one is
   held until the flood ends, anything else closed), on a listener with
   smtp.max_connections_per_ip 20, while a tenant sends one message per session
   from 127.0.0.2: its p99 session time during the flood against before and
   after (target: within 2x), and how many flood connections got 421;
6. limits: the one-message-per-session figure (sessions/s, and the listener's
   CPU per session) without sending limits, with limits high enough never to
   refuse on `limits.storage: memory://`, and on a throwaway redis-server
   (`redis://127.0.0.1:PORT`), each on a fresh listener, in --limits-rounds
   rounds (ABC, then CBA, to even out drift); the ratios to the figure without
   limits (target: within 5%), and how many messages Redis counted;
7. credentials: the one-message-per-session figure with the sessions spread over
   the own logins of 100 accounts, against 1,000 logins (ten credentials per
   account), in --limits-rounds interleaved rounds on fresh listeners (target:
   within 5%);
8. haproxy: the one-message-per-session figure through a real HAProxy
   (`send-proxy-v2`, connecting from BALANCER_ADDRESS, which the listener
   trusts in smtp.proxy_protocol_from) beside direct connections to the same
   listener, in --haproxy-rounds rounds (direct, proxied, then the reverse);
   the ratio, and the CPU per session of the listener and of HAProxy.

Phases 1-4 share one listener with smtp.max_connections_per_ip 0 (off): their
load comes from one address. Everything listens on 127.0.0.1 only, every loop is bounded in count and time,
and everything started is stopped by its pid.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import math
import multiprocessing
import os
import random
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchlib import (
    SmtpWire,
    cpu_seconds,
    cpu_split,
    migrated_database,
    process_tree,
    serve,
    stop,
)  # also puts the checkout on sys.path
from sqlalchemy import create_engine, insert, select

from smtp_proxy.config import config_from_dict
from smtp_proxy.crypto import generate_encryption_key
from smtp_proxy.db.models import Account
from smtp_proxy.db.session import Database
from smtp_proxy.devcert import write_self_signed
from smtp_proxy.storage import accounts, credentials
from smtp_proxy.storage.audit import CLI
from tests.haproxy import HAPROXY, Haproxy, relay
from tests.pgcluster import PgCluster, free_port

PASSWORD = "bench password 123"  # noqa: S105 - the throwaway bench tenant
# After the From: field: about 10 KB.
BODY = b"To: sink@example.net\r\nSubject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 130


class Client(SmtpWire):
    """A lean SMTP client: the commands a mailer sends, with PIPELINING for the envelope."""

    def __init__(
        self, port: int, context: ssl.SSLContext, user: str = "bench", source: str | None = None
    ) -> None:
        bind = (source, 0) if source else None
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=bind)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.expect(b"220")
        self.send(b"EHLO bench.test\r\n")
        self.expect(b"250")
        self.send(b"STARTTLS\r\n")
        self.expect(b"220")
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.send(b"EHLO bench.test\r\n")
        self.expect(b"250")
        token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
        self.send(b"AUTH PLAIN " + token + b"\r\n")
        self.expect(b"235")

    def message(self, sender: bytes = b"bench@example.com") -> None:
        self.send(b"MAIL FROM:<" + sender + b">\r\nRCPT TO:<sink@example.net>\r\nDATA\r\n")
        self.expect(b"250")
        self.expect(b"250")
        self.expect(b"354")
        self.send(b"From: " + sender + b"\r\n" + BODY + b".\r\n")
        self.expect(b"250")

    def quit(self) -> None:
        self.send(b"QUIT\r\n")
        self.expect(b"221")
        self.sock.close()


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _worker(
    port: int,
    threads: int,
    per_session: int,
    deadline: float,
    queue: multiprocessing.Queue,
    logins: list[tuple[str, str]] | None = None,
) -> None:
    """One load process: `threads` clients in a loop until the deadline; reports latencies.

    ``logins``: (user name, sender) pairs that the sessions take in turn; else the bench tenant's.
    """
    context = _client_context()
    latencies: list[float] = []
    errors: dict[str, int] = {}  # what went wrong (the exception, its first 80 characters) -> times
    lock = threading.Lock()
    logins = logins or [("bench", "bench@example.com")]
    turn = itertools.count(random.randrange(len(logins)))

    def loop() -> None:
        while time.time() < deadline:
            started = time.perf_counter()
            user, sender = logins[next(turn) % len(logins)]
            try:
                client = Client(port, context, user=user)
                for _ in range(per_session):
                    client.message(sender.encode())
                client.quit()
            except (OSError, RuntimeError, ConnectionError) as error:
                kind = f"{type(error).__name__}: {error}"[:80]
                with lock:
                    errors[kind] = errors.get(kind, 0) + 1
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    queue.put((latencies, errors))


def run_load(
    port: int, clients: int, per_session: int, seconds: float, logins: list[tuple[str, str]] | None = None
) -> dict[str, Any]:
    processes = min(4, clients)
    per_process = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    deadline = time.time() + seconds
    queue: multiprocessing.Queue = multiprocessing.Queue()
    started = time.perf_counter()
    workers = [
        multiprocessing.Process(target=_worker, args=(port, n, per_session, deadline, queue, logins))
        for n in per_process
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    elapsed = time.perf_counter() - started
    latencies = sorted(x for lats, _ in results for x in lats)
    kinds: dict[str, int] = {}
    for _, errors in results:
        for kind, count in errors.items():
            kinds[kind] = kinds.get(kind, 0) + count
    return {
        "sessions": len(latencies),
        "sessions_per_s": len(latencies) / elapsed,
        "messages_per_s": len(latencies) * per_session / elapsed,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan"),
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
    }


def pss_mib(pid: int) -> float:
    """Proportional set size summed over the listener's processes: pages they share count once."""
    total = 0
    for each in process_tree(pid):
        for line in Path(f"/proc/{each}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


def _status_field(pid: int, name: str) -> int:
    """A number from /proc/PID/status (VmRSS in KiB, Threads, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {name}")


def rss_mib(pid: int) -> float:
    return sum(_status_field(each, "VmRSS") for each in process_tree(pid)) / 1024


def thread_count(pid: int) -> int:
    return sum(_status_field(each, "Threads") for each in process_tree(pid))


def mass_close(port: int, pid: int, held: list[socket.socket], base_threads: int) -> dict[str, float]:
    """Close every held connection at once; time a new greeting and the end of their sessions."""
    for sock in held:
        sock.close()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        greeting = sock.recv(256)
    greeting_ms = (time.perf_counter() - started) * 1000
    if not greeting.startswith(b"220"):
        raise SystemExit(f"no greeting after the mass close: {greeting!r}")
    deadline = started + 60
    while thread_count(pid) > base_threads + 2 and time.perf_counter() < deadline:
        time.sleep(0.02)
    return {"greeting_ms": greeting_ms, "ended_s": time.perf_counter() - started}


def hold_idle(port: int, count: int, seconds: float = 60) -> tuple[list[socket.socket], int]:
    """Open `count` connections that read the greeting and then say nothing."""
    held, errors, kinds = [], 0, {}
    deadline = time.time() + seconds
    for _ in range(count):
        if time.time() > deadline:
            break
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            greeting = sock.recv(256)
            if not greeting.startswith(b"220"):
                errors += 1
                kinds[repr(greeting[:40])] = kinds.get(repr(greeting[:40]), 0) + 1
            held.append(sock)
        except OSError as error:
            errors += 1
            kinds[repr(error)] = kinds.get(repr(error), 0) + 1
    if kinds:
        print(f"  errors while opening idle connections: {kinds}", file=sys.stderr)
    return held, errors


def sessions_meanwhile(port: int, count: int) -> dict[str, float]:
    context = _client_context()
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        client = Client(port, context)
        client.message()
        client.quit()
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def add_cold_accounts(url: str, count: int) -> None:
    """Accounts sharing the bench password hash: each one's first AUTH pays a bcrypt check."""
    engine = create_engine(url)
    table = Account.__table__
    with engine.begin() as connection:
        row = connection.execute(select(table).where(table.c.name == "bench")).one()._asdict()
        rows = [
            {**row, "id": uuid.uuid4(), "name": f"cold-{n}", "api_key_digest": uuid.uuid4().hex * 2}
            for n in range(count)
        ]
        connection.execute(insert(table), rows)
    engine.dispose()


def cold_auth(port: int, accounts: int, seconds: float) -> dict[str, float]:
    """Logins with a cold cache (each account once, 10 at a time) beside a verified account's sessions."""
    context = _client_context()
    names = iter(f"cold-{n}" for n in range(accounts))
    lock = threading.Lock()
    done, warm = [0], []
    deadline = time.time() + seconds

    def cold() -> None:
        while time.time() < deadline:
            with lock:
                name = next(names, None)
            if name is None:
                return
            Client(port, context, user=name).quit()
            with lock:
                done[0] += 1

    def verified() -> None:
        while time.time() < deadline:
            started = time.perf_counter()
            client = Client(port, context)
            client.message()
            client.quit()
            warm.append(time.perf_counter() - started)

    threads = [threading.Thread(target=cold) for _ in range(10)] + [threading.Thread(target=verified)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    warm.sort()
    return {
        "auth_per_s": done[0] / (time.perf_counter() - started),
        "warm_p50_ms": statistics.median(warm) * 1000,
        "warm_p99_ms": warm[int(len(warm) * 0.99) - 1] * 1000,
    }


# --- flood and limits -----------------------------------------------------------------------------

TENANT_ADDRESS = "127.0.0.2"  # Linux routes all of 127.0.0.0/8 to lo
FLOOD_ADDRESS = "127.0.0.1"
HIGH_LIMITS = {  # never reached in a bench run: the limits are checked and counted, never refuse
    "messages_per_minute": 1_000_000,
    "messages_per_hour": 100_000_000,
    "messages_per_day": 1_000_000_000,
    "recipients_per_day": 1_000_000_000,
}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of values (any order); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(len(ordered) * q + 0.999999) - 1))]


def ratio(value: float, base: float) -> float:
    return value / base if base and not math.isnan(base) else float("nan")


def tenant_sessions(port: int, seconds: float, max_sessions: int = 100_000) -> tuple[list[float], int]:
    """One client from TENANT_ADDRESS, one message per session, back to back for `seconds`."""
    context = _client_context()
    latencies: list[float] = []
    errors = 0
    deadline = time.time() + seconds
    while time.time() < deadline and len(latencies) + errors < max_sessions:
        started = time.perf_counter()
        try:
            client = Client(port, context, source=TENANT_ADDRESS)
            client.message()
            client.quit()
        except (OSError, RuntimeError, ConnectionError):
            errors += 1
            time.sleep(0.01)
            continue
        latencies.append(time.perf_counter() - started)
    return latencies, errors


class Flood:
    """`count` connections from FLOOD_ADDRESS, paced evenly over `seconds` by a few threads.

    Each reads the first line it gets: a 220 is held until ``close()``, a 421 or anything else
    is closed at once. Bounded: `count` connections at most, none started after the deadline,
    10 s timeouts on connect and read.
    """

    def __init__(self, port: int, count: int, seconds: float, threads: int = 8) -> None:
        self.port, self.count, self.seconds = port, count, seconds
        self.lock = threading.Lock()
        self.slots = iter(range(count))
        self.held: list[socket.socket] = []
        self.closed = False
        self.outcomes = {"220": 0, "421": 0, "other": 0, "error": 0}
        self.kinds: dict[str, int] = {}
        self.started = time.perf_counter()
        self.finished = self.started
        self.threads = [threading.Thread(target=self._open, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _note(self, outcome: str, kind: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if kind is not None:
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.finished = time.perf_counter()

    def _open(self) -> None:
        interval = self.seconds / max(self.count, 1)
        while True:
            with self.lock:
                slot = next(self.slots, None)
            if slot is None:
                return
            due = self.started + slot * interval
            if due > self.started + self.seconds:
                return
            time.sleep(max(0.0, due - time.perf_counter()))
            try:
                sock = socket.create_connection(
                    ("127.0.0.1", self.port), timeout=10, source_address=(FLOOD_ADDRESS, 0)
                )
            except OSError as error:
                self._note("error", type(error).__name__)
                continue
            try:
                line = sock.recv(256)
            except OSError as error:
                sock.close()
                self._note("error", type(error).__name__)
                continue
            if line.startswith(b"220"):
                with self.lock:
                    late = self.closed
                    if not late:
                        self.held.append(sock)
                if late:  # an opener that outlived close(): nothing is left open
                    sock.close()
                self._note("220")
            else:
                sock.close()
                self._note("421" if line.startswith(b"421") else "other", repr(line[:40]))

    def close(self) -> dict[str, object]:
        """Wait for the openers (bounded), close every held connection; what the flood saw."""
        for thread in self.threads:
            thread.join(timeout=max(1.0, self.seconds + 30 - (time.perf_counter() - self.started)))
        with self.lock:
            held, self.held, self.closed = self.held, [], True
            result = {**self.outcomes, "opened_s": self.finished - self.started, "kinds": dict(self.kinds)}
        for sock in held:
            sock.close()
        return result


def wait_for_threads(pid: int, target: int, seconds: float = 30) -> None:
    """Until the listener is back to about `target` threads (its sessions ended), bounded."""
    deadline = time.time() + seconds
    while thread_count(pid) > target + 2 and time.time() < deadline:
        time.sleep(0.05)


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server on 127.0.0.1 (no persistence), once it answers PING."""
    import redis

    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is missing (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
        + ["--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.time() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return process, url
        except redis.ConnectionError:
            if time.time() > deadline or process.poll() is not None:
                stop_redis(process)
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)


def stop_redis(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def redis_counted(url: str) -> int:
    """Messages counted in Redis so far: the sum of every account's messages_per_day counters."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    total = 0
    for n, key in enumerate(client.scan_iter(match="*smtp-proxy/send/*/messages_per_day/*", count=1000)):
        if n >= 100_000:
            break
        total += int(client.get(key) or 0)
    client.close()
    return total


BASE_PHASES = ("one", "ten", "cold", "idle")
PHASES = (*BASE_PHASES, "flood", "limits", "processes", "credentials", "haproxy")
CREDENTIAL_ACCOUNTS = 100
CREDENTIALS_PER_ACCOUNT = 10
# The balancer's connections come from here, the load generator's direct ones from 127.0.0.1.
BALANCER_ADDRESS = "127.0.0.3"


class Bench:
    """The database, TLS files and key every listener of the run shares; writes configs, starts listeners."""

    def __init__(
        self, workdir: Path, url: str, listener: str, max_connections: int, processes: int = 1
    ) -> None:
        self.workdir, self.url, self.listener = workdir, url, listener
        self.processes = processes
        self.max_connections = max_connections
        self.cert, self.key = write_self_signed(workdir / "tls", "localhost")
        self.encryption_key = generate_encryption_key()
        self.configs = 0

    def config(
        self,
        port: int,
        per_ip: int,
        limits: dict[str, object] | None = None,
        processes: int | None = None,
        smtp: dict[str, object] | None = None,
    ) -> Path:
        self.configs += 1
        processes = processes or self.processes
        path = self.workdir / f"config-{self.configs}.yaml"
        text = f"""
smtp:
  host: 127.0.0.1
  port: {port}
  hostname: bench.test
  max_connections: {self.max_connections}
  max_connections_per_account: {self.max_connections}
  max_connections_per_ip: {per_ip}
  read_timeout: 5m
  metrics_port: null
  processes: {processes}
{"".join(f"  {name}: {value}" + chr(10) for name, value in (smtp or {}).items())}database:
  url: {self.url}
  pool_min: 20
  pool_max: 100
logging:
  level: info
tls:
  cert_file: {self.cert}
  key_file: {self.key}
security:
  encryption_key: {self.encryption_key}
  bcrypt_cost: 12
"""
        if limits is not None:
            text += "limits:\n" + "".join(f"  {name}: {value}\n" for name, value in limits.items())
        if self.listener == "all":
            # The bench tenant has no routing rule: the worker fails each message at once, a
            # claim and an outcome per message beside the listener, as a small install runs.
            text += (
                f"api:\n  host: 127.0.0.1\n  port: {free_port()}\n  processes: {processes}\n"
                "delivery:\n  metrics_port: null\n"
            )
        path.write_text(text)
        return path

    def start(
        self,
        per_ip: int,
        limits: dict[str, object] | None = None,
        processes: int | None = None,
        smtp: dict[str, object] | None = None,
    ) -> tuple[subprocess.Popen, int]:
        """A listener on a free port, each process's credential cache warmed by logins."""
        port = free_port()
        process = serve(self.listener, self.config(port, per_ip, limits, processes, smtp), port)
        try:
            # Connections go to whichever process accepts first: enough logins to reach each.
            for _ in range(4 * (processes or self.processes)):
                Client(port, _client_context()).quit()
        except BaseException:
            stop(process)
            raise
        return process, port


def base_phases(args: argparse.Namespace, phases: set[str], port: int, pid: int) -> None:
    """Phases 1-4, on the shared listener."""
    if "one" in phases:
        cpu = cpu_seconds(pid)
        one = run_load(port, args.clients, 1, args.seconds)
        used = cpu_seconds(pid) - cpu
        print(
            f"1 message/session : {one['sessions_per_s']:7.1f} sessions/s   "
            f"p50 {one['p50_ms']:6.1f} ms   p99 {one['p99_ms']:6.1f} ms   "
            f"({one['sessions']} sessions, {one['errors']} errors; "
            f"listener CPU {used * 1000 / max(one['sessions'], 1):.2f} ms/session)"
        )
    if "ten" in phases:
        cpu = cpu_seconds(pid)
        ten = run_load(port, args.clients, 10, args.seconds)
        used = cpu_seconds(pid) - cpu
        print(
            f"10 messages/session: {ten['messages_per_s']:7.1f} messages/s  "
            f"p50 {ten['p50_ms']:6.1f} ms   p99 {ten['p99_ms']:6.1f} ms   "
            f"({ten['sessions']} sessions, {ten['errors']} errors; "
            f"listener CPU {used * 1000 / max(ten['sessions'] * 10, 1):.2f} ms/message)"
        )
    if "cold" in phases:
        cold = cold_auth(port, 2000, args.seconds)
        print(
            f"cold-cache AUTH    : {cold['auth_per_s']:7.1f} logins/s (bcrypt cost 12); a verified "
            f"account's sessions meanwhile p50 {cold['warm_p50_ms']:.1f} ms  "
            f"p99 {cold['warm_p99_ms']:.1f} ms"
        )
    if "idle" in phases:
        base_rss, base_threads = rss_mib(pid), thread_count(pid)
        for count in (args.idle, 2 * args.idle):
            held, errors = hold_idle(port, count)
            time.sleep(1)
            rss, pss = rss_mib(pid), pss_mib(pid)
            meanwhile = sessions_meanwhile(port, 100)
            print(
                f"{len(held):5d} idle held  : RSS {rss:6.1f} MiB (was {base_rss:.1f}), PSS {pss:6.1f} MiB "
                f"over {len(process_tree(pid))} processes   new session "
                f"meanwhile p50 {meanwhile['p50_ms']:5.1f} ms  p99 {meanwhile['p99_ms']:5.1f} ms"
                f"   ({errors} errors)"
            )
            closed = mass_close(port, pid, held, base_threads)
            print(
                f"{len(held):5d} closed at once: a new client's greeting after "
                f"{closed['greeting_ms']:.0f} ms; all their sessions ended after "
                f"{closed['ended_s']:.2f} s"
            )
            time.sleep(1)


def flood_phase(bench: Bench, args: argparse.Namespace, per_ip: int = 20) -> None:
    """The tenant's p99 from TENANT_ADDRESS before, during and after a flood from FLOOD_ADDRESS."""
    listener, port = bench.start(per_ip)
    try:
        tenant_sessions(port, 1.0)  # warm-up (the database pool, the code paths), not counted
        base_threads = thread_count(listener.pid)
        before, before_errors = tenant_sessions(port, args.seconds)
        flood = Flood(port, args.flood, args.seconds)
        try:
            during, during_errors = tenant_sessions(port, args.seconds)
        finally:
            seen = flood.close()
        wait_for_threads(listener.pid, base_threads)
        after, after_errors = tenant_sessions(port, args.seconds)
    finally:
        stop(listener)
    baseline = before + after
    during_ratio = ratio(percentile(during, 0.99), percentile(baseline, 0.99))
    print(
        f"flood              : {args.flood} connections from {FLOOD_ADDRESS} over {args.seconds:.0f} s "
        f"(smtp.max_connections_per_ip {per_ip}): {seen['421']} got 421, {seen['220']} greeted and held, "
        f"{seen['other']} other, {seen['error']} errors; last answer after {seen['opened_s']:.1f} s"
    )
    if seen["kinds"]:
        print(f"  flood replies other than 220: {seen['kinds']}")
    if not seen["421"]:
        print("  no 421 at all: this listener does not cap connections per client address (yet)")

    def p(values: list[float], q: float = 0.99) -> str:
        return f"{percentile(values, q) * 1000:.1f} ms"

    print(
        f"  tenant from {TENANT_ADDRESS}, 1 message/session, p99: before {p(before)} "
        f"({len(before)} sessions, {before_errors} errors), during {p(during)} "
        f"({len(during)}, {during_errors} errors), after {p(after)} ({len(after)}, {after_errors} errors)"
    )
    verdict = "met" if during_ratio <= 2 else "NOT met"
    print(
        f"  p99 during / p99 without the flood (before and after pooled): {during_ratio:.2f}x "
        f"(target <= 2x: {verdict}); p50 {p(baseline, 0.5)} -> {p(during, 0.5)}"
    )


def limits_phase(bench: Bench, args: argparse.Namespace) -> None:
    """One message per session without limits, with memory:// and with redis:// limits, interleaved."""
    redis_process, redis_url = start_redis(bench.workdir)
    variants: dict[str, dict[str, object] | None] = {
        "none": None,
        "memory": {"storage": "memory://", **HIGH_LIMITS},
        "redis": {"storage": redis_url, **HIGH_LIMITS},
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    try:
        for round_ in range(args.limits_rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in order:
                listener, port = bench.start(0, variants[name])
                try:
                    run_load(port, args.clients, 1, min(2.0, args.seconds / 4))  # warm-up, not counted
                    counted = redis_counted(redis_url)
                    cpu = cpu_seconds(listener.pid)
                    result = run_load(port, args.clients, 1, args.seconds)
                    result["cpu_ms"] = (cpu_seconds(listener.pid) - cpu) * 1000 / max(result["sessions"], 1)
                finally:
                    stop(listener)
                result["redis_counted"] = redis_counted(redis_url) - counted
                runs[name].append(result)
                print(
                    f"  limits round {round_ + 1} {name:6s}: {result['sessions_per_s']:7.1f} sessions/s  "
                    f"p99 {result['p99_ms']:6.1f} ms  listener CPU {result['cpu_ms']:.2f} ms/session  "
                    f"({result['sessions']} sessions, {result['errors']} errors, "
                    f"{result['redis_counted']:.0f} counted in Redis)"
                )
                if result["error_kinds"]:
                    worst = sorted(result["error_kinds"].items(), key=lambda item: -item[1])[:3]
                    print(f"    errors: {'; '.join(f'{count} x {kind}' for kind, count in worst)}")
    finally:
        stop_redis(redis_process)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(run[key] for run in runs[name])

    print(
        f"limits (1 message/session, {args.clients} clients, {args.limits_rounds} x {args.seconds:.0f} s "
        "per variant, each on a fresh listener; ratios to no limits, target >= 0.95 for sessions/s):"
    )
    for name in variants:
        sent = sum(run["sessions"] for run in runs[name])
        counted = sum(run["redis_counted"] for run in runs[name])
        rate, cpu = mean(name, "sessions_per_s"), mean(name, "cpu_ms")
        rate_ratio = ratio(rate, mean("none", "sessions_per_s"))
        cpu_ratio = ratio(cpu, mean("none", "cpu_ms"))
        note = f"; Redis counted {counted:.0f} of {sent} messages" if name == "redis" else ""
        print(
            f"  {name:6s}: {rate:7.1f} sessions/s ({rate_ratio:.3f}x)   listener CPU {cpu:.2f} ms/session "
            f"({cpu_ratio:.3f}x)   p99 {mean(name, 'p99_ms'):.1f} ms{note}"
        )
    if not sum(run["redis_counted"] for run in runs["redis"]):
        print("  Redis counted nothing: this listener does not apply sending limits (yet)")


def add_credential_accounts(url: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """CREDENTIAL_ACCOUNTS accounts of CREDENTIALS_PER_ACCOUNT credentials each (bcrypt cost 4, so
    that warming every credential's cache entry takes seconds); returns the (user, sender) pairs of
    the accounts' own logins, and of every credential."""
    database = Database(config_from_dict({"database": {"url": url}}, env={}).database)
    own: list[tuple[str, str]] = []
    every: list[tuple[str, str]] = []
    with database.transaction() as session:
        for n in range(CREDENTIAL_ACCOUNTS):
            name, domain = f"cred-{n}", f"c{n}.bench.test"
            account = accounts.create_account(
                session,
                name=name,
                email=f"ops@{domain}",
                allowed_domains=[domain],
                password=PASSWORD,
                bcrypt_cost=4,
                actor=CLI,
            ).account
            own.append((name, f"app@{domain}"))
            every.append((name, f"app@{domain}"))
            for label in range(1, CREDENTIALS_PER_ACCOUNT):
                created = credentials.create_credential(
                    session, account, label=f"device-{label}", password=PASSWORD, bcrypt_cost=4, actor=CLI
                )
                every.append((created.credential.username, f"app@{domain}"))
    database.dispose()
    return own, every


def warm_logins(port: int, logins: list[tuple[str, str]], threads: int = 10) -> None:
    """Log in once with each user name, ``threads`` at a time."""
    context = _client_context()
    pending = iter(logins)
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                login = next(pending, None)
            if login is None:
                return
            Client(port, context, user=login[0]).quit()

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def credentials_phase(bench: Bench, args: argparse.Namespace) -> None:
    """One message per session spread over 100 logins (each account's own) against 1,000 (ten
    credentials per account), interleaved rounds on fresh listeners; target: within 5%."""
    own, every = add_credential_accounts(bench.url)
    variants = {f"{len(own)} logins": own, f"{len(every)} logins": every}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for round_ in range(args.limits_rounds):
        for name in variants if round_ % 2 == 0 else list(reversed(variants)):
            # Every login's first AUTH is a bcrypt check counted by the AUTH throttle until it
            # succeeds: 50 clients from one address would otherwise trip its per-address count.
            listener, port = bench.start(0, smtp={"auth_failures_per_ip": 100_000})
            try:
                # Warm-up, not counted: every login's first AUTH pays its bcrypt check (and writes
                # its last_used_at), as it would once in a long-running listener's life.
                warm_logins(port, variants[name])
                run_load(port, args.clients, 1, min(3.0, args.seconds / 3), variants[name])
                cpu = cpu_seconds(listener.pid)
                result = run_load(port, args.clients, 1, args.seconds, variants[name])
                result["cpu_ms"] = (cpu_seconds(listener.pid) - cpu) * 1000 / max(result["sessions"], 1)
            finally:
                stop(listener)
            runs[name].append(result)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(run[key] for run in runs[name])

    base = next(iter(variants))
    print(
        f"credentials (1 message/session, {args.clients} clients, {args.limits_rounds} x "
        f"{args.seconds:.0f} s per variant, each on a fresh listener; {CREDENTIAL_ACCOUNTS} accounts; "
        "target >= 0.95 for sessions/s):"
    )
    for name in variants:
        rate, cpu = mean(name, "sessions_per_s"), mean(name, "cpu_ms")
        errors = sum(run["errors"] for run in runs[name])
        print(
            f"  {name:12s}: {rate:7.1f} sessions/s ({ratio(rate, mean(base, 'sessions_per_s')):.3f}x)   "
            f"listener CPU {cpu:.2f} ms/session ({ratio(cpu, mean(base, 'cpu_ms')):.3f}x)   "
            f"p99 {mean(name, 'p99_ms'):.1f} ms   ({errors} errors)"
        )
        kinds: dict[str, int] = {}
        for run in runs[name]:
            for kind, count in run["error_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + count
        if kinds:
            worst = sorted(kinds.items(), key=lambda item: -item[1])[:3]
            print(f"    errors: {'; '.join(f'{count} x {kind}' for kind, count in worst)}")


def processes_phase(bench: Bench, cluster: PgCluster, args: argparse.Namespace) -> None:
    """Phases 1 and 2 on a fresh listener per process count, in rounds (1 2 4, then 4 2 1).

    Beside the listener's CPU per session it measures where the rest of the machine went: the load
    generator, PostgreSQL and what stayed idle. On a machine the generator shares, the listener's
    share of a saturated machine bounds what more processes can gain.
    """
    counts = [int(n) for n in args.process_counts.split(",")]
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for round_ in range(args.process_rounds):
        for count in counts if round_ % 2 == 0 else list(reversed(counts)):
            listener, port = bench.start(0, processes=count)
            try:
                before = cpu_split(listener.pid, cluster)
                one = run_load(port, args.clients, 1, args.seconds)
                middle = cpu_split(listener.pid, cluster)
                ten = run_load(port, args.clients, 10, args.seconds)
                after = cpu_split(listener.pid, cluster)
            finally:
                stop(listener)
            sessions, messages = max(one["sessions"], 1), max(ten["sessions"] * 10, 1)
            split = {key: (middle[key] - before[key]) * 1000 / sessions for key in before}
            runs[count].append(
                {
                    "sessions_per_s": one["sessions_per_s"],
                    "session_cpu_ms": split["server"],
                    "generator_ms": split["generator"],
                    "postgres_ms": split["postgres"],
                    "idle_ms": split["idle"],
                    "messages_per_s": ten["messages_per_s"],
                    "message_cpu_ms": (after["server"] - middle["server"]) * 1000 / messages,
                    "errors": one["errors"] + ten["errors"],
                }
            )

    def mean(count: int, key: str) -> float:
        return statistics.fmean(run[key] for run in runs[count])

    base = counts[0]
    print(
        f"processes (smtp.processes; {args.clients} clients, {args.process_rounds} x {args.seconds:.0f} s "
        "per figure, each count on a fresh listener; CPU summed over the listener's processes):"
    )
    print("  processes  sessions/s (ratio)   CPU/session   messages/s (ratio)   CPU/message   errors")
    for count in counts:
        sessions, messages = mean(count, "sessions_per_s"), mean(count, "messages_per_s")
        session_ratio = ratio(sessions, mean(base, "sessions_per_s"))
        message_ratio = ratio(messages, mean(base, "messages_per_s"))
        print(
            f"  {count:9d}  {sessions:10.1f} ({session_ratio:.2f}x)"
            f"   {mean(count, 'session_cpu_ms'):8.2f} ms   {messages:10.1f} ({message_ratio:.2f}x)"
            f"   {mean(count, 'message_cpu_ms'):8.2f} ms   {sum(run['errors'] for run in runs[count]):.0f}"
        )
    print("  where the machine's CPU went per session, one message per session (ms of one core):")
    print("  processes   listener   generator   PostgreSQL   other   idle")
    for count in counts:
        listener, generator = mean(count, "session_cpu_ms"), mean(count, "generator_ms")
        postgres, idle = mean(count, "postgres_ms"), mean(count, "idle_ms")
        whole = os.cpu_count() * 1000 / mean(count, "sessions_per_s")
        other = whole - listener - generator - postgres - idle
        print(
            f"  {count:9d}   {listener:8.2f}   {generator:9.2f}   {postgres:10.2f}"
            f"   {other:5.2f}   {idle:4.2f}"
        )


def haproxy_phase(bench: Bench, args: argparse.Namespace) -> None:
    """One message per session, direct and through HAProxy with send-proxy-v2, on one listener."""
    if not Path(HAPROXY).exists():
        print("haproxy            : not installed (./scripts/test installs Debian's haproxy); skipped")
        return
    listener, port = bench.start(0, smtp={"proxy_protocol_from": f"[{BALANCER_ADDRESS}/32]"})
    haproxy = None
    try:
        front = free_port()
        haproxy = Haproxy(
            bench.workdir / "haproxy", relay(front, port, send=f"send-proxy-v2 source {BALANCER_ADDRESS}")
        )
        targets = {"direct": port, "haproxy": front}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        run_load(front, args.clients, 1, min(2.0, args.seconds / 4))  # warm-up, not counted
        for round_ in range(args.haproxy_rounds):
            for name in targets if round_ % 2 == 0 else list(reversed(targets)):
                cpu, balancer_cpu = cpu_seconds(listener.pid), cpu_seconds(haproxy.process.pid)
                result = run_load(targets[name], args.clients, 1, args.seconds)
                sessions = max(result["sessions"], 1)
                result["cpu_ms"] = (cpu_seconds(listener.pid) - cpu) * 1000 / sessions
                result["haproxy_cpu_ms"] = (cpu_seconds(haproxy.process.pid) - balancer_cpu) * 1000 / sessions
                runs[name].append(result)
                print(
                    f"  haproxy round {round_ + 1} {name:7s}: {result['sessions_per_s']:7.1f} sessions/s  "
                    f"p99 {result['p99_ms']:6.1f} ms  listener CPU {result['cpu_ms']:.2f} ms/session  "
                    f"({result['sessions']} sessions, {result['errors']} errors)"
                )
    finally:
        if haproxy is not None:
            haproxy.stop()
        stop(listener)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(run[key] for run in runs[name])

    direct, proxied = mean("direct", "sessions_per_s"), mean("haproxy", "sessions_per_s")
    print(
        f"haproxy (1 message/session, {args.clients} clients, {args.haproxy_rounds} x {args.seconds:.0f} s "
        f"each, one listener trusting {BALANCER_ADDRESS}): direct {direct:.1f} sessions/s "
        f"(p99 {mean('direct', 'p99_ms'):.1f} ms), through HAProxy send-proxy-v2 {proxied:.1f} sessions/s "
        f"(p99 {mean('haproxy', 'p99_ms'):.1f} ms): {ratio(proxied, direct):.2f}x; listener CPU "
        f"{mean('direct', 'cpu_ms'):.2f} -> {mean('haproxy', 'cpu_ms'):.2f} ms/session, HAProxy "
        f"{mean('haproxy', 'haproxy_cpu_ms'):.2f} ms/session"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--idle", type=int, default=5000, help="idle connections to hold")
    parser.add_argument("--flood", type=int, default=2000, help="connections the flood phase opens")
    parser.add_argument(
        "--limits-rounds",
        type=int,
        default=2,
        help="rounds of the limits phase's three variants and of the credentials phase's two",
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="smtp.processes of the listener of phases 1-5 (default 1)"
    )
    parser.add_argument(
        "--process-counts", default="1,2", help="the processes phase's smtp.processes values (default 1,2)"
    )
    parser.add_argument("--process-rounds", type=int, default=2, help="rounds of the processes phase")
    parser.add_argument("--haproxy-rounds", type=int, default=2, help="rounds of the haproxy phase")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} to run (default: all, in that order)",
    )
    parser.add_argument(
        "--listener",
        choices=("smtp", "all"),
        default="smtp",
        help="`serve smtp` (default), or `serve all`: the API and the worker in the same process",
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if not phases or not phases <= set(PHASES):
        parser.error(f"--phases takes a comma-separated subset of {','.join(PHASES)}")
    if (
        not 1 <= args.flood <= 10_000
        or not 1 <= args.limits_rounds <= 10
        or not 1 <= args.haproxy_rounds <= 10
    ):
        parser.error("--flood takes 1 to 10000, --limits-rounds and --haproxy-rounds 1 to 10")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the listener too
    if hard < 2 * args.idle + 1000:
        print(f"note: open-file limit {hard} caps the idle test", file=sys.stderr)

    cluster = PgCluster.start(durable=True)
    listener = None
    workdir = Path(tempfile.mkdtemp(prefix="smtp-proxy-bench-"))
    try:
        url = migrated_database(cluster)
        database = Database(config_from_dict({"database": {"url": url}}, env={}).database)
        with database.transaction() as session:
            accounts.create_account(
                session,
                name="bench",
                email="bench@example.com",
                allowed_domains=["example.com"],
                password=PASSWORD,
                bcrypt_cost=12,
                actor=CLI,
            )
        database.dispose()
        if "cold" in phases:
            add_cold_accounts(url, 2000)
        bench = Bench(workdir, url, args.listener, max(2 * args.idle, args.flood) + 500, args.processes)

        cores, phase = os.cpu_count(), f"{args.seconds:.0f} s"
        title = f"smtp-proxy SMTP benchmark (serve {args.listener})"
        print(f"{title}: {cores} cores, {args.clients} clients, {phase} phases")
        if phases & set(BASE_PHASES):
            # One client address drives these phases: no per-address cap.
            listener, port = bench.start(0)
            base_phases(args, phases, port, listener.pid)
            stop(listener)
            listener = None
        if "flood" in phases:
            flood_phase(bench, args)
        if "limits" in phases:
            limits_phase(bench, args)
        if "processes" in phases:
            processes_phase(bench, cluster, args)
        if "credentials" in phases:
            credentials_phase(bench, args)
        if "haproxy" in phases:
            haproxy_phase(bench, args)
    finally:
        stop(listener)
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
