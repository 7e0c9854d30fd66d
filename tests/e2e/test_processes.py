"""`smtp-proxy serve` with ``smtp.processes`` (and ``api.processes``) 2: one parent, two children.

Real processes on 127.0.0.1 and real clients. Which child serves a connection is read
from /proc: the server's end of a TCP connection (a row of /proc/net/tcp) is a socket
that only the child which accepted it holds (/proc/<pid>/fd), while the listening
socket itself is in every process. The supervisor's own log lines name each child in
``child_pid``; every line names the process that wrote it in ``pid``.
"""

from __future__ import annotations

import collections
import http.client
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from smtp_proxy.config import config_from_dict
from smtp_proxy.db.models import Message
from smtp_proxy.db.session import Database
from tests.conftest import free_port
from tests.e2e.conftest import PASSWORD, ServeProcess, create_tenant
from tests.e2e.test_systemd import NotifySocket
from tests.waiting import wait_for

T = TypeVar("T")

MESSAGE = b"From: app@example.com\r\nSubject: processes\r\n\r\nbody\r\n"
# Connections opened at most while waiting for each child to accept one: the kernel hands a
# connection to whichever child accepts first, so one child may take several in a row.
SPREAD_LIMIT = 80
# How long a teardown gives the parent to drain before the processes are killed.
STOP_SECONDS = 15.0


# --- who serves a connection ----------------------------------------------------------------------


def _proc_address(host: str, port: int) -> str:
    """An IPv4 endpoint as /proc/net/tcp prints it: the address in host byte order, then the port."""
    return f"{int.from_bytes(socket.inet_aton(host), sys.byteorder):08X}:{port:04X}"


def owner(sock: socket.socket, pids: Collection[int]) -> int | None:
    """The process among ``pids`` that holds the server's end of this client connection."""
    client_host, client_port = sock.getsockname()[:2]
    server_host, server_port = sock.getpeername()[:2]
    local, remote = _proc_address(server_host, server_port), _proc_address(client_host, client_port)
    with open("/proc/net/tcp") as table:
        rows = [row.split() for row in table.read().splitlines()[1:]]
    inode = next((row[9] for row in rows if row[1] == local and row[2] == remote), "0")
    if inode == "0":  # not accepted yet
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for name in names:
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                    return pid
            except OSError:
                continue
    return None


def accepted_by(sock: socket.socket, pids: Collection[int]) -> int:
    """The child that accepted this connection, once one has."""
    return wait_for(lambda: owner(sock, pids), "a child to accept the connection", timeout=5)


def spread(
    connect: Callable[[], T], pids: Collection[int], sock_of: Callable[[T], socket.socket] = lambda c: c
) -> tuple[dict[int, T], list[T]]:
    """Open connections (held open) until each of ``pids`` serves one.

    Returns the first connection each child accepted, and the others in order; the
    caller closes both. Fails after SPREAD_LIMIT connections.
    """
    kept: dict[int, T] = {}
    others: list[T] = []
    try:
        while set(kept) != set(pids):
            assert len(kept) + len(others) < SPREAD_LIMIT, (
                f"{SPREAD_LIMIT} connections and only {sorted(kept)} of {sorted(pids)} served one"
            )
            client = connect()
            pid = accepted_by(sock_of(client), pids)
            if pid in kept:
                others.append(client)
            else:
                kept[pid] = client
    except BaseException:
        for client in [*kept.values(), *others]:
            sock_of(client).close()
        raise
    return kept, others


