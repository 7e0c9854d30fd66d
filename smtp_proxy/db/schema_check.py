"""Whether the database's schema is the one this code was written for.

The database's Alembic revision against the code's head: ``current``; ``behind`` (no
revision yet, or an older one the code knows: ``smtp-proxy db upgrade`` fixes it); or
``ahead`` (a revision the code does not know: newer code migrated it). Migrations only
add, and a rolling upgrade runs old and new code side by side on the migrated schema,
so ahead is logged and allowed; behind is refused (``SchemaNotMigrated``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from smtp_proxy.db.migrate import code_revisions, current_revision
from smtp_proxy.db.session import safe_url
from smtp_proxy.errors import SchemaNotMigrated

log = logging.getLogger("smtp_proxy.db")

CURRENT, BEHIND, AHEAD = "current", "behind", "ahead"


@dataclass(frozen=True)
class SchemaStatus:
    state: str  # CURRENT, BEHIND or AHEAD
    revision: str | None  # the database's; None before the first migration
    head: str  # the code's

    def problem(self, where: str) -> str:
        """The one line that tells the operator what is wrong with a schema behind, and the fix."""
        return (
            f"the database at {where} is not migrated (revision {self.revision or 'none'}, "
            f"this version needs {self.head}): run smtp-proxy db upgrade"
        )


def schema_status(engine: Engine) -> SchemaStatus:
    """One query. Raises DatabaseUnavailable, or SchemaNotMigrated for a missing SQLite file."""
    revision = current_revision(engine)
    head, known = code_revisions()
    if revision == head:
        state = CURRENT
    elif revision is None or revision in known:
        state = BEHIND
    else:
        state = AHEAD
    return SchemaStatus(state, revision, head)


def require_migrated(engine: Engine) -> SchemaStatus:
    """The status when the code can run on this schema; logs a warning when it is ahead.

    Raises SchemaNotMigrated (with the operator's one line) when it is behind,
    DatabaseUnavailable when the database does not answer.
    """
    status = schema_status(engine)
    if status.state == BEHIND:
        raise SchemaNotMigrated(status.problem(safe_url(engine)))
    if status.state == AHEAD:
        log.warning(
            f"the database is at revision {status.revision}, which this version ({status.head}) does not "
            "know: newer code migrated it; carrying on, since migrations only add",
            extra={"event": "db.schema_ahead", "revision": status.revision, "head": status.head},
        )
    return status


class SchemaWatch:
    """The schema status for ``/readyz``, without a query per probe once it can no longer change.

    A schema only moves forward: once current (or ahead) it stays so for this code, and
    that answer is kept; a schema behind is asked again at every call, so the probe turns
    ready as soon as ``db upgrade`` has run.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._settled: SchemaStatus | None = None

    def status(self) -> SchemaStatus:
        """Raises DatabaseUnavailable (SchemaNotMigrated for a missing SQLite file) while unsettled."""
        settled = self._settled
        if settled is not None:
            return settled
        status = schema_status(self._engine)
        if status.state != BEHIND:
            self._settled = status
        return status
