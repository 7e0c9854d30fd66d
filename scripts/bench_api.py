#!/usr/bin/env python3
"""Benchmark of the management API; prints its figures.

Run from the repository root after ./scripts/test has made the venv (and
installed wrk):

    .venv/bin/python scripts/bench_api.py [--seconds 10] [--connections 50]

It starts a throwaway PostgreSQL cluster (fsync on) and `smtp-proxy serve
api` on 127.0.0.1 (rate limit raised for the run), stores a tenant with 20
providers and 10,000 queued messages, and drives three endpoints with wrk
(2 threads, --connections connections, bounded by --seconds each): /healthz,
GET /api/v1/providers and GET /api/v1/messages?status=queued (the first page
of 50). With --processes 1,2 it runs them once per api.processes value, each
on a fresh server, and prints each figure's ratio to the first; --rounds N
repeats that in alternating order (1 2, then 2 1) and prints the means. Beside
each figure it prints where the machine's CPU went per request: the server's
processes, wrk, PostgreSQL, and the time every core sat idle. Everything
started is stopped by its pid.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchlib import cpu_split, migrated_database, serve, stop  # also puts the checkout on sys.path
from sqlalchemy import create_engine, insert

from smtp_proxy.config import config_from_dict
from smtp_proxy.crypto import Cipher, generate_encryption_key
from smtp_proxy.db.models import Message, MessageStatus
from smtp_proxy.db.session import Database
from smtp_proxy.storage import accounts, providers
from smtp_proxy.storage.audit import CLI
from smtp_proxy.storage.messages import body_aad
from tests.pgcluster import PgCluster, free_port

MESSAGES = 10_000
PROVIDERS = 20


def seed(url: str, key: str) -> str:
    """A tenant with PROVIDERS providers and MESSAGES queued messages; returns its API key."""
    config = config_from_dict({"database": {"url": url}, "security": {"encryption_key": key}}, env={})
    database = Database(config.database)
    cipher = Cipher.from_config(config.security)
    with database.transaction() as session:
        tenant = accounts.create_account(
            session,
            name="bench",
            email="bench@example.com",
            allowed_domains=["example.com"],
            bcrypt_cost=4,
            actor=CLI,
        )
        for n in range(PROVIDERS):
            providers.create_provider(
                session,
                cipher,
                account_id=tenant.account.id,
                name=f"provider-{n:02d}",
                provider_type="sendgrid",
                api_key=f"SG.bench-{n}",
                actor=CLI,
            )
        account_id, api_key = tenant.account.id, tenant.api_key
    database.dispose()
    engine = create_engine(url)
    start = datetime.now(UTC) - timedelta(hours=1)
    rows = []
    for n in range(MESSAGES):
        message_id = uuid.uuid4()
        stamp = start + timedelta(milliseconds=n * 300)
        rows.append(
            {
                "id": message_id,
                "account_id": account_id,
                "sender": "app@example.com",
                "recipients": [f"user{n}@example.net"],
                "subject": f"bench {n}",
                "headers": [["Subject", f"bench {n}"]],
                "body_encrypted": cipher.encrypt(b"x" * 2000, body_aad(message_id)),
                "size": 2000,
                "status": MessageStatus.QUEUED,
                "correlation_id": uuid.uuid4().hex,
                "attempts": 0,
                "next_attempt_at": stamp,
                "created_at": stamp,
                "updated_at": stamp,
            }
        )
    with engine.begin() as connection:
        connection.execute(insert(Message.__table__), rows)
        connection.exec_driver_sql("ANALYZE messages")
    engine.dispose()
    return api_key


def wrk(url: str, seconds: float, connections: int, api_key: str | None) -> dict[str, float]:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "--timeout", "5s"]
    if api_key:
        command += ["-H", f"Authorization: Bearer {api_key}"]
    output = subprocess.run(command + [url], capture_output=True, text=True, timeout=seconds + 60).stdout
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}
    for name, pattern in (("p50", r"\s50%\s+([\d.]+)(us|ms|s)"), ("p99", r"\s99%\s+([\d.]+)(us|ms|s)")):
        value, unit = re.search(pattern, output).groups()
        figures[name] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    figures["errors"] = float(errors.group(1)) if errors else 0.0
    figures["errors"] += sum(float(x) for x in socket_errors.groups()) if socket_errors else 0.0
    return figures


@dataclass
class Server:
    process: subprocess.Popen
    port: int


def start_server(workdir: Path, url: str, encryption_key: str, api_key: str, processes: int) -> Server:
    """`serve api` with api.processes PROCESSES on a free port, answering the tenant's key."""
    port = free_port()
    config = workdir / f"config-{port}.yaml"
    config.write_text(
        f"""
api:
  host: 127.0.0.1
  port: {port}
  rate_limit: 100000000/minute
  processes: {processes}
database:
  url: {url}
logging:
  level: warning
security:
  encryption_key: {encryption_key}
"""
    )
    process = serve("api", config, port)
    request = urllib.request.Request(  # noqa: S310 - our own 127.0.0.1 server
        f"http://127.0.0.1:{port}/api/v1/messages?status=queued",
        headers={"Authorization": f"Bearer {api_key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our own server
            assert response.status == 200
    except BaseException:
        stop(process)
        raise
    return Server(process, port)


def report(results: dict[str, dict[int, list[dict[str, float]]]], counts: list[int]) -> None:
    """Each figure's mean over the rounds, its ratio to the first process count, and where the CPU went."""
    for label, by_count in results.items():
        print(label)
        for processes in counts:
            runs = by_count[processes]

            def mean(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.fmean(run[key] for run in runs)

            versus = mean("rps") / statistics.fmean(run["rps"] for run in by_count[counts[0]])
            each = ", ".join(f"{run['rps']:.0f}" for run in runs)
            print(
                f"  api.processes {processes}: {mean('rps'):8.1f} req/s ({versus:.2f}x; runs: {each})"
                f"   p50 {mean('p50'):6.1f} ms   p99 {mean('p99'):6.1f} ms"
                f"   ({sum(run['errors'] for run in runs):.0f} errors)\n"
                f"    per request: server {mean('server'):.2f} ms, wrk {mean('generator'):.2f}, "
                f"PostgreSQL {mean('postgres'):.2f}, all cores idle {mean('idle'):.2f} (ms of one core)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--connections", type=int, default=50, help="concurrent connections")
    parser.add_argument("--processes", default="1", help="api.processes values, comma-separated (default 1)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each figure, in alternating order (1 2, then 2 1)"
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk (./scripts/test installs it)")

    cluster = PgCluster.start(durable=True)
    server: Server | None = None
    workdir = Path(tempfile.mkdtemp(prefix="smtp-proxy-bench-api-"))
    try:
        url = migrated_database(cluster)
        encryption_key = generate_encryption_key()
        api_key = seed(url, encryption_key)
        print(
            f"smtp-proxy API benchmark: {os.cpu_count()} cores, "
            f"wrk -t2 -c{args.connections}, {args.seconds:.0f} s runs"
        )
        runs = [
            ("/healthz", "/healthz", None),
            (f"GET /api/v1/providers ({PROVIDERS})", "/api/v1/providers", api_key),
            (
                f"GET /api/v1/messages?status=queued (50 of {MESSAGES})",
                "/api/v1/messages?status=queued",
                api_key,
            ),
        ]
        # label -> api.processes -> one figures dict per round (the CPU split merged in)
        results: dict[str, dict[int, list[dict[str, float]]]] = {
            label: {n: [] for n in counts} for label, _, _ in runs
        }
        for round_ in range(args.rounds):
            for processes in counts if round_ % 2 == 0 else list(reversed(counts)):
                server = start_server(workdir, url, encryption_key, api_key, processes)
                base = f"http://127.0.0.1:{server.port}"
                for label, path, key in runs:
                    before = cpu_split(server.process.pid, cluster)
                    figures = wrk(base + path, args.seconds, args.connections, key)
                    after = cpu_split(server.process.pid, cluster)
                    requests = max(figures["rps"] * args.seconds, 1)
                    figures.update({name: (after[name] - before[name]) * 1000 / requests for name in before})
                    results[label][processes].append(figures)
                stop(server.process)
                server = None
        report(results, counts)
    finally:
        stop(server.process if server else None)
        cluster.stop()


if __name__ == "__main__":
    main()
