"""The /api/v1 blueprint: bearer authentication in front of every resource."""

from __future__ import annotations

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from smtp_proxy.api import (
    accounts,
    audit_log,
    dkim_keys,
    messages,
    openapi,
    providers,
    routing_rules,
    smtp_credentials,
    suppressions,
    webhooks,
)
from smtp_proxy.api.auth import authenticate

bp = Blueprint("v1", __name__, url_prefix="/api/v1")
PUBLIC_ENDPOINTS = {"v1.openapi_json"}


@bp.before_request
def _authenticate() -> None:
    if request.endpoint not in PUBLIC_ENDPOINTS:
        authenticate()  # the rate limits (per key, per address without one) come with it


@bp.get("/openapi.json")
def openapi_json() -> ResponseReturnValue:
    return openapi.document()


for child in (accounts.bp, smtp_credentials.bp, providers.bp, routing_rules.bp, messages.bp, audit_log.bp):
    bp.register_blueprint(child)
bp.register_blueprint(suppressions.bp)
bp.register_blueprint(dkim_keys.bp)
bp.register_blueprint(webhooks.bp)
