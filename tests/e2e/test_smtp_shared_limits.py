"""Two `smtp-proxy serve smtp` processes on one database and one Redis: one set of limits.

Sending limits and AUTH failures are counted in ``limits.storage``; a deactivation
reaches the sessions of both processes through the database.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml

from smtp_proxy.config import config_from_dict
from smtp_proxy.db.session import Database
from smtp_proxy.storage import accounts
from smtp_proxy.storage.audit import CLI
from tests.conftest import free_port
from tests.e2e.conftest import PASSWORD, SMTP_PROXY, ServeProcess, closed_after_test, create_tenant
from tests.waiting import wait_for

MESSAGE = b"From: app@example.com\r\nSubject: shared\r\n\r\nbody\r\n"


class SmtpProcess(ServeProcess):
    def __init__(self, config: Path, log: Path, port: int) -> None:
        self.port = port
        super().__init__("smtp", config, log)
        self.wait_accepting(port)

    def client(self, context: ssl.SSLContext, password: str = PASSWORD) -> smtplib.SMTP:
        """Logged in with AUTH PLAIN only (``login()`` would try LOGIN after a failed PLAIN)."""
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=10)
        closed_after_test(client)
        client.starttls(context=context)
        client.ehlo()
        client.user, client.password = "tenant", password
        client.auth("PLAIN", client.auth_plain)
        return client


@pytest.fixture
def start_smtp(
    tmp_path: Path, pg_url: str, encryption_key: str, tls_files
) -> Iterator[Callable[..., SmtpProcess]]:
    create_tenant(pg_url)
    started: list[SmtpProcess] = []

    def start(name: str, limits: dict, smtp: dict | None = None) -> SmtpProcess:
        port = free_port()
        config = {
            "smtp": {
                "host": "127.0.0.1",
                "port": port,
                "hostname": "mx.test",
                "metrics_port": None,
                **(smtp or {}),
            },
            "database": {"url": pg_url, "pool_min": 2, "pool_max": 10, "connect_timeout": "2s"},
            "logging": {"level": "info", "format": "json"},
            "tls": {"cert_file": str(tls_files[0]), "key_file": str(tls_files[1])},
            "security": {"encryption_key": encryption_key, "bcrypt_cost": 4},
            "limits": limits,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        process = SmtpProcess(path, tmp_path / f"{name}.log", port)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def test_two_listeners_share_the_sending_limit_and_auth_failures_through_redis(
    start_smtp, redis_url: str, client_tls: ssl.SSLContext
) -> None:
    shared = {"storage": redis_url, "messages_per_minute": 2}
    first = start_smtp("first", shared, {"auth_failures_per_ip": 3})
    second = start_smtp("second", shared, {"auth_failures_per_ip": 3})
    line = first.wait_for_event("smtp.counters")
    assert (line["shared"], line["storage"]) == (True, redis_url)
    # The three messages must fall into one minute's window (the test needs a few seconds).
    wait_for(lambda: time.time() % 60 < 40, "the first 40 s of a minute", timeout=25)
    one = first.client(client_tls)
    for _ in range(2):
        one.sendmail("app@example.com", ["a@example.net"], MESSAGE)
    other = second.client(client_tls)
    replies: list[tuple[int, bytes]] = []

    def refused() -> bool:
        # The first process sends its counts to Redis within sending_limits.FLUSH_SECONDS.
        replies.append(other.mail("app@example.com"))
        if replies[-1][0] == 250:
            other.rset()
            return False
        return True

    wait_for(refused, "MAIL FROM refused", timeout=5.0)
    code, text = replies[-1]
    assert code == 451
    assert text.startswith(b"4.7.1 Sending rate exceeded for this account, try again in ")
    seconds = int(text.split(b"try again in ")[1].split()[0])
    assert 1 <= seconds <= 60
    # AUTH failures too: two on the first listener, one on the second, then the address is refused.
    codes = []
    for process in (first, first, second, second):
        with pytest.raises(smtplib.SMTPAuthenticationError) as raised:
            process.client(client_tls, password="wrong password")
        codes.append(raised.value.smtp_code)
    assert codes == [535, 535, 535, 454]


def test_memory_counters_say_so_at_startup(start_smtp) -> None:
    process = start_smtp("alone", {})
    line = process.wait_for_event("smtp.counters")
    assert (line["shared"], line["storage"]) == (False, "memory://")
    assert "per process" in line["message"]


def test_a_deactivation_through_the_cli_ends_the_sessions_of_both_processes(
    start_smtp, client_tls: ssl.SSLContext
) -> None:
    first, second = start_smtp("first", {}), start_smtp("second", {})
    sessions = [first.client(client_tls), second.client(client_tls)]
    for client in sessions:
        client.sendmail("app@example.com", ["a@example.net"], MESSAGE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_PROXY_", "DATABASE_URL"))}
    subprocess.run(
        [str(SMTP_PROXY), "--config", str(first.config), "accounts", "deactivate", "tenant"],
        check=True,
        capture_output=True,
        timeout=60,
        env=env,
    )
    changed = time.monotonic()
    for client in sessions:
        refusal: list[tuple[int, bytes]] = []

        def refused(client: smtplib.SMTP = client, refusal: list = refusal) -> bool:
            reply = client.mail("app@example.com")
            if reply[0] == 250:
                client.rset()
                return False
            refusal.append(reply)
            return True

        wait_for(refused, "MAIL FROM refused", timeout=5.0)
        assert refusal == [(421, b"4.7.0 Account disabled, closing connection")]
    assert time.monotonic() - changed < 5.0
    for process in (first, second):
        assert process.wait_for_event("smtp.mail_refused")["reason"] == "account_disabled"


def test_serve_all_shows_the_listeners_counts_on_the_usage_endpoint(
    tmp_path: Path, pg_url: str, encryption_key: str, tls_files, client_tls: ssl.SSLContext
) -> None:
    """memory:// counts per process: under serve all the API reads the same counters as the listener."""
    database = Database(config_from_dict({"database": {"url": pg_url}}, env={}).database)
    with database.transaction() as session:
        created = accounts.create_account(
            session,
            name="tenant",
            email="ops@example.com",
            allowed_domains=["example.com"],
            password=PASSWORD,
            bcrypt_cost=4,
            actor=CLI,
        )
        account_id, api_key = created.account.id, created.api_key
    database.dispose()
    smtp_port, api_port = free_port(), free_port()
    config = {
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "hostname": "mx.test", "metrics_port": None},
        "api": {"host": "127.0.0.1", "port": api_port},
        "database": {"url": pg_url, "pool_min": 2, "pool_max": 10},
        "tls": {"cert_file": str(tls_files[0]), "key_file": str(tls_files[1])},
        "security": {"encryption_key": encryption_key, "bcrypt_cost": 4},
        "delivery": {"metrics_port": None, "poll_interval": "10s"},
        "limits": {"messages_per_hour": 10},
    }
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(config))
    process = ServeProcess("all", path, tmp_path / "all.log")
    try:
        process.wait_accepting(smtp_port)
        process.wait_accepting(api_port)
        client = smtplib.SMTP("127.0.0.1", smtp_port, local_hostname="client.test", timeout=10)
        closed_after_test(client)
        client.starttls(context=client_tls)
        client.login("tenant", PASSWORD)
        client.sendmail("app@example.com", ["a@example.net", "b@example.net"], MESSAGE)
        client.quit()
        response = requests.get(
            f"http://127.0.0.1:{api_port}/api/v1/accounts/{account_id}/usage",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10,
        )
        assert response.status_code == 200
        windows = {w["name"]: w for w in response.json()["windows"]}
        assert response.json()["shared"] is False
        assert windows["messages_per_hour"]["used"] == 1 and windows["messages_per_hour"]["limit"] == 10
        assert windows["recipients_per_day"]["used"] == 2
    finally:
        process.kill()
