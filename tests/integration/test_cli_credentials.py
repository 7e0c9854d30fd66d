"""``smtp-proxy credentials create|list|disable|enable|delete`` against PostgreSQL and SQLite.

The commands run through the same click runner as tests/integration/test_cli.py, with its
fixtures; what they stored is read back through the storage layer and the audit table.
"""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import select

from smtp_proxy import crypto
from smtp_proxy.api.schemas import SCHEMAS
from smtp_proxy.db.models import AuditLog
from smtp_proxy.db.session import Database
from smtp_proxy.storage import credentials as credential_store
from tests.integration import test_cli
from tests.integration.test_cli import Cli, assert_one_line_error, create

# test_cli.py's fixtures, for pytest to find in this module too.
make_cli, cli, sqlite_cli, storage = test_cli.make_cli, test_cli.cli, test_cli.sqlite_cli, test_cli.storage

# The CLI prints a credential as the API shows it.
KEYS = set(SCHEMAS["SmtpCredential"]["required"])


def audit_trail(storage: Database, credential_id: str) -> list[tuple[str, str, list[str]]]:
    """(action, actor, fields) of one credential's audit rows, oldest first."""
    try:
        with storage.transaction() as session:
            rows = session.scalars(
                select(AuditLog)
                .where(AuditLog.entity == "smtp_credential", AuditLog.entity_id == uuid.UUID(credential_id))
                .order_by(AuditLog.created_at, AuditLog.id)
            )
            return [(row.action, row.actor, row.changes["fields"]) for row in rows]
    finally:
        storage.remove_session()


def stored_hash(storage: Database, username: str) -> str:
    try:
        with storage.transaction() as session:
            return credential_store.get_by_username(session, username).password_hash
    finally:
        storage.remove_session()


def labels(cli: Cli, account: str) -> list[str]:
    return [item["label"] for item in cli.json("credentials", "list", account)]


def test_create_prints_a_generated_password_once(cli: Cli, storage: Database) -> None:
    account = create(cli, "alice")
    result = cli.ok("credentials", "create", "alice", "printer")
    assert result.stderr == ""
    created = json.loads(result.stdout)
    assert set(created) == KEYS | {"password"}
    assert created["username"] == "alice.printer"
    assert created["account_id"] == account["id"]
    assert created["enabled"] is True
    assert created["allowed_ips"] == [] and created["allowed_domains"] is None
    assert created["last_used_at"] is None
    assert len(created["password"]) == 32
    hashed = stored_hash(storage, "alice.printer")
    assert hashed.startswith("$2b$04$")  # bcrypt_cost 4 from the config file
    assert crypto.verify_password(created["password"], hashed)

    listed = cli.json("credentials", "list", "alice")
    # The account's own login comes first; no password and no hash in the listing.
    assert [item["username"] for item in listed] == ["alice", "alice.printer"]
    assert listed[1] == {key: value for key, value in created.items() if key != "password"}
    text = cli.ok("credentials", "list", "alice").stdout
    assert created["password"] not in text and "$2b$" not in text
    assert audit_trail(storage, created["id"]) == [
        ("create", "cli", ["enabled", "label", "password", "username"])
    ]


def test_create_with_a_chosen_user_name_password_and_restrictions(cli: Cli, storage: Database) -> None:
    create(cli, "alice", "--domain", "*.alice.example.com")
    created = cli.json(
        "credentials", "create", "alice", "scanner", "--username", "alice.scan-3",
        "--password-stdin", "--allowed-ip", "192.0.2.0/24", "--allowed-ip", "2001:db8::/48",
        "--allowed-domain", "News.Alice.Example.com",
        stdin="a chosen password of 16+\n",
    )  # fmt: skip
    assert created["username"] == "alice.scan-3"
    assert created["label"] == "scanner"
    assert created["password"] == "a chosen password of 16+"
    assert created["allowed_ips"] == ["192.0.2.0/24", "2001:db8::/48"]
    assert created["allowed_domains"] == ["news.alice.example.com"]
    assert crypto.verify_password("a chosen password of 16+", stored_hash(storage, "alice.scan-3"))
    assert audit_trail(storage, created["id"]) == [
        ("create", "cli", ["allowed_domains", "allowed_ips", "enabled", "label", "password", "username"])
    ]


