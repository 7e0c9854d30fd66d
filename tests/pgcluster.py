"""A throwaway PostgreSQL cluster from Debian's server binaries, for tests and benchmarks.

pytest-postgresql's executor runs initdb and pg_ctl in a temporary directory,
on 127.0.0.1 and a free port. initdb refuses to run as root, so under root (as
in CI) pg_ctl runs as the ``postgres`` user (else ``nobody``) through runuser.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from pytest_postgresql.executors import PostgreSQLExecutor

from tests.waiting import wait_for


class PgClusterError(RuntimeError):
    """The cluster cannot be started here (no binaries, no user to run it as)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_bindir() -> Path:
    explicit = os.environ.get("SMTP_PROXY_TEST_PG_BINDIR")
    if explicit:
        return Path(explicit)
    found = [p for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") if int(Path(p).parts[-3]) >= 15]
    if not found:
        raise PgClusterError("PostgreSQL 15+ server binaries not found; ./scripts/test installs them")
    return Path(max(found, key=lambda p: int(Path(p).parts[-3]))).parent


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PgClusterError("running as root, but there is no postgres or nobody user for initdb")


def admin_sql(port: int, *statements: str) -> None:
    """Run statements as the superuser in the maintenance database, outside a transaction."""
    connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


def wait_until_accepting(executor: PostgreSQLExecutor, timeout: float = 30.0) -> None:
    """The port opens before the server accepts sessions ("the database system is starting up")."""

    def accepting() -> bool:
        try:
            psycopg2.connect(
                host="127.0.0.1", port=executor.port, user="postgres", dbname="postgres", connect_timeout=2
            ).close()
            return True
        except psycopg2.OperationalError:
            return False

    wait_for(
        accepting, f"PostgreSQL on port {executor.port} to accept sessions", timeout=timeout, interval=0.1
    )


@dataclass
class PgCluster:
    executor: PostgreSQLExecutor
    base: Path

    @classmethod
    def start(cls, durable: bool = False, max_connections: int = 300) -> PgCluster:
        """Start a new cluster; ``durable=False`` turns fsync off for a faster test suite."""
        pg_ctl = pg_bindir() / "pg_ctl"
        base = Path(tempfile.mkdtemp(prefix="smtp-proxy-pg-"))
        if os.geteuid() == 0:
            user = _unprivileged_user()
            os.chown(base, user.pw_uid, user.pw_gid)
            wrapper = base / "pg_ctl-as-user"
            wrapper.write_text(
                f'#!/bin/sh\ncd "{base}" || exit 1\nexec runuser -u {user.pw_name} -- "{pg_ctl}" "$@"\n'
            )
            wrapper.chmod(stat.S_IRWXU)
            pg_ctl = wrapper
        options = f"-c listen_addresses=127.0.0.1 -c max_connections={max_connections}"
        if durable:
            # pytest-postgresql's executor always passes -F (fsync off); a later -c wins.
            options += " -c fsync=on -c synchronous_commit=on -c full_page_writes=on"
        else:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        executor = PostgreSQLExecutor(
            executable=str(pg_ctl),
            host="127.0.0.1",
            port=free_port(),
            datadir=str(base / "data"),
            unixsocketdir=str(base),
            logfile=str(base / "postgresql.log"),
            startparams="-w",
            dbname="postgres",
            user="postgres",
            postgres_options=options,
        )
        executor.start()
        cluster = cls(executor, base)
        try:
            wait_until_accepting(executor)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.executor.port}/{dbname}"

    def admin(self, *statements: str) -> None:
        admin_sql(self.executor.port, *statements)

    def stop(self) -> None:
        try:
            self.executor.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
