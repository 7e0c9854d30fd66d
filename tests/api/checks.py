"""Shared checks for API error responses, used by the tests in tests/api.

Every error the API returns has the same envelope::

    {"error": {"code": "<stable code>", "message": "<text>", "fields": {...}}}

``fields`` is present on 422 ``invalid_fields``, 403 ``forbidden_field`` and 409 ``domain_taken`` errors.
The checks here assert that envelope and that the body leaks no internals (stack traces, SQL, driver
names, file paths) and none of the given secrets.
A test file that needs a stricter check (an exact content type, the request id format) layers it on top.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import requests

# Text that only appears in a response body when internals leak into it. Case-sensitive; deliberately no
# plain words that a message could legitimately contain.
LEAK_MARKERS = (
    "Traceback",  # a Python stack trace
    'File "',  # a stack frame
    ".py:",  # a file:line reference
    '.py"',  # a quoted module path
    "site-packages",
    "/work/",  # the checkout the tests run from
    "sqlalchemy",
    "psycopg",  # psycopg and psycopg2
    "SELECT",
    "INSERT",
    "UPDATE ",
)


def assert_no_secret(response: requests.Response, secrets: Iterable[str]) -> None:
    """Neither the body (raw or JSON-escaped) nor any header value carries one of ``secrets``."""
    for secret in secrets:
        escaped = json.dumps(secret)[1:-1]
        assert secret not in response.text, f"secret {secret!r} leaked in body: {response.text}"
        assert escaped not in response.text, f"secret {secret!r} leaked in body: {response.text}"
        for name, value in response.headers.items():
            assert secret not in value, f"secret {secret!r} leaked in header {name}"


def assert_error(
    response: requests.Response, status: int, code: str, *, secrets: Iterable[str] = ()
) -> dict[str, Any]:
    """``response`` is the JSON error envelope with ``status`` and ``code``, leaking nothing.

    Checks the status, a JSON content type, an ``X-Request-ID`` header, a body that is exactly
    ``{"error": {...}}`` with ``code`` and a non-empty message, no ``LEAK_MARKERS`` in the body and none of
    ``secrets`` in the body or headers. Returns the ``error`` object.
    """
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    assert response.headers.get("X-Request-ID"), response.headers
    for marker in LEAK_MARKERS:
        assert marker not in response.text, f"{marker!r} leaked: {response.text}"
    assert_no_secret(response, secrets)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


def assert_invalid(response: requests.Response, *fields: str, secrets: Iterable[str] = ()) -> dict[str, str]:
    """``response`` is a 422 ``invalid_fields`` error naming each of ``fields`` with a non-empty problem.

    Returns the ``fields`` object (field name to problem).
    """
    error = assert_error(response, 422, "invalid_fields", secrets=secrets)
    problems = error.get("fields") or {}
    for field in fields:
        assert field in problems, f"{field} not named in {problems}"
        assert isinstance(problems[field], str) and problems[field], problems
    return problems


def field_error(response: requests.Response, field: str, *, secrets: Iterable[str] = ()) -> str | None:
    """None when ``response`` is a clean 422 naming ``field``; else what is wrong with it.

    For checking many cases and reporting every failing one at once.
    """
    try:
        assert_invalid(response, field, secrets=secrets)
    except AssertionError as error:
        return f"{response.status_code} {response.text[:300]}: {error}"
    return None