def test_disable_enable_and_delete(cli: Cli, storage: Database) -> None:
    create(cli, "alice")
    created = cli.json("credentials", "create", "alice", "cron")

    disabled = cli.json("credentials", "disable", "alice.cron")
    assert disabled["enabled"] is False and "password" not in disabled
    assert [item["enabled"] for item in cli.json("credentials", "list", "alice")] == [True, False]
    enabled = cli.json("credentials", "enable", "alice.cron")
    assert enabled["enabled"] is True
    # The account's own login is a credential like the others.
    assert cli.json("credentials", "disable", "alice")["enabled"] is False

    assert cli.ok("credentials", "delete", "alice.cron").stdout.strip() == "credential alice.cron deleted"
    assert labels(cli, "alice") == ["account"]
    assert audit_trail(storage, created["id"]) == [
        ("create", "cli", ["enabled", "label", "password", "username"]),
        ("disable", "cli", ["enabled"]),
        ("update", "cli", ["enabled"]),
        ("delete", "cli", []),
    ]
    assert_one_line_error(cli.run("credentials", "delete", "alice.cron"), "no SMTP credential 'alice.cron'")


def test_a_taken_label_or_user_name_fails_in_one_line(cli: Cli) -> None:
    create(cli, "alice")
    create(cli, "alice.billing")  # an account name with a dot: its own login is "alice.billing"
    cli.ok("credentials", "create", "alice", "web")
    assert_one_line_error(cli.run("credentials", "create", "alice", "web"), "labelled 'web'")
    assert_one_line_error(cli.run("credentials", "create", "alice", "billing"), "'alice.billing' is taken")
    result = cli.run("credentials", "create", "alice", "other", "--username", "alice.web")
    assert_one_line_error(result, "'alice.web' is taken")
    assert labels(cli, "alice") == ["account", "web"]


@pytest.mark.parametrize(
    ("args", "stdin", "fragments"),
    [
        (["--password-stdin"], "fifteen chars!!\n", ("password:", "at least 16")),
        (["--password-stdin"], "", ("password:",)),
        (["--allowed-ip", "192.0.2.1/24"], None, ("allowed_ips[0]:", "host bits")),
        (["--allowed-ip", "198.51.100.0/24", "--allowed-ip", "nonsense"], None, ("allowed_ips[1]:",)),
        (["--allowed-domain", "example.org"], None, ("allowed_domains:", "not among the account's")),
        (["--username", "bob.device"], None, ("username:", "'alice.'")),
        (["--username", "alice device"], None, ("username:",)),
    ],
    ids=[
        "short-password",
        "no-password",
        "host-bits",
        "not-a-network",
        "foreign-domain",
        "foreign-name",
        "space",
    ],
)
def test_invalid_input_fails_in_one_line_and_stores_nothing(
    sqlite_cli: Cli, args: list[str], stdin: str | None, fragments: tuple[str, ...]
) -> None:
    create(sqlite_cli, "alice")
    result = sqlite_cli.run("credentials", "create", "alice", "device", *args, stdin=stdin)
    assert_one_line_error(result, "smtp-proxy: error: ", *fragments)
    assert labels(sqlite_cli, "alice") == ["account"]


def test_a_bad_label_or_unknown_names_fail_in_one_line(sqlite_cli: Cli) -> None:
    create(sqlite_cli, "alice")
    assert_one_line_error(sqlite_cli.run("credentials", "create", "alice", "a label"), "label:")
    for command in (["create", "nobody", "device"], ["list", "nobody"]):
        assert_one_line_error(sqlite_cli.run("credentials", *command), "no account named 'nobody'")
    for command in ("disable", "enable", "delete"):
        assert_one_line_error(sqlite_cli.run("credentials", command, "alice.none"), "'alice.none'")
    assert labels(sqlite_cli, "alice") == ["account"]
