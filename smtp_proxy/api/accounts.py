"""/api/v1/accounts: admins manage every account, a tenant reads and updates itself."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from smtp_proxy import crypto, validation
from smtp_proxy.api import schemas
from smtp_proxy.api.auth import forget_account, principal, require_admin
from smtp_proxy.api.context import config, database, key_cache, sending_limits
from smtp_proxy.api.errors import forbidden_fields, invalid
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.errors import NotFound, ValidationError
from smtp_proxy.sending_limits import effective_limits
from smtp_proxy.storage import accounts as store
from smtp_proxy.storage import relay_networks as relay

bp = Blueprint("accounts", __name__, url_prefix="/accounts")


def render(account: Any) -> dict[str, Any]:
    """An account of ``storage.accounts``, without its secrets."""
    return {
        "id": str(account.id),
        "name": account.name,
        "email": account.email,
        "allowed_domains": list(account.allowed_domains or []),
        "is_admin": bool(account.is_admin),
        "active": bool(account.active),
        "allow_any_header_from": bool(account.allow_any_header_from),
        "limits": dict(account.limits or {}),
        "relay_networks": relay.render(account),
        "bounces": account.bounces,
        "bounces_effective": effective_bounces(account.bounces, config().delivery.bounces),
        "created_at": iso_timestamp(account.created_at),
        "updated_at": iso_timestamp(account.updated_at),
    }


def effective_bounces(own: bool | None, default: bool) -> bool:
    """The account's own setting, else the config's ``delivery.bounces``."""
    return default if own is None else own


def _visible(session: Any, account_id: uuid.UUID) -> Any:
    """The account if the caller may see it: an admin any, a tenant only itself (else 404)."""
    _check_visible(account_id)
    return store.get_account(session, account_id)


def _check_visible(account_id: uuid.UUID) -> None:
    caller = principal()
    if not caller.is_admin and account_id != caller.id:
        raise NotFound("no such account")


def _checked(data: dict[str, Any]) -> dict[str, Any]:
    """The fields given, normalised; one 422 naming every field the validators reject."""
    checks: dict[str, Callable[[Any], Any]] = {
        "name": validation.account_name,
        "email": validation.email,
        "allowed_domains": validation.domain_patterns,
        "password": crypto.check_password_policy,
        "limits": validation.limit_overrides,
        "relay_networks": relay.entries,
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
            # Relay networks stay as given: storage checks them again and takes the JSON form,
            # not the Entry tuples this check returns.
            if name not in ("password", "relay_networks"):
                values[name] = result
    if fields:
        raise invalid(fields)
    return values


@bp.post("")
def create() -> ResponseReturnValue:
    caller = require_admin()
    data = _checked(schemas.body("AccountCreate"))
    settings = config()
    with database().transaction() as session:
        created = store.create_account(
            session,
            name=data["name"],
            email=data["email"],
            allowed_domains=data["allowed_domains"],
            password=data.get("password"),
            is_admin=data.get("is_admin", False),
            allow_any_header_from=data.get("allow_any_header_from", False),
            limits=data.get("limits"),
            relay_networks=data.get("relay_networks", ()),
            unique_domains=settings.security.unique_sender_domains,
            bcrypt_cost=settings.security.bcrypt_cost,
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
    _check_visible(account_id)  # another tenant's account: 404 before anything else
    raw = schemas.json_object()
    if not caller.is_admin:
        # Sender identity and quotas are the operator's: naming one is refused, whatever its value.
        named = [name for name in store.OPERATOR_FIELDS if name in raw]
        if named:
            raise forbidden_fields(named)
    schemas.check("AccountUpdate", raw)
    data = _checked(raw)
    settings = config()
    with database().transaction() as session:
        account = _visible(session, account_id)
        done = store.update_account(
            session,
            account,
            data,
            actor=caller.actor,
            bcrypt_cost=settings.security.bcrypt_cost,
            unique_domains=settings.security.unique_sender_domains,
        )
        body = render(account)
        digest = account.api_key_digest
    if "is_admin" in data or "active" in data:
        forget_account(account_id)
    if done.reactivated:
        key_cache().forget_unknown(digest)  # its key may be remembered as unknown since
    return body


@bp.get("/<uuid:account_id>/usage")
def usage(account_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        account = _visible(session, account_id)
        own = dict(account.limits or {})
    counters = sending_limits()
    windows = counters.usage(account_id, effective_limits(config().limits, own))
    return {
        "account_id": str(account_id),
        "shared": not config().limits.storage.startswith("memory://"),
        "windows": [
            {"name": w.name, "limit": w.limit, "used": w.used, "resets_in": w.resets_in} for w in windows
        ],
    }


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
