"""A real SMTP listener on 127.0.0.1, a tenant, and TLS-speaking clients."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from smtp_proxy.config import Config
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import Message
from smtp_proxy.db.session import Database
from smtp_proxy.devcert import write_self_signed
from smtp_proxy.smtp.credentials import AuthThrottle, CredentialVerifier
from smtp_proxy.smtp.server import SmtpServer
from smtp_proxy.smtp.tls import TlsContextHolder
from smtp_proxy.storage import accounts, messages
from smtp_proxy.storage.audit import CLI
from tests.waiting import wait_for

PASSWORD = "correct horse battery"
# The listener's Received field: its first line, then continuation lines, each ending in CRLF.
TRACE_FIELD = re.compile(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


# Clients a test opened; closed after it, whatever the listener did with their sessions.
_clients: list[smtplib.SMTP] = []


def closed_after_test(client: smtplib.SMTP) -> smtplib.SMTP:
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def create_tenant(pg_url: str) -> None:
    """The account ``tenant`` (PASSWORD, example.com), for listeners run as processes; once."""
    from smtp_proxy.config import config_from_dict

    database = Database(config_from_dict({"database": {"url": pg_url}}, env={}).database)
    with database.transaction() as session:
        if not accounts.list_accounts(session):
            accounts.create_account(
                session,
                name="tenant",
                email="ops@example.com",
                allowed_domains=["example.com"],
                password=PASSWORD,
                bcrypt_cost=4,
                actor=CLI,
            )
    database.dispose()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_self_signed(tmp_path_factory.mktemp("tls"), "localhost")


@pytest.fixture
def client_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts the test certificate."""
    context = ssl.create_default_context(cafile=str(tls_files[0]))
    return context


@dataclass
class Listener:
    server: SmtpServer
    database: Database
    cipher: Cipher
    config: Config
    host: str
    port: int
    tenant: str = "tenant"
    password: str = PASSWORD

    def stored(self) -> list[Message]:
        with self.database.transaction() as session:
            rows = list(session.scalars(select(Message).order_by(Message.created_at)))
        self.database.remove_session()
        return rows

    def body(self, message: Message) -> bytes:
        return messages.message_body(self.cipher, message)

    def received_and_content(self, message: Message) -> tuple[str, bytes]:
        """The Received field the listener put first (unfolded), and the content the client sent."""
        body = self.body(message)
        match = TRACE_FIELD.match(body)
        assert match, body[:200]
        return re.sub(r"\r\n[ \t]", " ", match.group().decode("ascii"))[:-2], body[match.end() :]

    def wait_idle(self, timeout: float = 5.0) -> None:
        wait_for(lambda: self.server.active_count == 0, "every session to end", timeout=timeout)


@pytest.fixture
def start_listener(pg_url: str, make_config, tls_files) -> Iterator[Callable[..., Listener]]:
    """Start SmtpServer in this process on a free port; ``smtp`` overrides config keys.

    ``tls``: the tls section, instead of the session's one certificate (``tls_files``).
    """
    started: list[tuple[SmtpServer, threading.Thread, Database]] = []

    def start(
        implicit_tls: bool = False,
        on_quiet: Callable[[], object] | None = None,
        tls: dict[str, object] | None = None,
        **smtp: object,
    ) -> Listener:
        cert, key = tls_files
        config = make_config(
            pg_url,
            smtp={"host": "127.0.0.1", "hostname": "mx.test", "metrics_port": None, **smtp},
            tls=tls or {"cert_file": str(cert), "key_file": str(key)},
        )
        database = Database(config.database)
        cipher = Cipher.from_config(config.security)
        with database.transaction() as session:
            if not accounts.list_accounts(session):
                accounts.create_account(
                    session,
                    name="tenant",
                    email="ops@example.com",
                    allowed_domains=["example.com", "*.example.org"],
                    password=PASSWORD,
                    bcrypt_cost=4,
                    actor=CLI,
                )
        database.remove_session()
        server = SmtpServer(
            ("127.0.0.1", 0),
            config=lambda: config,
            database=database,
            cipher=cipher,
            verifier=CredentialVerifier(database, dummy_cost=4),
            throttle=AuthThrottle(per_ip=5),
            tls=TlsContextHolder(config.tls),
            implicit_tls=implicit_tls,
            on_quiet=on_quiet,
        )
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread, database))
        host, port = server.server_address[:2]
        return Listener(server, database, cipher, config, host, port)

    yield start
    for server, thread, database in started:
        server.drain(timeout=2)
        thread.join(timeout=5)
        database.dispose()


@pytest.fixture
def listener(start_listener) -> Listener:
    return start_listener()


