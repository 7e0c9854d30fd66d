"""Routing rules of one tenant, always read in priority order."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from smtp_proxy.db.models import RoutingRule
from smtp_proxy.errors import ValidationError
from smtp_proxy.storage import audit
from smtp_proxy.storage.audit import Actor
from smtp_proxy.storage.providers import RULE_ENTITY, check_quota, get_provider
from smtp_proxy.storage.tenancy import owned

ENTITY = RULE_ENTITY
_FIELDS = ("name", "provider_id", "priority", "conditions", "enabled")


def _check_priority(priority: int) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise ValidationError("priority", "must be an integer >= 0")


def create_rule(
    session: Session,
    *,
    account_id: uuid.UUID,
    provider_id: uuid.UUID,
    name: str,
    priority: int,
    conditions: dict[str, Any] | None = None,
    enabled: bool = True,
    max_rules: int | None = None,
    actor: Actor,
) -> RoutingRule:
    """Add a rule; the provider must be the same tenant's (else NotFound).

    Raises QuotaExceeded when the account already has ``max_rules``
    (``limits.max_rules_per_account``; None: no cap).
    """
    _check_priority(priority)
    get_provider(session, account_id, provider_id)
    check_quota(session, account_id, RoutingRule, max_rules, "limits.max_rules_per_account")
    rule = RoutingRule(
        id=uuid.uuid4(),
        account_id=account_id,
        provider_id=provider_id,
        name=name,
        priority=priority,
        conditions=dict(conditions or {}),
        enabled=enabled,
    )
    session.add(rule)
    audit.record(
        session,
        actor=actor,
        action="create",
        entity=ENTITY,
        entity_id=rule.id,
        account_id=account_id,
        fields=_FIELDS,
    )
    session.flush()
    return rule


def update_rule(session: Session, rule: RoutingRule, changes: dict[str, Any], *, actor: Actor) -> RoutingRule:
    """Apply a partial update of the fields in ``_FIELDS``."""
    unknown = set(changes) - set(_FIELDS)
    if unknown:
        raise ValidationError(sorted(unknown)[0], "unknown field")
    if "priority" in changes:
        _check_priority(changes["priority"])
    if "provider_id" in changes:
        get_provider(session, rule.account_id, changes["provider_id"])
    for field, value in changes.items():
        setattr(rule, field, dict(value) if field == "conditions" else value)
    audit.record(
        session,
        actor=actor,
        action="update",
        entity=ENTITY,
        entity_id=rule.id,
        account_id=rule.account_id,
        fields=changes,
    )
    session.flush()
    return rule


def delete_rule(session: Session, rule: RoutingRule, *, actor: Actor) -> None:
    audit.record(
        session, actor=actor, action="delete", entity=ENTITY, entity_id=rule.id, account_id=rule.account_id
    )
    session.delete(rule)
    session.flush()


def get_rule(session: Session, account_id: uuid.UUID, rule_id: uuid.UUID) -> RoutingRule:
    return owned(session, RoutingRule, account_id, rule_id, "routing rule")


def list_rules(session: Session, account_id: uuid.UUID, enabled_only: bool = False) -> list[RoutingRule]:
    """Lowest priority first; ties in creation order."""
    query = select(RoutingRule).where(RoutingRule.account_id == account_id)
    if enabled_only:
        query = query.where(RoutingRule.enabled.is_(True))
    return list(session.scalars(query.order_by(RoutingRule.priority, RoutingRule.created_at, RoutingRule.id)))
