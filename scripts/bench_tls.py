#!/usr/bin/env python3
"""Benchmark of the SMTP listener's TLS handshakes; prints a table.

Run from the repository root after ./scripts/test has made the venv:

    .venv/bin/python scripts/bench_tls.py [--seconds 5] [--rounds 2] [--clients 2]

It starts two `smtp-proxy serve smtp` processes on 127.0.0.1, one with an
ECDSA P-256 certificate and one with an RSA-2048 one (the database is an
embedded SQLite file migrated here; these sessions never reach it), and drives
them with --clients processes, each running one session after another for
--seconds: greeting, EHLO, STARTTLS, the handshake, EHLO, QUIT. Each round runs
every variant once, every other round in reverse order, to even out drift on a
shared machine; the table pools the rounds. Variants:

- plaintext: greeting, EHLO, RSET (for STARTTLS), EHLO, QUIT; the cost of a
  session without TLS, subtracted from the others to give the handshake's;
- full handshakes with each certificate, under TLS 1.3 and TLS 1.2;
- resumed: each session offers the session (ticket) of the one before it; a
  TLS 1.3 resumption still makes an ECDHE exchange, a TLS 1.2 one does not.

Measured: sessions/s, and the listener's CPU per session (user + system time
of its process over the phase, from /proc, divided by the sessions). The
clients share the machine's cores with the listener, so sessions/s is what
this machine does with both; "per core" (1000 / the handshake's CPU ms) is
what one core of the listener would sustain on handshakes alone. Everything
listens on 127.0.0.1 only, every loop is bounded in count and time, and every
process started is stopped by its pid.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import SmtpWire, serve, stop  # also puts the checkout on sys.path
from sqlalchemy import create_engine

from smtp_proxy.config import TlsConfig
from smtp_proxy.crypto import generate_encryption_key
from smtp_proxy.db.migrate import upgrade
from smtp_proxy.devcert import write_self_signed
from smtp_proxy.smtp.tls import make_server_context
from tests.pgcluster import free_port


@dataclass(frozen=True)
class Variant:
    name: str
    listener: str  # "ecdsa" or "rsa": the certificate the listener serves
    tls: ssl.TLSVersion | None  # None: no STARTTLS
    resume: bool = False


VARIANTS = (
    Variant("plaintext (no TLS)", "ecdsa", None),
    Variant("ECDSA P-256 full, TLS 1.3", "ecdsa", ssl.TLSVersion.TLSv1_3),
    Variant("RSA-2048 full, TLS 1.3", "rsa", ssl.TLSVersion.TLSv1_3),
    Variant("TLS 1.3 resumed, ECDSA", "ecdsa", ssl.TLSVersion.TLSv1_3, resume=True),
    Variant("TLS 1.3 resumed, RSA", "rsa", ssl.TLSVersion.TLSv1_3, resume=True),
    Variant("ECDSA P-256 full, TLS 1.2", "ecdsa", ssl.TLSVersion.TLSv1_2),
    Variant("RSA-2048 full, TLS 1.2", "rsa", ssl.TLSVersion.TLSv1_2),
    Variant("TLS 1.2 resumed, RSA", "rsa", ssl.TLSVersion.TLSv1_2, resume=True),
)


class Session(SmtpWire):
    """One client session; ``session``: a TLS session to offer (resumption)."""

    def __init__(self, port: int, variant: Variant, context: ssl.SSLContext | None, session=None) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.reused = False
        self.session: ssl.SSLSession | None = None
        try:
            self.expect(b"220")
            self.command(b"EHLO bench.test\r\n", b"250")
            if context is None:
                self.command(b"RSET\r\n", b"250")
            else:
                self.command(b"STARTTLS\r\n", b"220")
                self.sock = context.wrap_socket(self.sock, server_hostname="localhost", session=session)
            self.command(b"EHLO bench.test\r\n", b"250")  # also reads the TLS 1.3 ticket
            if isinstance(self.sock, ssl.SSLSocket):
                self.reused, self.session = self.sock.session_reused, self.sock.session
            self.command(b"QUIT\r\n", b"221")
        finally:
            self.sock.close()


def _context(variant: Variant) -> ssl.SSLContext | None:
    if variant.tls is None:
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the handshake's signature is still checked
    context.minimum_version = context.maximum_version = variant.tls
    return context


def _worker(port: int, variant: Variant, deadline: float, limit: int, queue: multiprocessing.Queue) -> None:
    """Sessions one after another until the deadline or ``limit``; reports (sessions, reused, errors)."""
    context = _context(variant)
    sessions = reused = errors = 0
    offered = None
    while time.time() < deadline and sessions + errors < limit:
        try:
            done = Session(port, variant, context, offered if variant.resume else None)
        except (OSError, RuntimeError) as error:
            errors += 1
            if errors == 1:
                print(f"  {variant.name}: {type(error).__name__}: {error}"[:120])
            continue
        sessions += 1
        reused += done.reused
        offered = done.session
    queue.put((sessions, reused, errors))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(port: int, pid: int, variant: Variant, clients: int, seconds: float, limit: int) -> dict[str, float]:
    """One phase: ``clients`` processes for ``seconds`` (at most ``limit`` sessions in all)."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    deadline = time.time() + seconds
    workers = [
        multiprocessing.Process(target=_worker, args=(port, variant, deadline, limit // clients, queue))
        for _ in range(clients)
    ]
    cpu, started = cpu_seconds(pid), time.perf_counter()
    for worker in workers:
        worker.start()
    try:
        results = [queue.get(timeout=seconds + 60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)
    elapsed, used = time.perf_counter() - started, cpu_seconds(pid) - cpu
    sessions = sum(r[0] for r in results)
    return {
        "sessions": sessions,
        "reused": sum(r[1] for r in results),
        "errors": sum(r[2] for r in results),
        "s": elapsed,
        "cpu_s": used,
        "per_s": sessions / elapsed,
        "cpu_ms": used * 1000 / max(sessions, 1),
    }


def context_handshakes(
    server: ssl.SSLContext, variant: Variant, seconds: float, limit: int
) -> dict[str, float]:
    """Handshakes alone against the listener's SSLContext on a loopback socket, the server on a thread.

    The server's CPU is its thread's (``time.thread_time``) from accept to close: the TLS work
    without the SMTP session around it. The client runs one handshake at a time.
    """
    client = _context(variant)
    assert client is not None
    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(30)
    port = listening.getsockname()[1]
    cpu: list[float] = []

    def serve() -> None:
        while True:
            try:
                sock, _ = listening.accept()
            except OSError:
                return  # closed: the run is over
            started = time.thread_time()
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the listener does
                with server.wrap_socket(sock, server_side=True) as tls:
                    tls.sendall(b"!")  # the first write, as the listener's reply after STARTTLS
                    tls.recv(1)  # until the client closes
            except (OSError, ssl.SSLError):
                pass
            finally:
                sock.close()
            cpu.append(time.thread_time() - started)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    offered, count, reused = None, 0, 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    try:
        while count < limit and time.perf_counter() < deadline:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with client.wrap_socket(sock, server_hostname="localhost", session=offered) as tls:
                tls.recv(1)
                reused += tls.session_reused
                if variant.resume:
                    offered = tls.session
            count += 1
        elapsed = time.perf_counter() - started
    finally:
        listening.close()
        thread.join(timeout=30)
    measured = cpu[:count]
    return {
        "sessions": count,
        "reused": reused,
        "per_s": count / elapsed,
        "cpu_ms": sum(measured) * 1000 / max(len(measured), 1),
    }


def write_config(
    workdir: Path, name: str, cert: Path, key: Path, database: str, encryption_key: str
) -> tuple[Path, int]:
    port = free_port()
    path = workdir / f"config-{name}.yaml"
    path.write_text(
        f"""
smtp:
  host: 127.0.0.1
  port: {port}
  hostname: bench.test
  max_connections: 1000
  max_connections_per_ip: 0
  metrics_port: null
database:
  url: {database}
logging:
  level: info
tls:
  cert_file: {cert}
  key_file: {key}
security:
  encryption_key: {encryption_key}
"""
    )
    return path, port


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each variant's phase")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of all variants (every other one reversed)"
    )
    parser.add_argument("--clients", type=int, default=2, help="client processes, each one session at a time")
    parser.add_argument("--max-sessions", type=int, default=50_000, help="bound on each phase's sessions")
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 0.5 <= args.seconds <= 600 or not 1 <= args.rounds <= 10:
        parser.error("--clients takes 1 to 64, --seconds 0.5 to 600, --rounds 1 to 10")
    if args.max_sessions < args.clients:
        parser.error("--max-sessions must be at least --clients")

    workdir = Path(tempfile.mkdtemp(prefix="smtp-proxy-bench-tls-"))
    listeners: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        database = f"sqlite:///{workdir / 'bench.db'}"
        engine = create_engine(database)
        upgrade(engine)
        engine.dispose()
        encryption_key = generate_encryption_key()
        for kind in ("ecdsa", "rsa"):
            cert, key = write_self_signed(workdir / kind, "localhost", rsa_key=kind == "rsa")
            config, port = write_config(workdir, kind, cert, key, database, encryption_key)
            listeners[kind] = (serve("smtp", config, port), port)
        print(
            f"smtp-proxy TLS handshake benchmark: {os.cpu_count()} cores, {args.clients} client processes, "
            f"{args.rounds} rounds of {args.seconds:g} s per variant, {ssl.OPENSSL_VERSION}"
        )
        for variant in VARIANTS:  # warm-up, not counted
            process, port = listeners[variant.listener]
            run(port, process.pid, variant, args.clients, min(1.0, args.seconds), 2000)
        runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in VARIANTS}
        for round_ in range(args.rounds):
            for variant in VARIANTS if round_ % 2 == 0 else reversed(VARIANTS):
                process, port = listeners[variant.listener]
                result = run(port, process.pid, variant, args.clients, args.seconds, args.max_sessions)
                runs[variant.name].append(result)
                print(
                    f"  round {round_ + 1} {variant.name:27s} {result['per_s']:7.1f} sessions/s  "
                    f"listener CPU {result['cpu_ms']:.3f} ms/session"
                )
        print_table(runs)
        print_context_table(workdir, args)
    finally:
        for process, _port in listeners.values():
            stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(runs: dict[str, list[dict[str, float]]]) -> None:
    """Pooled over the rounds: sessions and CPU summed, then divided."""

    def pooled(name: str) -> dict[str, float]:
        total = {
            key: sum(r[key] for r in runs[name]) for key in ("sessions", "reused", "errors", "cpu_s", "s")
        }
        return {
            **total,
            "per_s": total["sessions"] / total["s"],
            "cpu_ms": total["cpu_s"] * 1000 / total["sessions"],
        }

    base = pooled(VARIANTS[0].name)["cpu_ms"]
    print(
        f"{'variant':27s} {'sessions/s':>10s} {'listener CPU':>13s} {'handshake CPU':>14s} "
        f"{'handshakes/s':>13s}   sessions (reused, errors)"
    )
    print(f"{'':27s} {'':>10s} {'ms/session':>13s} {'ms (- plain)':>14s} {'per core':>13s}")
    for variant in VARIANTS:
        r = pooled(variant.name)
        handshake = per_core = ""
        if variant.tls is not None:
            cost = r["cpu_ms"] - base
            handshake = f"{cost:.3f}"
            per_core = f"{1000 / cost:.0f}" if cost > 0 else "-"
        print(
            f"{variant.name:27s} {r['per_s']:10.1f} {r['cpu_ms']:13.3f} {handshake:>14s} {per_core:>13s}"
            f"   {r['sessions']:.0f} ({r['reused']:.0f}, {r['errors']:.0f})"
        )


def print_context_table(workdir: Path, args: argparse.Namespace) -> None:
    """The handshakes alone, on make_server_context's context: no SMTP, no session thread."""
    contexts = {
        kind: make_server_context(
            TlsConfig(
                cert_file=(str(workdir / kind / "cert.pem"),), key_file=(str(workdir / kind / "key.pem"),)
            )
        )
        for kind in ("ecdsa", "rsa")
    }
    print(f"handshakes alone (make_server_context, loopback TCP, one at a time, {args.seconds:g} s each):")
    print(
        f"{'variant':27s} {'handshakes/s':>12s} {'server CPU ms':>14s} {'per core':>9s}   handshakes (reused)"
    )
    for variant in VARIANTS:
        if variant.tls is None:
            continue
        r = context_handshakes(contexts[variant.listener], variant, args.seconds, args.max_sessions)
        print(
            f"{variant.name:27s} {r['per_s']:12.1f} {r['cpu_ms']:14.3f} {1000 / r['cpu_ms']:9.0f}"
            f"   {r['sessions']:.0f} ({r['reused']:.0f})"
        )


if __name__ == "__main__":
    main()
