"""/api/v1/audit-log: every change, newest first; a tenant sees only its own."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from smtp_proxy.api import pages
from smtp_proxy.api.auth import principal
from smtp_proxy.api.context import database
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.storage import audit as store

bp = Blueprint("audit_log", __name__, url_prefix="/audit-log")


def render(entry: Any) -> dict[str, Any]:
    """An audit row of ``storage.audit``."""
    return {
        "id": str(entry.id),
        "actor": entry.actor,
        "client_ip": entry.client_ip,
        "action": entry.action,
        "entity": entry.entity,
        "entity_id": str(entry.entity_id),
        "account_id": str(entry.account_id) if entry.account_id else None,
        "fields": list((entry.changes or {}).get("fields", [])),
        "created_at": iso_timestamp(entry.created_at),
    }


@bp.get("")
def list_() -> ResponseReturnValue:
    caller = principal()
    query = pages.gather(limit=pages.limit, before=pages.cursor)
    limit, before = query["limit"], query["before"]
    with database().read() as session:
        entries = store.list_entries(
            session, None if caller.is_admin else caller.id, limit=limit + 1, before=before
        )
        items = [render(entry) for entry in entries[:limit]]
        more = len(entries) > limit
        last = entries[limit - 1] if more else None
    return {"items": items, "next_cursor": pages.encode_cursor(last.created_at, last.id) if last else None}
