"""Per-test PostgreSQL databases: cloned from the migrated template once, then reset and reused.

Cloning a database costs two checkpoints and dropping it a third (about 0.3 s each time on the
test machines); emptying the tables of one a test has finished with costs a few milliseconds.
A database goes back to the pool only when it is indistinguishable from a fresh clone: its
schema fingerprint (tables, columns, constraints, indexes, enums, triggers, functions, grants,
database settings, the migration version) equals the template's, its other sessions are ended,
and its tables are truncated. Anything else (a test that altered
the schema, a reset that fails or waits on a lock) drops it, and the next test gets a new clone.
"""

from __future__ import annotations

import itertools
import os

import psycopg2
from psycopg2 import sql

from tests.pgcluster import admin_sql

# Everything about a database that a test could change and a TRUNCATE would not put back.
FINGERPRINT = """
SELECT md5(string_agg(item, E'\\n' ORDER BY item)) FROM (
    SELECT format('class %s.%s %s %s', n.nspname, c.relname, c.relkind, c.relacl)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'
  UNION ALL
    SELECT format('column %s.%s %s %s %s', c.oid::regclass, a.attname, format_type(a.atttypid, a.atttypmod),
                  a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attnum > 0 AND NOT a.attisdropped
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'
  UNION ALL
    SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
    FROM pg_constraint
    WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  UNION ALL
    SELECT format('index %s', pg_get_indexdef(i.indexrelid))
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'
  UNION ALL
    SELECT format('enum %s %s %s', enumtypid::regtype, enumsortorder, enumlabel) FROM pg_enum
  UNION ALL
    SELECT format('type %s %s', oid::regtype, typtype) FROM pg_type
    WHERE typnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
      AND typnamespace::regnamespace::text !~ '^pg_(toast|temp)'
  UNION ALL
    SELECT format('trigger %s %s', tgrelid::regclass, pg_get_triggerdef(oid))
    FROM pg_trigger WHERE NOT tgisinternal
  UNION ALL
    SELECT format('function %s %s', oid::regprocedure, md5(prosrc)) FROM pg_proc
    WHERE pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  UNION ALL
    SELECT format('namespace %s %s', nspname, nspacl) FROM pg_namespace WHERE nspname !~ '^pg_(toast|temp)'
  UNION ALL
    SELECT format('extension %s %s', extname, extversion) FROM pg_extension
  UNION ALL
    SELECT format('setting %s %s', setrole, setconfig) FROM pg_db_role_setting
    WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
  UNION ALL
    SELECT format('version %s', version_num) FROM alembic_version
) AS fingerprint(item)
"""

# The tables a reset empties: every one but the migration version.
TABLES = """
SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
WHERE schemaname NOT IN ('pg_catalog', 'information_schema') AND tablename <> 'alembic_version'
"""

# Shared by every pool of the process, so that no two hand out the same name.
_numbers = itertools.count()


class DatabasePool:
    """Migrated databases of one test process, handed out one per test."""

    def __init__(self, port: int, template: str) -> None:
        self.port = port
        self.template = template
        self._clean: list[str] = []
        self._fingerprint = self._connect_and(template, _fingerprint)

    def take(self) -> str:
        """The name of a database that looks exactly like a fresh clone of the template."""
        if self._clean:
            return self._clean.pop()
        name = f"test_{os.getpid()}_{next(_numbers)}"
        # A small template is copied file by file faster than through the WAL (PostgreSQL 15's
        # default strategy); the checkpoints FILE_COPY needs cost little in a cluster without fsync.
        admin_sql(self.port, f'CREATE DATABASE "{name}" TEMPLATE "{self.template}" STRATEGY FILE_COPY')
        return name

    def give_back(self, name: str) -> None:
        """Reset the database for the next test, or drop it when it cannot be made like new."""
        try:
            admin_sql(
                self.port,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
            )
            if self._connect_and(name, _reset) == self._fingerprint:
                self._clean.append(name)
                return
        except psycopg2.Error:
            pass
        self.drop(name)

    def drop(self, name: str) -> None:
        admin_sql(self.port, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        while self._clean:
            self.drop(self._clean.pop())

    def _connect_and(self, dbname: str, action):
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)
        try:
            with connection, connection.cursor() as cursor:
                return action(cursor)
        finally:
            connection.close()


def _fingerprint(cursor) -> str:
    cursor.execute(FINGERPRINT)
    return cursor.fetchone()[0]


def _reset(cursor) -> str:
    """Empty every table in one transaction and return the schema's fingerprint.

    A session the terminate did not end in time (or one that came back) holds a lock the
    TRUNCATE would wait for: after a few seconds the reset fails and the database is dropped.
    """
    cursor.execute("SET LOCAL lock_timeout = '5s'")
    fingerprint = _fingerprint(cursor)
    cursor.execute(TABLES)
    tables = [sql.SQL(row[0]) for row in cursor.fetchall()]
    if tables:
        cursor.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(sql.SQL(", ").join(tables)))
    return fingerprint
