"""A real HAProxy (Debian's package, which scripts/test installs) in front of a listener, for tests.

It runs in the foreground (``-db``) as a child process with a generated config on 127.0.0.1, is
stopped by its pid, and says it is ready through its admin socket: answering there means every
listener of its config is bound, so no probe connection has to go through it (one would reach the
listener behind it and count there).
"""

from __future__ import annotations

import contextlib
import csv
import shutil
import socket
import subprocess
from pathlib import Path

from tests.waiting import wait_for

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

GLOBAL = """\
global
    stats socket {directory}/admin.sock mode 600 level admin
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def relay(front: int, back: int, send: str = "", mode: str = "tcp", options: str = "") -> str:
    """A frontend on 127.0.0.1:``front`` relaying to 127.0.0.1:``back``, with ``send`` on the
    server line (``send-proxy``, ``send-proxy-v2`` or nothing) and ``options`` in the frontend
    (``option forwardfor`` in http mode)."""
    return (
        f"frontend front\n    mode {mode}\n    bind 127.0.0.1:{front}\n    {options}\n"
        "    default_backend back\n\n"
        f"backend back\n    mode {mode}\n    server app 127.0.0.1:{back} {send}\n"
    )


class Haproxy:
    """``haproxy -db -f <generated config>``, its output in a log file beside the config."""

    def __init__(self, directory: Path, sections: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.admin = directory / "admin.sock"
        self.config = directory / "haproxy.cfg"
        self.config.write_text(GLOBAL.format(directory=directory) + "\n" + sections)
        self.log_path = directory / "haproxy.log"
        with self.log_path.open("w") as out:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_for(self._ready, "haproxy to answer on its admin socket", timeout=10, interval=0.05)
        except AssertionError as error:
            self.stop()
            raise AssertionError(f"{error}:\n{self.log_path.read_text()}") from None

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}")
        try:
            return "Name: HAProxy" in self.command("show info")
        except OSError:
            return False

    def command(self, line: str) -> str:
        """One command on the admin socket, and its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as admin:
            admin.settimeout(5)
            admin.connect(str(self.admin))
            admin.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := admin.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_check(self, backend: str = "back", server: str = "app") -> tuple[str, str]:
        """The server's status and its last health check's: ``("UP", "L7OK")``, ``("DOWN", "L4CON")``..."""
        rows = csv.DictReader(self.command("show stat").lstrip("# ").splitlines())
        for row in rows:
            if row["pxname"] == backend and row["svname"] == server:
                return row["status"], row["check_status"]
        raise AssertionError(f"no server {backend}/{server} in haproxy's stats")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
