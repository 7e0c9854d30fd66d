"""The ``smtp-proxy`` command against real databases.

Most cases run the click command in this process (click's CliRunner: its own stdin, stdout, stderr
and environment), which is the same code path as the console script minus the interpreter start.
The cases whose point is the process itself (the installed entry point, exit codes and one-line
errors with a broken config or an unreachable database, --help with a broken config) run the
console script as a real subprocess (``Cli.run_process``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from smtp_proxy import __version__, crypto
from smtp_proxy.db.migrate import head_revision
from smtp_proxy.db.session import Database
from smtp_proxy.storage import accounts as account_store
from smtp_proxy.storage import audit
from tests.cli_runner import OPERATOR_VARIABLES, run_cli
from tests.logins import login_hash

SMTP_PROXY = Path(sys.executable).with_name("smtp-proxy")
CONFIG_YAML = """\
database:
  pool_min: 1
  pool_max: 2
  connect_timeout: 2s
security:
  encryption_key: ${SMTP_PROXY_ENCRYPTION_KEY}
  bcrypt_cost: 4
"""


@dataclass
class Cli:
    """Runs ``smtp-proxy`` with a clean environment, a config file and a database."""

    cwd: Path
    config_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def _command(self, args: tuple[str, ...], use_config_option: bool) -> list[str]:
        return [*(["--config", str(self.config_path)] if use_config_option else []), *args]

    def run(
        self,
        *args: str,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
        use_config_option: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """In this process (tests/cli_runner.py)."""
        return run_cli(
            self._command(args, use_config_option), stdin=stdin or "", env={**self.env, **(env or {})}
        )

    def run_process(
        self, *args: str, env: dict[str, str] | None = None, use_config_option: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The installed console script as a real subprocess."""
        base = {
            k: v
            for k, v in os.environ.items()
            if k not in OPERATOR_VARIABLES and not k.startswith("SMTP_PROXY_")
        }
        return subprocess.run(
            [str(SMTP_PROXY), *self._command(args, use_config_option)],
            input="",
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env={**base, **self.env, **(env or {})},
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result

    def json(self, *args: str, **kwargs):
        return json.loads(self.ok(*args, **kwargs).stdout)


@pytest.fixture
def make_cli(tmp_path: Path, encryption_key: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)

    def make(database_url: str) -> Cli:
        config_path = tmp_path / "config.yaml"
        config_path.write_text(CONFIG_YAML)
        env = {"SMTP_PROXY_ENCRYPTION_KEY": encryption_key, "DATABASE_URL": database_url}
        return Cli(cwd=tmp_path, config_path=config_path, env=env)

    assert SMTP_PROXY.exists(), f"console script not installed at {SMTP_PROXY}"
    return make


@pytest.fixture
def cli(make_cli, db_url: str) -> Cli:
    return make_cli(db_url)


@pytest.fixture
def sqlite_cli(make_cli, sqlite_url: str) -> Cli:
    return make_cli(sqlite_url)


@pytest.fixture
def storage(db_url: str, make_config) -> Iterator[Database]:
    """The same database as the CLI's, to check what the commands stored."""
    db = Database(make_config(db_url).database)
    yield db
    db.dispose()


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], *fragments: str, exit_code: int = 1
) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("smtp-proxy: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""
    return lines[0]


def create(cli: Cli, name: str = "alice", *extra: str, stdin: str | None = None) -> dict:
    """An account whose sender domain is ``<name>.example.com`` (one domain, one tenant)."""
    return cli.json(
        "accounts", "create", "--name", name, "--email", f"{name}@example.com",
        "--domain", f"{name}.example.com", *extra, stdin=stdin,
    )  # fmt: skip


# --- db -------------------------------------------------------------------------------------------


def test_db_upgrade_on_an_empty_sqlite_file_then_again(make_cli, tmp_path: Path) -> None:
    database_file = tmp_path / "data" / "fresh.db"
    cli = make_cli(f"sqlite:///{database_file}")
    head = head_revision()
    assert head

    # Only db upgrade creates the file; db current says it is not there yet, and creates nothing.
    missing = cli.run("db", "current")
    assert (missing.returncode, missing.stderr) == (
        2,
        f"smtp-proxy: error: the database file {database_file} does not exist: run smtp-proxy db upgrade\n",
    )
    assert not database_file.parent.exists()
    assert cli.ok("db", "upgrade").stdout.strip() == f"database upgraded from empty to {head}"
    assert database_file.is_file()
    assert cli.ok("db", "upgrade").stdout.strip() == f"database is up to date at revision {head}"
    assert cli.ok("db", "current").stdout.strip() == f"database: {head}; code: {head}"
    # The migrated file is usable straight away.
    assert cli.json("accounts", "list") == []


def test_db_upgrade_and_current_on_a_migrated_database(cli: Cli) -> None:
    head = head_revision()
    assert cli.ok("db", "upgrade").stdout.strip() == f"database is up to date at revision {head}"
    assert cli.ok("db", "current").stdout.strip() == f"database: {head}; code: {head}"


# --- accounts -------------------------------------------------------------------------------------


def test_accounts_create_prints_credentials_once(cli: Cli, storage: Database) -> None:
    result = cli.ok(
        "accounts", "create", "--name", "alice", "--email", "Ops@Example.COM",
        "--domain", "Example.COM", "--domain", "*.Mail.Example.com", "--admin",
    )  # fmt: skip
    created = json.loads(result.stdout)
    assert set(created) == {"id", "name", "api_key", "password"}
    assert created["name"] == "alice"
    uuid.UUID(created["id"])
    assert re.fullmatch(r"[0-9a-f]{64}", created["api_key"])
    assert len(created["password"]) >= crypto.MIN_PASSWORD_LENGTH
    assert result.stderr == ""

    with storage.transaction() as session:
        account = account_store.get_account_by_name(session, "alice")
        assert str(account.id) == created["id"]
        assert account.is_admin is True
        assert account.email == "Ops@example.com"
        assert account.allowed_domains == ["example.com", "*.mail.example.com"]
        # bcrypt_cost 4 from the config file given with --config.
        assert login_hash(session, account).startswith("$2b$04$")
        assert crypto.verify_password(created["password"], login_hash(session, account))
        found = account_store.find_by_api_key(session, created["api_key"])
        assert found is not None and found.id == account.id


def test_accounts_create_with_password_stdin(cli: Cli, storage: Database) -> None:
    created = create(cli, "bob", "--password-stdin", stdin="my chosen password\n")
    assert created["password"] == "my chosen password"
    with storage.transaction() as session:
        account = account_store.get_account_by_name(session, "bob")
        assert account.is_admin is False
        assert crypto.verify_password("my chosen password", login_hash(session, account))
        assert not crypto.verify_password("my chosen password\n", login_hash(session, account))


def test_config_file_from_environment_variable(make_cli, sqlite_url: str, make_config) -> None:
    cli = make_cli(sqlite_url)
    result = cli.run(
        "accounts", "create", "--name", "envcfg", "--email", "e@example.com", "--domain", "example.com",
        env={"SMTP_PROXY_CONFIG": str(cli.config_path)}, use_config_option=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    db = Database(make_config(sqlite_url).database)
    try:
        with db.transaction() as session:
            account = account_store.get_account_by_name(session, "envcfg")
            # The default cost is 12: cost 4 proves the file named by SMTP_PROXY_CONFIG was read.
            assert login_hash(session, account).startswith("$2b$04$")
            assert crypto.verify_password(created["password"], login_hash(session, account))
    finally:
        db.dispose()


def test_accounts_list(cli: Cli) -> None:
    assert cli.json("accounts", "list") == []
    bob = create(cli, "bob")
    alice = create(cli, "alice", "--admin", "--domain", "*.example.org")
    listed = cli.json("accounts", "list")
    assert [a["name"] for a in listed] == ["alice", "bob"]
    assert [a["id"] for a in listed] == [alice["id"], bob["id"]]
    first = listed[0]
    assert set(first) == {
        "id",
        "name",
        "email",
        "allowed_domains",
        "is_admin",
        "active",
        "allow_any_header_from",
        "limits",
        "relay_networks",
        "bounces",
        "created_at",
    }
    assert first["email"] == "alice@example.com"
    assert first["allowed_domains"] == ["alice.example.com", "*.example.org"]
    assert first["allow_any_header_from"] is False
    assert first["limits"] == {}
    assert first["bounces"] is None  # delivery.bounces holds
    assert first["is_admin"] is True
    assert first["active"] is True
    assert first["created_at"].endswith("+00:00")
    assert listed[1]["is_admin"] is False
    # No secret in the listing.
    text = json.dumps(listed)
    for secret in (alice["password"], alice["api_key"], bob["password"], bob["api_key"]):
        assert secret not in text


def test_set_password_generated_and_from_stdin(cli: Cli, storage: Database) -> None:
    created = create(cli, "alice")
    generated = cli.json("accounts", "set-password", "alice")
    assert set(generated) == {"name", "password"}
    assert generated["name"] == "alice"
    assert generated["password"] != created["password"]
    with storage.transaction() as session:
        account = account_store.get_account_by_name(session, "alice")
        assert crypto.verify_password(generated["password"], login_hash(session, account))
        assert not crypto.verify_password(created["password"], login_hash(session, account))
    storage.remove_session()

    given = cli.json(
        "accounts", "set-password", "alice", "--password-stdin", stdin="another long password\r\n"
    )
    assert given == {"name": "alice", "password": "another long password"}
    with storage.transaction() as session:
        account = account_store.get_account_by_name(session, "alice")
        assert crypto.verify_password("another long password", login_hash(session, account))
        assert not crypto.verify_password(generated["password"], login_hash(session, account))


def test_rotate_key(cli: Cli, storage: Database) -> None:
    created = create(cli, "alice")
    rotated = cli.json("accounts", "rotate-key", "alice")
    assert set(rotated) == {"name", "api_key"}
    assert rotated["name"] == "alice"
    assert re.fullmatch(r"[0-9a-f]{64}", rotated["api_key"])
    assert rotated["api_key"] != created["api_key"]
    with storage.transaction() as session:
        assert account_store.find_by_api_key(session, created["api_key"]) is None
        found = account_store.find_by_api_key(session, rotated["api_key"])
        assert found is not None and str(found.id) == created["id"]


def test_deactivate(cli: Cli, storage: Database) -> None:
    created = create(cli, "alice")
    create(cli, "bob")
    assert cli.ok("accounts", "deactivate", "alice").stdout.strip() == "account alice deactivated"
    listed = {a["name"]: a for a in cli.json("accounts", "list")}
    assert listed["alice"]["active"] is False
    assert listed["bob"]["active"] is True
    assert listed["alice"]["email"] == "alice@example.com"
    with storage.transaction() as session:
        assert account_store.find_by_api_key(session, created["api_key"]) is None
    # Again: still fine, still inactive.
    cli.ok("accounts", "deactivate", "alice")
    assert {a["name"]: a["active"] for a in cli.json("accounts", "list")} == {"alice": False, "bob": True}


def test_accounts_create_with_header_from_exemption_and_limits(cli: Cli, storage: Database) -> None:
    create(
        cli, "alice", "--allow-any-header-from", "--limit", "messages_per_hour=100",
        "--limit", "recipients_per_day=none", "--limit", "messages_per_day=5",
    )  # fmt: skip
    create(cli, "bob")
    listed = {a["name"]: a for a in cli.json("accounts", "list")}
    assert listed["alice"]["allow_any_header_from"] is True
    assert listed["alice"]["limits"] == {
        "messages_per_hour": 100,
        "messages_per_day": 5,
        "recipients_per_day": None,
    }
    assert listed["bob"]["allow_any_header_from"] is False and listed["bob"]["limits"] == {}
    with storage.transaction() as session:
        account = account_store.get_account_by_name(session, "alice")
        rows = audit.list_entries(session, account.id)
        assert [(r.action, r.actor) for r in rows] == [("create", "cli")]
        assert {"allow_any_header_from", "limits"} <= set(rows[0].changes["fields"])


def test_accounts_update_changes_domains_flags_and_limits_audited(cli: Cli, storage: Database) -> None:
    create(cli, "alice", "--limit", "messages_per_hour=100", "--limit", "messages_per_day=1000")
    shown = cli.json(
        "accounts", "update", "alice", "--domain", "Shop.Example", "--domain", "*.shop.example",
        "--allow-any-header-from", "--admin", "--limit", "messages_per_minute=10",
        "--limit", "messages_per_hour=none", "--limit", "messages_per_day=default",
    )  # fmt: skip
    assert shown["allowed_domains"] == ["shop.example", "*.shop.example"]  # replaced, normalised
    assert shown["allow_any_header_from"] is True and shown["is_admin"] is True
    # Limits given are set one by one; "default" drops the account's own value.
    assert shown["limits"] == {"messages_per_minute": 10, "messages_per_hour": None}
    assert cli.json("accounts", "list")[0] == shown

    shown = cli.json("accounts", "update", "alice", "--no-allow-any-header-from", "--no-admin")
    assert shown["allow_any_header_from"] is False and shown["is_admin"] is False
    assert shown["allowed_domains"] == ["shop.example", "*.shop.example"]  # untouched

    cli.ok("accounts", "deactivate", "alice")
    assert cli.json("accounts", "update", "alice", "--activate")["active"] is True
    with storage.transaction() as session:
        account = account_store.get_account_by_name(session, "alice")
        rows = [
            (r.action, r.actor, r.changes["fields"])
            for r in reversed(audit.list_entries(session, account.id))
        ]
    assert rows[1:] == [
        ("update", "cli", ["allow_any_header_from", "allowed_domains", "is_admin", "limits"]),
        ("update", "cli", ["allow_any_header_from", "is_admin"]),
        ("deactivate", "cli", ["active"]),
        ("reactivate", "cli", ["active"]),
    ]


def test_accounts_update_sets_bounces_and_drops_back_to_the_default_audited(
    cli: Cli, storage: Database
) -> None:
    create(cli, "alice")
    assert cli.json("accounts", "list")[0]["bounces"] is None
    assert cli.json("accounts", "update", "alice", "--no-bounces")["bounces"] is False
    assert cli.json("accounts", "update", "alice", "--bounces")["bounces"] is True
    shown = cli.json("accounts", "update", "alice", "--bounces-default")
    assert shown["bounces"] is None and cli.json("accounts", "list")[0] == shown
    result = cli.run("accounts", "update", "alice", "--bounces", "--bounces-default")
    assert_one_line_error(result, "smtp-proxy: error: ", "--bounces-default cannot be given with")
    with storage.transaction() as session:
        account = account_store.get_account_by_name(session, "alice")
        assert account.bounces is None
        fields = [r.changes["fields"] for r in reversed(audit.list_entries(session, account.id))]
    assert fields[1:] == [["bounces"]] * 3


def test_a_taken_domain_fails_in_one_line_on_create_update_and_activate(cli: Cli) -> None:
    create(cli, "holder", "--domain", "*.shop.example")
    create(cli, "other")
    before = cli.json("accounts", "list")

    args = [
        "accounts",
        "create",
        "--name",
        "newcomer",
        "--email",
        "n@example.com",
        "--domain",
        "eu.shop.example",
    ]
    assert_one_line_error(cli.run(*args), "smtp-proxy: error: ", "eu.shop.example", "another active account")
    result = cli.run("accounts", "update", "other", "--domain", "*.eu.shop.example")
    assert_one_line_error(result, "*.eu.shop.example", "another active account")
    assert cli.json("accounts", "list") == before

    # A deactivated holder frees it; coming back while it is held fails.
    cli.ok("accounts", "deactivate", "holder")
    cli.ok("accounts", "update", "other", "--domain", "eu.shop.example")
    result = cli.run("accounts", "update", "holder", "--activate")
    assert_one_line_error(result, "cannot reactivate", "*.shop.example")
    assert {a["name"]: a["active"] for a in cli.json("accounts", "list")}["holder"] is False


def test_shared_domains_pass_when_unique_sender_domains_is_off(cli: Cli) -> None:
    cli.config_path.write_text(CONFIG_YAML + "  unique_sender_domains: false\n")
    create(cli, "first", "--domain", "shared.example")
    create(cli, "second", "--domain", "shared.example")
    cli.ok("accounts", "update", "first", "--domain", "*.shared.example")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["update", "alice", "--limit", "messages_per_week=5"], ("--limit", "messages_per_week")),
        (["update", "alice", "--limit", "messages_per_hour"], ("--limit", "NAME=VALUE")),
        (["update", "alice", "--limit", "messages_per_hour=0"], ("--limit", "positive integer")),
        (["update", "alice", "--limit", "messages_per_hour=lots"], ("--limit", "positive integer")),
        (["update", "alice"], ("nothing to change",)),
        (["update", "alice", "--domain", "bad_domain.com"], ("allowed_domains:",)),
        (["update", "nobody", "--admin"], ("nobody",)),
        (
            ["create", "--name", "x", "--email", "x@example.com", "--domain", "x.example", "--limit", "x=1"],
            ("--limit",),
        ),
    ],
    ids=[
        "unknown-limit",
        "no-value",
        "zero",
        "not-a-number",
        "no-change",
        "bad-domain",
        "unknown-account",
        "create",
    ],
)
def test_bad_update_input_fails_in_one_line(
    sqlite_cli: Cli, args: list[str], fragments: tuple[str, ...]
) -> None:
    create(sqlite_cli, "alice")
    before = sqlite_cli.json("accounts", "list")
    assert_one_line_error(sqlite_cli.run("accounts", *args), "smtp-proxy: error: ", *fragments)
    assert sqlite_cli.json("accounts", "list") == before