class Greeted:
    """A raw SMTP connection that has read the 220 greeting."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._file = self.sock.makefile("rb")
        self.greeting = self.reply()
        assert self.greeting.startswith(b"220 "), self.greeting

    def reply(self) -> bytes:
        lines = [self._file.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(self._file.readline())
        return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def quit(self) -> None:
        assert self.command(b"QUIT").startswith(b"221 ")
        self.close()

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def smtp_client(port: int) -> smtplib.SMTP:
    """Greeted by the listener; no EHLO yet."""
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)


def log_in(client: smtplib.SMTP, context: ssl.SSLContext) -> tuple[int, bytes]:
    """STARTTLS, then AUTH PLAIN only; the reply to AUTH, whatever it is."""
    client.starttls(context=context)
    client.ehlo()
    client.user, client.password = "tenant", PASSWORD
    try:
        return client.auth("PLAIN", client.auth_plain)
    except smtplib.SMTPAuthenticationError as refused:
        return refused.smtp_code, refused.smtp_error


def close_quietly(client: smtplib.SMTP) -> None:
    try:
        client.close()
    except OSError:
        pass


def quit_all(clients: Collection[Greeted | smtplib.SMTP]) -> None:
    for client in clients:
        client.quit()


def scrape(port: int, pids: Collection[int]) -> tuple[int, dict[str, float]]:
    """One scrape of /metrics: the child that answered it, and every sample by name and labels.

    The request's header block is left open until the child that accepted the
    connection is known, so that it is the one that answers.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n")
        pid = accepted_by(sock, pids)
        sock.sendall(b"\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    samples = {
        sample.name + repr(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    return pid, samples


def total(samples: dict[str, float], name: str) -> float:
    return sum(value for key, value in samples.items() if key.startswith(name + "["))


# --- the supervised processes ---------------------------------------------------------------------


class Supervised(ServeProcess):
    """``smtp-proxy serve`` whose config asks for several processes."""

    def children(self, role: str | None = None) -> dict[str, int]:
        """The children serving now, by role label (``smtp/0``), as the supervisor logged them."""
        serving: dict[str, int] = {}
        for line in self.events():
            event = line.get("event")
            if event == "supervisor.child_ready":
                serving[line["role"]] = line["child_pid"]
            elif event in ("supervisor.child_died", "supervisor.child_stopped"):
                serving.pop(line["role"], None)
        return {label: pid for label, pid in serving.items() if role is None or label.split("/")[0] == role}

    def pids(self, role: str) -> list[int]:
        return sorted(self.children(role).values())

    def replaced(self, label: str, old: int) -> int | None:
        """The pid of the child serving as ``label`` in place of ``old``, once one is."""
        new = self.children().get(label)
        return new if new and new != old else None

    def started_pids(self) -> set[int]:
        return {line["child_pid"] for line in self.events("supervisor.child_started")}

    def by_pid(self, name: str) -> collections.Counter[int]:
        """How many lines of this event each process wrote."""
        return collections.Counter(line["pid"] for line in self.events(name))

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the supervisor logs that every child serves; fails with the output if it exits."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode} before serving:\n{self.output()}")
            return bool(self.events("supervisor.ready"))

        try:
            wait_for(ready, "every child to serve", timeout=timeout, interval=0.05)
        except AssertionError as error:
            raise AssertionError(f"{error}:\n{self.output()}") from None

    def stop(self) -> None:
        """Drain by SIGTERM; kill the parent and its children if that takes too long."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def tenant(pg_url: str) -> None:
    create_tenant(pg_url)


class Ports:
    def __init__(self) -> None:
        self.smtp, self.metrics, self.api = free_port(), free_port(), free_port()


@pytest.fixture
def ports() -> Ports:
    return Ports()


@pytest.fixture
def write_config(
    tmp_path: Path, pg_url: str, encryption_key: str, tls_files: tuple[Path, Path], ports: Ports
) -> Callable[..., Path]:
    """Write a config with two SMTP processes; ``sections`` override keys, ``path`` the file."""

    def write(path: Path | None = None, **sections: dict[str, Any]) -> Path:
        config: dict[str, dict[str, Any]] = {
            "smtp": {
                "host": "127.0.0.1",
                "port": ports.smtp,
                "hostname": "mx.test",
                "metrics_port": ports.metrics,
                "processes": 2,
                "max_connections_per_ip": 0,  # every test client is 127.0.0.1
            },
            "api": {"host": "127.0.0.1", "port": ports.api, "threads": 2},
            "database": {"url": pg_url, "pool_min": 1, "pool_max": 5, "connect_timeout": "2s"},
            "logging": {"level": "info", "format": "json"},
            "tls": {"cert_file": str(tls_files[0]), "key_file": str(tls_files[1])},
            "security": {"encryption_key": encryption_key, "bcrypt_cost": 4},
            "delivery": {"metrics_port": None},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        path = path or tmp_path / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """Start ``serve COMMAND`` and wait until every child serves; each is stopped at teardown."""
    started: list[Supervised] = []

    def start(command: str, config: Path, notify_socket: str | None = None, wait: bool = True) -> Supervised:
        served = Supervised(command, config, tmp_path / f"serve-{command}-{len(started)}.log", notify_socket)
        started.append(served)
        if wait:
            served.wait_ready()
        return served

    yield start
    for served in started:
        served.stop()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """The service manager's socket, in the abstract namespace."""
    manager = NotifySocket(f"@smtp-proxy-test-{uuid.uuid4().hex}")
    yield manager
    manager.close()


# --- 1. two processes serve -----------------------------------------------------------------------


def test_both_smtp_children_take_sessions(serve, write_config, ports: Ports, tenant: None) -> None:
    # Both children accept on the one port: each is seen holding sessions, and each logs the
    # close of exactly the sessions /proc says it held.
    served = serve("smtp", write_config())
    children = served.pids("smtp")
    assert len(children) == 2 and served.process.pid not in children

    kept, others = spread(lambda: Greeted(ports.smtp), children, lambda c: c.sock)
    held = [*kept.values(), *others]
    try:
        # Held open at once, as a client's connection pool would.
        while len(held) < 20:
            held.append(Greeted(ports.smtp))
        owners = collections.Counter(accepted_by(client.sock, children) for client in held)
        quit_all(held)
    finally:
        for client in held:
            client.close()

    assert set(owners) == set(children), owners
    # The children's own close lines tell the same story.
    wait_for(
        lambda: sum(served.by_pid("smtp.disconnect").values()) == len(held),
        f"{len(held)} smtp.disconnect lines",
    )
    assert served.by_pid("smtp.disconnect") == owners


def test_both_api_children_answer(serve, write_config, ports: Ports, tenant: None) -> None:
    # The same for `serve api` with api.processes 2: each child answers the requests of the
    # connections it accepted, and logs them.
    served = serve("api", write_config(api={"processes": 2}))
    children = served.pids("api")
    assert len(children) == 2 and served.process.pid not in children

    def connect() -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection("127.0.0.1", ports.api, timeout=10)
        connection.connect()
        return connection

    kept, others = spread(connect, children, lambda c: c.sock)
    held = [*kept.values(), *others]
    try:
        owners = collections.Counter(accepted_by(connection.sock, children) for connection in held)
        for connection in held:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, b'{"status":"ok"}\n')
    finally:
        for connection in held:
            connection.close()

    assert set(owners) == set(children), owners
    wait_for(
        lambda: sum(served.by_pid("api.request").values()) == len(held), f"{len(held)} api.request lines"
    )
    assert served.by_pid("api.request") == owners


