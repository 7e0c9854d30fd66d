"""Shared fixtures: a throwaway PostgreSQL cluster, migrated databases, configs.

The test session starts its own PostgreSQL from Debian's server binaries with
pytest-postgresql's executor (initdb + pg_ctl in a temporary directory, on
127.0.0.1 and a free port) and stops it at the end. initdb refuses to run as
root, so under root (as in CI) pg_ctl runs as the ``postgres`` user through
runuser. The schema is migrated once into a template database; each test that
asks for ``pg_url`` gets a fresh copy of it.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import pwd
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from pytest_postgresql.executors import PostgreSQLExecutor
from sqlalchemy import create_engine

from smtp_proxy.config import Config, config_from_dict
from smtp_proxy.crypto import generate_encryption_key
from smtp_proxy.db.migrate import upgrade
from smtp_proxy.logs import set_correlation_id

TEMPLATE_DB = "smtp_proxy_template"
_db_counter = itertools.count()


def _pg_bindir() -> Path:
    explicit = os.environ.get("SMTP_PROXY_TEST_PG_BINDIR")
    if explicit:
        return Path(explicit)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    candidates = [c for c in candidates if int(Path(c).parts[-3]) >= 15]
    if not candidates:
        pytest.exit("PostgreSQL 15+ server binaries not found; ./scripts/test installs them", returncode=3)
    return Path(candidates[-1]).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.exit("running as root, but there is no postgres or nobody user for initdb", returncode=3)


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgreSQLExecutor]:
    """A PostgreSQL cluster of our own for the whole test session."""
    bindir = _pg_bindir()
    base = Path(tempfile.mkdtemp(prefix="smtp-proxy-pg-"))
    pg_ctl = bindir / "pg_ctl"
    if os.geteuid() == 0:
        user = _unprivileged_user()
        os.chown(base, user.pw_uid, user.pw_gid)
        wrapper = base / "pg_ctl-as-user"
        wrapper.write_text(
            f'#!/bin/sh\ncd "{base}" || exit 1\nexec runuser -u {user.pw_name} -- "{pg_ctl}" "$@"\n'
        )
        wrapper.chmod(stat.S_IRWXU)
        pg_ctl = wrapper
    executor = PostgreSQLExecutor(
        executable=str(pg_ctl),
        host="127.0.0.1",
        port=free_port(),
        datadir=str(base / "data"),
        unixsocketdir=str(base),
        logfile=str(base / "postgresql.log"),
        startparams="-w",
        dbname=TEMPLATE_DB,
        user="postgres",
        # Durability is not under test here: a faster cluster keeps the suite short.
        postgres_options=(
            "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=300"
        ),
    )
    executor.start()
    try:
        wait_until_accepting(executor)
        _admin(executor, f'CREATE DATABASE "{TEMPLATE_DB}"')
        engine = create_engine(_url(executor, TEMPLATE_DB))
        upgrade(engine)
        engine.dispose()
        yield executor
    finally:
        executor.stop()
        shutil.rmtree(base, ignore_errors=True)


def wait_until_accepting(executor: PostgreSQLExecutor, timeout: float = 30.0) -> None:
    """The port opens before the server accepts sessions ("the database system is starting up")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg2.connect(
                host="127.0.0.1", port=executor.port, user="postgres", dbname="postgres", connect_timeout=2
            ).close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _url(executor: PostgreSQLExecutor, dbname: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{executor.port}/{dbname}"


def _admin(executor: PostgreSQLExecutor, *statements: str) -> None:
    connection = psycopg2.connect(host="127.0.0.1", port=executor.port, user="postgres", dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


@pytest.fixture
def pg_url(postgresql_server: PostgreSQLExecutor) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test."""
    name = f"test_{os.getpid()}_{next(_db_counter)}"
    _admin(postgresql_server, f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    yield _url(postgresql_server, name)
    _admin(postgresql_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database file for one test."""
    url = f"sqlite:///{tmp_path / 'smtp-proxy.db'}"
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run the test once on PostgreSQL and once on SQLite."""
    fixture = "pg_url" if request.param == "postgresql" else "sqlite_url"
    return request.getfixturevalue(fixture)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging rewires the root logger; put everything back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    others = {name: logging.getLogger(name).level for name in ("sqlalchemy", "watchdog")}
    set_correlation_id(None)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, other_level in others.items():
        logging.getLogger(name).setLevel(other_level)
    set_correlation_id(None)


@pytest.fixture(scope="session")
def encryption_key() -> str:
    return generate_encryption_key()


@pytest.fixture
def make_config(encryption_key: str):
    """Build a validated Config from section overrides, with test-friendly defaults."""

    def make(db_url: str = "", **sections: dict) -> Config:
        raw: dict = {
            "database": {"url": db_url, "pool_min": 2, "pool_max": 10, "connect_timeout": "2s"},
            "security": {"encryption_key": encryption_key, "bcrypt_cost": 4},
            "logging": {"level": "debug", "format": "json"},
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return config_from_dict(raw, env={})

    return make
