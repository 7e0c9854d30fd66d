"""/api/v1/routing-rules: a tenant's rules, listed lowest priority first."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from smtp_proxy import validation
from smtp_proxy.api import schemas
from smtp_proxy.api.auth import principal
from smtp_proxy.api.context import config, database
from smtp_proxy.api.errors import invalid
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.errors import NotFound, ValidationError
from smtp_proxy.storage import routing_rules as store

bp = Blueprint("routing_rules", __name__, url_prefix="/routing-rules")


def render(rule: Any) -> dict[str, Any]:
    """A rule of ``storage.routing_rules``."""
    return {
        "id": str(rule.id),
        "name": rule.name,
        "provider_id": str(rule.provider_id),
        "priority": rule.priority,
        "conditions": dict(rule.conditions or {}),
        "enabled": bool(rule.enabled),
        "created_at": iso_timestamp(rule.created_at),
        "updated_at": iso_timestamp(rule.updated_at),
    }


def _conditions(data: dict[str, Any]) -> dict[str, Any] | None:
    """The conditions with their domain patterns normalised (IDNA, lower case)."""
    conditions = data.get("conditions")
    if conditions is None:
        return None
    normalised = dict(conditions)
    for key in ("recipient_domains", "sender_domains"):
        if key in conditions:
            try:
                normalised[key] = validation.domain_patterns(conditions[key], field=f"conditions.{key}")
            except ValidationError as error:
                raise invalid({error.field: error.problem}) from None
    return normalised


def _provider_id(data: dict[str, Any]) -> uuid.UUID | None:
    if "provider_id" not in data:
        return None
    return uuid.UUID(data["provider_id"])


def _own_provider(error: NotFound) -> Exception:
    # Another tenant's provider is as unknown as a missing one: a field error, not a 404.
    return invalid({"provider_id": "no such provider"})


@bp.post("")
def create() -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("RoutingRuleCreate")
    conditions = _conditions(data)
    with database().transaction() as session:
        try:
            rule = store.create_rule(
                session,
                account_id=caller.id,
                provider_id=_provider_id(data),
                name=data["name"],
                priority=data["priority"],
                conditions=conditions,
                enabled=data.get("enabled", True),
                max_rules=config().limits.max_rules_per_account,
                actor=caller.actor,
            )
        except NotFound as error:
            raise _own_provider(error) from None
        body = render(rule)
    return body, 201, {"Location": f"/api/v1/routing-rules/{body['id']}"}


@bp.get("")
def list_() -> ResponseReturnValue:
    with database().read() as session:
        return {"items": [render(rule) for rule in store.list_rules(session, principal().id)]}


@bp.get("/<uuid:rule_id>")
def get(rule_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        return render(store.get_rule(session, principal().id, rule_id))


@bp.put("/<uuid:rule_id>")
def update(rule_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("RoutingRuleUpdate")
    changes = dict(data)
    if "conditions" in data:
        changes["conditions"] = _conditions(data)
    if "provider_id" in data:
        changes["provider_id"] = _provider_id(data)
    with database().transaction() as session:
        rule = store.get_rule(session, caller.id, rule_id)
        try:
            rule = store.update_rule(session, rule, changes, actor=caller.actor)
        except NotFound as error:
            raise _own_provider(error) from None
        return render(rule)


@bp.delete("/<uuid:rule_id>")
def delete(rule_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with database().transaction() as session:
        store.delete_rule(session, store.get_rule(session, caller.id, rule_id), actor=caller.actor)
    return "", 204
