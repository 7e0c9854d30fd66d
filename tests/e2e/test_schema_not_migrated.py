"""A database behind the code (never migrated, or by an older release) is one line and exit 2, everywhere.

The console script runs as a real process, as an operator following the README runs it: admin
commands and every listener refuse with the same line naming the database (no password), both
revisions and the fix; nothing prints a traceback, and on SQLite nothing creates the file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from smtp_proxy.db.migrate import head_revision, upgrade
from tests.console import SMTP_PROXY, clean_env, listener_config

OLDER = "0008"


def smtp_proxy(*args: str, cwd: Path | None = None, key: str | None = None) -> subprocess.CompletedProcess:
    env = clean_env()
    if key:
        env["SMTP_PROXY_ENCRYPTION_KEY"] = key
    return subprocess.run(
        [SMTP_PROXY, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def shown(url: str) -> str:
    """The database as the messages name it: the driver the engine uses, the password hidden."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=True)


def not_migrated(url: str, revision: str | None) -> str:
    return (
        f"smtp-proxy: error: the database at {shown(url)} is not migrated (revision {revision or 'none'}, "
        f"this version needs {head_revision()}): run smtp-proxy db upgrade"
    )


def assert_one_line(result: subprocess.CompletedProcess, line: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr == line + "\n"
    assert "Traceback" not in result.stdout + result.stderr


def with_password(url: str) -> str:
    """The test cluster trusts every local login: a password in the URL is only there to be hidden."""
    return url.replace("postgresql://postgres@", "postgresql://postgres:secretpw@", 1)


ADMIN_COMMANDS = [
    ["accounts", "list"],
    ["accounts", "create", "--name", "shop", "--email", "ops@shop.example", "--domain", "shop.example"],
    ["credentials", "list", "shop"],
    ["keys", "reencrypt"],
]


@pytest.mark.parametrize("revision", [None, OLDER], ids=["empty", "older"])
@pytest.mark.parametrize("command", ADMIN_COMMANDS, ids=lambda c: "-".join(c[:2]))
def test_an_admin_command_on_a_database_behind_is_one_line_and_exit_2(
    tmp_path: Path,
    unmigrated_pg_url,
    encryption_key: str,
    tls_files,
    revision: str | None,
    command: list[str],
) -> None:
    url = with_password(unmigrated_pg_url(revision))
    config = listener_config(tmp_path, url, encryption_key, tls_files)
    result = smtp_proxy("--config", str(config), *command)
    assert_one_line(result, not_migrated(url, revision))
    assert "secretpw" not in result.stderr and result.stdout == ""


def test_db_current_names_both_revisions_and_db_upgrade_is_the_fix(
    tmp_path: Path, unmigrated_pg_url, encryption_key: str, tls_files
) -> None:
    url = unmigrated_pg_url(OLDER)
    config = str(listener_config(tmp_path, url, encryption_key, tls_files))
    assert_one_line(smtp_proxy("--config", config, "accounts", "list"), not_migrated(url, OLDER))
    current = smtp_proxy("--config", config, "db", "current")
    assert (current.returncode, current.stdout) == (0, f"database: {OLDER}; code: {head_revision()}\n")
    upgraded = smtp_proxy("--config", config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    listed = smtp_proxy("--config", config, "accounts", "list")
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "[]\n", "")


def accounts_list_after(
    tmp_path: Path, url: str, statement: str, key: str, tls_files
) -> subprocess.CompletedProcess:
    """``accounts list`` on the database at ``url`` once ``statement`` has changed it."""
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(statement))
    engine.dispose()
    return smtp_proxy("--config", str(listener_config(tmp_path, url, key, tls_files)), "accounts", "list")


def test_a_missing_table_met_past_the_check_is_the_same_one_line(
    tmp_path: Path, unmigrated_pg_url, encryption_key: str, tls_files
) -> None:
    # At the code's revision, but a table is gone: the query's UndefinedTable, not a traceback.
    url = unmigrated_pg_url("head")
    result = accounts_list_after(tmp_path, url, "DROP TABLE accounts CASCADE", encryption_key, tls_files)
    assert_one_line(
        result,
        f"smtp-proxy: error: the database at {shown(url)} lacks a table or column this version needs, "
        f"though it is at revision {head_revision()}",
    )


