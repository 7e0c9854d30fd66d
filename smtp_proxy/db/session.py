"""Engine, thread-local sessions, and the one place driver errors are translated.

The threaded servers share one ``Database``: its ``scoped_session`` gives each
thread its own session, which ``transaction()`` commits on a clean exit and
rolls back on any exception. A lost or refused connection becomes
``DatabaseUnavailable`` (SMTP 451, HTTP 503), a missing table or column
``SchemaNotMigrated`` (a kind of it), a unique violation ``Conflict``;
callers never see a driver exception. A SQLite file is opened, never created:
only ``migrate.upgrade`` creates it. ``hide_parameters`` keeps bound values
(password hashes, ciphertexts, addresses) out of every exception text.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from smtp_proxy.config import DatabaseConfig
from smtp_proxy.errors import Conflict, DatabaseUnavailable, SchemaNotMigrated

if TYPE_CHECKING:  # a PostgreSQL process need not load libsqlite3
    import sqlite3

log = logging.getLogger("smtp_proxy.db")

# How long SQLite waits on a lock held by another connection before failing.
SQLITE_BUSY_TIMEOUT_MS = 5000
# A table or column the code needs and the database lacks: its schema is older than the code.
# PostgreSQL's undefined_table and undefined_column, and the start of SQLite's message for each.
PG_UNDEFINED = frozenset({"42P01", "42703"})
SQLITE_UNDEFINED = ("no such table", "no such column")
# A unique violation as each driver names it: PostgreSQL's SQLSTATE (psycopg2.errorcodes.UNIQUE_VIOLATION,
# written out so that a SQLite process need not load libpq) and SQLite's extended result codes.
PG_UNIQUE_VIOLATION = "23505"
SQLITE_UNIQUE_VIOLATIONS = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})


def make_engine(config: DatabaseConfig, *, autocommit: bool = False) -> Engine:
    """An engine with the configured pool; SQLite in WAL mode with a busy timeout.

    ``autocommit`` makes every connection of the pool run each statement as its
    own transaction, set once when the connection is made rather than switched
    on and off at each checkout. Such a connection has no transaction to roll
    back, so SQLAlchemy is told not to call the driver's rollback when it is
    closed or goes back to the pool: psycopg2 would return at once, but only
    after releasing and re-taking the GIL, twice per request for nothing on a
    busy server.
    """
    url = make_url(config.effective_url)
    options: dict[str, Any] = (
        {"isolation_level": "AUTOCOMMIT", "skip_autocommit_rollback": True} if autocommit else {}
    )
    if url.drivername == "postgresql":
        # SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql:// URL; we ship psycopg2.
        url = url.set(drivername="postgresql+psycopg2")
    if url.get_backend_name() == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        path = sqlite_file(url)
        if path is not None:
            options["creator"] = functools.partial(_open_existing_sqlite, path, connect_args)
        engine = create_engine(url, connect_args=connect_args, hide_parameters=True, **options)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    # Every connection the pool opens stays in it for reuse (no overflow): a
    # connection closed on return would cost a new PostgreSQL backend (a fork
    # and a cold catalog cache) at the next burst, on every burst.
    engine = create_engine(
        url,
        pool_size=config.pool_max,
        max_overflow=0,
        pool_timeout=config.connect_timeout,
        # Last in, first out: under load the same few connections go round, each back
        # within PING_IDLE_AFTER_SECONDS, so none is pinged; first in, first out cycled
        # through all pool_max of them and pinged nearly every checkout.
        pool_use_lifo=True,
        connect_args={"connect_timeout": max(int(round(config.connect_timeout)), 1)},
        hide_parameters=True,
        **options,
    )
    event.listen(engine, "checkin", _stamp_checkin)
    event.listen(engine, "checkout", functools.partial(_ping_if_idle, engine.dialect))
    return engine


# A connection that sat in the pool longer than this is pinged before use, so
# one that died meanwhile (database restart, idle cut by a firewall) is
# replaced instead of failing a transaction. A restart takes longer than this,
# so every connection last used before it is pinged after it. One returned
# more recently is used as is: under load that saves a round trip per
# statement; if the database went away in that instant, the statement fails
# (451 / 503), SQLAlchemy invalidates the pool and the next checkout reconnects.
PING_IDLE_AFTER_SECONDS = 0.25


def _stamp_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def _ping_if_idle(dialect: Any, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    checked_in = record.info.get("checked_in")
    if checked_in is None or time.monotonic() - checked_in < PING_IDLE_AFTER_SECONDS:
        return  # just connected, or in use a moment ago
    try:
        dialect.do_ping(dbapi_connection)
    except dialect.loaded_dbapi.Error as error:
        # The pool discards this connection and checks out (or opens) another.
        raise exc.DisconnectionError("pooled connection is gone") from error


def sqlite_file(url: URL) -> str | None:
    """The file a SQLite URL names, or None (in memory, or a ``file:`` URI the URL spells itself)."""
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    if url.query.get("uri") or url.database.startswith("file:"):
        return None
    return url.database


def _open_existing_sqlite(path: str, connect_args: dict[str, Any]) -> sqlite3.Connection:
    """Open the SQLite file, never create it: only ``db upgrade`` does (``create_sqlite_file``).

    Plain ``sqlite3.connect`` would make an empty file (and a command would then find no
    tables in it); ``mode=rw`` fails instead, and a missing file is named as such.
    """
    import sqlite3

    try:
        return sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True, **connect_args)
    except sqlite3.OperationalError as error:
        if os.path.exists(path):
            raise
        raise SchemaNotMigrated(
            f"the database file {os.path.abspath(path)} does not exist: run smtp-proxy db upgrade"
        ) from error


def create_sqlite_file(engine: Engine) -> None:
    """Make the engine's SQLite file (and its directory) when missing; the upgrade's first step."""
    path = sqlite_file(engine.url)
    if path is None or os.path.exists(path):
        return
    import sqlite3

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(path).close()


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def safe_url(engine: Engine) -> str:
    """The engine's URL without its password, for messages and logs."""
    return engine.url.render_as_string(hide_password=True)


