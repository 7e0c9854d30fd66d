"""Proof that secrets never reach the logs, the CLI's stderr, or a database column in the clear.

Never logged: message bodies and attachments, passwords, AUTH payloads, API
keys beyond a short prefix, provider secrets. The scenario below drives the
real storage layer (on PostgreSQL and SQLite) and the real CLI through every
path that handles one of them, the error paths included, with the root logger
at DEBUG; then it searches everything that was written.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from smtp_proxy import crypto
from smtp_proxy.config import LoggingConfig
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.errors import Conflict, DatabaseUnavailable
from smtp_proxy.logs import PREFIX_LENGTH, configure_logging, correlation
from smtp_proxy.storage import accounts, messages, providers
from smtp_proxy.storage.audit import CLI
from tests.cli_runner import run_cli
from tests.logins import login_hash

BAD_DB_URL = "postgresql://user:pw@127.0.0.1:1/x"
SMTP_PROXY = Path(sys.executable).parent / "smtp-proxy"


class RawRecords(logging.Handler):
    """Everything about every record, before any formatter or redaction touches it."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []
        self.dumps: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        parts = [record.getMessage(), repr(record.msg), repr(record.args)]
        parts += [f"{name}={value!r}" for name, value in vars(record).items()]
        if record.exc_info and record.exc_info[1] is not None:
            parts += traceback.format_exception(record.exc_info[1])
        self.dumps.append("\n".join(parts))

    @property
    def text(self) -> str:
        return "\n".join(self.dumps)


@dataclass
class Captured:
    stream: io.StringIO
    raw: RawRecords

    @property
    def output(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def captured_logs(restore_logging: None) -> Iterator[Captured]:
    """Root at DEBUG into a StringIO, plus a raw handler that runs ahead of the redaction."""
    root = logging.getLogger()
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="debug", format="json"), stream=stream)
    raw = RawRecords()
    root.handlers.insert(0, raw)
    yield Captured(stream, raw)


@dataclass
class Secrets:
    """Everything that must never be seen in a log line (or, for most, in the database)."""

    values: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, value: str) -> str:
        assert value, label
        self.values[label] = value
        return value


def assert_free_of(haystack: str, found_in: str, secret_values: dict[str, str]) -> None:
    leaks = [label for label, value in secret_values.items() if value in haystack]
    assert not leaks, f"{found_in} contains {leaks}"


def make_message(sender: str, recipient: str, body: str, attachment: bytes) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = "Quarterly numbers"
    msg.set_content(body)
    msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="numbers.bin")
    return msg.as_bytes()


def raw_rows(db_url: str) -> list[tuple[str, str, Any]]:
    """(table, column, value) for every column of every row of every table."""
    engine = create_engine(db_url)
    try:
        found = []
        with engine.connect() as connection:
            for table in inspect(connection).get_table_names():
                result = connection.execute(text(f'SELECT * FROM "{table}"'))
                columns = list(result.keys())
                for row in result:
                    found += [(table, column, value) for column, value in zip(columns, row, strict=True)]
        return found
    finally:
        engine.dispose()


def cell_forms(value: Any) -> tuple[bytes, str]:
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), bytes(value).decode("latin-1")
    as_text = value if isinstance(value, str) else repr(value)
    if isinstance(value, (dict, list)):
        as_text += json.dumps(value, default=str)
    return as_text.encode("utf-8"), as_text


