"""ESP providers of one tenant; their secrets are sealed and never read back by the API."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, literal_column, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import Account, EspProvider, ProviderType, RoutingRule
from smtp_proxy.errors import Conflict
from smtp_proxy.storage import audit, json_rows
from smtp_proxy.storage.audit import Actor
from smtp_proxy.storage.tenancy import owned

ENTITY = "provider"
RULE_ENTITY = "routing_rule"  # routing_rules.ENTITY, which imports this module
_UNSET: Any = object()


class QuotaExceeded(Exception):
    """An account already has as many rows of a kind as ``setting`` allows."""

    def __init__(self, what: str, limit: int, setting: str) -> None:
        super().__init__(f"an account may have at most {limit} {what} ({setting})")
        self.what = what
        self.limit = limit
        self.setting = setting


def check_quota(
    session: Session, account_id: uuid.UUID, model: Any, limit: int | None, setting: str, what: str = ""
) -> None:
    """Raise QuotaExceeded when the account holds ``limit`` rows of ``model`` already.

    The account's row is locked first (PostgreSQL; SQLite has one writer), so two
    creates at once are counted one after the other and cannot both take the last place.
    """
    if limit is None:
        return
    session.execute(select(Account.id).where(Account.id == account_id).with_for_update())
    count = session.scalar(select(func.count()).select_from(model).where(model.account_id == account_id))
    if (count or 0) >= limit:
        what = what or ("providers" if model is EspProvider else "routing rules")
        raise QuotaExceeded(what, limit, setting)


@dataclass(frozen=True)
class ProviderSecrets:
    """What the worker needs to authenticate at the provider."""

    api_key: str | None
    smtp_password: str | None


def _aad(provider_id: uuid.UUID, column: str) -> bytes:
    return f"esp_providers.{column}:".encode() + provider_id.bytes


def _seal(cipher: Cipher, provider_id: uuid.UUID, column: str, value: str | None) -> bytes | None:
    return None if value is None else cipher.encrypt(value.encode("utf-8"), _aad(provider_id, column))


def create_provider(
    session: Session,
    cipher: Cipher,
    *,
    account_id: uuid.UUID,
    name: str,
    provider_type: ProviderType | str,
    api_key: str | None = None,
    settings: dict[str, Any] | None = None,
    smtp_config: dict[str, Any] | None = None,
    enabled: bool = True,
    max_providers: int | None = None,
    actor: Actor,
) -> EspProvider:
    """Add a provider; ``smtp_config["password"]`` is split off and sealed.

    Raises Conflict for a taken name, QuotaExceeded when the account already has
    ``max_providers`` (``limits.max_providers_per_account``; None: no cap).
    """
    check_quota(session, account_id, EspProvider, max_providers, "limits.max_providers_per_account")
    _check_unique_name(session, account_id, name)
    provider_id = uuid.uuid4()
    public_smtp, smtp_password = _split_smtp_config(smtp_config)
    provider = EspProvider(
        id=provider_id,
        account_id=account_id,
        name=name,
        provider_type=ProviderType(provider_type),
        api_key_encrypted=_seal(cipher, provider_id, "api_key", api_key),
        settings=dict(settings or {}),
        smtp_config=public_smtp,
        smtp_password_encrypted=_seal(cipher, provider_id, "smtp_password", smtp_password),
        enabled=enabled,
    )
    session.add(provider)
    fields = ["name", "provider_type", "settings", "smtp_config", "enabled"]
    fields += ["api_key"] if api_key is not None else []
    audit.record(
        session,
        actor=actor,
        action="create",
        entity=ENTITY,
        entity_id=provider_id,
        account_id=account_id,
        fields=fields,
    )
    session.flush()
    return provider


def update_provider(
    session: Session,
    cipher: Cipher,
    provider: EspProvider,
    *,
    name: str = _UNSET,
    api_key: str | None = _UNSET,
    settings: dict[str, Any] = _UNSET,
    smtp_config: dict[str, Any] | None = _UNSET,
    enabled: bool = _UNSET,
    actor: Actor,
) -> EspProvider:
    """Change the given fields only; a secret left out keeps its stored value."""
    changed: list[str] = []
    if name is not _UNSET and name != provider.name:
        _check_unique_name(session, provider.account_id, name)
        provider.name = name
        changed.append("name")
    if api_key is not _UNSET:
        provider.api_key_encrypted = _seal(cipher, provider.id, "api_key", api_key)
        changed.append("api_key")
    if settings is not _UNSET:
        provider.settings = dict(settings)
        changed.append("settings")
    if smtp_config is not _UNSET:
        public_smtp, smtp_password = _split_smtp_config(smtp_config)
        provider.smtp_config = public_smtp
        if smtp_config is None or "password" in smtp_config:
            provider.smtp_password_encrypted = _seal(cipher, provider.id, "smtp_password", smtp_password)
            changed.append("smtp_password")
        changed.append("smtp_config")
    if enabled is not _UNSET:
        provider.enabled = enabled
        changed.append("enabled")
    audit.record(
        session,
        actor=actor,
        action="update",
        entity=ENTITY,
        entity_id=provider.id,
        account_id=provider.account_id,
        fields=changed,
    )
    session.flush()
    return provider


def delete_provider(session: Session, provider: EspProvider, *, actor: Actor) -> None:
    """Delete a provider and, through the foreign key, the rules that point at it.

    Each of those rules gets its own audit row, as if it had been deleted alone.
    """
    rules = session.scalars(select(RoutingRule.id).where(RoutingRule.provider_id == provider.id)).all()
    for entity, entity_id in [*((RULE_ENTITY, rule_id) for rule_id in rules), (ENTITY, provider.id)]:
        audit.record(
            session,
            actor=actor,
            action="delete",
            entity=entity,
            entity_id=entity_id,
            account_id=provider.account_id,
        )
    session.delete(provider)
    session.flush()


def get_provider(session: Session, account_id: uuid.UUID, provider_id: uuid.UUID) -> EspProvider:
    """A tenant's own provider; another tenant's id is NotFound."""
    return owned(session, EspProvider, account_id, provider_id, "provider")


_PROVIDERS = EspProvider.__table__.c
# Plain table columns, not ORM attributes: SQLAlchemy matches a cached
# statement's result columns to ORM-annotated ones by building comparison
# expressions, per column and per call.
_SUMMARY = select(
    _PROVIDERS.id,
    _PROVIDERS.name,
    _PROVIDERS.provider_type,
    _PROVIDERS.settings,
    _PROVIDERS.smtp_config,
    _PROVIDERS.enabled,
    # The sealed blobs only to tell whether each is set.
    _PROVIDERS.api_key_encrypted,
    _PROVIDERS.smtp_password_encrypted,
    _PROVIDERS.created_at,
    _PROVIDERS.updated_at,
)


def list_summaries(session: Session | Connection, account_id: uuid.UUID) -> list[Any]:
    """A tenant's providers as plain rows, by name: the API's list, one SELECT and no ORM objects.

    The rows hold the sealed secrets (ciphertext); the API only tells whether each is set.
    """
    query = _SUMMARY.where(_PROVIDERS.account_id == account_id).order_by(_PROVIDERS.name)
    return session.execute(query).all()


# The API's view of a provider (api/providers.render), built by PostgreSQL.
_SUMMARY_JSON = {
    "id": _PROVIDERS.id,
    "name": _PROVIDERS.name,
    "provider_type": _PROVIDERS.provider_type,
    "settings": func.coalesce(_PROVIDERS.settings, literal_column("'{}'::jsonb")),
    "smtp_config": _PROVIDERS.smtp_config,
    "enabled": _PROVIDERS.enabled,
    "has_api_key": _PROVIDERS.api_key_encrypted.is_not(None),
    "has_smtp_password": _PROVIDERS.smtp_password_encrypted.is_not(None),
    "created_at": _PROVIDERS.created_at,
    "updated_at": _PROVIDERS.updated_at,
}
# Built once: constructing it per request cost more than running it.
_LIST_JSON = select(json_rows.json_array(_SUMMARY_JSON, _PROVIDERS.name)).where(
    _PROVIDERS.account_id == bindparam("account_id")
)


def list_summaries_json(connection: Connection, account_id: uuid.UUID) -> str | None:
    """``list_summaries`` as the API renders it, a JSON array built by PostgreSQL; None elsewhere."""
    if not json_rows.renders_json(connection):
        return None
    return connection.execute(_LIST_JSON, {"account_id": account_id}).scalar_one()


def list_providers(session: Session, account_id: uuid.UUID) -> list[EspProvider]:
    query = select(EspProvider).where(EspProvider.account_id == account_id).order_by(EspProvider.name)
    return list(session.scalars(query))


def provider_secrets(cipher: Cipher, provider: EspProvider) -> ProviderSecrets:
    """Open the sealed secrets; for the worker only, never for an API response."""

    def open_(blob: bytes | None, column: str) -> str | None:
        if blob is None:
            return None
        return cipher.decrypt(blob, _aad(provider.id, column)).decode("utf-8")

    return ProviderSecrets(
        api_key=open_(provider.api_key_encrypted, "api_key"),
        smtp_password=open_(provider.smtp_password_encrypted, "smtp_password"),
    )


def reseal_secrets(session: Session, cipher: Cipher) -> int:
    """Re-encrypt, under the current key, every provider secret sealed with an older key."""
    resealed = 0
    for provider in session.scalars(select(EspProvider)):
        for column in ("api_key", "smtp_password"):
            blob = getattr(provider, f"{column}_encrypted")
            if blob is not None and cipher.needs_rotation(blob):
                plain = cipher.decrypt(blob, _aad(provider.id, column))
                setattr(provider, f"{column}_encrypted", cipher.encrypt(plain, _aad(provider.id, column)))
                resealed += 1
    session.flush()
    return resealed


def _split_smtp_config(smtp_config: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    if smtp_config is None:
        return None, None
    public = {k: v for k, v in smtp_config.items() if k != "password"}
    return public, smtp_config.get("password")


def _check_unique_name(session: Session, account_id: uuid.UUID, name: str) -> None:
    clash = select(EspProvider.id).where(EspProvider.account_id == account_id, EspProvider.name == name)
    if session.scalar(clash) is not None:
        raise Conflict(f"a provider named {name!r} already exists")