# --- errors ---------------------------------------------------------------------------------------


def test_duplicate_account_name_fails(cli: Cli) -> None:
    create(cli, "alice")
    result = cli.run(
        "accounts", "create", "--name", "alice", "--email", "x@example.com", "--domain", "example.com"
    )
    assert_one_line_error(result, "alice", "already exists")
    assert len(cli.json("accounts", "list")) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--name", "alice", "--email", "not-an-email", "--domain", "example.com"], "email:"),
        (["--name", "alice", "--email", "a@example.com", "--domain", "localhost"], "allowed_domains:"),
        (["--name", "alice", "--email", "a@example.com", "--domain", "bad_domain.com"], "allowed_domains:"),
        (["--name", "bad name", "--email", "a@example.com", "--domain", "example.com"], "name:"),
        (["--name", "-alice", "--email", "a@example.com", "--domain", "example.com"], "name:"),
    ],
    ids=["bad-email", "single-label-domain", "bad-domain", "space-in-name", "dash-first-name"],
)
def test_invalid_account_input_fails(sqlite_cli: Cli, args: list[str], fragment: str) -> None:
    result = sqlite_cli.run("accounts", "create", *args)
    assert_one_line_error(result, "smtp-proxy: error: ", fragment)
    assert sqlite_cli.json("accounts", "list") == []