def translate(error: exc.DBAPIError | exc.SQLAlchemyError) -> Exception:
    """Map a SQLAlchemy/driver error onto the project's own exceptions."""
    if is_undefined_object(getattr(error, "orig", None)):
        return SchemaNotMigrated("the database is not migrated: run smtp-proxy db upgrade")
    if isinstance(error, exc.IntegrityError):
        return Conflict("already exists") if is_unique_violation(error.orig) else error
    if isinstance(error, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)):
        return DatabaseUnavailable("the database is unavailable")
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return DatabaseUnavailable("the database connection was lost")
    return error


def is_undefined_object(driver_error: BaseException | None) -> bool:
    """Whether the driver says a table or column does not exist (an unmigrated database)."""
    if getattr(driver_error, "pgcode", None) in PG_UNDEFINED:
        return True
    return getattr(driver_error, "sqlite_errorname", None) == "SQLITE_ERROR" and str(driver_error).startswith(
        SQLITE_UNDEFINED
    )


def is_unique_violation(driver_error: BaseException | None) -> bool:
    """Whether the driver reports a unique (or primary key) violation, read from its error code."""
    return (
        getattr(driver_error, "pgcode", None) == PG_UNIQUE_VIOLATION
        or getattr(driver_error, "sqlite_errorname", None) in SQLITE_UNIQUE_VIOLATIONS
    )


class Database:
    """An engine plus the thread-local session registry built on it."""

    def __init__(self, config: DatabaseConfig) -> None:
        self.config = config
        self.engine = make_engine(config)
        self._autocommit_engine: Engine | None = None
        self._lock = threading.Lock()
        self.sessions = scoped_session(sessionmaker(bind=self.engine, expire_on_commit=False))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """The calling thread's session inside one transaction.

        Commits on a clean exit; rolls back and re-raises (translated) on any
        error, the commit included, so nothing is ever half-stored.
        """
        session = self.sessions()
        try:
            with translated_errors():
                yield session
                session.commit()
        except BaseException:
            _rollback_quietly(session)
            raise

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A Core connection for ONE statement that is its own transaction.

        The listeners' hot paths (the INSERT behind each 250, the SELECT behind
        each AUTH) are single statements: in autocommit mode the database
        commits each before it answers, one round trip instead of three
        (BEGIN, the statement, COMMIT). Never run two dependent statements here.
        """
        with translated_errors(), self.autocommit_engine.connect() as connection:
            yield connection

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """An ORM session for reads only, on the autocommit pool.

        Each SELECT is its own transaction: no BEGIN and COMMIT round trips
        around a GET. Two queries in one read may see different snapshots;
        anything that writes uses ``transaction()``.
        """
        session = Session(bind=self.autocommit_engine, expire_on_commit=False, autoflush=False)
        try:
            with translated_errors():
                yield session
        finally:
            session.close()

    @property
    def autocommit_engine(self) -> Engine:
        """The engine behind ``autocommit()``: a pool of its own, made on first use.

        A process that only runs single statements (the SMTP listener) opens
        connections in this pool alone; one that never does, none at all.
        """
        engine = self._autocommit_engine
        if engine is None:
            with self._lock:
                if self._autocommit_engine is None:
                    self._autocommit_engine = make_engine(self.config, autocommit=True)
                engine = self._autocommit_engine
        return engine

    def warm(self, *, autocommit: bool = False) -> None:
        """Open ``pool_min`` connections now, so a listener's first burst finds them ready.

        ``autocommit`` warms the pool behind ``autocommit()`` instead of the
        transactional one. Best effort: a database that is down now is
        reconnected on demand later.
        """
        engine = self.autocommit_engine if autocommit else self.engine
        if engine.dialect.name == "sqlite":
            return
        connections = []
        try:
            for _ in range(self.config.pool_min):
                connections.append(engine.connect())
        except exc.SQLAlchemyError:
            log.warning("database unavailable at start", extra={"event": "db.unavailable"})
        finally:
            for connection in connections:
                connection.close()

    def ping(self) -> bool:
        """True when the database answers a trivial query now."""
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
            return True
        except exc.SQLAlchemyError:
            return False

    def remove_session(self) -> None:
        """End the calling thread's session (at the end of a request or SMTP session)."""
        self.sessions.remove()

    def dispose(self) -> None:
        self.sessions.remove()
        self.engine.dispose()
        if self._autocommit_engine is not None:
            self._autocommit_engine.dispose()


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raise driver errors as DatabaseUnavailable or Conflict (others unchanged)."""
    try:
        yield
    except exc.SQLAlchemyError as error:
        translated = translate(error)
        if translated is error:
            raise
        if isinstance(translated, SchemaNotMigrated):
            log.warning(
                "database not migrated: run smtp-proxy db upgrade",
                extra={
                    "event": "db.not_migrated",
                    "error_class": type(getattr(error, "orig", None) or error).__name__,
                },
            )
        elif isinstance(translated, DatabaseUnavailable):
            log.warning(
                "database unavailable",
                extra={
                    "event": "db.unavailable",
                    "error_class": type(getattr(error, "orig", None) or error).__name__,
                },
            )
        raise translated from error


def _rollback_quietly(session: Session) -> None:
    try:
        session.rollback()
    except exc.SQLAlchemyError:
        # The connection is gone; the pool invalidates it and the next checkout reconnects.
        session.close()