@pytest.fixture
def smtp_client(listener: Listener, client_tls: ssl.SSLContext) -> Iterator[Callable[..., smtplib.SMTP]]:
    """smtplib clients to the listener; ``login=True`` does STARTTLS and AUTH."""
    clients: list[smtplib.SMTP] = []

    def connect(login: bool = True, starttls: bool = True) -> smtplib.SMTP:
        client = smtplib.SMTP(listener.host, listener.port, local_hostname="client.test", timeout=10)
        clients.append(client)
        if starttls:
            client.starttls(context=client_tls)
        if login:
            client.login(listener.tenant, listener.password)
        return client

    yield connect
    for client in clients:
        try:
            client.close()
        except OSError:
            pass


class RawClient:
    """A byte-level client for what smtplib will not send: pipelining, smuggling, junk."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, source: str | None = None) -> None:
        """``source``: the local address to connect from (127.0.0.x), to be another client."""
        self.sock: socket.socket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        lines = []
        while True:
            line = self._line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line + b"\r\n"

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (nothing more, or only a reset)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b"" and not self._buffer
        except (ConnectionResetError, ssl.SSLError):
            return True

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self._buffer, f"plaintext left over before TLS: {self._buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def login(self, listener: Listener, context: ssl.SSLContext) -> None:
        """Greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN: ready for MAIL."""
        assert self.auth(listener, context).startswith(b"235 2.7.0")

    def auth(self, listener: Listener, context: ssl.SSLContext) -> bytes:
        """Greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN; returns the reply to AUTH."""
        import base64

        assert self.reply().startswith(b"220 ")
        self.send(b"EHLO client.test\r\n")
        assert b"STARTTLS" in self.reply()
        self.send(b"STARTTLS\r\n")
        assert self.reply().startswith(b"220 2.0.0")
        self.starttls(context)
        self.send(b"EHLO client.test\r\n")
        assert b"AUTH PLAIN LOGIN" in self.reply()
        token = base64.b64encode(f"\0{listener.tenant}\0{listener.password}".encode()).decode()
        self.send(f"AUTH PLAIN {token}\r\n".encode())
        return self.reply()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def raw_client(listener: Listener) -> Iterator[Callable[[], RawClient]]:
    clients: list[RawClient] = []

    def connect() -> RawClient:
        client = RawClient(listener.host, listener.port)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


SMTP_PROXY = Path(sys.executable).parent / "smtp-proxy"
# Where a JSON log record begins (logs.py writes the timestamp first).
RECORD_START = re.compile(r'(?=\{"timestamp": ")')


class ServeProcess:
    """``smtp-proxy --config FILE serve <command>`` as a child process, its output in a log file.

    Nothing of the operator's environment leaks in (SMTP_PROXY_*, DATABASE_URL,
    NOTIFY_SOCKET); ``notify_socket`` sets the service manager's socket.
    """

    def __init__(self, command: str, config: Path, log: Path, notify_socket: str | None = None) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SMTP_PROXY_", "DATABASE_URL")) and k != "NOTIFY_SOCKET"
        }
        if notify_socket is not None:
            env["NOTIFY_SOCKET"] = notify_socket
        self.config = config
        self.log_path = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [str(SMTP_PROXY), "--config", str(config), "serve", command],
                env=env,
                cwd=config.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: kill() takes the processes it supervises with it.
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines, or those of one event, from every process writing the log.

        A line may be cut short: one still being written as it is read, or one whose
        writer was killed in the middle of it (``smtp.processes`` above 1: the next
        record then starts on the same line). Such a fragment is left out; a whole
        record after it is kept.
        """
        lines = []
        for row in self.output().splitlines():
            for piece in RECORD_START.split(row):
                try:
                    line = json.loads(piece)
                except ValueError:
                    continue
                if isinstance(line, dict) and (name is None or line.get("event") == name):
                    lines.append(line)
        return lines

    def wait_for_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        try:
            return wait_for(lambda: self.events(name), f"a {name} log line", timeout=timeout)[0]
        except AssertionError as error:
            raise AssertionError(f"{error}:\n{self.output()}") from None

    def wait_accepting(self, port: int, timeout: float = 20.0) -> None:
        """Until 127.0.0.1:port accepts; fails with the output if the process exits first."""

        def accepting() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                if self.process.poll() is not None:
                    raise AssertionError(f"the process exited before accepting on {port}") from None
                return False

        try:
            wait_for(accepting, f"127.0.0.1:{port} to accept", timeout=timeout, interval=0.05)
        except AssertionError as error:
            raise AssertionError(f"{error}:\n{self.output()}") from None

    def terminate(self, timeout: float = 40.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL to the process and every process it started (``smtp.processes`` above 1)."""
        with contextlib.suppress(ProcessLookupError):  # the group is gone once every member is
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