def test_too_short_password_fails(sqlite_cli: Cli) -> None:
    args = ["accounts", "create", "--name", "alice", "--email", "a@example.com", "--domain", "example.com"]
    result = sqlite_cli.run(*args, "--password-stdin", stdin="short\n")
    assert_one_line_error(result, "password:", "at least 12")
    assert sqlite_cli.json("accounts", "list") == []

    create(sqlite_cli, "alice")
    result = sqlite_cli.run("accounts", "set-password", "alice", "--password-stdin", stdin="short\n")
    assert_one_line_error(result, "password:", "at least 12")
    result = sqlite_cli.run("accounts", "set-password", "alice", "--password-stdin", stdin="")
    assert_one_line_error(result, "password:")


@pytest.mark.parametrize("command", ["set-password", "rotate-key", "deactivate"])
def test_unknown_account_fails(sqlite_cli: Cli, command: str) -> None:
    create(sqlite_cli, "alice")
    result = sqlite_cli.run("accounts", command, "nobody")
    assert_one_line_error(result, "smtp-proxy: error: ", "nobody")


def test_unreachable_database_fails_without_leaking_the_password(make_cli) -> None:
    cli = make_cli("postgresql://u:secretpw@127.0.0.1:1/x")
    # The console script once; the other commands take the same path in this process.
    results = [cli.run_process("accounts", "list")]
    results += [
        cli.run(*args) for args in (["db", "upgrade"], ["db", "current"], ["accounts", "rotate-key", "a"])
    ]
    for result in results:
        line = assert_one_line_error(result, "database unavailable", "127.0.0.1")
        assert "secretpw" not in line