# --- 2. SIGHUP --------------------------------------------------------------------------------------


def test_sighup_reloads_the_config_of_every_child(
    tmp_path: Path, serve, write_config, ports: Ports, tenant: None
) -> None:
    # The config path is a symlink swapped to a file in another directory: the children's file
    # watchers (on the first file's directory) cannot see that, so only SIGHUP loads it.
    link = tmp_path / "etc" / "config.yaml"
    link.parent.mkdir()
    link.symlink_to(write_config(tmp_path / "v1" / "config.yaml", smtp={"max_message_size": 1_000_000}))
    served = serve("smtp", link)
    children = served.pids("smtp")
    before = Greeted(ports.smtp)
    assert b"SIZE 1000000\r\n" in before.command(b"EHLO client.test")
    before.quit()

    swap = link.with_name("config.yaml.new")
    swap.symlink_to(write_config(tmp_path / "v2" / "config.yaml", smtp={"max_message_size": 2_000_000}))
    swap.replace(link)
    os.kill(served.process.pid, signal.SIGHUP)

    def reloaded() -> bool:
        return set(served.by_pid("config.reloaded")) >= set(children)

    wait_for(reloaded, "config.reloaded from every child", timeout=5)
    lines = served.events("config.reloaded")
    assert sorted(line["pid"] for line in lines) == children
    assert all(line["changed"] == ["smtp.max_message_size"] for line in lines), lines
    kept, others = spread(lambda: Greeted(ports.smtp), children, lambda c: c.sock)
    try:
        for pid, client in kept.items():
            assert b"SIZE 2000000\r\n" in client.command(b"EHLO client.test"), pid
    finally:
        quit_all([*kept.values(), *others])

    # A child started after the reload (a restart) serves the reloaded config from its first
    # session, not the one its parent read at startup.
    label, victim = sorted(served.children("smtp").items())[0]
    os.kill(victim, signal.SIGKILL)
    replacement = wait_for(lambda: served.replaced(label, victim), "the killed child's replacement to serve")
    now = served.pids("smtp")
    kept, others = spread(lambda: Greeted(ports.smtp), now, lambda c: c.sock)
    try:
        assert b"SIZE 2000000\r\n" in kept[replacement].command(b"EHLO client.test")
    finally:
        quit_all([*kept.values(), *others])


