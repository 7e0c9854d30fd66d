"""Liveness and readiness probes for load balancers and systemd."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from smtp_proxy.api.context import database

bp = Blueprint("health", __name__)

RETRY_AFTER_SECONDS = "5"


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """The process is up and serving requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    """Ready for traffic: the database answers. 503 with Retry-After otherwise."""
    if database().ping():
        return jsonify(status="ready", database="ok")
    body = jsonify(error={"code": "database_unavailable", "message": "the database is not answering"})
    return body, 503, {"Retry-After": RETRY_AFTER_SECONDS}