def test_no_secret_reaches_logs_cli_output_or_database_columns(
    db_url: str, make_config, encryption_key: str, captured_logs: Captured, tmp_path: Path
) -> None:
    s = Secrets()
    config = make_config(db_url)
    cipher = Cipher.from_config(config.security)
    bcrypt_cost = config.security.bcrypt_cost
    password = s.add("account password", "Initial-Pa55word-" + secrets.token_hex(8))
    new_password = s.add("new account password", "Changed-Pa55word-" + secrets.token_hex(8))
    provider_key = s.add("provider api key", "SG." + secrets.token_urlsafe(24))
    provider_key_2 = s.add("rotated provider api key", "SG." + secrets.token_urlsafe(24))
    smtp_password = s.add("provider smtp password", "smtp-Relay-Secret-" + secrets.token_hex(8))
    smtp_password_2 = s.add("rotated smtp password", "smtp-Relay-Secret-" + secrets.token_hex(8))
    body_text = s.add("message body", "BODY-CANARY-" + secrets.token_hex(12) + " the launch code is 0000")
    attachment = ("ATTACHMENT-CANARY-" + secrets.token_hex(8)).encode("ascii")
    s.add("attachment", attachment.decode("ascii"))
    s.add("attachment (base64)", base64.b64encode(attachment).decode("ascii"))
    data = make_message("app@example.com", "customer@example.org", body_text, attachment)
    assert base64.b64encode(attachment) in data

    database = Database(config.database)
    try:
        # --- accounts: create, duplicate, rotate the key, new password -------------------------
        with correlation("test-accounts"):
            with database.transaction() as session:
                created = accounts.create_account(
                    session,
                    name="acme",
                    email="ops@example.com",
                    allowed_domains=["example.com"],
                    bcrypt_cost=bcrypt_cost,
                    password=password,
                    actor=CLI,
                )
            assert created.password == password
            first_key = s.add("first api key", created.api_key)
            account_id = created.account.id

            with pytest.raises(Conflict) as duplicate_account:
                with database.transaction() as session:
                    accounts.create_account(
                        session,
                        name="acme",
                        email="other@example.com",
                        allowed_domains=["example.com"],
                        bcrypt_cost=bcrypt_cost,
                        password=password,
                        actor=CLI,
                    )
            logging.getLogger("smtp_proxy.tests").warning("duplicate", exc_info=duplicate_account.value)

            with database.transaction() as session:
                account = accounts.get_account(session, account_id)
                second_key = s.add("rotated api key", accounts.rotate_api_key(session, account, actor=CLI))
            with database.transaction() as session:
                account = accounts.get_account(session, account_id)
                assert (
                    accounts.set_password(session, account, bcrypt_cost, new_password, actor=CLI)
                    == new_password
                )

            with database.transaction() as session:
                account = accounts.get_account(session, account_id)
                assert crypto.verify_password(new_password, login_hash(session, account))
                assert not crypto.verify_password(password, login_hash(session, account))
                assert accounts.find_by_api_key(session, first_key) is None
                assert accounts.find_by_api_key(session, second_key).id == account_id

        # --- providers: create with secrets, duplicate, rotate them, read them back ------------
        with correlation("test-providers"):
            with database.transaction() as session:
                provider = providers.create_provider(
                    session,
                    cipher,
                    account_id=account_id,
                    name="primary",
                    provider_type="smtp",
                    api_key=provider_key,
                    settings={"region": "eu"},
                    smtp_config={
                        "host": "smtp.example.net",
                        "port": 587,
                        "username": "relay-user",
                        "password": smtp_password,
                    },
                    actor=CLI,
                )
                provider_id = provider.id
            with pytest.raises(Conflict) as duplicate_provider:
                with database.transaction() as session:
                    providers.create_provider(
                        session,
                        cipher,
                        account_id=account_id,
                        name="primary",
                        provider_type="sendgrid",
                        api_key=provider_key,
                        actor=CLI,
                    )
            logging.getLogger("smtp_proxy.tests").warning("duplicate", exc_info=duplicate_provider.value)
            with database.transaction() as session:
                provider = providers.get_provider(session, account_id, provider_id)
                assert providers.provider_secrets(cipher, provider) == providers.ProviderSecrets(
                    provider_key, smtp_password
                )
                providers.update_provider(
                    session,
                    cipher,
                    provider,
                    api_key=provider_key_2,
                    smtp_config={"host": "smtp.example.net", "port": 587, "password": smtp_password_2},
                    actor=CLI,
                )
            with database.transaction() as session:
                provider = providers.get_provider(session, account_id, provider_id)
                assert provider.smtp_config == {"host": "smtp.example.net", "port": 587}
                assert providers.provider_secrets(cipher, provider) == providers.ProviderSecrets(
                    provider_key_2, smtp_password_2
                )

        # --- a message with a body and an attachment: enqueue and read back ---------------------
        with correlation("test-message") as cid:
            with database.transaction() as session:
                message = messages.enqueue_message(
                    session,
                    cipher,
                    account_id=account_id,
                    sender="app@example.com",
                    recipients=["customer@example.org"],
                    data=data,
                    correlation_id=cid,
                )
                message_id = message.id
            with database.transaction() as session:
                stored = messages.get_message(session, message_id, account_id=account_id)
                assert messages.message_body(cipher, stored) == data
                assert stored.subject == "Quarterly numbers"
                assert stored.size == len(data)
    finally:
        database.dispose()

    # --- an unreachable database whose URL carries a password -----------------------------------
    bad = Database(make_config(BAD_DB_URL, database={"connect_timeout": "1s"}).database)
    try:
        with correlation("test-unavailable"):
            with pytest.raises(DatabaseUnavailable) as unavailable:
                with bad.transaction() as session:
                    session.execute(text("SELECT 1"))
        assert "pw" not in str(unavailable.value)
        # What a listener does with it: log it, traceback and driver cause included.
        logging.getLogger("smtp_proxy.tests").error("database down", exc_info=unavailable.value)
    finally:
        bad.dispose()

    # --- the CLI (in this process: what it logs lands in the captured logs above) ---------------
    config_file = tmp_path / "cli-config.yaml"
    config_file.write_text(
        "security:\n  encryption_key: ${SMTP_PROXY_ENCRYPTION_KEY}\n  bcrypt_cost: 4\n"
        "logging:\n  level: debug\n",
        encoding="utf-8",
    )
    env = {
        "DATABASE_URL": db_url,
        "SMTP_PROXY_ENCRYPTION_KEY": encryption_key,
        "SMTP_PROXY_CONFIG": str(config_file),
    }
    cli_password = s.add("cli password", "Cli-Given-Pa55word-" + secrets.token_hex(8))
    stderr = []

    create = run_cli(
        ["accounts", "create", "--name", "cli-tenant", "--email", "ops@example.com",
         "--domain", "cli.example.com", "--password-stdin"],
        env=env, stdin=cli_password + "\n",
    )  # fmt: skip
    stderr.append(create.stderr)
    assert create.returncode == 0, create.stderr
    created_json = json.loads(create.stdout)
    assert created_json["name"] == "cli-tenant"
    assert created_json["password"] == cli_password
    cli_key = s.add("cli api key", created_json["api_key"])
    assert len(cli_key) == 64 and cli_key in create.stdout

    duplicate = run_cli(
        ["accounts", "create", "--name", "cli-tenant", "--email", "ops@example.com",
         "--domain", "cli.example.com", "--password-stdin"],
        env=env, stdin=cli_password + "\n",
    )  # fmt: skip
    stderr.append(duplicate.stderr)
    assert duplicate.returncode == 1
    assert "already exists" in duplicate.stderr
    assert duplicate.stdout == ""

    for refused in ("Tiny-Secret", "Long-Secret-" + "x" * 70, "Ctrl-Secret-\x1b[31m-x"):
        s.add(f"refused cli password {refused[:4]}", refused)
        policy = run_cli(
            ["accounts", "create", "--name", "cli-refused", "--email", "ops@example.com",
             "--domain", "example.com", "--password-stdin"],
            env=env, stdin=refused + "\n",
        )  # fmt: skip
        stderr.append(policy.stderr)
        assert policy.returncode == 1
        assert policy.stderr.startswith("smtp-proxy: error: password: ")
        assert policy.stdout == ""

    rotate = run_cli(["accounts", "rotate-key", "cli-tenant"], env=env)
    stderr.append(rotate.stderr)
    assert rotate.returncode == 0, rotate.stderr
    rotated_json = json.loads(rotate.stdout)
    cli_key_2 = s.add("cli rotated api key", rotated_json["api_key"])
    assert rotated_json["name"] == "cli-tenant"
    assert cli_key_2 != cli_key

    set_pw = run_cli(["accounts", "set-password", "cli-tenant"], env=env)
    stderr.append(set_pw.stderr)
    assert set_pw.returncode == 0, set_pw.stderr
    cli_password_2 = s.add("cli generated password", json.loads(set_pw.stdout)["password"])

    listed = run_cli(["accounts", "list"], env=env)
    stderr.append(listed.stderr)
    assert listed.returncode == 0, listed.stderr
    assert {a["name"] for a in json.loads(listed.stdout)} == {"acme", "cli-tenant"}
    assert_free_of(listed.stdout, "`accounts list` output", s.values)

    unreachable = run_cli(["accounts", "list"], env={**env, "DATABASE_URL": BAD_DB_URL})
    stderr.append(unreachable.stderr)
    assert unreachable.returncode == 1
    assert "database unavailable" in unreachable.stderr
    assert "127.0.0.1:1" in unreachable.stderr

    # The CLI's credentials are real: the database holds their digest and hash.
    check = Database(config.database)
    try:
        with check.transaction() as session:
            tenant = accounts.get_account_by_name(session, "cli-tenant")
            assert tenant.api_key_digest == crypto.api_key_digest(cli_key_2)
            assert crypto.verify_password(cli_password_2, login_hash(session, tenant))
            assert accounts.find_by_api_key(session, cli_key) is None
    finally:
        check.dispose()

    # --- now search everything that was written --------------------------------------------------
    logged = captured_logs.output
    raw = captured_logs.raw.text
    cli_stderr = "\n".join(stderr)

    # The scenario did log: the JSON lines parse, and the unreachable database was reported.
    parsed = [json.loads(line) for line in logged.splitlines()]
    unavailable_lines = [p for p in parsed if p.get("event") == "db.unavailable"]
    assert unavailable_lines, logged
    assert unavailable_lines[0]["correlation_id"] == "test-unavailable"
    assert captured_logs.raw.records

    assert_free_of(logged, "the JSON log output", s.values)
    assert_free_of(raw, "a log record (before redaction)", s.values)
    assert_free_of(cli_stderr, "the CLI's stderr", s.values)
    for label, text_ in (("JSON log", logged), ("raw log record", raw), ("CLI stderr", cli_stderr)):
        assert "pw" not in text_, f"the database URL password is in the {label}"
        # API keys may appear as a short prefix, never more.
        for key in (first_key, second_key, cli_key, cli_key_2):
            assert key[: PREFIX_LENGTH + 1] not in text_, f"more than an API key prefix in the {label}"
    # No password hash or key digest either.
    assert "$2b$" not in logged and "$2b$" not in raw and "$2b$" not in cli_stderr
    for key in (first_key, second_key, cli_key, cli_key_2):
        digest = crypto.api_key_digest(key)
        assert digest not in logged and digest not in raw and digest not in cli_stderr

    # --- and the database rows hold no plaintext secret ----------------------------------------
    cells = raw_rows(db_url)
    tables = {table for table, _, _ in cells}
    assert {"accounts", "esp_providers", "messages", "audit_log"} <= tables
    for table, column, value in cells:
        as_bytes, as_text = cell_forms(value)
        for label, secret in s.values.items():
            assert secret.encode("utf-8") not in as_bytes, f"{label} in {table}.{column}"
            assert secret not in as_text, f"{label} in {table}.{column}"
    # The rows are there, in their protected form.
    digests = {str(v) for t, c, v in cells if (t, c) == ("accounts", "api_key_digest")}
    assert crypto.api_key_digest(second_key) in digests
    assert crypto.api_key_digest(cli_key_2) in digests
    bodies = [cell_forms(v)[0] for t, c, v in cells if (t, c) == ("messages", "body_encrypted")]
    assert len(bodies) == 1 and bodies[0][:1] == b"\x01" and len(bodies[0]) == len(data) + 33
