"""Faults: the database going away mid-send, SIGTERM drain, kill -9 under load."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import free_port, wait_until_accepting
from tests.e2e.conftest import PASSWORD, Listener, RawClient, ServeProcess, create_tenant
from tests.waiting import wait_for

MESSAGE = b"Subject: fault test\r\n\r\nbody\r\n"


def test_database_down_gives_451_and_stores_nothing_then_recovers(
    listener: Listener, smtp_client, postgresql_server
) -> None:
    client = smtp_client()
    client.sendmail("app@example.com", ["a@example.net"], MESSAGE)  # warm: AUTH cached, pool open
    client.mail("app@example.com")
    client.rcpt("a@example.net")
    postgresql_server.stop()
    try:
        code, reply = client.data(MESSAGE)
        assert (code, reply[:5]) == (451, b"4.3.0")
        client.rset()
    finally:
        postgresql_server.start()
        wait_until_accepting(postgresql_server)

    # Same connection, same server process: it recovers by itself.
    def sent() -> bool:
        client.mail("app@example.com")
        client.rcpt("a@example.net")
        code, _reply = client.data(MESSAGE)
        if code != 250:
            client.rset()
        return code == 250

    wait_for(sent, "a message accepted again", timeout=20, interval=0.2)
    assert len(listener.stored()) == 2


class ListenerProcess(ServeProcess):
    """`smtp-proxy serve smtp` as a child process on free ports."""

    def __init__(
        self, tmp_path: Path, pg_url: str, encryption_key: str, tls_files, processes: int = 1
    ) -> None:
        self.port = free_port()
        # Its own copies: a test may overwrite them to simulate a renewal.
        (tmp_path / "tls").mkdir()
        cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
        cert.write_bytes(tls_files[0].read_bytes())
        key.write_bytes(tls_files[1].read_bytes())
        self.config = tmp_path / "config.yaml"
        self.config.write_text(
            f"""
smtp:
  host: 127.0.0.1
  port: {self.port}
  hostname: mx.test
  metrics_port: {free_port()}
  max_connections: 500
  max_connections_per_account: 500
  processes: {processes}
database:
  url: {pg_url}
  pool_min: 5
  pool_max: 40
  connect_timeout: 2s
logging:
  level: info
tls:
  cert_file: {cert}
  key_file: {key}
security:
  encryption_key: {encryption_key}
  bcrypt_cost: 4
