"""/api/v1/accounts: admins manage every account, a tenant reads and updates itself."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue

from smtp_proxy import crypto, validation
from smtp_proxy.api import schemas
from smtp_proxy.api.auth import forget_account, principal, require_admin
from smtp_proxy.api.context import database
from smtp_proxy.api.errors import ApiError, invalid
from smtp_proxy.db.models import Account
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.errors import NotFound, ValidationError
from smtp_proxy.storage import accounts as store
from smtp_proxy.storage import audit

bp = Blueprint("accounts", __name__, url_prefix="/accounts")


def render(account: Account) -> dict[str, Any]:
    return {
        "id": str(account.id),
        "name": account.name,
        "email": account.email,
        "allowed_domains": list(account.allowed_domains or []),
        "is_admin": bool(account.is_admin),
        "active": bool(account.active),
        "created_at": iso_timestamp(account.created_at),
        "updated_at": iso_timestamp(account.updated_at),
    }


def _bcrypt_cost() -> int:
    return current_app.extensions["smtp_proxy.config"].security.bcrypt_cost


def _visible(session, account_id: uuid.UUID) -> Account:
    """The account if the caller may see it: an admin any, a tenant only itself (else 404)."""
    caller = principal()
    if not caller.is_admin and account_id != caller.id:
        raise NotFound("no such account")
    return store.get_account(session, account_id)


def _checked(data: dict[str, Any]) -> dict[str, Any]:
    """The fields given, normalised; one 422 naming every field the validators reject."""
    checks: dict[str, Callable[[Any], Any]] = {
        "name": validation.account_name,
        "email": validation.email,
        "allowed_domains": validation.domain_patterns,
        "password": crypto.check_password_policy,
    }
    values = dict(data)
    fields: dict[str, str] = {}
    for name, check in checks.items():
        if name in data:
            try:
                result = check(data[name])
            except ValidationError as error:
                fields[error.field] = error.problem
                continue
            if name != "password":
                values[name] = result
    if fields:
        raise invalid(fields)
    return values


@bp.post("")
def create() -> ResponseReturnValue:
    caller = require_admin()
    data = _checked(schemas.body("AccountCreate"))
    with database().transaction() as session:
        created = store.create_account(
            session,
            name=data["name"],
            email=data["email"],
            allowed_domains=data["allowed_domains"],
            password=data.get("password"),
            is_admin=data.get("is_admin", False),
            bcrypt_cost=_bcrypt_cost(),
            actor=caller.actor,
        )
        body = {**render(created.account), "api_key": created.api_key, "password": created.password}
    return body, 201, {"Location": f"/api/v1/accounts/{body['id']}"}


@bp.get("")
def list_() -> ResponseReturnValue:
    caller = principal()
    with database().read() as session:
        if caller.is_admin:
            items = [render(account) for account in store.list_accounts(session)]
        else:
            items = [render(store.get_account(session, caller.id))]
    return {"items": items}


@bp.get("/<uuid:account_id>")
def get(account_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        return render(_visible(session, account_id))


@bp.put("/<uuid:account_id>")
def update(account_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    data = _checked(schemas.body("AccountUpdate"))
    if "is_admin" in data and not caller.is_admin:
        raise ApiError(403, "only an admin may change is_admin")
    with database().transaction() as session:
        account = _visible(session, account_id)
        changed: list[str] = []
        for name in ("email", "allowed_domains", "is_admin"):
            if name in data:
                setattr(account, name, data[name])
                changed.append(name)
        if "password" in data:
            account.password_hash = crypto.hash_password(data["password"], _bcrypt_cost())
            changed.append("password")
        if changed:  # one audit row for the whole change
            audit.record(
                session,
                actor=caller.actor,
                action="update",
                entity=store.ENTITY,
                entity_id=account.id,
                account_id=account.id,
                fields=changed,
            )
        session.flush()
        body = render(account)
    if "is_admin" in data:
        forget_account(account_id)
    return body


@bp.delete("/<uuid:account_id>")
def deactivate(account_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with database().transaction() as session:
        store.deactivate_account(session, _visible(session, account_id), actor=caller.actor)
    forget_account(account_id)
    return "", 204


@bp.post("/<uuid:account_id>/rotate-key")
def rotate_key(account_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with database().transaction() as session:
        api_key = store.rotate_api_key(session, _visible(session, account_id), actor=caller.actor)
    forget_account(account_id)
    return {"api_key": api_key}
