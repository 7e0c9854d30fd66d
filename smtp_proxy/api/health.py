"""Liveness and readiness probes for load balancers and systemd."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

from smtp_proxy.api.context import database
from smtp_proxy.db.migrate import head_revision
from smtp_proxy.db.schema_check import BEHIND, SchemaWatch
from smtp_proxy.db.session import safe_url
from smtp_proxy.errors import DatabaseUnavailable, SchemaNotMigrated

bp = Blueprint("health", __name__)

RETRY_AFTER_SECONDS = "5"
_SCHEMA = "smtp_proxy.schema_watch"


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """The process is up and serving requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    """Ready for traffic: the database answers and its schema is not behind this code's.

    503 with Retry-After otherwise. The schema costs a query only until it is found current
    (``SchemaWatch``), so a probe every second is one ``SELECT 1`` once ready.
    """
    unavailable = jsonify(error={"code": "database_unavailable", "message": "the database is not answering"})
    try:
        if not database().ping():
            return unavailable, 503, {"Retry-After": RETRY_AFTER_SECONDS}
        status = _schema_watch().status()
    except SchemaNotMigrated as error:  # the SQLite file does not exist
        return _not_migrated(None, head_revision(), str(error))
    except DatabaseUnavailable:
        return unavailable, 503, {"Retry-After": RETRY_AFTER_SECONDS}
    if status.state == BEHIND:
        return _not_migrated(status.revision, status.head, status.problem(safe_url(database().engine)))
    return jsonify(status="ready", database="ok", schema=status.state)


def _schema_watch() -> SchemaWatch:
    watch = current_app.extensions.get(_SCHEMA)
    if watch is None:
        watch = current_app.extensions.setdefault(_SCHEMA, SchemaWatch(database().engine))
    return watch


def _not_migrated(revision: str | None, head: str, message: str) -> ResponseReturnValue:
    body = jsonify(
        status="not ready",
        database="ok",
        schema=BEHIND,
        revision=revision,
        head=head,
        error={"code": "database_not_migrated", "message": message},
    )
    return body, 503, {"Retry-After": RETRY_AFTER_SECONDS}