"""
        )
        super().__init__("smtp", self.config, tmp_path / "listener.log")
        self.wait_accepting(self.port)

    def stop(self) -> None:
        self.kill()


@pytest.fixture
def listener_process(
    tmp_path: Path, pg_url: str, encryption_key: str, tls_files
) -> Iterator[ListenerProcess]:
    process = ListenerProcess(tmp_path, pg_url, encryption_key, tls_files)
    yield process
    process.stop()


def _as_listener(process: ListenerProcess) -> Listener:
    return Listener(server=None, database=None, cipher=None, config=None, host="127.0.0.1", port=process.port)  # type: ignore[arg-type]


def test_sigterm_drains_idle_now_busy_after_their_message_then_exits_0(
    listener_process: ListenerProcess, client_tls: ssl.SSLContext
) -> None:
    target = _as_listener(listener_process)
    busy, idle = RawClient("127.0.0.1", listener_process.port), RawClient("127.0.0.1", listener_process.port)
    try:
        busy.login(target, client_tls)
        idle.login(target, client_tls)
        busy.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
        assert [busy.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        busy.send(b"Subject: in flight\r\n\r\npart one\r\n")
        listener_process.process.send_signal(signal.SIGTERM)
        assert idle.reply().startswith(b"421 4.3.2")
        # New connections are no longer accepted.

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", listener_process.port), timeout=1).close()
                return False
            except OSError:
                return True

        wait_for(refused, "new connections refused after SIGTERM", interval=0.05)
        busy.send(b"part two\r\n.\r\n")
        assert busy.reply().startswith(b"250 2.0.0 Ok: queued as")
        assert busy.reply().startswith(b"421 4.3.2")
        assert listener_process.process.wait(timeout=35) == 0
    finally:
        busy.close()
        idle.close()


def test_a_second_sigint_during_the_drain_stops_at_once_keeping_what_got_250(
    listener_process: ListenerProcess, client_tls: ssl.SSLContext, pg_url: str
) -> None:
    # Ctrl-C at a terminal: the first SIGINT drains and names the session it waits for, the
    # second ends the wait (421 to that session) and the process exits 130, not after 30 s.
    create_tenant(pg_url)
    client = smtplib.SMTP("127.0.0.1", listener_process.port, timeout=10)
    try:
        client.starttls(context=client_tls)
        client.login("tenant", PASSWORD)
        queued = send_one(client)
        assert queued
        client.mail("app@example.com")  # a transaction open: the drain waits for it
        client.rcpt("a@example.net")
        listener_process.process.send_signal(signal.SIGINT)
        draining = listener_process.wait_for_event("smtp.draining")
        assert draining["open_sessions"] == 1 and draining["idle_sessions"] == 0
        assert "1 open session in a transaction" in draining["message"]
        assert "second SIGINT or SIGTERM stops at once" in draining["message"]
        listener_process.process.send_signal(signal.SIGINT)
        assert listener_process.process.wait(timeout=10) == 130
        (hurried,) = listener_process.events("smtp.stopping_now")
        assert hurried["open_sessions"] == 1 and "already committed" in hurried["message"]
        assert client.getreply()[0] == 421
    finally:
        client.close()
    assert_all_stored(pg_url, [queued])


def send_one(client: smtplib.SMTP) -> str | None:
    """One message; its queue id when the listener acknowledged it with 250."""
    client.mail("app@example.com")
    client.rcpt("a@example.net")
    code, reply = client.data(MESSAGE)
    match = re.search(rb"queued as ([0-9a-f-]{36})", reply)
    return match.group(1).decode() if code == 250 and match else None


def assert_all_stored(pg_url: str, acknowledged: list[str]) -> None:
    engine = create_engine(pg_url)
    with engine.connect() as connection:
        stored = {str(row[0]) for row in connection.execute(text("SELECT id FROM messages"))}
    engine.dispose()
    missing = {uuid.UUID(a) for a in acknowledged} - {uuid.UUID(s) for s in stored}
    assert not missing, f"{len(missing)} acknowledged messages lost"


def test_kill_9_under_load_loses_no_acknowledged_message(
    listener_process: ListenerProcess, client_tls: ssl.SSLContext, pg_url: str
) -> None:
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 20

    def sender() -> None:
        try:
            client = smtplib.SMTP("127.0.0.1", listener_process.port, timeout=10)
            client.starttls(context=client_tls)
            client.login("tenant", PASSWORD)
            for _ in range(30):
                if time.monotonic() > stop_at:
                    return
                queued = send_one(client)
                if queued:
                    with lock:
                        acknowledged.append(queued)
        except (smtplib.SMTPException, OSError):
            return

    create_tenant(pg_url)
    threads = [threading.Thread(target=sender) for _ in range(100)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(acknowledged) >= 200, "200 messages acknowledged", timeout=30)
    os.kill(listener_process.process.pid, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=30)
    assert len(acknowledged) >= 200
    assert_all_stored(pg_url, acknowledged)


def test_kill_9_of_one_of_two_processes_under_load_loses_nothing_and_it_is_back_within_2_s(
    tmp_path: Path, pg_url: str, encryption_key: str, tls_files, client_tls: ssl.SSLContext
) -> None:
    listener = ListenerProcess(tmp_path, pg_url, encryption_key, tls_files, processes=2)
    acknowledged: list[str] = []
    broken: list[str] = []  # sessions cut short, by the kill or otherwise
    lock = threading.Lock()
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def sender() -> None:
        while not stop.is_set():
            try:
                client = smtplib.SMTP("127.0.0.1", listener.port, timeout=10)
                client.starttls(context=client_tls)
                client.login("tenant", PASSWORD)
                for _ in range(20):
                    queued = send_one(client)
                    if queued:
                        with lock:
                            acknowledged.append(queued)
                client.quit()
            except (smtplib.SMTPException, OSError) as error:
                with lock:
                    broken.append(repr(error))

    try:
        create_tenant(pg_url)
        ready = wait_for(
            lambda: len(listener.events("supervisor.child_ready")) >= 2, "both processes serving"
        )
        assert ready
        victim, survivor = (event["child_pid"] for event in listener.events("supervisor.child_ready")[:2])
        # Fewer than smtp.max_connections_per_ip (20), which each process applies to its own sessions.
        threads += [threading.Thread(target=sender) for _ in range(16)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(acknowledged) >= 200, "200 messages acknowledged", timeout=30)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        def replaced() -> list[dict]:
            ready = listener.events("supervisor.child_ready")
            return [e for e in ready if e["child_pid"] not in (victim, survivor)]

        wait_for(replaced, "a new process serving in the killed one's place", timeout=5, interval=0.02)
        back_after = time.monotonic() - killed_at
        assert back_after < 2, f"the new process served {back_after:.2f} s after the kill"
        died = listener.events("supervisor.child_died")
        assert [(e["child_pid"], e["exit_code"]) for e in died] == [(victim, -signal.SIGKILL)]
        with lock:
            at_restart, broken_at_restart = len(acknowledged), len(broken)
        wait_for(lambda: len(acknowledged) >= at_restart + 200, "200 more messages acknowledged", timeout=30)
        # Only sessions of the killed process broke: none since it was replaced.
        assert len(broken) == broken_at_restart, broken[broken_at_restart:]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        listener.stop()
    assert broken, "no session was cut by the kill: the test did not load the killed process"
    assert_all_stored(pg_url, acknowledged)


@pytest.fixture(autouse=True)
def _tenant_for_processes(request: pytest.FixtureRequest) -> None:
    if "listener_process" in request.fixturenames:
        create_tenant(request.getfixturevalue("pg_url"))


def _log_lines(process: ListenerProcess) -> list[dict]:
    import json

    return [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]


def test_logs_one_line_per_connection_and_message_without_secrets(
    listener_process: ListenerProcess, client_tls: ssl.SSLContext
) -> None:
    client = smtplib.SMTP("127.0.0.1", listener_process.port, timeout=10)
    client.starttls(context=client_tls)
    client.login("tenant", PASSWORD)
    client.sendmail(
        "app@example.com", ["a@example.net", "b@example.net"], b"Subject: s\r\n\r\nTOPSECRETBODY\r\n"
    )
    client.quit()

    def closes() -> list[dict]:
        # The start-up probe's connection closes too; ours is the authenticated one.
        lines = _log_lines(listener_process)
        return [line for line in lines if line.get("event") == "smtp.disconnect" and line["account"]]

    wait_for(closes, "the authenticated session's smtp.disconnect line", timeout=20)
    lines = _log_lines(listener_process)
    [accepted] = [line for line in lines if line.get("event") == "smtp.message_accepted"]
    assert accepted["recipients"] == 2 and accepted["code"] == 250 and accepted["sender"] == "app@example.com"
    [closed] = closes()
    assert closed["client_ip"] == "127.0.0.1" and closed["account"] == "tenant"
    assert closed["tls_version"] in ("TLSv1.2", "TLSv1.3") and closed["tls_cipher"]
    assert closed["outcome"] == "quit" and closed["commands"] >= 6
    assert closed["correlation_id"] == accepted["correlation_id"]
    output = listener_process.output()
    assert "TOPSECRETBODY" not in output and PASSWORD not in output


def test_metrics_endpoint_counts_sessions_and_messages(
    listener_process: ListenerProcess, client_tls: ssl.SSLContext
) -> None:
    import urllib.request

    import yaml

    client = smtplib.SMTP("127.0.0.1", listener_process.port, timeout=10)
    client.starttls(context=client_tls)
    client.login("tenant", PASSWORD)
    client.sendmail("app@example.com", ["a@example.net"], MESSAGE)
    client.quit()
    port = yaml.safe_load(listener_process.config.read_text())["smtp"]["metrics_port"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'smtp_proxy_smtp_messages_total{reason="",result="accepted"} 1.0' in body
    assert "smtp_proxy_smtp_active_connections" in body
    assert "smtp_proxy_smtp_commit_seconds_count 1.0" in body
    assert "smtp_proxy_smtp_received_bytes_total" in body


def test_limits_follow_the_config_file_without_restart(listener_process: ListenerProcess) -> None:
    import yaml

    raw = yaml.safe_load(listener_process.config.read_text())
    raw["smtp"]["max_connections"] = 2
    listener_process.config.write_text(yaml.safe_dump(raw))
    wait_for(
        lambda: any(line.get("event") == "config.reloaded" for line in _log_lines(listener_process)),
        "a config.reloaded line",
        timeout=20,
    )
    held = [RawClient("127.0.0.1", listener_process.port) for _ in range(2)]
    try:
        for client in held:
            assert client.reply().startswith(b"220 ")
        extra = RawClient("127.0.0.1", listener_process.port)
        assert extra.reply().startswith(b"421 4.7.0")
        extra.close()
    finally:
        for client in held:
            client.close()


def test_sighup_picks_up_a_renewed_certificate(
    listener_process: ListenerProcess, tls_files, tmp_path: Path
) -> None:
    from smtp_proxy.devcert import write_self_signed

    def served_certificate() -> bytes:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client = smtplib.SMTP("127.0.0.1", listener_process.port, timeout=10)
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)
        client.quit()
        return der

    import yaml

    before = served_certificate()
    renewed_cert, renewed_key = write_self_signed(tmp_path / "renewed", "localhost")
    raw = yaml.safe_load(listener_process.config.read_text())
    # Same paths as an ACME client would use: overwrite the files the config names.
    Path(raw["tls"]["cert_file"]).write_bytes(renewed_cert.read_bytes())
    Path(raw["tls"]["key_file"]).write_bytes(renewed_key.read_bytes())
    listener_process.process.send_signal(signal.SIGHUP)
    wait_for(lambda: served_certificate() != before, "the renewed certificate served", timeout=20)


def _served_serial(port: int, context: ssl.SSLContext) -> int | None:
    """The serial number of the certificate served after STARTTLS, or None when the handshake fails."""
    from cryptography import x509

    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    try:
        client.starttls(context=context)
    except ssl.SSLError:
        client.close()
        return None
    der = client.sock.getpeercert(binary_form=True)
    client.quit()
    return x509.load_der_x509_certificate(der).serial_number


def test_a_pair_of_certificates_follows_the_config_file_and_sighup_renews_it(
    listener_process: ListenerProcess, tmp_path: Path
) -> None:
    import yaml
    from cryptography import x509

    from smtp_proxy.devcert import write_self_signed

    def serial(path: Path | str) -> int:
        return x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number

    default = ssl.create_default_context()
    default.check_hostname, default.verify_mode = False, ssl.CERT_NONE
    rsa_only = ssl.create_default_context()
    rsa_only.check_hostname, rsa_only.verify_mode = False, ssl.CERT_NONE
    rsa_only.maximum_version = ssl.TLSVersion.TLSv1_2
    rsa_only.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    port = listener_process.port
    raw = yaml.safe_load(listener_process.config.read_text())
    ecdsa_cert, ecdsa_key = raw["tls"]["cert_file"], raw["tls"]["key_file"]
    assert _served_serial(port, rsa_only) is None  # one ECDSA certificate so far

    # A config file change adds the RSA pair.
    rsa_cert, rsa_key = write_self_signed(tmp_path / "tls-rsa", "localhost", rsa_key=True)
    raw["tls"] = {"cert_file": [ecdsa_cert, str(rsa_cert)], "key_file": [ecdsa_key, str(rsa_key)]}
    listener_process.config.write_text(yaml.safe_dump(raw))
    reloaded = listener_process.wait_for_event("tls.reloaded", timeout=20)
    assert reloaded["cert_file"] == [ecdsa_cert, str(rsa_cert)]
    assert reloaded["key_file"] == [ecdsa_key, str(rsa_key)]
    assert _served_serial(port, rsa_only) == serial(rsa_cert)
    assert _served_serial(port, default) == serial(ecdsa_cert)

    # SIGHUP re-reads both pairs: the RSA one renewed in place, the ECDSA one unchanged.
    write_self_signed(tmp_path / "tls-rsa", "localhost", rsa_key=True)
    listener_process.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: _served_serial(port, rsa_only) == serial(rsa_cert), "the renewed RSA certificate", timeout=20
    )
    assert _served_serial(port, default) == serial(ecdsa_cert)

    # A broken RSA key keeps both certificates in service.
    rsa_key.write_text("-----BEGIN PRIVATE KEY-----\ntruncated\n")
    listener_process.process.send_signal(signal.SIGHUP)
    failed = listener_process.wait_for_event("tls.reload_failed", timeout=20)
    assert failed["config_key"] == "tls.cert_file[1]"
    assert _served_serial(port, rsa_only) == serial(rsa_cert)
    assert _served_serial(port, default) == serial(ecdsa_cert)


def test_a_second_drain_closes_nothing(start_listener) -> None:
    """The drain closes its pipes by number; a second drain must not close whatever reuses them."""
    listener: Listener = start_listener()
    listener.server.drain(timeout=0.1)
    reader, writer = os.pipe()  # likely to get the numbers the drain just freed
    try:
        listener.server.drain(timeout=0.1)  # and the fixture drains once more at teardown
        os.write(writer, b"still open")
        assert os.read(reader, 64) == b"still open"
    finally:
        os.close(reader)
        os.close(writer)
