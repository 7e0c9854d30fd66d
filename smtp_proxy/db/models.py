"""Declarative models for every table.

Secrets never sit here in the clear: passwords are bcrypt hashes, API keys
SHA-256 digests, and provider secrets and message bodies AES-GCM ciphertexts
(see ``smtp_proxy.crypto``). Alembic's initial migration produces exactly
this metadata; a test holds the two together. The enums are the API
contract's (``smtp_proxy.contract``), native types on PostgreSQL.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from smtp_proxy.contract import (
    ACCOUNT_NAME_MAX,
    CREDENTIAL_LABEL_MAX,
    CREDENTIAL_USERNAME_MAX,
    DKIM_SELECTOR_MAX,
    DOMAIN_MAX,
    EMAIL_MAX,
    NAME_MAX,
    NETWORK_MAX,
    DeliveryStatus,
    DkimAlgorithm,
    MessageStatus,
    ProviderType,
    SuppressionReason,
)
from smtp_proxy.db.types import JsonDocument, OptionalJsonDocument, UtcDateTime, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime, dict[str, Any]: JsonDocument, list[Any]: JsonDocument}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Store the lowercase values, not the member names; a native type on PostgreSQL.
    return Enum(cls, name=name, values_callable=lambda e: [m.value for m in e], validate_strings=True)


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(Uuid, primary_key=True, default=uuid.uuid4)


def _created() -> Mapped[datetime]:
    return mapped_column(default=utcnow, nullable=False)


def _updated() -> Mapped[datetime]:
    return mapped_column(default=utcnow, onupdate=utcnow, nullable=False)


class Account(Base):
    """A tenant: API key holder, with SMTP credentials (``SmtpCredential``) and relay networks."""

    __tablename__ = "accounts"

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(ACCOUNT_NAME_MAX), unique=True)
    email: Mapped[str] = mapped_column(String(EMAIL_MAX))
    api_key_digest: Mapped[str] = mapped_column(String(64), unique=True)
    # Sender domains this account may use: "example.com" or "*.example.com".
    allowed_domains: Mapped[list[Any]] = mapped_column(default=list)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Admin-only: From:/Sender: may name any domain (a tenant that sends on behalf of others).
    allow_any_header_from: Mapped[bool] = mapped_column(Boolean, default=False)
    # Admin-only sending limits overriding the config's defaults: {"messages_per_hour": 500, ...};
    # a key set to null means unlimited, a key left out takes the default.
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Whether the worker sends delivery status notifications (RFC 3464) to this account's
    # senders; NULL takes ``delivery.bounces``.
    bounces: Mapped[bool | None] = mapped_column(Boolean)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    # Admin-only: networks whose clients send as this account without AUTH.
    relay_networks: Mapped[list[RelayNetwork]] = relationship(
        order_by="RelayNetwork.network", lazy="selectin", cascade="all, delete-orphan", passive_deletes=True
    )


class SmtpCredential(Base):
    """One SMTP login of an account: one per application or device, revoked on its own.

    The account's own login (user name = the account's name) is the credential labelled
    ``account``. ``allowed_ips`` (CIDRs; empty: anywhere) and ``allowed_domains`` (a subset of
    the account's; NULL: all of them) narrow what the credential may do.
    """

    __tablename__ = "smtp_credentials"
    __table_args__ = (UniqueConstraint("account_id", "label"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    username: Mapped[str] = mapped_column(String(CREDENTIAL_USERNAME_MAX), unique=True)
    password_hash: Mapped[str] = mapped_column(String(60))
    label: Mapped[str] = mapped_column(String(CREDENTIAL_LABEL_MAX))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    allowed_ips: Mapped[list[Any]] = mapped_column(default=list)
    allowed_domains: Mapped[list[Any] | None] = mapped_column(JsonDocument)
    # Written at most once a minute, so a busy device costs no write per login.
    last_used_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class RelayNetwork(Base):
    """A network whose clients send as the account without AUTH (printers, old appliances).

    One network belongs to one account, and networks of different accounts never overlap
    (``storage.relay_networks`` checks it under a lock), so an address names one account.
    """

    __tablename__ = "relay_networks"

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    # Canonical CIDR text ("192.0.2.0/24", "2001:db8::/48").
    network: Mapped[str] = mapped_column(String(NETWORK_MAX), unique=True)
    # False lets a device that cannot do TLS send in the clear, from this network only.
    require_tls: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()


class EspProvider(Base):
    """An email service provider a tenant delivers through."""

    __tablename__ = "esp_providers"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    provider_type: Mapped[ProviderType] = mapped_column(_enum(ProviderType, "provider_type"))
    api_key_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # host, port, tls and username; the password is kept apart, encrypted.
    smtp_config: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    smtp_password_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class DkimKey(Base):
    """A DKIM key of one of the account's domains; the worker signs mail from that domain with it.

    (domain, selector) is unique across the relay: it is one DNS name. The private key is
    AES-GCM sealed, bound to this row (``storage.dkim_keys``), and never leaves the worker.
    """

    __tablename__ = "dkim_keys"
    __table_args__ = (UniqueConstraint("domain", "selector"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    domain: Mapped[str] = mapped_column(String(DOMAIN_MAX))
    selector: Mapped[str] = mapped_column(String(DKIM_SELECTOR_MAX))
    algorithm: Mapped[DkimAlgorithm] = mapped_column(_enum(DkimAlgorithm, "dkim_algorithm"))
    # The record's p= value: base64 of the DER SubjectPublicKeyInfo (RSA) or of the raw key (Ed25519).
    public_key: Mapped[str] = mapped_column(Text)
    private_key_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class RoutingRule(Base):
    """Picks a provider for a tenant's messages; lower priority is tried first."""

    __tablename__ = "routing_rules"
    __table_args__ = (
        Index(None, "account_id", "priority"),
        CheckConstraint("priority >= 0", name="priority_not_negative"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    provider_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("esp_providers.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    priority: Mapped[int] = mapped_column(Integer)
    conditions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class Message(Base):
    """One accepted submission, from the 250 reply until delivery or failure."""

    __tablename__ = "messages"
    __table_args__ = (
        # A page of one status, newest first (GET /api/v1/messages?status=...).
        Index(None, "account_id", "status", "created_at", "id"),
        Index(None, "account_id", "created_at"),
        # One credential's messages, newest first (GET /api/v1/messages?credential_id=...).
        Index(None, "account_id", "credential_id", "created_at", "id"),
        # The worker's claim query: due messages of one status, oldest first; and per account,
        # so that one account's backlog cannot hide another's new message.
        Index(None, "status", "next_attempt_at"),
        Index(None, "account_id", "status", "next_attempt_at"),
        # The retention purge: finished messages that still hold a body, oldest first.
        Index(
            "ix_messages_purgeable",
            "processed_at",
            postgresql_where=text("body_encrypted IS NOT NULL AND processed_at IS NOT NULL"),
            sqlite_where=text("body_encrypted IS NOT NULL AND processed_at IS NOT NULL"),
        ),
        # A page of the delivery status notifications (GET /api/v1/messages?is_bounce=true): few
        # among many, so a small partial index rather than a filter over every message.
        Index(
            "ix_messages_bounces",
            "account_id",
            "created_at",
            "id",
            postgresql_where=text("is_bounce"),
            sqlite_where=text("is_bounce"),
        ),
        CheckConstraint("size >= 0", name="size_not_negative"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    # The SMTP credential that submitted it; NULL for a relay network's client (no AUTH), or once
    # the credential is deleted.
    credential_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("smtp_credentials.id", ondelete="SET NULL")
    )
    sender: Mapped[str] = mapped_column(String(256))
    recipients: Mapped[list[Any]] = mapped_column()
    subject: Mapped[str | None] = mapped_column(Text)
    # The header fields as [name, value] pairs, in order; the body is not here.
    headers: Mapped[list[Any]] = mapped_column(default=list)
    # AES-GCM of the whole message as received; NULL once retention purged it.
    body_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    status: Mapped[MessageStatus] = mapped_column(
        _enum(MessageStatus, "message_status"), default=MessageStatus.QUEUED
    )
    provider_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("esp_providers.id", ondelete="SET NULL"), index=True
    )
    correlation_id: Mapped[str] = mapped_column(String(64), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Queued: when it is due. Processing: when the claiming worker's lease runs out.
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The claim that holds a processing message; its outcome is only written under it.
    lease_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    processed_at: Mapped[datetime | None] = mapped_column()
    # RFC 3461 as given on MAIL FROM: RET ("FULL" or "HDRS") and ENVID (xtext-decoded).
    dsn_ret: Mapped[str | None] = mapped_column(String(4))
    dsn_envid: Mapped[str | None] = mapped_column(String(100))
    # Per recipient that gave NOTIFY or ORCPT on RCPT TO: {"bob@x.test": {"notify": ["FAILURE"],
    # "orcpt": "rfc822;bob@x.test"}}; NULL when none did (the common case).
    dsn_recipients: Mapped[dict[str, Any] | None] = mapped_column(OptionalJsonDocument)
    # A delivery status notification the worker wrote: never answered with another.
    is_bounce: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The sender was told the message is delayed (once, after ``delivery.delay_notice_after``).
    delay_notified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class DeliveryLog(Base):
    """One delivery attempt of one message."""

    __tablename__ = "delivery_logs"

    id: Mapped[uuid.UUID] = _uuid_pk()
    message_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    provider_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("esp_providers.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus, "delivery_status"))
    # SMTP reply code or HTTP status of the provider's answer; NULL for network errors.
    response_code: Mapped[int | None] = mapped_column(Integer)
    response_text: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = _created()


class WebhookEndpoint(Base):
    """Where a tenant wants its delivery events POSTed, and the secret that signs them.

    The secret is sealed (AES-GCM, bound to the row); after a rotation the previous one keeps
    signing beside the new one until ``previous_secret_expires_at``.
    """

    __tablename__ = "webhook_endpoints"

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    # The event types it wants ("message.delivered", ...).
    events: Mapped[list[Any]] = mapped_column(default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    secret_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    previous_secret_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class WebhookEvent(Base):
    """One event for one account, written in the transaction of the outcome that caused it."""

    __tablename__ = "webhook_events"
    __table_args__ = (Index(None, "account_id", "created_at"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    # The JSON object POSTed, as built when the event happened.
    payload: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = _created()


class WebhookDelivery(Base):
    """One event owed to one endpoint: the outbox row the sender claims, retries and settles."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id"),
        # The sender's claim: pending deliveries that are due, oldest first.
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index(None, "endpoint_id", "created_at"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    event_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    endpoint_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    # "pending" (owed, retried with backoff), "delivered" (a 2xx), "dropped" (gave up after 24 h).
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The claim that holds it while a sender POSTs it; its outcome is only written under it.
    lease_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    last_attempt_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class Suppression(Base):
    """A recipient the worker no longer sends to for this account (``storage.suppressions``).

    ``address`` is normalised (``storage.suppressions.normalise``), so the unique constraint
    holds one entry per mailbox. The message, provider and reply that caused a hard bounce
    stay as they were written; the message and provider may go later (SET NULL).
    """

    __tablename__ = "suppressions"
    __table_args__ = (
        UniqueConstraint("account_id", "address"),
        # A page of one account's entries, newest first, optionally of one reason.
        Index(None, "account_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(EMAIL_MAX))
    reason: Mapped[SuppressionReason] = mapped_column(_enum(SuppressionReason, "suppression_reason"))
    message_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    provider_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("esp_providers.id", ondelete="SET NULL"))
    response_code: Mapped[int | None] = mapped_column(Integer)
    response_text: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = _created()


class AuditLog(Base):
    """Who changed what. ``changes`` lists field names and never holds a secret."""

    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "account_id", "created_at"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    # The tenant the entity belongs to, so a tenant can read its own entries.
    account_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    # The account that acted; NULL with actor "cli" for operator commands.
    actor_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("accounts.id", ondelete="SET NULL"))
    actor: Mapped[str] = mapped_column(String(100))
    # The address an API call came from (behind a trusted proxy, the real client's); NULL for the CLI.
    client_ip: Mapped[str | None] = mapped_column(String(45))
    action: Mapped[str] = mapped_column(String(32))
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    changes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = _created()
