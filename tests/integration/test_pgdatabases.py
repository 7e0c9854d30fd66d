"""The per-test database pool hands out only databases that look like a fresh clone."""

from __future__ import annotations

import psycopg2
import pytest

from tests.conftest import TEMPLATE_DB
from tests.pgdatabases import DatabasePool


@pytest.fixture
def pool(postgresql_server) -> DatabasePool:
    pool = DatabasePool(postgresql_server.port, TEMPLATE_DB)
    yield pool
    pool.close()


def run(pool: DatabasePool, name: str, *statements: str):
    connection = psycopg2.connect(host="127.0.0.1", port=pool.port, user="postgres", dbname=name)
    try:
        with connection, connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
            return cursor.fetchall() if cursor.description else None
    finally:
        connection.close()


def insert_account(pool: DatabasePool, name: str, account: str) -> None:
    run(
        pool,
        name,
        "INSERT INTO accounts (id, name, email, api_key_digest, allowed_domains, is_admin,"
        " active, allow_any_header_from, limits, created_at, updated_at)"
        f" VALUES (gen_random_uuid(), '{account}', 'a@example.com', '{account}', '[]', false, true,"
        " false, '{}', now(), now())",
    )


def test_a_database_given_back_is_reused_empty(pool: DatabasePool) -> None:
    name = pool.take()
    insert_account(pool, name, "first")
    # A session the test left open does not keep the database from its reset.
    lingering = psycopg2.connect(host="127.0.0.1", port=pool.port, user="postgres", dbname=name)
    lingering.cursor().execute("SELECT 1 FROM accounts FOR UPDATE")
    try:
        pool.give_back(name)
    finally:
        lingering.close()

    assert pool.take() == name
    assert run(pool, name, "SELECT count(*) FROM accounts") == [(0,)]
    insert_account(pool, name, "first")  # its unique name is free again
    assert run(pool, name, "SELECT count(*) FROM alembic_version") == [(1,)]


@pytest.mark.parametrize(
    "change",
    [
        "ALTER TABLE accounts ADD COLUMN extra integer",
        "ALTER TABLE accounts ALTER COLUMN email DROP NOT NULL",
        "ALTER TABLE accounts DROP CONSTRAINT uq_accounts_name",
        "CREATE INDEX extra_index ON accounts (email, name)",
        "CREATE TABLE extra (x integer)",
        "CREATE SCHEMA extra",
        "GRANT SELECT ON accounts TO PUBLIC",
        "UPDATE alembic_version SET version_num = 'other'",
        "ALTER TYPE message_status ADD VALUE 'other'",
        "ALTER DATABASE {name} SET work_mem = '8MB'",
    ],
)
def test_a_database_whose_schema_changed_is_dropped_not_reused(pool: DatabasePool, change: str) -> None:
    name = pool.take()
    try:
        run(pool, name, change.format(name=name))
    except psycopg2.errors.UndefinedObject:
        pytest.fail(f"the change names nothing in the schema: {change}")
    pool.give_back(name)

    assert pool.take() != name
    assert run(pool, "postgres", f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == [(0,)]
