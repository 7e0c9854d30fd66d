"""The engine and session layer: pool settings, SQLite pragmas, error translation."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import psycopg2.errorcodes
import psycopg2.extensions
import pytest
from sqlalchemy import event, exc, select, text

from smtp_proxy.config import Config
from smtp_proxy.crypto import Cipher
from smtp_proxy.db import session as session_module
from smtp_proxy.db.models import Account, EspProvider
from smtp_proxy.db.session import Database
from smtp_proxy.errors import Conflict, DatabaseUnavailable
from smtp_proxy.storage import accounts, providers
from smtp_proxy.storage.audit import CLI

HOSTILE = "x'); DROP TABLE accounts; -- \" \\ %s %(name)s ${HOME} \u202e"


@pytest.fixture
def database(db_url: str, make_config) -> Database:
    db = Database(make_config(db_url).database)
    yield db
    db.dispose()


def test_postgres_pool_follows_pool_min_and_pool_max(pg_url: str, make_config) -> None:
    config: Config = make_config(pg_url, database={"pool_min": 3, "pool_max": 7})
    db = Database(config.database)
    try:
        # Up to pool_max connections, every one kept for reuse (no overflow to churn).
        assert db.engine.pool.size() == 7
        assert db.engine.pool._max_overflow == 0
        assert db.engine.hide_parameters is True
        assert db.engine.pool.checkedin() == 0
        db.warm()  # a listener opens pool_min at start
        assert db.engine.pool.checkedin() == 3
        held = [db.engine.connect() for _ in range(7)]
        for connection in held:
            connection.close()
        assert db.engine.pool.checkedin() == 7  # nothing closed on return
        # The single-statement path has a pool of its own, the same size, made on first use.
        assert db._autocommit_engine is None
        db.warm(autocommit=True)
        assert db.autocommit_engine.pool.size() == 7
        assert db.autocommit_engine.pool.checkedin() == 3
        with db.autocommit() as connection:
            assert connection.connection.dbapi_connection.autocommit is True
        with db.engine.connect() as connection:
            assert connection.connection.dbapi_connection.autocommit is False
    finally:
        db.dispose()


def test_warm_survives_a_database_that_is_down(make_config) -> None:
    config: Config = make_config(
        "postgresql://nobody@127.0.0.1:1/none", database={"pool_min": 2, "pool_max": 4, "connect_timeout": 1}
    )
    db = Database(config.database)
    try:
        db.warm()
        assert db.engine.pool.checkedin() == 0
    finally:
        db.dispose()


def _backend_pid(db: Database) -> int:
    with db.autocommit() as connection:
        return connection.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(pg_url: str, make_config, pid: int) -> None:
    admin = Database(make_config(pg_url).database)
    try:
        with admin.autocommit() as connection:
            assert connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    finally:
        admin.dispose()


def test_a_pooled_connection_that_died_while_idle_is_replaced_before_use(
    pg_url: str, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "PING_IDLE_AFTER_SECONDS", 0.0)
    db = Database(make_config(pg_url, database={"pool_min": 1, "pool_max": 1}).database)
    try:
        first = _backend_pid(db)
        _terminate(pg_url, make_config, first)
        assert _backend_pid(db) != first  # pinged, found dead, replaced: no error reached us
    finally:
        db.dispose()


def test_a_connection_lost_between_quick_uses_fails_once_then_the_pool_recovers(
    pg_url: str, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "PING_IDLE_AFTER_SECONDS", 3600.0)
    db = Database(make_config(pg_url, database={"pool_min": 2, "pool_max": 2}).database)
    try:
        held = [db.autocommit_engine.connect() for _ in range(2)]
        pids = [c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in held]
        for connection in held:
            connection.close()
        for pid in pids:
            _terminate(pg_url, make_config, pid)
        with pytest.raises(DatabaseUnavailable):
            _backend_pid(db)
        # The failure invalidated the whole pool: the other dead connection is not handed out.
        assert _backend_pid(db) not in pids
        assert _backend_pid(db) not in pids
    finally:
        db.dispose()


def test_an_autocommit_statement_is_committed_when_it_returns(database: Database) -> None:
    table = Account.__table__
    row = {
        "id": uuid.uuid4(),
        "name": "autocommitted",
        "email": "a@example.com",
        "api_key_digest": uuid.uuid4().hex * 2,
        "allowed_domains": ["example.com"],
        "active": True,
        "created_at": datetime.now(UTC),
        "updated_at": datetime.now(UTC),
    }
    with database.autocommit() as connection:
        connection.execute(table.insert(), row)
        # Another connection sees the row while this one is still open: it is committed.
        with database.engine.connect() as other:
            name = other.execute(select(table.c.name).where(table.c.id == row["id"])).scalar_one()
            assert name == "autocommitted"
    with pytest.raises(Conflict), database.autocommit() as connection:
        connection.execute(table.insert(), {**row, "id": uuid.uuid4()})


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_busy_timeout(sqlite_url: str, make_config) -> None:
    db = Database(make_config(sqlite_url).database)
    try:
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    finally:
        db.dispose()


def test_hostile_strings_are_stored_and_returned_literally(database: Database, make_config) -> None:
    cipher = Cipher.from_config(make_config().security)
    with database.transaction() as session:
        owner = accounts.create_account(
            session,
            name="tenant",
            email="t@example.com",
            allowed_domains=["example.com"],
            bcrypt_cost=4,
            actor=CLI,
        ).account
        provider = providers.create_provider(
            session,
            cipher,
            account_id=owner.id,
            name=HOSTILE,
            provider_type="smtp",
            settings={"note": HOSTILE},
            smtp_config={"host": HOSTILE, "port": 25, "tls": "none", "password": HOSTILE},
            actor=CLI,
        )
        provider_id = provider.id
    database.remove_session()
    with database.transaction() as session:
        stored = session.get(EspProvider, provider_id)
        assert stored.name == HOSTILE
        assert stored.settings == {"note": HOSTILE}
        assert stored.smtp_config["host"] == HOSTILE
        assert providers.provider_secrets(cipher, stored).smtp_password == HOSTILE
        assert session.scalar(select(Account.name)) == "tenant"
        assert session.execute(text("SELECT count(*) FROM accounts")).scalar() == 1


def test_unique_violation_becomes_conflict_and_rolls_back(database: Database) -> None:
    with database.transaction() as session:
        accounts.create_account(
            session,
            name="dup",
            email="d@example.com",
            allowed_domains=["example.com"],
            bcrypt_cost=4,
            actor=CLI,
        )
    # Bypass the friendly pre-check: two rows with one name hit the unique constraint itself.
    with pytest.raises(Conflict):
        with database.transaction() as session:
            session.add(
                Account(
                    id=uuid.uuid4(),
                    name="dup",
                    email="e@example.com",
                    api_key_digest="0" * 64,
                    allowed_domains=["example.com"],
                )
            )
    with database.transaction() as session:
        assert session.execute(text("SELECT count(*) FROM accounts")).scalar() == 1


def test_a_primary_key_violation_becomes_conflict(database: Database) -> None:
    """Read from the driver's code: SQLSTATE 23505 on PostgreSQL, SQLITE_CONSTRAINT_PRIMARYKEY on SQLite."""
    first = _account_row("first")
    with database.transaction() as session:
        session.execute(Account.__table__.insert(), first)
    with pytest.raises(Conflict) as caught, database.transaction() as session:
        session.execute(Account.__table__.insert(), {**_account_row("second"), "id": first["id"]})
    assert session_module.is_unique_violation(caught.value.__cause__.orig)
    with database.transaction() as session:
        assert session.execute(text("SELECT count(*) FROM accounts")).scalar() == 1


