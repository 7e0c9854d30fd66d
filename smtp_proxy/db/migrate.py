"""Schema migrations with Alembic, driven from code.

``upgrade`` holds a PostgreSQL advisory lock while it runs, so several
instances started together (or an operator and a deploy script) can all run
``smtp-proxy db upgrade`` safely; the second one finds nothing left to do.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from smtp_proxy.db.session import create_sqlite_file, translated_errors


def _migrations_root() -> Path:
    """Where alembic.ini and alembic/ are: the source checkout, else the installed data files."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "alembic.ini").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "smtp-proxy"


_ROOT = _migrations_root()
# An arbitrary constant that names "the smtp-proxy migration" in pg_advisory_lock.
_ADVISORY_LOCK_ID = 0x5357_5850


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig(str(_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(_ROOT / "alembic"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def code_revisions() -> tuple[str, frozenset[str]]:
    """The code's head revision and every revision it knows, read once from alembic/versions."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {script.dir}")
    return head, frozenset(revision.revision for revision in script.walk_revisions())


def head_revision() -> str:
    """The revision this code needs."""
    return code_revisions()[0]


def current_revision(engine: Engine) -> str | None:
    """The database's revision, None before the first migration.

    Raises DatabaseUnavailable when the database does not answer, SchemaNotMigrated when
    its SQLite file does not exist.
    """
    with translated_errors(), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate to ``revision``; returns (before, after). Idempotent.

    The one path that creates a missing SQLite file (and its directory); everything else
    opens an existing one only. Raises DatabaseUnavailable when the database does not answer.
    """
    create_sqlite_file(engine)
    with translated_errors(), engine.connect() as connection:
        postgres = connection.dialect.name == "postgresql"
        if postgres:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
            connection.commit()
        try:
            before = MigrationContext.configure(connection).get_current_revision()
            command.upgrade(alembic_config(connection), revision)
            connection.commit()
            after = MigrationContext.configure(connection).get_current_revision()
        finally:
            if postgres:
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _ADVISORY_LOCK_ID})
                connection.commit()
    return before, after
