"""/api/v1/providers: a tenant's ESP providers; secrets are write-only."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from smtp_proxy.api import pages, schemas
from smtp_proxy.api.auth import principal
from smtp_proxy.api.context import cipher, config, database
from smtp_proxy.api.errors import invalid
from smtp_proxy.contract import ProviderType
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.storage import providers as store

bp = Blueprint("providers", __name__, url_prefix="/providers")


def render(row: Any) -> dict[str, Any]:
    """A provider (a row of ``get_provider`` or of ``list_summaries``) without its secrets."""
    return {
        "id": str(row.id),
        "name": row.name,
        "provider_type": row.provider_type.value,
        "settings": row.settings or {},
        "smtp_config": row.smtp_config,
        "enabled": row.enabled,
        "has_api_key": row.api_key_encrypted is not None,
        "has_smtp_password": row.smtp_password_encrypted is not None,
        "created_at": iso_timestamp(row.created_at),
        "updated_at": iso_timestamp(row.updated_at),
    }


def check_fields_for(kind: str, data: dict[str, Any]) -> None:
    """422 for a field this provider type would ignore: a tenant's mistake should show, not be stored."""
    fields: dict[str, str] = {}
    if kind != ProviderType.SMTP and data.get("smtp_config") is not None:
        fields["smtp_config"] = "is only for smtp providers"
    if kind == ProviderType.SMTP and data.get("api_key") is not None:
        fields["api_key"] = "is not used by smtp providers: the password goes in smtp_config.password"
    if fields:
        raise invalid(fields)


@bp.post("")
def create() -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("ProviderCreate")
    check_fields_for(data["provider_type"], data)
    with database().transaction() as session:
        provider = store.create_provider(
            session,
            cipher(),
            account_id=caller.id,
            name=data["name"],
            provider_type=data["provider_type"],
            api_key=data.get("api_key"),
            settings=data.get("settings"),
            smtp_config=data.get("smtp_config"),
            enabled=data.get("enabled", True),
            max_providers=config().limits.max_providers_per_account,
            actor=caller.actor,
        )
        body = render(provider)
    return body, 201, {"Location": f"/api/v1/providers/{body['id']}"}


@bp.get("")
def list_() -> ResponseReturnValue:
    # A Core connection: the list is one SELECT, no ORM objects; on PostgreSQL
    # the database renders the items (storage/json_rows.py).
    with database().autocommit() as connection:
        items = store.list_summaries_json(connection, principal().id)
        if items is not None:
            return pages.prerendered(f'{{"items": {items}}}')
        return {"items": [render(row) for row in store.list_summaries(connection, principal().id)]}


@bp.get("/<uuid:provider_id>")
def get(provider_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        return render(store.get_provider(session, principal().id, provider_id))


@bp.put("/<uuid:provider_id>")
def update(provider_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("ProviderUpdate")
    with database().transaction() as session:
        provider = store.get_provider(session, caller.id, provider_id)
        kind = provider.provider_type.value
        check_fields_for(kind, data)
        if "settings" in data and kind in schemas.SETTINGS_BY_TYPE:
            schemas.check_field("settings", schemas.SETTINGS_BY_TYPE[kind], data["settings"])
        if kind == ProviderType.SES and "api_key" in data:
            schemas.check_field("api_key", "SesApiKey", data["api_key"])
        provider = store.update_provider(session, cipher(), provider, **data, actor=caller.actor)
        return render(provider)


@bp.delete("/<uuid:provider_id>")
def delete(provider_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with database().transaction() as session:
        store.delete_provider(
            session, store.get_provider(session, caller.id, provider_id), actor=caller.actor
        )
    return "", 204
