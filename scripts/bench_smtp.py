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
   sessions have ended.

Everything listens on 127.0.0.1 only, every loop is bounded in count and time,
and everything started is stopped by its pid.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from benchlib import migrated_database, serve, stop  # also puts the checkout on sys.path
from sqlalchemy import create_engine, insert, select

from smtp_proxy.config import config_from_dict
from smtp_proxy.crypto import generate_encryption_key
from smtp_proxy.db.models import Account
from smtp_proxy.db.session import Database
from smtp_proxy.devcert import write_self_signed
from smtp_proxy.storage import accounts
from tests.pgcluster import PgCluster, free_port

PASSWORD = "bench password 123"  # noqa: S105 - the throwaway bench tenant
BODY = (
    b"From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 130
)  # about 10 KB


class Client:
    """A lean SMTP client: the commands a mailer sends, with PIPELINING for the envelope."""

    def __init__(self, port: int, context: ssl.SSLContext, user: str = "bench") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
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

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def expect(self, code: bytes) -> None:
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buffer += chunk
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            if line[3:4] != b"-":
                if not line.startswith(code):
                    raise RuntimeError(f"expected {code!r}, got {line!r}")
                return

    def message(self) -> None:
        self.send(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.net>\r\nDATA\r\n")
        self.expect(b"250")
        self.expect(b"250")
        self.expect(b"354")
        self.send(BODY + b".\r\n")
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


def _worker(port: int, threads: int, per_session: int, deadline: float, queue: multiprocessing.Queue) -> None:
    """One load process: `threads` clients in a loop until the deadline; reports latencies."""
    context = _client_context()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def loop() -> None:
        while time.time() < deadline:
            started = time.perf_counter()
            try:
                client = Client(port, context)
                for _ in range(per_session):
                    client.message()
                client.quit()
            except (OSError, RuntimeError, ConnectionError):
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    queue.put((latencies, errors[0]))


def run_load(port: int, clients: int, per_session: int, seconds: float) -> dict[str, float]:
    processes = min(4, clients)
    per_process = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    deadline = time.time() + seconds
    queue: multiprocessing.Queue = multiprocessing.Queue()
    started = time.perf_counter()
    workers = [
        multiprocessing.Process(target=_worker, args=(port, n, per_session, deadline, queue))
        for n in per_process
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    elapsed = time.perf_counter() - started
    latencies = sorted(x for lats, _ in results for x in lats)
    errors = sum(e for _, e in results)
    return {
        "sessions": len(latencies),
        "sessions_per_s": len(latencies) / elapsed,
        "messages_per_s": len(latencies) * per_session / elapsed,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan"),
        "errors": errors,
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_field(pid: int, name: str) -> int:
    """A number from /proc/PID/status (VmRSS in KiB, Threads, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {name}")


def rss_mib(pid: int) -> float:
    return _status_field(pid, "VmRSS") / 1024


def thread_count(pid: int) -> int:
    return _status_field(pid, "Threads")


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--idle", type=int, default=5000, help="idle connections to hold")
    parser.add_argument(
        "--phases",
        default="one,ten,cold,idle",
        help="comma-separated subset of one,ten,cold,idle to run (default: all, in that order)",
    )
    parser.add_argument(
        "--listener",
        choices=("smtp", "all"),
        default="smtp",
        help="`serve smtp` (default), or `serve all`: the API and the worker in the same process",
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if not phases or not phases <= {"one", "ten", "cold", "idle"}:
        parser.error("--phases takes a comma-separated subset of one,ten,cold,idle")

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
            )
        database.dispose()
        add_cold_accounts(url, 2000)
        cert, key = write_self_signed(workdir / "tls", "localhost")
        port = free_port()
        config = workdir / "config.yaml"
        config.write_text(
            f"""
smtp:
  host: 127.0.0.1
  port: {port}
  hostname: bench.test
  max_connections: {2 * args.idle + 500}
  max_connections_per_account: {2 * args.idle + 500}
  read_timeout: 5m
  metrics_port: null
database:
  url: {url}
  pool_min: 20
  pool_max: 100
logging:
  level: info
tls:
  cert_file: {cert}
  key_file: {key}
security:
  encryption_key: {generate_encryption_key()}
  bcrypt_cost: 12
"""
        )
        if args.listener == "all":
            # The bench tenant has no routing rule: the worker fails each message at once, a
            # claim and an outcome per message beside the listener, as a small install runs.
            with config.open("a") as extra:
                extra.write(
                    f"api:\n  host: 127.0.0.1\n  port: {free_port()}\ndelivery:\n  metrics_port: null\n"
                )
        listener = serve(args.listener, config, port)
        # Warm the credential cache: one bcrypt check, as a legacy mailer's first login would pay.
        Client(port, _client_context()).quit()

        cores, phase = os.cpu_count(), f"{args.seconds:.0f} s"
        title = f"smtp-proxy SMTP benchmark (serve {args.listener})"
        print(f"{title}: {cores} cores, {args.clients} clients, {phase} phases")
        if "one" in phases:
            cpu = cpu_seconds(listener.pid)
            one = run_load(port, args.clients, 1, args.seconds)
            used = cpu_seconds(listener.pid) - cpu
            print(
                f"1 message/session : {one['sessions_per_s']:7.1f} sessions/s   "
                f"p50 {one['p50_ms']:6.1f} ms   p99 {one['p99_ms']:6.1f} ms   "
                f"({one['sessions']} sessions, {one['errors']} errors; "
                f"listener CPU {used * 1000 / max(one['sessions'], 1):.2f} ms/session)"
            )
        if "ten" in phases:
            cpu = cpu_seconds(listener.pid)
            ten = run_load(port, args.clients, 10, args.seconds)
            used = cpu_seconds(listener.pid) - cpu
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
            base_rss, base_threads = rss_mib(listener.pid), thread_count(listener.pid)
            for count in (args.idle, 2 * args.idle):
                held, errors = hold_idle(port, count)
                time.sleep(1)
                rss = rss_mib(listener.pid)
                meanwhile = sessions_meanwhile(port, 100)
                print(
                    f"{len(held):5d} idle held  : RSS {rss:6.1f} MiB (was {base_rss:.1f})   new session "
                    f"meanwhile p50 {meanwhile['p50_ms']:5.1f} ms  p99 {meanwhile['p99_ms']:5.1f} ms"
                    f"   ({errors} errors)"
                )
                closed = mass_close(port, listener.pid, held, base_threads)
                print(
                    f"{len(held):5d} closed at once: a new client's greeting after "
                    f"{closed['greeting_ms']:.0f} ms; all their sessions ended after "
                    f"{closed['ended_s']:.2f} s"
                )
                time.sleep(1)
    finally:
        stop(listener)
        cluster.stop()


if __name__ == "__main__":
    main()
