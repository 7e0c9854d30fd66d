"""Shared fixtures: a throwaway PostgreSQL cluster, migrated databases, configs.

The test session starts its own PostgreSQL from Debian's server binaries with
pytest-postgresql's executor (initdb + pg_ctl in a temporary directory, on
127.0.0.1 and a free port) and stops it at the end. initdb refuses to run as
root, so under root (as in CI) pg_ctl runs as the ``postgres`` user through
runuser. The schema is migrated once into a template database; each test that
asks for ``pg_url`` gets a copy of it (reset and reused between tests: tests/pgdatabases.py).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pytest_postgresql.executors import PostgreSQLExecutor
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from smtp_proxy.config import Config, config_from_dict
from smtp_proxy.crypto import generate_encryption_key
from smtp_proxy.db.migrate import upgrade
from smtp_proxy.logs import set_correlation_id, stop_background_writer
from tests.haproxy import Haproxy, relay
from tests.leaks import keep_socket, new_sockets, new_threads, open_sockets
from tests.pgcluster import PgCluster, PgClusterError, admin_sql, free_port, wait_until_accepting
from tests.pgdatabases import DatabasePool
from tests.waiting import wait_for
from tests.webhook_receiver import receiver  # noqa: F401 - a fixture for every test directory

__all__ = ["free_port", "wait_until_accepting"]

TEMPLATE_DB = "smtp_proxy_template"
# How long a test's threads and sockets may take to end after its teardown.
LEAK_GRACE = 5.0


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgreSQLExecutor]:
    """A PostgreSQL cluster of our own for the whole test session, with the template migrated."""
    try:
        cluster = PgCluster.start(durable=False)
    except PgClusterError as error:
        pytest.exit(str(error), returncode=3)
    try:
        cluster.admin(f'CREATE DATABASE "{TEMPLATE_DB}"')
        engine = create_engine(cluster.url(TEMPLATE_DB))
        upgrade(engine)
        engine.dispose()
        yield cluster.executor
    finally:
        cluster.stop()


def _url(executor: PostgreSQLExecutor, dbname: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{executor.port}/{dbname}"


@pytest.fixture(scope="session")
def pg_databases(postgresql_server: PostgreSQLExecutor) -> Iterator[DatabasePool]:
    pool = DatabasePool(postgresql_server.port, TEMPLATE_DB)
    yield pool
    pool.close()


@pytest.fixture
def pg_url(postgresql_server: PostgreSQLExecutor, pg_databases: DatabasePool) -> Iterator[str]:
    """A migrated PostgreSQL database for one test, as empty as a fresh clone of the template."""
    name = pg_databases.take()
    yield _url(postgresql_server, name)
    pg_databases.give_back(name)


@pytest.fixture
def unmigrated_pg_url(postgresql_server: PostgreSQLExecutor) -> Iterator[Callable[..., str]]:
    """``make(revision=None)``: a new database of its own, empty or migrated only up to ``revision``
    (``smtp_proxy.db.migrate.upgrade``), as a release behind the code would have left it."""
    made: list[str] = []

    def make(revision: str | None = None) -> str:
        name = f"unmigrated_{uuid.uuid4().hex[:12]}"
        admin_sql(postgresql_server.port, f'CREATE DATABASE "{name}"')
        made.append(name)
        url = _url(postgresql_server, name)
        if revision is not None:
            engine = create_engine(url)
            upgrade(engine, revision)
            engine.dispose()
        return url

    yield make
    for name in made:
        admin_sql(postgresql_server.port, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def shared_pg_url(postgresql_server: PostgreSQLExecutor, pg_databases: DatabasePool) -> Iterator[str]:
    """One migrated database per test process, for tests whose writes are rolled back."""
    name = pg_databases.take()
    yield _url(postgresql_server, name)
    pg_databases.drop(name)


@pytest.fixture(scope="session")
def shared_pg_engine(shared_pg_url: str) -> Iterator[Engine]:
    # Pinged at checkout: a test that stops the cluster leaves dead connections in the pool.
    engine = create_engine(
        shared_pg_url.replace("postgresql://", "postgresql+psycopg2://", 1), pool_pre_ping=True
    )
    # Its pooled connections outlive the test that opened them, on purpose.
    event.listen(engine, "connect", lambda dbapi_connection, _record: keep_socket(dbapi_connection.fileno()))
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _leaves_no_thread_or_socket(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose thread or socket outlives it (after its fixtures' teardown).

    Threads that are finishing (a server's loop after its stop, a library's 10 ms expiry timer)
    get a moment to end; whatever is still there is named in the failure.
    """
    threads = set(threading.enumerate())
    # The in-process SMTP listener of tests/e2e leaves some sockets of ended sessions to the
    # garbage collector (seen after a drain: a TLS socket, a session's database connections);
    # until smtp/server.py closes them itself, those tests are checked for threads only.
    sockets = None if "/e2e/" in str(request.node.fspath) else open_sockets()
    yield
    leaked: list[str] = []

    def clean() -> bool:
        leaked[:] = [f"thread {name}" for name in new_threads(threads)]
        leaked.extend(new_sockets(sockets) if sockets is not None else ())
        return not leaked

    try:
        wait_for(clean, "the test's threads and sockets to end", timeout=LEAK_GRACE)
    except AssertionError:
        pytest.fail(f"left behind: {', '.join(leaked)}", pytrace=False)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once per test process (tests/integration/test_migrations.py
    migrates its own), copied for each test that asks for ``sqlite_url``."""
    path = tmp_path_factory.mktemp("sqlite-template") / "smtp-proxy.db"
    engine = create_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()  # the last connection to close checkpoints the WAL into the file
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A migrated SQLite database file for one test."""
    path = tmp_path / "smtp-proxy.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run the test once on PostgreSQL and once on SQLite."""
    fixture = "pg_url" if request.param == "postgresql" else "sqlite_url"
    return request.getfixturevalue(fixture)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging rewires the root logger; put everything back afterwards."""
    root = logging.getLogger()
    handlers, level, log_threads = list(root.handlers), root.level, logging.logThreads
    others = {
        name: logging.getLogger(name).level
        for name in ("sqlalchemy", "watchdog", "waitress.queue", "alembic")
    }
    set_correlation_id(None)
    yield
    stop_background_writer()
    logging.logThreads = log_threads
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


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1, stopped by its pid."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: ./scripts/test installs it"
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _answers(url), "redis-server to answer", timeout=10)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """``start_haproxy(back, **relay_options)``: a real HAProxy on a free port of 127.0.0.1 relaying
    to 127.0.0.1:``back`` (``tests.haproxy.relay``: ``send=``, ``mode=``, ``options=``); returns
    its port, and stops it after the test."""
    started: list[Haproxy] = []

    def start(back: int, **relay_options: str) -> int:
        front = free_port()
        started.append(Haproxy(tmp_path / f"haproxy-{len(started)}", relay(front, back, **relay_options)))
        return front

    yield start
    for haproxy in started:
        haproxy.stop()


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.ConnectionError:
        return False


# The files with the longest tests are collected first, so that they start at once and the two
# test processes share out the short ones around them (work stealing), instead of one process
# running a minute-long test alone at the end.
LONGEST_FIRST = (
    "tests/e2e/test_readme.py",
    "tests/api/test_api_schemathesis.py",
    "tests/e2e/test_worker.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own order
