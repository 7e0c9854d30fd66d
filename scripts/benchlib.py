"""What the benchmarks share: a durable throwaway database, an `smtp-proxy serve` child, SMTP replies."""

from __future__ import annotations

import os
import resource
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


# --- processes and their CPU time ----------------------------------------------------------------------


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1], utime [11])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """A process and its children (``processes`` above 1 forks them)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return pids


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process and its live children have used so far."""
    ticks = 0
    for each in process_tree(pid):
        try:
            fields = stat_fields(each)
        except FileNotFoundError:  # a child that exited meanwhile
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(cluster: PgCluster) -> float | None:
    """CPU time of the whole cluster so far: the postmaster, its live backends, and the ended ones.

    Ended backends are in the postmaster's cutime/cstime once reaped. None when the postmaster's
    pid cannot be read (then the figure is left out, not guessed).
    """
    try:
        postmaster = int((cluster.base / "data" / "postmaster.pid").read_text().split()[0])
        fields = stat_fields(postmaster)
    except (OSError, ValueError, IndexError):
        return None
    ticks = sum(int(x) for x in fields[11:15])
    for child in process_tree(postmaster)[1:]:
        try:
            ticks += sum(int(x) for x in stat_fields(child)[11:13])
        except FileNotFoundError:
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores so far, from /proc/stat; iowait counts as idle."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def cpu_split(server: int, cluster: PgCluster) -> dict[str, float]:
    """CPU seconds used so far by the server's processes, by this benchmark and the load processes it
    has waited for (the generator), and by PostgreSQL; and the seconds every core has been idle.

    Taken before and after a run, the differences say where a saturated machine's time went.
    """
    mine = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, total = machine_ticks()
    return {
        "server": cpu_seconds(server),
        "generator": mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime,
        "postgres": postgres_cpu_seconds(cluster) or 0.0,
        "idle": (total - busy) / os.sysconf("SC_CLK_TCK"),
    }