# --- 3. SIGTERM -------------------------------------------------------------------------------------


def test_sigterm_lets_a_transaction_in_each_child_finish_then_exits_0(
    serve, write_config, ports: Ports, tenant: None, pg_url: str, notify_socket: NotifySocket, client_tls
) -> None:
    # SIGTERM to the parent drains every child: the port refuses new connections, a
    # transaction in progress in each child still ends in 250, and the parent exits 0 last.
    served = serve("smtp", write_config(), notify_socket.address)
    assert notify_socket.receive(served).fields.get("READY") == "1"
    children = served.pids("smtp")

    def logged_in() -> smtplib.SMTP:
        client = smtp_client(ports.smtp)
        assert log_in(client, client_tls)[0] == 235
        return client

    kept, others = spread(logged_in, children, lambda c: c.sock)
    quit_all(others)
    in_data, after_rcpt = (kept[pid] for pid in children)
    try:
        for client in kept.values():
            assert client.mail("app@example.com")[0] == 250
            assert client.rcpt("a@example.net")[0] == 250
        # One in the middle of its DATA, the other between RCPT and DATA.
        assert in_data.docmd("DATA")[0] == 354
        in_data.send(MESSAGE[:20])

        served.process.send_signal(signal.SIGTERM)
        stopping = notify_socket.receive(served)
        assert stopping.fields.get("STOPPING") == "1", stopping.fields
        assert stopping.sender_pid == served.process.pid
        wait_for(lambda: set(served.by_pid("smtp.draining")) == set(children), "both children to drain")
        # Stop accepting: a new connection is refused, as with one process, not left in a backlog.
        wait_for(lambda: not listening(ports.smtp), "the SMTP port to refuse connections", timeout=3)

        in_data.send(MESSAGE[20:] + b".\r\n")
        code, text = in_data.getreply()
        assert code == 250, text
        code, text = after_rcpt.data(MESSAGE)
        assert code == 250, text
    finally:
        for client in kept.values():
            close_quietly(client)

    assert served.process.wait(timeout=STOP_SECONDS) == 0, served.output()
    stopped = served.events("supervisor.child_stopped")
    assert sorted(line["child_pid"] for line in stopped) == children
    assert all(line["exit_code"] == 0 for line in stopped), stopped
    events = [line["event"] for line in served.events()]
    assert events[-1] == "supervisor.stopped"
    assert not any(alive(pid) for pid in children)
    assert not listening(ports.smtp) and not listening(ports.metrics)
    database = Database(config_from_dict({"database": {"url": pg_url}}, env={}).database)
    try:
        with database.transaction() as session:
            assert session.scalar(select(func.count()).select_from(Message)) == 2
    finally:
        database.dispose()


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_twice_stops_serve_all_at_once_keeping_what_got_250(
    serve, write_config, ports: Ports, tenant: None, pg_url: str, client_tls, processes: int
) -> None:
    # ``./scripts/run``'s ``serve all`` at a terminal, where Ctrl-C reaches the whole process group:
    # the first drains and names the one session it waits for, the second stops at once (exit 130).
    # Supervised children ignore the terminal's SIGINT and count what their parent forwards.
    served = serve("all", write_config(smtp={"processes": processes}), wait=False)
    served.wait_accepting(ports.smtp)
    served.wait_accepting(ports.api)
    if processes > 1:
        served.wait_ready()
    client = smtp_client(ports.smtp)
    try:
        assert log_in(client, client_tls)[0] == 235
        assert client.sendmail("app@example.com", ["a@example.net"], MESSAGE) == {}
        assert client.mail("app@example.com")[0] == 250
        assert client.rcpt("a@example.net")[0] == 250
        os.killpg(served.process.pid, signal.SIGINT)

        def waited_for() -> int | None:
            lines = served.events("smtp.draining")
            return sum(line["open_sessions"] for line in lines) if len(lines) == processes else None

        assert wait_for(waited_for, "every SMTP process to drain") == 1
        os.killpg(served.process.pid, signal.SIGINT)
        assert served.process.wait(timeout=10) == 130, served.output()
        assert client.getreply()[0] == 421
    finally:
        close_quietly(client)
    assert sum(line["open_sessions"] for line in served.events("smtp.stopping_now")) == 1
    if processes > 1:
        assert len(served.events("supervisor.stopping_now")) == 1
        stopped = served.events("supervisor.child_stopped")
        assert stopped and {line["exit_code"] for line in stopped} <= {0, 143}, stopped
    database = Database(config_from_dict({"database": {"url": pg_url}}, env={}).database)
    try:
        with database.transaction() as session:
            assert session.scalar(select(func.count()).select_from(Message)) == 1
    finally:
        database.dispose()