@pytest.mark.parametrize(
    ("config_text", "env", "fragment"),
    [
        (CONFIG_YAML + "  bogus_key: 1\n", {}, "security.bogus_key"),
        ("database: [unclosed\n", {}, "--config"),
        (CONFIG_YAML, {"SMTP_PROXY_ENCRYPTION_KEY": "not-a-key"}, "security.encryption_key"),
        (CONFIG_YAML.replace("bcrypt_cost: 4", "bcrypt_cost: 99"), {}, "security.bcrypt_cost"),
    ],
    ids=["unknown-key", "bad-yaml", "bad-encryption-key", "out-of-range"],
)
def test_config_error_exits_2(sqlite_cli: Cli, config_text: str, env: dict[str, str], fragment: str) -> None:
    sqlite_cli.config_path.write_text(config_text)
    result = sqlite_cli.run("accounts", "list", env=env)
    assert_one_line_error(result, "smtp-proxy: config error: ", fragment, exit_code=2)


def test_missing_config_file_exits_2(sqlite_cli: Cli, tmp_path: Path) -> None:
    result = sqlite_cli.run_process(
        "accounts", "list", env={"SMTP_PROXY_CONFIG": str(tmp_path / "missing.yaml")}, use_config_option=False
    )
    assert_one_line_error(result, "config error", "missing.yaml", exit_code=2)