def test_a_database_ahead_of_the_code_is_a_warning_and_the_command_runs(
    tmp_path: Path, unmigrated_pg_url, encryption_key: str, tls_files
) -> None:
    # Newer code migrated it (migrations only add): an older release still works on it.
    url = unmigrated_pg_url("head")
    result = accounts_list_after(
        tmp_path, url, "UPDATE alembic_version SET version_num = '9999'", encryption_key, tls_files
    )
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr
    assert result.stderr == (
        f"smtp-proxy: warning: the database is at revision 9999, which this version ({head_revision()}) "
        "does not know; carrying on\n"
    )


LISTENERS = [
    ("smtp", {}),
    ("api", {}),
    ("worker", {}),
    ("all", {}),
    ("all", {"smtp": {"processes": 2}, "api": {"processes": 2}}),
]


@pytest.mark.parametrize("revision", [None, OLDER], ids=["empty", "older"])
@pytest.mark.parametrize(
    ("command", "sections"), LISTENERS, ids=["smtp", "api", "worker", "all", "all-supervised"]
)
def test_a_listener_refuses_to_start_on_a_database_behind_with_exit_2(
    tmp_path: Path,
    unmigrated_pg_url,
    encryption_key: str,
    tls_files,
    revision: str | None,
    command: str,
    sections: dict,
) -> None:
    url = with_password(unmigrated_pg_url(revision))
    config = listener_config(tmp_path, url, encryption_key, tls_files, **sections)
    result = smtp_proxy("--config", str(config), "serve", command)
    assert_one_line(result, not_migrated(url, revision))
    assert "secretpw" not in result.stdout + result.stderr
    assert "smtp.listening" not in result.stdout and "api.listening" not in result.stdout
    # The exit code the units name in RestartPreventExitStatus: systemd does not restart it in a loop.
    unit = Path(__file__).resolve().parents[2] / "etc" / "systemd" / f"smtp-proxy-{command}.service"
    assert f"\nRestartPreventExitStatus={result.returncode}\n" in unit.read_text()


# --- SQLite --------------------------------------------------------------------------------------


def test_without_a_sqlite_file_a_command_says_so_and_creates_nothing(tmp_path: Path) -> None:
    # The default database, sqlite:///var/smtp-proxy.db, in a directory where it was never created.
    result = smtp_proxy("accounts", "list", cwd=tmp_path)
    assert_one_line(
        result,
        f"smtp-proxy: error: the database file {tmp_path}/var/smtp-proxy.db does not exist: "
        "run smtp-proxy db upgrade",
    )
    assert list(tmp_path.iterdir()) == []
    current = smtp_proxy("db", "current", cwd=tmp_path)
    assert current.returncode == 2 and "does not exist: run smtp-proxy db upgrade" in current.stderr
    assert list(tmp_path.iterdir()) == []
    # db upgrade alone creates it (scripts/run runs it first), and then the command works.
    assert smtp_proxy("db", "upgrade", cwd=tmp_path).returncode == 0
    listed = smtp_proxy("accounts", "list", cwd=tmp_path)
    assert (listed.returncode, listed.stdout) == (0, "[]\n"), listed.stderr


def test_without_a_sqlite_file_serve_all_refuses_to_start_and_creates_nothing(
    tmp_path: Path, encryption_key: str, tls_files
) -> None:
    path = tmp_path / "var" / "smtp-proxy.db"
    config = listener_config(tmp_path, f"sqlite:///{path}", encryption_key, tls_files)
    result = smtp_proxy("--config", str(config), "serve", "all")
    assert_one_line(
        result, f"smtp-proxy: error: the database file {path} does not exist: run smtp-proxy db upgrade"
    )
    assert not path.parent.exists()


def test_a_sqlite_file_behind_is_one_line_for_commands_and_listeners(
    tmp_path: Path, encryption_key: str, tls_files
) -> None:
    url = f"sqlite:///{tmp_path / 'smtp-proxy.db'}"
    engine = create_engine(url)
    upgrade(engine, OLDER)
    engine.dispose()
    config = str(listener_config(tmp_path, url, encryption_key, tls_files))
    assert_one_line(smtp_proxy("--config", config, "accounts", "list"), not_migrated(url, OLDER))
    assert_one_line(smtp_proxy("--config", config, "serve", "all"), not_migrated(url, OLDER))