# --- 4. a killed child ------------------------------------------------------------------------------


def test_a_killed_child_is_restarted_and_the_port_never_stops_answering(
    serve, write_config, ports: Ports, tenant: None, client_tls
) -> None:
    # SIGKILL to one child: the supervisor starts another within 2 s, while the other child
    # keeps its session and greets every new connection.
    served = serve("smtp", write_config())
    children = served.children("smtp")
    victim_label, victim = sorted(children.items())[0]
    survivor = next(pid for pid in children.values() if pid != victim)

    def logged_in() -> smtplib.SMTP:
        client = smtp_client(ports.smtp)
        assert log_in(client, client_tls)[0] == 235
        return client

    kept, others = spread(logged_in, list(children.values()), lambda c: c.sock)
    quit_all(others)
    try:
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        died = served.wait_for_event("supervisor.child_died", timeout=2)
        assert (died["role"], died["child_pid"], died["exit_code"]) == (victim_label, victim, -9)

        greetings = 0

        def restarted() -> int | None:
            # Every connection made meanwhile is greeted, by the surviving child.
            nonlocal greetings
            client = Greeted(ports.smtp)
            greetings += 1
            client.quit()
            return served.replaced(victim_label, victim)

        replacement = wait_for(restarted, "a new child to serve", timeout=2 - (time.monotonic() - killed))
        assert greetings > 0
        assert alive(replacement) and not alive(victim)

        # The killed child's session is no longer counted as open; the survivor's still is.
        wait_for(
            lambda: (
                total(scrape(ports.metrics, [survivor, replacement])[1], "smtp_proxy_smtp_active_connections")
                == 1
            ),
            "only the survivor's session counted as open",
        )
        # The survivor's session went on as if nothing happened.
        assert kept[survivor].sendmail("app@example.com", ["a@example.net"], MESSAGE) == {}
        assert kept[survivor].quit()[0] == 221
        # And the new child takes sessions too.
        now = [survivor, replacement]
        fresh, extra = spread(lambda: Greeted(ports.smtp), now, lambda c: c.sock)
        quit_all([*fresh.values(), *extra])
    finally:
        for client in kept.values():
            close_quietly(client)


# --- 5. READY=1 ------------------------------------------------------------------------------------


def test_ready_is_sent_once_by_the_parent_after_every_child_is_ready(
    serve, write_config, tenant: None, notify_socket: NotifySocket
) -> None:
    # Only the parent speaks to the service manager, and only once every child told it that
    # it serves; a child restarted later does not make it say READY=1 again.
    served = serve("smtp", write_config(), notify_socket.address, wait=False)
    ready = notify_socket.receive(served)
    assert ready.fields.get("READY") == "1", ready.fields
    assert ready.fields.get("MAINPID") == str(served.process.pid)
    assert ready.sender_pid == served.process.pid

    # Read once READY=1 is in: the parent logged every child's readiness before it notified.
    child_ready = served.events("supervisor.child_ready")
    assert sorted(line["role"] for line in child_ready) == ["smtp/0", "smtp/1"]
    children = {line["child_pid"] for line in child_ready}
    announced = served.wait_for_event("supervisor.ready")
    order = [line["event"] for line in served.events()]
    assert order.count("supervisor.ready") == 1
    assert order.index("supervisor.ready") > max(
        i for i, e in enumerate(order) if e == "supervisor.child_ready"
    )
    assert all(line["timestamp"] <= announced["timestamp"] for line in child_ready)
    # Each child listened before it told the parent (its own lines go through a writer
    # thread, so they may reach the file later: their timestamps say when they were logged).
    wait_for(lambda: set(served.by_pid("smtp.listening")) == children, "smtp.listening from both children")
    for line in served.events("smtp.listening"):
        told = next(ready for ready in child_ready if ready["child_pid"] == line["pid"])
        assert line["timestamp"] <= told["timestamp"], (line, told)

    # A restarted child is what could announce readiness again: it must not.
    victim = child_ready[0]["child_pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: served.replaced(child_ready[0]["role"], victim), "the killed child's replacement to serve"
    )
    served.process.send_signal(signal.SIGTERM)
    following = notify_socket.receive(served)
    assert following.fields.get("STOPPING") == "1", following.fields
    assert following.sender_pid == served.process.pid
    assert served.process.wait(timeout=STOP_SECONDS) == 0, served.output()


