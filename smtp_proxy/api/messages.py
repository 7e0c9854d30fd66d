"""/api/v1/messages: a tenant's messages, their status and delivery log; never a body."""

from __future__ import annotations

import json
import uuid
from typing import Any

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from smtp_proxy.api import pages
from smtp_proxy.api.auth import principal
from smtp_proxy.api.context import database
from smtp_proxy.api.errors import invalid
from smtp_proxy.contract import MessageStatus
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.storage import messages as store

bp = Blueprint("messages", __name__, url_prefix="/messages")


def _iso(value: Any) -> str | None:
    return iso_timestamp(value) if value is not None else None


def render(row: Any) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "sender": row.sender,
        "recipients": list(row.recipients or []),
        "subject": row.subject,
        "size": row.size,
        "status": row.status.value,
        "attempts": row.attempts,
        "provider_id": str(row.provider_id) if row.provider_id else None,
        "credential_id": str(row.credential_id) if row.credential_id else None,
        "correlation_id": row.correlation_id,
        "is_bounce": bool(row.is_bounce),
        "next_attempt_at": _iso(row.next_attempt_at),
        "processed_at": _iso(row.processed_at),
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
    }


def _status() -> MessageStatus | None:
    value = request.args.get("status")
    if value is None:
        return None
    try:
        return MessageStatus(value)
    except ValueError:
        choices = ", ".join(status.value for status in MessageStatus)
        raise invalid({"status": f"must be one of {choices}"}) from None


def _credential_id() -> uuid.UUID | None:
    value = request.args.get("credential_id")
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid({"credential_id": "must be a UUID"}) from None


def _is_bounce() -> bool | None:
    value = request.args.get("is_bounce")
    if value is None:
        return None
    if value not in ("true", "false"):
        raise invalid({"is_bounce": "must be true or false"})
    return value == "true"


@bp.get("")
def list_() -> ResponseReturnValue:
    query = pages.gather(
        status=_status,
        credential_id=_credential_id,
        is_bounce=_is_bounce,
        since=lambda: pages.timestamp("since"),
        until=lambda: pages.timestamp("until"),
        limit=pages.limit,
        before=pages.cursor,
    )
    limit = query.pop("limit")
    filters = store.Filters(**query)
    with database().autocommit() as connection:  # one SELECT, no ORM objects
        rendered = store.list_messages_json(connection, principal().id, filters, limit=limit)
        if rendered is None:
            page = store.list_messages(connection, principal().id, filters, limit=limit)
    if rendered is not None:  # PostgreSQL built the items (storage/json_rows.py)
        cursor = pages.encode_cursor(*rendered.last) if rendered.last else None
        return pages.prerendered(f'{{"items": {rendered.items}, "next_cursor": {json.dumps(cursor)}}}')
    last = page.rows[-1] if page.rows else None
    return {
        "items": [render(row) for row in page.rows],
        "next_cursor": pages.encode_cursor(last.created_at, last.id) if page.more and last else None,
    }


@bp.get("/<uuid:message_id>")
def get(message_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        row = store.message_metadata(session, principal().id, message_id)
        attempts = store.deliveries(session, message_id)
        return {
            **render(row),
            "headers": [list(pair) for pair in row.headers or []],
            "deliveries": [
                {
                    "id": str(attempt.id),
                    "provider_id": str(attempt.provider_id) if attempt.provider_id else None,
                    "status": attempt.status.value,
                    "response_code": attempt.response_code,
                    "response_text": attempt.response_text,
                    "created_at": iso_timestamp(attempt.created_at),
                }
                for attempt in attempts
            ],
        }
