"""/api/v1/accounts: admins manage every account, a tenant reads and updates itself."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue

from smtp_proxy import validation
from smtp_proxy.api import schemas
from smtp_proxy.api.auth import forget_account, principal, require_admin
from smtp_proxy.api.errors import ApiError
from smtp_proxy.db.models import Account
from smtp_proxy.errors import NotFound
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
        "created_at": account.created_at.isoformat(),
        "updated_at": account.updated_at.isoformat(),
    }


def _database():
    return current_app.extensions["smtp_proxy.db"]


def _bcrypt_cost() -> int:
    return current_app.extensions["smtp_proxy.config"].security.bcrypt_cost


def _visible(session, account_id: uuid.UUID) -> Account:
    """The account if the caller may see it: an admin any, a tenant only itself (else 404)."""
    caller = principal()
    if not caller.is_admin and account_id != caller.id:
        raise NotFound("no such account")
    return store.get_account(session, account_id)


@bp.post("")
def create() -> ResponseReturnValue:
    caller = require_admin()
    data = schemas.body("AccountCreate")
    with _database().transaction() as session:
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
    with _database().read() as session:
        if caller.is_admin:
            items = [render(account) for account in store.list_accounts(session)]
        else:
            items = [render(store.get_account(session, caller.id))]
    return {"items": items}


@bp.get("/<uuid:account_id>")
def get(account_id: uuid.UUID) -> ResponseReturnValue:
    with _database().read() as session:
        return render(_visible(session, account_id))


@bp.put("/<uuid:account_id>")
def update(account_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("AccountUpdate")
    if "is_admin" in data and not caller.is_admin:
        raise ApiError(403, "only an admin may change is_admin")
    with _database().transaction() as session:
        account = _visible(session, account_id)
        changed: list[str] = []
        if "email" in data:
            account.email = validation.email(data["email"])
            changed.append("email")
        if "allowed_domains" in data:
            account.allowed_domains = validation.domain_patterns(data["allowed_domains"])
            changed.append("allowed_domains")
        if "is_admin" in data:
            account.is_admin = data["is_admin"]
            changed.append("is_admin")
        if "password" in data:
            store.set_password(session, account, _bcrypt_cost(), data["password"], actor=caller.actor)
        if changed:
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
    with _database().transaction() as session:
        store.deactivate_account(session, _visible(session, account_id), actor=caller.actor)
    forget_account(account_id)
    return "", 204


@bp.post("/<uuid:account_id>/rotate-key")
def rotate_key(account_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with _database().transaction() as session:
        api_key = store.rotate_api_key(session, _visible(session, account_id), actor=caller.actor)
    forget_account(account_id)
    return {"api_key": api_key}
