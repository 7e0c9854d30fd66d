"""/api/v1/webhooks: a tenant's webhook endpoints, their secrets, and what was sent to them.

The secret is shown once, at creation and at each rotation; the previous one keeps
signing beside the new one for 24 hours (``storage.webhooks``). Every change is audited.
Targets must be https and public unless ``delivery.allow_private_networks`` (checked again
at each POST, by the sender's address guard).
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from smtp_proxy.api import schemas
from smtp_proxy.api.auth import principal
from smtp_proxy.api.context import cipher, config, database
from smtp_proxy.db.types import iso_timestamp, utcnow
from smtp_proxy.storage import webhooks as store

bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")


def render(endpoint: Any) -> dict[str, Any]:
    """An endpoint without its secrets."""
    expires = endpoint.previous_secret_expires_at
    sealed = endpoint.previous_secret_encrypted is not None
    previous_valid = sealed and expires is not None and expires > utcnow()
    return {
        "id": str(endpoint.id),
        "url": endpoint.url,
        "events": list(endpoint.events or []),
        "enabled": bool(endpoint.enabled),
        "previous_secret_expires_at": iso_timestamp(expires) if previous_valid else None,
        "created_at": iso_timestamp(endpoint.created_at),
        "updated_at": iso_timestamp(endpoint.updated_at),
    }


def _allow_http() -> bool:
    return config().delivery.allow_private_networks


@bp.post("")
def create() -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("WebhookCreate")
    with database().transaction() as session:
        made = store.create_endpoint(
            session,
            cipher(),
            account_id=caller.id,
            url_=data["url"],
            events=data["events"],
            enabled=data.get("enabled", True),
            allow_http=_allow_http(),
            actor=caller.actor,
        )
        body = {**render(made.endpoint), "secret": made.secret}
    return body, 201, {"Location": f"/api/v1/webhooks/{body['id']}"}


@bp.get("")
def list_() -> ResponseReturnValue:
    with database().read() as session:
        return {"items": [render(e) for e in store.list_endpoints(session, principal().id)]}


@bp.get("/<uuid:webhook_id>")
def get(webhook_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        return render(store.get_endpoint(session, principal().id, webhook_id))


@bp.patch("/<uuid:webhook_id>")
def update(webhook_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("WebhookUpdate")
    with database().transaction() as session:
        endpoint = store.get_endpoint(session, caller.id, webhook_id)
        store.update_endpoint(session, endpoint, data, allow_http=_allow_http(), actor=caller.actor)
        return render(endpoint)


@bp.delete("/<uuid:webhook_id>")
def delete(webhook_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with database().transaction() as session:
        store.delete_endpoint(session, store.get_endpoint(session, caller.id, webhook_id), actor=caller.actor)
    return "", 204


@bp.post("/<uuid:webhook_id>/rotate-secret")
def rotate_secret(webhook_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with database().transaction() as session:
        endpoint = store.get_endpoint(session, caller.id, webhook_id)
        secret = store.rotate_secret(session, cipher(), endpoint, actor=caller.actor)
        return {**render(endpoint), "secret": secret}


@bp.get("/<uuid:webhook_id>/deliveries")
def deliveries(webhook_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        endpoint = store.get_endpoint(session, principal().id, webhook_id)
        rows = store.deliveries_with_types(session, endpoint.id)
        return {"items": [_delivery(delivery, kind) for delivery, kind in rows]}


def _delivery(row: Any, kind: str) -> dict[str, Any]:
    return {
        "event_id": str(row.event_id),
        "type": kind,
        "status": row.status,
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "last_attempt_at": iso_timestamp(row.last_attempt_at) if row.last_attempt_at else None,
        "next_attempt_at": iso_timestamp(row.next_attempt_at) if row.status == "pending" else None,
        "created_at": iso_timestamp(row.created_at),
    }


@bp.post("/<uuid:webhook_id>/deliveries/<uuid:event_id>/redeliver")
def redeliver(webhook_id: uuid.UUID, event_id: uuid.UUID) -> ResponseReturnValue:
    with database().transaction() as session:
        endpoint = store.get_endpoint(session, principal().id, webhook_id)
        store.redeliver(session, endpoint.id, event_id, now=utcnow())
    return {"event_id": str(event_id), "status": "pending"}, 202
