"""The README's "Running behind HAProxy" example, run: its HAProxy config and its smtp-proxy config,
with 127.0.0.1 and free ports in place of the example's addresses, in front of ``smtp-proxy serve
smtp``. HAProxy's SMTP health checks (a v2 LOCAL header, then EHLO) must find the listener up, and a
client on 127.0.0.2 must be that client in the listener's log and the stored Received: field.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from pathlib import Path

import yaml
from sqlalchemy import select

from smtp_proxy.config import config_from_dict
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import Message
from smtp_proxy.db.session import Database
from smtp_proxy.storage import messages
from tests.conftest import free_port
from tests.e2e.conftest import PASSWORD, TRACE_FIELD, ServeProcess, closed_after_test, create_tenant
from tests.haproxy import Haproxy
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"From: App <app@example.com>\r\nSubject: through the README's balancer\r\n\r\nbody\r\n"


def readme_example() -> tuple[str, str]:
    """The section's literal block, split into its HAProxy part and its smtp-proxy YAML part."""
    readme = (ROOT / "README.rst").read_text()
    section = readme[readme.index("\nRunning behind HAProxy\n---") :]
    block = re.search(r"::\n\n((?:(?: {4}.*)?\n)+)", section)
    assert block, "no literal block in the section"
    text = "\n".join(line[4:] for line in block.group(1).rstrip("\n").split("\n"))
    haproxy, marker, smtp_proxy = text.partition("# /etc/smtp-proxy/config.yaml on each instance\n")
    assert marker, "the example names no smtp-proxy config"
    return haproxy, smtp_proxy


def test_the_readme_example_serves_clients_behind_haproxy(
    tmp_path: Path, pg_url: str, encryption_key: str, tls_files, client_tls: ssl.SSLContext
) -> None:
    haproxy_text, smtp_proxy_text = readme_example()
    front, back = free_port(), free_port()
    # The example's addresses and ports, made local; its checks every 5 s, every 200 ms.
    substitutions = {
        "bind :587": f"bind 127.0.0.1:{front}",
        "10.0.0.11:587": f"127.0.0.1:{back}",
        "10.0.0.12:587": f"127.0.0.1:{back}",
        "inter 5s": "inter 200ms",
    }
    for example, local in substitutions.items():
        assert example in haproxy_text, example
        haproxy_text = haproxy_text.replace(example, local)
    assert "10.0.0.5/32" in smtp_proxy_text
    example_config = yaml.safe_load(smtp_proxy_text.replace("10.0.0.5/32", "127.0.0.1/32"))

    create_tenant(pg_url)
    config = {
        "smtp": {
            **example_config["smtp"],
            "host": "127.0.0.1",
            "port": back,
            "hostname": "mx.test",
            "metrics_port": None,
        },
        "database": {"url": pg_url, "pool_min": 2, "pool_max": 10},
        "tls": {"cert_file": str(tls_files[0]), "key_file": str(tls_files[1])},
        "security": {"encryption_key": encryption_key, "bcrypt_cost": 4},
    }
    path = tmp_path / "smtp.yaml"
    path.write_text(yaml.safe_dump(config))
    listener = ServeProcess("smtp", path, tmp_path / "smtp.log")
    haproxy = None
    try:
        listener.wait_accepting(back)
        haproxy = Haproxy(tmp_path / "haproxy", haproxy_text)
        # L7OK: HAProxy's SMTP check got the greeting and a 250 to its EHLO, after its LOCAL header.
        for server in ("a", "b"):
            wait_for(
                lambda server=server: (
                    haproxy.server_check(backend="smtp_proxy", server=server) == ("UP", "L7OK")
                ),
                f"HAProxy's health check of server {server} to pass",
                timeout=15,
            )

        client = closed_after_test(
            smtplib.SMTP(
                "127.0.0.1", front, local_hostname="client.test", timeout=10, source_address=("127.0.0.2", 0)
            )
        )
        client.starttls(context=client_tls)
        client.login("tenant", PASSWORD)
        client.sendmail("app@example.com", ["someone@example.net"], MESSAGE)
        client.quit()

        def tenant_session() -> list[dict]:
            return [line for line in listener.events("smtp.disconnect") if line.get("account") == "tenant"]

        [closed] = wait_for(tenant_session, "the tenant's session's close line")
        assert (closed["client_ip"], closed["proxy_ip"]) == ("127.0.0.2", "127.0.0.1")
        checks = [line for line in listener.events("smtp.disconnect") if line.get("account") is None]
        assert checks and {line["client_ip"] for line in checks} == {"127.0.0.1"}  # LOCAL: the balancer
    finally:
        if haproxy is not None:
            haproxy.stop()
        listener.terminate()

    stored_config = config_from_dict(config, env={})
    database = Database(stored_config.database)
    try:
        with database.transaction() as session:
            [stored] = session.scalars(select(Message))
            body = messages.message_body(Cipher.from_config(stored_config.security), stored)
    finally:
        database.dispose()
    field = TRACE_FIELD.match(body)
    assert field and field.group().startswith(b"Received: from client.test ([127.0.0.2])")
