"""/api/v1/suppressions: an account's suppression list (``storage.suppressions``).

A tenant sees and edits its own list. An admin acts on its own list, or on any account's with
``account_id`` (a query parameter, or a field of the POST body); a tenant naming another account
gets 404, as for a missing one. Adding and deleting write audit rows; the worker's own additions
(hard bounces) carry the message and the reply that caused them instead.
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from smtp_proxy.api import pages, schemas
from smtp_proxy.api.auth import principal
from smtp_proxy.api.context import database
from smtp_proxy.api.errors import invalid
from smtp_proxy.contract import SuppressionReason
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.errors import NotFound, ValidationError
from smtp_proxy.storage import accounts
from smtp_proxy.storage import suppressions as store

bp = Blueprint("suppressions", __name__, url_prefix="/suppressions")


def render(entry: Any) -> dict[str, Any]:
    return {
        "id": str(entry.id),
        "account_id": str(entry.account_id),
        "address": entry.address,
        "reason": entry.reason.value,
        "message_id": str(entry.message_id) if entry.message_id else None,
        "provider_id": str(entry.provider_id) if entry.provider_id else None,
        "response_code": entry.response_code,
        "response_text": entry.response_text,
        "created_at": iso_timestamp(entry.created_at),
    }


def _account_id(value: str | None) -> uuid.UUID:
    """The account acted on: the caller's own, or for an admin the one named (404 for a tenant)."""
    caller = principal()
    if value is None:
        return caller.id
    try:
        account_id = uuid.UUID(value)
    except ValueError:
        raise invalid({"account_id": "must be a UUID"}) from None
    if account_id != caller.id and not caller.is_admin:
        raise NotFound("no such account")
    return account_id


def _reason() -> SuppressionReason | None:
    value = request.args.get("reason")
    if value is None:
        return None
    try:
        return SuppressionReason(value)
    except ValueError:
        choices = ", ".join(reason.value for reason in SuppressionReason)
        raise invalid({"reason": f"must be one of {choices}"}) from None


@bp.get("")
def list_() -> ResponseReturnValue:
    query = pages.gather(
        account_id=lambda: _account_id(request.args.get("account_id")),
        reason=_reason,
        address=lambda: request.args.get("address"),
        limit=pages.limit,
        before=pages.cursor,
    )
    limit = query.pop("limit")
    account_id = query.pop("account_id")
    with database().read() as session:
        if account_id != principal().id:
            accounts.get_account(session, account_id)  # 404 for an admin naming no account
        rows = store.list_suppressions(session, account_id, store.Filters(**query), limit + 1)
        items = [render(row) for row in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        cursor = pages.encode_cursor(last.created_at, last.id) if last else None
    return {"items": items, "next_cursor": cursor}


@bp.post("")
def create() -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("SuppressionCreate")
    account_id = _account_id(data.get("account_id"))
    try:
        store.checked(data["address"])
    except ValidationError as error:
        raise invalid({error.field: error.problem}) from None
    with database().transaction() as session:
        if account_id != caller.id:
            accounts.get_account(session, account_id)
        body = render(store.add_manual(session, account_id, data["address"], actor=caller.actor))
    return body, 201, {"Location": f"/api/v1/suppressions/{body['id']}"}


@bp.get("/<uuid:suppression_id>")
def get(suppression_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        return render(_visible(session, suppression_id))


@bp.delete("/<uuid:suppression_id>")
def delete(suppression_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with database().transaction() as session:
        store.delete_suppression(session, _visible(session, suppression_id), actor=caller.actor)
    return "", 204


def _visible(session: Any, suppression_id: uuid.UUID) -> Any:
    """The entry by id: a tenant's own, or any account's for an admin (else 404)."""
    caller = principal()
    return store.get_suppression(session, None if caller.is_admin else caller.id, suppression_id)
