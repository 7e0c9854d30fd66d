"""/api/v1/accounts/<id>/smtp-credentials: an account's SMTP logins, one per application or device.

A tenant manages its own account's credentials, an admin any account's; another tenant's account
or credential is 404, as a missing one is. A password is in the 201 of its creation and in no
other response; the hash is in none.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
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
from smtp_proxy.storage import accounts
from smtp_proxy.storage import credentials as store

_INDEX = re.compile(r"\[([0-9]+)\]")

bp = Blueprint("smtp_credentials", __name__, url_prefix="/accounts/<uuid:account_id>/smtp-credentials")


def render(credential: Any) -> dict[str, Any]:
    """A credential by field allow-list: never its hash."""
    last_used = credential.last_used_at
    return {
        "id": str(credential.id),
        "account_id": str(credential.account_id),
        "username": credential.username,
        "label": credential.label,
        "enabled": bool(credential.enabled),
        "allowed_ips": list(credential.allowed_ips or []),
        "allowed_domains": None if credential.allowed_domains is None else list(credential.allowed_domains),
        "last_used_at": iso_timestamp(last_used) if last_used is not None else None,
        "created_at": iso_timestamp(credential.created_at),
        "updated_at": iso_timestamp(credential.updated_at),
    }


def _check_visible(account_id: uuid.UUID) -> None:
    """404 before anything else for another tenant's account: no oracle, whatever the body."""
    caller = principal()
    if not caller.is_admin and account_id != caller.id:
        raise NotFound("no such account")


def _account(session: Any, account_id: uuid.UUID) -> Any:
    """The account if the caller may act on it: an admin any, a tenant only itself (else 404)."""
    _check_visible(account_id)
    return accounts.get_account(session, account_id)


def _checked(data: dict[str, Any], account: Any) -> None:
    """One 422 naming every field the validators reject; the schema has passed already.

    Storage applies the same checks, one field at a time; these run first so that a
    request with several mistakes hears of all of them at once.
    """
    checks: dict[str, Callable[[Any], Any]] = {
        "username": lambda value: store.own_username(value, account),
        "allowed_ips": validation.networks,
        "allowed_domains": lambda value: store.restricted_domains(value, account),
        "password": store.chosen_password,
    }
    fields: dict[str, str] = {}
    for name, check in checks.items():
        if name in data:
            try:
                check(data[name])
            except ValidationError as error:
                # allowed_ips[2] as the schema's errors name it: allowed_ips.2
                fields[_INDEX.sub(r".\1", error.field)] = error.problem
    if fields:
        raise invalid(fields)


@bp.post("")
def create(account_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    _check_visible(account_id)
    data = schemas.body("SmtpCredentialCreate")
    with database().transaction() as session:
        account = _account(session, account_id)
        _checked(data, account)
        created = store.create_credential(
            session,
            account,
            label=data["label"],
            username=data.get("username"),
            password=data.get("password"),
            enabled=data.get("enabled", True),
            allowed_ips=data.get("allowed_ips", []),
            allowed_domains=data.get("allowed_domains"),
            bcrypt_cost=config().security.bcrypt_cost,
            actor=caller.actor,
        )
        body = {**render(created.credential), "password": created.password}
    location = f"/api/v1/accounts/{account_id}/smtp-credentials/{body['id']}"
    return body, 201, {"Location": location}


@bp.get("")
def list_(account_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        account = _account(session, account_id)
        return {"items": [render(credential) for credential in store.list_credentials(session, account.id)]}


@bp.get("/<uuid:credential_id>")
def get(account_id: uuid.UUID, credential_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        account = _account(session, account_id)
        return render(store.get_credential(session, account.id, credential_id))


@bp.patch("/<uuid:credential_id>")
def update(account_id: uuid.UUID, credential_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    _check_visible(account_id)
    data = schemas.body("SmtpCredentialUpdate")
    with database().transaction() as session:
        account = _account(session, account_id)
        credential = store.get_credential(session, account.id, credential_id)
        _checked(data, account)
        store.update_credential(
            session,
            credential,
            account,
            data,
            bcrypt_cost=config().security.bcrypt_cost,
            actor=caller.actor,
        )
        return render(credential)


@bp.delete("/<uuid:credential_id>")
def delete(account_id: uuid.UUID, credential_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with database().transaction() as session:
        credential = store.get_credential(session, _account(session, account_id).id, credential_id)
        store.delete_credential(session, credential, actor=caller.actor)
    return "", 204
