"""Every API error as ``{"error": {"code", "message"[, "fields"]}}`` with a stable code.

Handlers here are the only place an exception becomes a response: storage
errors map onto 404/409/422/503 (``database_not_migrated`` for a schema behind
the code), werkzeug's HTTP errors keep their status with a JSON body, and
anything else is a 500 whose body says nothing but the
request id (the log line under that id has the details).

``fields`` names the fields at fault: every rejected one on a 422
``invalid_fields`` (``body`` for a reached limit such as
limits.max_providers_per_account), the fields only an admin may set on a 403
``forbidden_field``, and ``allowed_domains`` on a 409 ``domain_taken``.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, current_app, g, jsonify
from werkzeug.exceptions import HTTPException

from smtp_proxy.errors import Conflict, DatabaseUnavailable, NotFound, SchemaNotMigrated, ValidationError
from smtp_proxy.storage.accounts import DomainTaken
from smtp_proxy.storage.providers import QuotaExceeded
from smtp_proxy.units import size_limit

log = logging.getLogger("smtp_proxy.api")

RETRY_AFTER_SECONDS = 5

# HTTP status -> stable error code, for errors werkzeug raises itself.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_fields",
    429: "rate_limited",
    500: "internal_error",
    503: "database_unavailable",
}


class ApiError(Exception):
    """An error the API answers on purpose, with a status and a stable code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        fields: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or HTTP_CODES.get(status, "error")
        self.message = message
        self.fields = fields
        self.headers = headers or {}


def invalid(fields: dict[str, str]) -> ApiError:
    """422 naming each rejected field."""
    names = ", ".join(sorted(fields))
    return ApiError(422, f"invalid fields: {names}", fields=fields)


def forbidden_fields(names: list[str]) -> ApiError:
    """403 ``forbidden_field``: the caller named fields only an admin may set."""
    listed = ", ".join(names)
    return ApiError(
        403,
        f"only an admin may set {listed}",
        code="forbidden_field",
        fields={name: "only an admin may set this field" for name in names},
    )


def error_response(error: ApiError) -> Response:
    body: dict[str, object] = {"code": error.code, "message": error.message}
    if error.fields:
        body["fields"] = error.fields
    response = jsonify(error=body)
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def register(app: Flask) -> None:
    """Install the handlers on the app."""

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(NotFound)
    def _not_found(error: NotFound) -> Response:
        return error_response(ApiError(404, str(error) or "not found"))

    @app.errorhandler(Conflict)
    def _conflict(error: Conflict) -> Response:
        return error_response(ApiError(409, str(error) or "already exists"))

    @app.errorhandler(DomainTaken)
    def _domain_taken(error: DomainTaken) -> Response:
        return error_response(
            ApiError(409, str(error), code="domain_taken", fields={"allowed_domains": str(error)})
        )

    @app.errorhandler(QuotaExceeded)
    def _quota(error: QuotaExceeded) -> Response:
        message = f"limit reached: {error}"
        return error_response(ApiError(422, message, fields={"body": message}))

    @app.errorhandler(ValidationError)
    def _invalid(error: ValidationError) -> Response:
        return error_response(invalid({error.field: error.problem}))

    @app.errorhandler(DatabaseUnavailable)
    def _unavailable(_error: DatabaseUnavailable) -> Response:
        return error_response(
            ApiError(
                503,
                "the database is not answering; retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        )

    @app.errorhandler(SchemaNotMigrated)
    def _not_migrated(_error: SchemaNotMigrated) -> Response:
        # A listener does not start on such a database; this one met it later (it was down at start).
        return error_response(
            ApiError(
                503,
                "the database is not migrated to this version's schema: run smtp-proxy db upgrade",
                code="database_not_migrated",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        )

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException) -> Response:
        status = error.code or 500
        messages = {
            400: "the request is malformed",
            404: "no such resource",
            405: "method not allowed on this resource",
            413: "the request body is too large",
            415: "the request body must be application/json",
        }
        message = messages.get(status, error.name.lower())
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        if status == 413 and limit:
            message = f"the request body is too large: the limit is {size_limit(limit)}"
        api_error = ApiError(status, message)
        response = error_response(api_error)
        if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    def _bug(error: Exception) -> Response:
        log.exception("unhandled error in API request", extra={"event": "api.error"})
        request_id = g.get("request_id", "")
        return error_response(
            ApiError(500, f"internal error; quote request id {request_id} when reporting it")
        )
