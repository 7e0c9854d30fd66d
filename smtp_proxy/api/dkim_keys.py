"""/api/v1/dkim-keys: a tenant's DKIM keys and the DNS records to publish; private keys never leave.

``POST /dkim-keys/{id}/verify`` looks the record up in the DNS (dnspython, through
``smtp_proxy.dkim.dns_txt``). The lookup is the app's ``smtp_proxy.txt_lookup`` extension
when one is set, so tests answer it without a network.
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue

from smtp_proxy import dkim
from smtp_proxy.api import schemas
from smtp_proxy.api.auth import principal
from smtp_proxy.api.context import cipher, database
from smtp_proxy.api.errors import ApiError
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.storage import accounts
from smtp_proxy.storage import dkim_keys as store

bp = Blueprint("dkim_keys", __name__, url_prefix="/dkim-keys")
LOOKUP_EXTENSION = "smtp_proxy.txt_lookup"


def render(key: Any) -> dict[str, Any]:
    """A key with its DNS record; never the private half (an allow-list of fields)."""
    return {
        "id": str(key.id),
        "domain": key.domain,
        "selector": key.selector,
        "algorithm": key.algorithm.value,
        "enabled": key.enabled,
        "dns_record": {
            "type": "TXT",
            "name": dkim.record_name(key.selector, key.domain),
            "value": dkim.record_value(key.algorithm, key.public_key),
        },
        "created_at": iso_timestamp(key.created_at),
        "updated_at": iso_timestamp(key.updated_at),
    }


@bp.post("")
def create() -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("DkimKeyCreate")
    with database().transaction() as session:
        key = store.create_key(
            session,
            cipher(),
            account=accounts.get_account(session, caller.id),
            domain=data["domain"],
            selector=data.get("selector"),
            algorithm=data.get("algorithm", "rsa-sha256"),
            enabled=data.get("enabled", True),
            actor=caller.actor,
        )
        body = render(key)
    return body, 201, {"Location": f"/api/v1/dkim-keys/{body['id']}"}


@bp.get("")
def list_() -> ResponseReturnValue:
    with database().read() as session:
        return {"items": [render(key) for key in store.list_keys(session, principal().id)]}


@bp.get("/<uuid:key_id>")
def get(key_id: uuid.UUID) -> ResponseReturnValue:
    with database().read() as session:
        return render(store.get_key(session, principal().id, key_id))


@bp.patch("/<uuid:key_id>")
def update(key_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    data = schemas.body("DkimKeyUpdate")
    with database().transaction() as session:
        key = store.get_key(session, caller.id, key_id)
        return render(store.set_enabled(session, key, data["enabled"], actor=caller.actor))


@bp.delete("/<uuid:key_id>")
def delete(key_id: uuid.UUID) -> ResponseReturnValue:
    caller = principal()
    with database().transaction() as session:
        store.delete_key(session, store.get_key(session, caller.id, key_id), actor=caller.actor)
    return "", 204


@bp.post("/<uuid:key_id>/verify")
def verify(key_id: uuid.UUID) -> ResponseReturnValue:
    """Whether the key's record is in the DNS and is this key; 502 ``dns_unavailable`` when DNS fails."""
    with database().read() as session:
        key = store.get_key(session, principal().id, key_id)
        rendered = render(key)
        selector, domain, public_key = key.selector, key.domain, key.public_key
    lookup = current_app.extensions.get(LOOKUP_EXTENSION, dkim.dns_txt)
    try:
        found = dkim.check_published(selector, domain, public_key, lookup)
    except dkim.DnsLookupError:
        raise ApiError(502, "the DNS did not answer; try again later", code="dns_unavailable") from None
    return {
        "published": found.published,
        "matches": found.matches,
        "found": found.found,
        "dns_record": rendered["dns_record"],
    }