# --- keys, tls, version, help ---------------------------------------------------------------------


def test_keys_generate_output_is_accepted_as_encryption_key(sqlite_cli: Cli) -> None:
    first = sqlite_cli.ok("keys", "generate").stdout
    second = sqlite_cli.ok("keys", "generate").stdout
    assert first.endswith("\n") and len(first.splitlines()) == 1
    key = first.strip()
    assert key != second.strip()
    assert len(base64.urlsafe_b64decode(key)) == 32
    crypto.Cipher(base64.urlsafe_b64decode(key))
    # The config layer validates the key (a bad one is exit 2, see above); this one passes.
    result = sqlite_cli.run("accounts", "list", env={"SMTP_PROXY_ENCRYPTION_KEY": key})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_tls_dev_cert(sqlite_cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "tls" / "dev"
    result = sqlite_cli.ok("tls", "dev-cert", "--out", str(out))
    cert, key = out / "cert.pem", out / "key.pem"
    assert str(cert) in result.stdout and str(key) in result.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)


def test_version(sqlite_cli: Cli) -> None:
    result = sqlite_cli.run_process("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"smtp-proxy, version {__version__}"


@pytest.mark.parametrize("via", ["option", "environment"])
def test_help_works_with_a_broken_config_file(sqlite_cli: Cli, tmp_path: Path, via: str) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("database: [unclosed\nnot: valid: yaml\n")
    kwargs: dict = {}
    if via == "option":
        sqlite_cli.config_path = broken
    else:
        kwargs = {"env": {"SMTP_PROXY_CONFIG": str(broken)}, "use_config_option": False}
    run = sqlite_cli.run
    # The file really is broken: a command that needs it stops with a config error.
    assert_one_line_error(run("accounts", "list", **kwargs), "config error", exit_code=2)
    result = sqlite_cli.run_process("--help", **kwargs)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("Usage: smtp-proxy")
    for command in ("accounts", "db", "keys", "serve", "tls"):
        assert re.search(rf"^\s+{command}\b", result.stdout, re.MULTILINE), command
    sub = run("accounts", "--help", **kwargs)
    assert sub.returncode == 0, sub.stderr
    assert "create" in sub.stdout and "Traceback" not in sub.stderr


def test_accounts_update_sets_and_withdraws_relay_networks(cli: Cli, storage: Database) -> None:
    create(cli, "printers")
    create(cli, "other")
    shown = cli.json(
        "accounts", "update", "printers", "--relay-network", "192.0.2.0/28",
        "--relay-network-without-tls", "198.51.100.7",
    )  # fmt: skip
    assert shown["relay_networks"] == [
        {"network": "192.0.2.0/28", "require_tls": True},
        {"network": "198.51.100.7/32", "require_tls": False},
    ]
    listed = {a["name"]: a["relay_networks"] for a in cli.json("accounts", "list")}
    assert listed == {"printers": shown["relay_networks"], "other": []}

    # Another account's overlapping network, a network too wide, both flags at once: one line each.
    taken = cli.run("accounts", "update", "other", "--relay-network", "192.0.2.8/29")
    assert taken.returncode == 1
    assert taken.stderr.startswith("smtp-proxy: error: 192.0.2.8/29 is already another account's relay")
    wide = cli.run("accounts", "update", "other", "--relay-network", "10.0.0.0/8")
    assert wide.returncode == 1 and "wider than /16" in wide.stderr
    both = cli.run("accounts", "update", "other", "--relay-network", "10.0.0.0/24", "--no-relay-networks")
    assert both.returncode == 1 and "--no-relay-networks" in both.stderr
    assert {a["name"]: a["relay_networks"] for a in cli.json("accounts", "list")}["other"] == []

    assert cli.json("accounts", "update", "printers", "--no-relay-networks")["relay_networks"] == []
    with storage.transaction() as session:
        account = account_store.get_account_by_name(session, "printers")
        rows = [(r.action, r.changes["fields"]) for r in reversed(audit.list_entries(session, account.id))]
    assert rows[1:] == [("update", ["relay_networks"]), ("update", ["relay_networks"])]