# --- 6. metrics ------------------------------------------------------------------------------------


def test_one_metrics_endpoint_sums_the_sessions_of_both_children(
    serve, write_config, ports: Ports, tenant: None
) -> None:
    # Every child serves smtp.metrics_port, and each answers with the sum over both.
    served = serve("smtp", write_config())
    children = served.pids("smtp")
    kept, others = spread(lambda: Greeted(ports.smtp), children, lambda c: c.sock)
    sessions = [*kept.values(), *others]
    quit_all(sessions)
    ended = len(sessions)

    # A session is counted as it ends, a moment after its client saw 221.
    wait_for(
        lambda: total(scrape(ports.metrics, children)[1], "smtp_proxy_smtp_sessions_total") == ended,
        f"{ended} sessions counted",
    )
    answered: collections.Counter[int] = collections.Counter()
    while set(answered) != set(children):
        assert sum(answered.values()) < SPREAD_LIMIT, f"only {dict(answered)} answered scrapes"
        pid, samples = scrape(ports.metrics, children)
        answered[pid] += 1
        assert samples["smtp_proxy_smtp_sessions_total[('outcome', 'quit')]"] == ended, (pid, samples)
        assert total(samples, "smtp_proxy_smtp_sessions_total") == ended, (pid, samples)
        assert total(samples, "smtp_proxy_smtp_active_connections") == 0, (pid, samples)
    assert set(served.by_pid("smtp.disconnect")) == set(children)


# --- 7. sessions per account across processes ------------------------------------------------------


def test_the_per_account_session_limit_holds_across_both_children_with_redis(
    serve, write_config, ports: Ports, tenant: None, redis_url: str, client_tls
) -> None:
    # smtp.max_connections_per_account counts an account's sessions in limits.storage when that
    # is redis://, so the limit is the service's, not each process's: two sessions, one in each
    # child, use it up, and a third is refused in either child until one of them ends.
    served = serve(
        "smtp", write_config(smtp={"max_connections_per_account": 2}, limits={"storage": redis_url})
    )
    children = served.pids("smtp")
    first, second = children
    opened: list[smtplib.SMTP] = []

    def connect() -> smtplib.SMTP:
        opened.append(smtp_client(ports.smtp))
        return opened[-1]

    def one_in_each() -> dict[int, smtplib.SMTP]:
        """A new greeted session in each child; the extra ones end unauthenticated."""
        kept, others = spread(connect, children, lambda c: c.sock)
        for client in others:
            client.quit()
        return kept

    def ended() -> int:
        return sum(1 for client in opened if client.sock is None)

    def counted(sessions: int) -> Callable[[], bool]:
        # The listener gives an account's slot back before it counts the session as ended.
        return lambda: total(scrape(ports.metrics, children)[1], "smtp_proxy_smtp_sessions_total") == sessions

    try:
        admitted = one_in_each()
        assert [log_in(admitted[pid], client_tls)[0] for pid in children] == [235, 235]

        refused = one_in_each()
        for pid in children:
            code, text = log_in(refused[pid], client_tls)
            assert (code, text) == (421, b"4.7.0 Too many concurrent sessions for this account"), pid
            close_quietly(refused[pid])

        assert admitted[first].quit()[0] == 221
        wait_for(counted(ended()), "the ended sessions counted")
        again = one_in_each()
        assert log_in(again[second], client_tls)[0] == 235
        code, text = log_in(again[first], client_tls)
        assert (code, text) == (421, b"4.7.0 Too many concurrent sessions for this account")
    finally:
        for client in opened:
            close_quietly(client)
