"""What the benchmarks share: a durable throwaway database, an `smtp-proxy serve` child, SMTP replies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine  # noqa: E402

from smtp_proxy.db.migrate import upgrade  # noqa: E402
from tests.pgcluster import PgCluster  # noqa: E402


def migrated_database(cluster: PgCluster, name: str = "bench") -> str:
    """A new database in the cluster at the schema's head; returns its URL."""
    cluster.admin(f'CREATE DATABASE "{name}"')
    url = cluster.url(name)
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def serve(listener: str, config: Path, port: int, timeout: float = 30) -> subprocess.Popen:
    """`smtp-proxy --config CONFIG serve LISTENER`, once it accepts connections on 127.0.0.1:PORT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_PROXY_", "DATABASE_URL"))}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "smtp-proxy"), "--config", str(config), "serve", listener],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                stop(process)
                raise SystemExit(f"the {listener} listener did not start") from None
            time.sleep(0.1)


def stop(process: subprocess.Popen | None, timeout: float = 40) -> None:
    """SIGTERM (the listeners drain), then SIGKILL if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class SmtpWire:
    """Commands to and replies from an SMTP server, on the socket the subclass opens."""

    sock: socket.socket
    buffer: bytes

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes, code: bytes) -> None:
        self.send(line)
        self.expect(code)

    def expect(self, code: bytes) -> None:
        """Read one whole reply (its continuation lines too); it must start with ``code``."""
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
