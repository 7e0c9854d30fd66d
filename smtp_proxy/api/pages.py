"""List endpoints: their query parameters (keyset cursors, limits, time bounds) and bodies."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Response, request

from smtp_proxy.api.errors import ApiError, invalid

_DIGITS = re.compile(r"[0-9]{1,4}")  # ASCII only: str.isdigit() also takes "²"
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def gather(**parsers: Callable[[], Any]) -> dict[str, Any]:
    """Run every parameter parser; one 422 naming all the bad ones."""
    values: dict[str, Any] = {}
    fields: dict[str, str] = {}
    for name, parse in parsers.items():
        try:
            values[name] = parse()
        except ApiError as error:
            fields.update(error.fields or {})
    if fields:
        raise invalid(fields)
    return values


def prerendered(body: str) -> Response:
    """A 200 whose JSON text the database built (storage/json_rows.py)."""
    return Response(body, mimetype="application/json")


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor() -> tuple[datetime, uuid.UUID] | None:
    """The ``cursor`` parameter as (created_at, id); 422 when it was not made by us."""
    value = request.args.get("cursor")
    if value is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        stamp, _, row_id = raw.partition("|")
        return _aware(datetime.fromisoformat(stamp)), uuid.UUID(row_id)
    except (ValueError, UnicodeDecodeError):
        raise invalid({"cursor": "is not a cursor from a previous page"}) from None


def limit() -> int:
    value = request.args.get("limit")
    if value is None:
        return DEFAULT_LIMIT
    if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= MAX_LIMIT:
        raise invalid({"limit": f"must be an integer from 1 to {MAX_LIMIT}"})
    return int(value)


def timestamp(name: str) -> datetime | None:
    """An ISO 8601 parameter; a time without a zone is taken as UTC."""
    value = request.args.get(name)
    if value is None:
        return None
    if value[-1:] in ("Z", "z"):  # RFC 3339 allows either case
        value = value[:-1] + "+00:00"
    try:
        return _aware(datetime.fromisoformat(value)).astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: a valid stamp whose UTC is outside years 1-9999
        raise invalid({name: "must be an ISO 8601 date-time within years 1 to 9999 UTC"}) from None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