def test_an_integrity_error_that_is_not_a_unique_violation_is_not_a_conflict(database: Database) -> None:
    """A check constraint named like a unique one stays an IntegrityError: its message is not read."""
    with pytest.raises(exc.IntegrityError) as caught, database.transaction() as session:
        session.execute(
            text("CREATE TEMPORARY TABLE t (x INTEGER CONSTRAINT unique_x_duplicate_key CHECK (x > 0))")
        )
        session.execute(text("INSERT INTO t (x) VALUES (-1)"))
    assert "unique_x_duplicate_key" in str(caught.value.orig)
    assert not session_module.is_unique_violation(caught.value.orig)


def test_pg_unique_violation_is_psycopg2s_sqlstate() -> None:
    assert session_module.PG_UNIQUE_VIOLATION == psycopg2.errorcodes.UNIQUE_VIOLATION


def test_an_autocommit_connection_does_not_call_the_drivers_rollback(pg_url: str, make_config) -> None:
    """skip_autocommit_rollback: no rollback() at close or checkin; the transactional pool rolls back."""
    db = Database(make_config(pg_url, database={"pool_min": 1, "pool_max": 1}).database)
    rollbacks: list[str] = []

    class CountingConnection(psycopg2.extensions.connection):
        def rollback(self) -> None:
            rollbacks.append("autocommit" if self.autocommit else "transaction")
            super().rollback()

    def counting(_dialect: object, _record: object, _args: object, params: dict) -> None:
        params["connection_factory"] = CountingConnection

    try:
        for engine in (db.engine, db.autocommit_engine):
            event.listen(engine, "do_connect", counting)
            engine.connect().close()  # the first connect initialises the dialect, autocommit set after
        rollbacks.clear()
        for _ in range(3):
            with db.autocommit() as connection:
                assert connection.execute(text("SELECT 1")).scalar_one() == 1
            with db.read() as session:
                assert session.execute(text("SELECT 1")).scalar_one() == 1
        assert rollbacks == []
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        assert rollbacks and set(rollbacks) == {"transaction"}  # the counter does count
    finally:
        db.dispose()


def _account_row(name: str) -> dict[str, object]:
    now = datetime.now(UTC)
    return {
        "id": uuid.uuid4(),
        "name": name,
        "email": "e@example.com",
        "api_key_digest": uuid.uuid4().hex * 2,
        "allowed_domains": ["example.com"],
        "active": True,
        "created_at": now,
        "updated_at": now,
    }


def test_each_thread_gets_its_own_session(database: Database) -> None:
    seen: dict[str, object] = {}

    def grab(name: str) -> None:
        seen[name] = database.sessions()
        database.remove_session()

    threads = [threading.Thread(target=grab, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["a"] is not seen["b"]
    assert database.sessions() is database.sessions()


def test_bare_postgresql_url_uses_psycopg2(pg_url: str, make_config) -> None:
    """SQLAlchemy 2.1 would pick psycopg 3, which is not a dependency."""
    db = Database(make_config(pg_url).database)
    try:
        assert db.engine.dialect.driver == "psycopg2"
        assert db.ping()
    finally:
        db.dispose()
