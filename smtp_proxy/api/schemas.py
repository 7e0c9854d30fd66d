"""JSON Schemas (2020-12) of every request and response body.

The OpenAPI document is built from these (``openapi.py``) and request bodies
are validated against the very same objects (``body()``), so the document
and the behaviour cannot drift apart.
"""

from __future__ import annotations

import json
from typing import Any

from flask import request
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError

from smtp_proxy import contract, crypto
from smtp_proxy.api.errors import ApiError, invalid
from smtp_proxy.config import SENDING_LIMITS
from smtp_proxy.contract import DeliveryStatus, MailgunRegion, MessageStatus, ProviderType, SmtpTls
from smtp_proxy.storage.credentials import MIN_CHOSEN_PASSWORD

Schema = dict[str, Any]

MAX_BODY_BYTES = 64 * 1024

_NAME = {"type": "string", "minLength": 1, "maxLength": contract.NAME_MAX}
_UUID = {"type": "string", "format": "uuid"}
_TIME = {"type": "string", "format": "date-time"}
_DOMAIN_PATTERN = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "description": "A domain (example.com) or all its subdomains (*.example.com).",
}

ACCOUNT_FIELDS: Schema = {
    "name": {
        "type": "string",
        "pattern": contract.ACCOUNT_NAME,
        "description": "The SMTP AUTH user name; unique.",
    },
    "email": {"type": "string", "minLength": 3, "maxLength": contract.EMAIL_MAX},
    "allowed_domains": {"type": "array", "items": _DOMAIN_PATTERN, "minItems": 1, "maxItems": 1000},
    "password": {
        "type": "string",
        "minLength": crypto.MIN_PASSWORD_LENGTH,
        "maxLength": crypto.MAX_PASSWORD_BYTES,
        "writeOnly": True,
        "description": (
            f"SMTP password, {crypto.MIN_PASSWORD_LENGTH} to {crypto.MAX_PASSWORD_BYTES} characters and at "
            f"most {crypto.MAX_PASSWORD_BYTES} bytes as UTF-8 (bcrypt's limit); "
            "generated (and shown once) when left out at creation."
        ),
    },
    "is_admin": {"type": "boolean", "description": "Set by an admin only."},
    "allow_any_header_from": {
        "type": "boolean",
        "description": (
            "Set by an admin only. The From:/Sender: headers may name any domain, not only "
            "allowed_domains (a tenant that sends on behalf of others)."
        ),
    },
    "limits": {"$ref": "#/components/schemas/AccountLimits"},
    "relay_networks": {
        "type": "array",
        "maxItems": 100,
        "items": {"$ref": "#/components/schemas/RelayNetwork"},
        "description": (
            "Set by an admin only. Networks whose clients send as this account without AUTH "
            "(printers, old appliances); a PUT replaces the whole list. None wider than /16 (IPv4) "
            "or /48 (IPv6); one overlapping another account's is 409 conflict."
        ),
    },
}
ACCOUNT_UPDATE_FIELDS: Schema = {
    **{k: v for k, v in ACCOUNT_FIELDS.items() if k != "name"},
    "active": {
        "type": "boolean",
        "description": "Set by an admin only. false deactivates (as DELETE does), true reactivates.",
    },
    "bounces": {
        "type": ["boolean", "null"],
        "description": (
            "Whether a message that fails sends a delivery status notification (RFC 3464) to its "
            "envelope sender; null: the server's default (delivery.bounces). The tenant may set it."
        ),
    },
}

PROVIDER_FIELDS: Schema = {
    "name": _NAME,
    "api_key": {"type": "string", "minLength": 1, "maxLength": 1024, "writeOnly": True},
    "settings": {"type": "object"},
    "smtp_config": {"$ref": "#/components/schemas/SmtpConfig"},
    "enabled": {"type": "boolean"},
}


def _when_type(kind: str) -> Schema:
    """An ``if`` that holds only when provider_type is present and equals ``kind``.

    Without ``required``, ``properties`` holds for a body with no provider_type at all, every
    branch's ``then`` applies, and a body missing only provider_type is told that api_key,
    settings and smtp_config are missing too. The root cause alone comes first; the fields that
    depend on the type are checked once it is valid.
    """
    return {"required": ["provider_type"], "properties": {"provider_type": {"const": kind}}}


RULE_FIELDS: Schema = {
    "name": _NAME,
    "provider_id": _UUID,
    "priority": {"type": "integer", "minimum": 0, "maximum": contract.PRIORITY_MAX},
    "conditions": {"$ref": "#/components/schemas/Conditions"},
    "enabled": {"type": "boolean"},
}

CREDENTIAL_FIELDS: Schema = {
    "label": {
        "type": "string",
        "pattern": contract.CREDENTIAL_LABEL,
        "description": "What the login is for (printer-2nd-floor, billing.app); unique within the account.",
    },
    "enabled": {"type": "boolean", "description": "false: AUTH fails and its open sessions end."},
    "allowed_ips": {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": 50},
        "maxItems": 100,
        "description": (
            "Networks in CIDR notation (192.0.2.0/24, 2001:db8::/48; an address alone is one host) "
            "the credential may AUTH from; empty: anywhere."
        ),
    },
    "allowed_domains": {
        "type": ["array", "null"],
        "items": _DOMAIN_PATTERN,
        "minItems": 1,
        "maxItems": 1000,
        "description": "Sender domains, each within the account's allowed_domains; null: all of those.",
    },
    "password": {
        "type": "string",
        "minLength": MIN_CHOSEN_PASSWORD,
        "maxLength": crypto.MAX_PASSWORD_BYTES,
        "writeOnly": True,
        "description": (
            f"A chosen SMTP password, {MIN_CHOSEN_PASSWORD} to {crypto.MAX_PASSWORD_BYTES} characters "
            f"and at most {crypto.MAX_PASSWORD_BYTES} bytes as UTF-8."
        ),
    },
}

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "fields": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            }
        },
    },
    "AccountLimits": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            name: {"type": ["integer", "null"], "minimum": 1, "maximum": contract.MAX_LIMIT}
            for name in SENDING_LIMITS
        },
        "description": (
            "Set by an admin only. The account's own sending limits: a limit left out takes the "
            "config's default (limits.<name>), null means unlimited. A PUT replaces the whole object; "
            "{} goes back to every default."
        ),
    },
    "RelayNetwork": {
        "type": "object",
        "additionalProperties": False,
        "required": ["network"],
        "properties": {
            "network": {
                "type": "string",
                "minLength": 1,
                "maxLength": 50,
                "description": "CIDR, host bits clear: 192.0.2.0/24, 2001:db8:1::/48, 192.0.2.7 (one host).",
            },
            "require_tls": {
                "type": "boolean",
                "default": True,
                "description": (
                    "true (the default): MAIL FROM before STARTTLS gets 530 5.7.0. false lets a device "
                    "that cannot do TLS send in the clear, from this network only."
                ),
            },
        },
    },
    "AccountCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "email", "allowed_domains"],
        "properties": ACCOUNT_FIELDS,
        "description": (
            "allowed_domains must not overlap a domain (or *. pattern) of another active account "
            "(409 domain_taken) unless security.unique_sender_domains is false."
        ),
    },
    "AccountUpdate": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": ACCOUNT_UPDATE_FIELDS,
        "description": (
            "A tenant may change its own email, password and bounces. allowed_domains, is_admin, active, "
            "allow_any_header_from, limits and relay_networks are the operator's: an admin sets them, "
            "a tenant naming one gets 403 forbidden_field. Granting a domain another active account "
            "holds, or reactivating an account whose domain was granted since, is 409 domain_taken."
        ),
    },
    "Account": {
        "type": "object",
        "required": [
            "id",
            "name",
            "email",
            "allowed_domains",
            "is_admin",
            "active",
            "allow_any_header_from",
            "limits",
            "relay_networks",
            "bounces",
            "bounces_effective",
            "created_at",
            "updated_at",
        ],
        "properties": {
            "id": _UUID,
            "name": {"type": "string"},
            "email": {"type": "string"},
            "allowed_domains": {"type": "array", "items": {"type": "string"}},
            "is_admin": {"type": "boolean"},
            "active": {"type": "boolean"},
            "allow_any_header_from": {"type": "boolean"},
            "limits": {
                "$ref": "#/components/schemas/AccountLimits",
                "description": "The account's own overrides only; GET .../usage shows the limits in force.",
            },
            "relay_networks": {"type": "array", "items": {"$ref": "#/components/schemas/RelayNetwork"}},
            "bounces": {
                "type": ["boolean", "null"],
                "description": "The account's own setting; null: the server's default holds.",
            },
            "bounces_effective": {
                "type": "boolean",
                "description": "The setting in force: the account's own, else delivery.bounces.",
            },
            "created_at": _TIME,
            "updated_at": _TIME,
        },
    },
    "UsageWindow": {
        "type": "object",
        "required": ["name", "limit", "used", "resets_in"],
        "properties": {
            "name": {"enum": list(SENDING_LIMITS)},
            "limit": {
                "type": ["integer", "null"],
                "description": "In force: the account's own, else the config's default; null: unlimited.",
            },
            "used": {"type": "integer", "minimum": 0, "description": "Messages (or recipients) counted."},
            "resets_in": {
                "type": "integer",
                "minimum": 1,
                "description": "Seconds until the window starts over.",
            },
        },
    },
    "Usage": {
        "type": "object",
        "required": ["account_id", "shared", "windows"],
        "properties": {
            "account_id": _UUID,
            "shared": {
                "type": "boolean",
                "description": (
                    "true: the counts live in limits.storage on redis, shared by every instance. "
                    "false (memory://): only what was counted in this API's own process (under "
                    "`serve all`, the process that also runs the listener)."
                ),
            },
            "windows": {"type": "array", "items": {"$ref": "#/components/schemas/UsageWindow"}},
        },
        "description": "Each window is fixed and aligned to the clock: the minute, the hour, the UTC day.",
    },
    "AccountCreated": {
        "allOf": [{"$ref": "#/components/schemas/Account"}],
        "type": "object",
        "required": ["api_key", "password"],
        "properties": {
            "api_key": {"type": "string", "description": "Shown this once."},
            "password": {"type": "string", "description": "Shown this once."},
        },
    },
    "ApiKey": {
        "type": "object",
        "required": ["api_key"],
        "properties": {"api_key": {"type": "string", "description": "Shown this once."}},
    },
    "SmtpConfig": {
        "type": "object",
        "additionalProperties": False,
        "required": ["host", "port", "tls"],
        "properties": {
            "host": {"type": "string", "minLength": 1, "maxLength": contract.DOMAIN_MAX},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "tls": {"enum": contract.values(SmtpTls)},
            "username": {"type": "string", "maxLength": 256},
            "password": {"type": "string", "maxLength": 1024, "writeOnly": True},
        },
    },
    "ProviderCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "provider_type"],
        "properties": {"provider_type": {"enum": contract.values(ProviderType)}, **PROVIDER_FIELDS},
        "allOf": [
            {
                "if": _when_type(ProviderType.SENDGRID.value),
                "then": {"required": ["api_key"]},
            },
            {
                "if": _when_type(ProviderType.MAILGUN.value),
                "then": {
                    "required": ["api_key", "settings"],
                    "properties": {"settings": {"$ref": "#/components/schemas/MailgunSettings"}},
                },
            },
            {
                "if": _when_type(ProviderType.SES.value),
                "then": {
                    "required": ["api_key", "settings"],
                    "properties": {
                        "api_key": {"pattern": contract.SES_API_KEY},
                        "settings": {"$ref": "#/components/schemas/SesSettings"},
                    },
                },
            },
            {
                "if": _when_type(ProviderType.SMTP.value),
                "then": {"required": ["smtp_config"]},
            },
        ],
        "description": (
            "sendgrid needs api_key; mailgun api_key and settings.domain (settings.region us or eu); "
            "ses api_key as ACCESS_KEY_ID:SECRET and settings.region; smtp needs smtp_config "
            "(its password in smtp_config.password) and takes no api_key. smtp_config is only for smtp."
        ),
    },
    "ProviderUpdate": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": PROVIDER_FIELDS,
        "description": "The provider type cannot change; a secret left out keeps its stored value.",
    },
    "MailgunSettings": {
        "type": "object",
        "additionalProperties": False,
        "required": ["domain"],
        "properties": {
            "domain": {"type": "string", "minLength": 1, "maxLength": contract.DOMAIN_MAX},
            "region": {"enum": contract.values(MailgunRegion)},
        },
    },
    "SesApiKey": {"type": "string", "pattern": contract.SES_API_KEY},
    "SesSettings": {
        "type": "object",
        "additionalProperties": False,
        "required": ["region"],
        "properties": {"region": {"type": "string", "pattern": contract.SES_REGION}},
    },
    "Provider": {
        "type": "object",
        "required": [
            "id",
            "name",
            "provider_type",
            "settings",
            "smtp_config",
            "enabled",
            "has_api_key",
            "has_smtp_password",
            "created_at",
            "updated_at",
        ],
        "properties": {
            "id": _UUID,
            "name": {"type": "string"},
            "provider_type": {"enum": contract.values(ProviderType)},
            "settings": {"type": "object"},
            "smtp_config": {"type": ["object", "null"], "description": "Without the password."},
            "enabled": {"type": "boolean"},
            "has_api_key": {"type": "boolean"},
            "has_smtp_password": {"type": "boolean"},
            "created_at": _TIME,
            "updated_at": _TIME,
        },
    },
    "Conditions": {
        "type": "object",
        "additionalProperties": False,
        "description": (
            "All given conditions must hold for a message to take this rule. recipient_domains: "
            "some recipient's domain matches one; sender_domains: the sender's domain matches one; "
            "headers: each named header contains the text (case-insensitive); weight: the share "
            "(1-100, percent) of matching messages this rule takes, the rest falling through."
        ),
        "properties": {
            "recipient_domains": {"type": "array", "items": _DOMAIN_PATTERN, "maxItems": 100},
            "sender_domains": {"type": "array", "items": _DOMAIN_PATTERN, "maxItems": 100},
            "headers": {
                "type": "array",
                "maxItems": 20,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "contains"],
                    "properties": {
                        "name": {"type": "string", "pattern": contract.HEADER_NAME},
                        "contains": {"type": "string", "minLength": 1, "maxLength": 256},
                    },
                },
            },
            "weight": {"type": "integer", "minimum": 1, "maximum": 100},
        },
    },
    "RoutingRuleCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "provider_id", "priority"],
        "properties": RULE_FIELDS,
    },
    "RoutingRuleUpdate": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": RULE_FIELDS,
    },
    "RoutingRule": {
        "type": "object",
        "required": [
            "id",
            "name",
            "provider_id",
            "priority",
            "conditions",
            "enabled",
            "created_at",
            "updated_at",
        ],
        "properties": {
            "id": _UUID,
            "name": {"type": "string"},
            "provider_id": _UUID,
            "priority": {"type": "integer"},
            "conditions": {"type": "object"},
            "enabled": {"type": "boolean"},
            "created_at": _TIME,
            "updated_at": _TIME,
        },
    },
    "SmtpCredentialCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["label"],
        "properties": {
            **CREDENTIAL_FIELDS,
            "username": {
                "type": "string",
                "pattern": contract.CREDENTIAL_USERNAME,
                "description": (
                    "The SMTP AUTH user name, unique across the relay: the account's name or "
                    "<account>.<anything>; <account>.<label> when left out."
                ),
            },
        },
        "description": "Without password, one is generated; either way the 201 shows it this once.",
    },
    "SmtpCredentialUpdate": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": CREDENTIAL_FIELDS,
        "description": "The user name never changes (devices hold it); a password replaces the old one.",
    },
    "SmtpCredential": {
        "type": "object",
        "required": [
            "id",
            "account_id",
            "username",
            "label",
            "enabled",
            "allowed_ips",
            "allowed_domains",
            "last_used_at",
            "created_at",
            "updated_at",
        ],
        "properties": {
            "id": _UUID,
            "account_id": _UUID,
            "username": {"type": "string"},
            "label": {"type": "string"},
            "enabled": {"type": "boolean"},
            "allowed_ips": {"type": "array", "items": {"type": "string"}},
            "allowed_domains": {"type": ["array", "null"], "items": {"type": "string"}},
            "last_used_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "The last AUTH with it, to the minute; null: never used.",
            },
            "created_at": _TIME,
            "updated_at": _TIME,
        },
    },
    "SmtpCredentialCreated": {
        "allOf": [{"$ref": "#/components/schemas/SmtpCredential"}],
        "type": "object",
        "required": ["password"],
        "properties": {"password": {"type": "string", "description": "Shown this once."}},
    },
    "Message": {
        "type": "object",
        "required": [
            "id",
            "sender",
            "recipients",
            "subject",
            "size",
            "status",
            "attempts",
            "provider_id",
            "credential_id",
            "correlation_id",
            "is_bounce",
            "next_attempt_at",
            "processed_at",
            "created_at",
            "updated_at",
        ],
        "properties": {
            "id": _UUID,
            "sender": {"type": "string"},
            "recipients": {"type": "array", "items": {"type": "string"}},
            "subject": {"type": ["string", "null"]},
            "size": {"type": "integer"},
            "status": {"enum": contract.values(MessageStatus)},
            "attempts": {"type": "integer"},
            "provider_id": {"type": ["string", "null"], "format": "uuid"},
            "credential_id": {
                "type": ["string", "null"],
                "format": "uuid",
                "description": "The SMTP credential that submitted it; null: a relay network's client, "
                "or the credential was deleted since.",
            },
            "correlation_id": {"type": "string"},
            "is_bounce": {
                "type": "boolean",
                "description": "A delivery status notification (RFC 3464) this server sent to a sender.",
            },
            "next_attempt_at": _TIME,
            "processed_at": {"type": ["string", "null"], "format": "date-time"},
            "created_at": _TIME,
            "updated_at": _TIME,
        },
    },
    "Delivery": {
        "type": "object",
        "required": ["id", "provider_id", "status", "response_code", "response_text", "created_at"],
        "properties": {
            "id": _UUID,
            "provider_id": {"type": ["string", "null"], "format": "uuid"},
            "status": {"enum": contract.values(DeliveryStatus)},
            "response_code": {"type": ["integer", "null"]},
            "response_text": {"type": ["string", "null"]},
            "created_at": _TIME,
        },
    },
    "MessageDetail": {
        "allOf": [{"$ref": "#/components/schemas/Message"}],
        "type": "object",
        "required": ["headers", "deliveries"],
        "properties": {
            "headers": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
            "deliveries": {"type": "array", "items": {"$ref": "#/components/schemas/Delivery"}},
        },
    },
    "SuppressionCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["address"],
        "properties": {
            "address": {
                "type": "string",
                "minLength": 3,
                "maxLength": contract.EMAIL_MAX,
                "description": "Stored in lower case, whole address (see the README).",
            },
            "account_id": {**_UUID, "description": "Admins only: another account's list."},
        },
    },
    "Suppression": {
        "type": "object",
        "required": [
            "id",
            "account_id",
            "address",
            "reason",
            "message_id",
            "provider_id",
            "response_code",
            "response_text",
            "created_at",
        ],
        "properties": {
            "id": _UUID,
            "account_id": _UUID,
            "address": {"type": "string"},
            "reason": {"enum": contract.values(contract.SuppressionReason)},
            "message_id": {"type": ["string", "null"], "format": "uuid"},
            "provider_id": {"type": ["string", "null"], "format": "uuid"},
            "response_code": {"type": ["integer", "null"]},
            "response_text": {"type": ["string", "null"]},
            "created_at": _TIME,
        },
    },
    "AuditEntry": {
        "type": "object",
        "required": [
            "id",
            "actor",
            "client_ip",
            "action",
            "entity",
            "entity_id",
            "account_id",
            "fields",
            "created_at",
        ],
        "properties": {
            "id": _UUID,
            "actor": {"type": "string"},
            "client_ip": {
                "type": ["string", "null"],
                "description": (
                    "The address the API call came from (the real client's behind a trusted proxy); "
                    "null for the CLI and for entries written before it was recorded."
                ),
            },
            "action": {"type": "string"},
            "entity": {"type": "string"},
            "entity_id": _UUID,
            "account_id": {"type": ["string", "null"], "format": "uuid"},
            "fields": {"type": "array", "items": {"type": "string"}},
            "created_at": _TIME,
        },
    },
}

_DNS_RECORD: Schema = {
    "type": "object",
    "required": ["type", "name", "value"],
    "properties": {
        "type": {"const": "TXT"},
        "name": {"type": "string", "description": "<selector>._domainkey.<domain>"},
        "value": {"type": "string", "description": "v=DKIM1; k=rsa|ed25519; p=<public key>"},
    },
}
SCHEMAS.update(
    {
        "DkimKeyCreate": {
            "type": "object",
            "additionalProperties": False,
            "required": ["domain"],
            "properties": {
                "domain": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": contract.DOMAIN_MAX,
                    "description": "One of the account's allowed domains (*.x allows x's subdomains).",
                },
                "selector": {
                    "type": "string",
                    "pattern": contract.DKIM_SELECTOR,
                    "description": "One DNS label; sp<yyyymm> (this month) when left out.",
                },
                "algorithm": {"enum": contract.values(contract.DkimAlgorithm), "default": "rsa-sha256"},
                "enabled": {"type": "boolean"},
            },
            "description": "RSA 2048 by default, Ed25519 on request. The private key is never returned.",
        },
        "DkimKeyUpdate": {
            "type": "object",
            "additionalProperties": False,
            "required": ["enabled"],
            "properties": {"enabled": {"type": "boolean"}},
        },
        "DkimKey": {
            "type": "object",
            "required": ["id", "domain", "selector", "algorithm", "enabled", "dns_record", "created_at"],
            "properties": {
                "id": _UUID,
                "domain": {"type": "string"},
                "selector": {"type": "string"},
                "algorithm": {"enum": contract.values(contract.DkimAlgorithm)},
                "enabled": {"type": "boolean"},
                "dns_record": _DNS_RECORD,
                "created_at": _TIME,
                "updated_at": _TIME,
            },
        },
        "DkimVerification": {
            "type": "object",
            "required": ["published", "matches", "found", "dns_record"],
            "properties": {
                "published": {"type": "boolean", "description": "A TXT record exists at the name."},
                "matches": {"type": "boolean", "description": "Its p= is this key's public key."},
                "found": {"type": ["string", "null"], "description": "The record as the DNS has it."},
                "dns_record": _DNS_RECORD,
            },
        },
    }
)

_WEBHOOK_URL: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": 2048,
    "description": (
        "An https URL on a public address (http and private addresses only with "
        "delivery.allow_private_networks); redirects are not followed."
    ),
}
_WEBHOOK_EVENTS: Schema = {
    "type": "array",
    "minItems": 1,
    "uniqueItems": True,
    "items": {"enum": list(contract.WEBHOOK_EVENT_TYPES)},
}
SCHEMAS.update(
    {
        "WebhookCreate": {
            "type": "object",
            "additionalProperties": False,
            "required": ["url", "events"],
            "properties": {"url": _WEBHOOK_URL, "events": _WEBHOOK_EVENTS, "enabled": {"type": "boolean"}},
            "description": "At most 10 per account. The secret is generated and shown once.",
        },
        "WebhookUpdate": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {"url": _WEBHOOK_URL, "events": _WEBHOOK_EVENTS, "enabled": {"type": "boolean"}},
        },
        "Webhook": {
            "type": "object",
            "required": [
                "id",
                "url",
                "events",
                "enabled",
                "previous_secret_expires_at",
                "created_at",
                "updated_at",
            ],  # fmt: skip
            "properties": {
                "id": _UUID,
                "url": {"type": "string"},
                "events": {"type": "array", "items": {"type": "string"}},
                "enabled": {"type": "boolean"},
                "previous_secret_expires_at": {
                    "type": ["string", "null"],
                    "format": "date-time",
                    "description": "Until then the secret before the last rotation signs too.",
                },
                "created_at": _TIME,
                "updated_at": _TIME,
            },
        },
        "WebhookWithSecret": {
            "allOf": [
                {"$ref": "#/components/schemas/Webhook"},
                {
                    "type": "object",
                    "required": ["secret"],
                    "properties": {
                        "secret": {
                            "type": "string",
                            "description": "Shown this once. Signs Webhook-Signature: t=<unix time>,v1=<hex "
                            "HMAC-SHA256 of t.body>.",
                        }
                    },
                },
            ]
        },
        "WebhookDelivery": {
            "type": "object",
            "required": ["event_id", "type", "status", "attempts", "created_at"],
            "properties": {
                "event_id": _UUID,
                "type": {"type": "string"},
                "status": {"enum": ["pending", "delivered", "dropped"]},
                "attempts": {"type": "integer", "minimum": 0},
                "last_status_code": {"type": ["integer", "null"]},
                "last_error": {"type": ["string", "null"]},
                "last_attempt_at": {"type": ["string", "null"], "format": "date-time"},
                "next_attempt_at": {"type": ["string", "null"], "format": "date-time"},
                "created_at": _TIME,
            },
        },
        "WebhookEvent": {
            "type": "object",
            "description": (
                "The body POSTed to an endpoint (Content-Type: application/json), with headers "
                "Webhook-Id (the event id) and Webhook-Signature. At least once: drop a repeated id."
            ),
            "required": [
                "id",
                "type",
                "time",
                "message_id",
                "correlation_id",
                "recipients",
                "provider",
                "reply",
            ],  # fmt: skip
            "properties": {
                "id": _UUID,
                "type": _WEBHOOK_EVENTS["items"],
                "time": _TIME,
                "message_id": _UUID,
                "correlation_id": {"type": "string"},
                "recipients": {"type": "array", "items": {"type": "string"}},
                "provider": {"type": ["string", "null"], "description": "The provider's name, or null."},
                "reply": {
                    "type": "object",
                    "description": (
                        "The reply about these recipients: a recipient refused at RCPT carries its own "
                        "refusal, the others the reply to the message; code null for message.suppressed."
                    ),
                    "properties": {"code": {"type": ["integer", "null"]}, "text": {"type": "string"}},
                },
            },
        },
    }
)

# Sub-schemas checked again on update, where the type is the stored one.
SETTINGS_BY_TYPE = {ProviderType.MAILGUN: "MailgunSettings", ProviderType.SES: "SesSettings"}


def page_of(item: str) -> Schema:
    return {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    }


def list_of(item: str) -> Schema:
    return {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}}},
    }


_REGISTRY_ROOT: Schema = {"components": {"schemas": SCHEMAS}}
_validators: dict[str, Draft202012Validator] = {}


def validator(name: str) -> Draft202012Validator:
    """A validator for ``SCHEMAS[name]`` that resolves ``#/components/schemas/...`` refs."""
    found = _validators.get(name)
    if found is None:
        schema = {**SCHEMAS[name], "components": {"schemas": SCHEMAS}}
        found = _validators[name] = Draft202012Validator(
            schema, format_checker=Draft202012Validator.FORMAT_CHECKER
        )
    return found


def _fields_of(error: SchemaError) -> list[str]:
    """The dotted names of the fields an error is about, read from the error's structure.

    ``required`` names the missing properties and ``additionalProperties`` the
    unexpected ones of the object at the error's path; any other error is about
    the value at its path (the whole body at the top).
    """
    path = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "required":
        names = [name for name in error.validator_value if name not in error.instance]
    elif error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        names = [name for name in error.instance if name not in known]
    else:
        return [path or "body"]
    return [f"{path}.{name}" if path else name for name in names]


def _problem(error: SchemaError) -> str:
    if error.validator == "required":
        return "is required"
    if error.validator == "additionalProperties":
        return "is not a known field"
    if error.validator == "minProperties":
        return "give at least one field"
    if error.validator in ("type", "enum", "const", "format", "pattern", "minimum", "maximum"):
        expected = error.validator_value
        if error.validator == "type":
            return f"must be of type {expected}"
        if error.validator in ("enum", "const"):
            choices = expected if isinstance(expected, list) else [expected]
            return "must be one of " + ", ".join(str(choice) for choice in choices)
        if error.validator == "format":
            return f"must be a valid {expected}"
        if error.validator == "pattern":
            return "has the wrong form"
        return f"must be {'at least' if error.validator == 'minimum' else 'at most'} {expected}"
    if error.validator in ("minLength", "maxLength", "minItems", "maxItems"):
        bound = "at least" if error.validator.startswith("min") else "at most"
        unit = "characters" if error.validator.endswith("Length") else "items"
        return f"must have {bound} {error.validator_value} {unit}"
    return "is not valid"


def check(name: str, value: Any) -> None:
    """422 naming every field of ``value`` that breaks ``SCHEMAS[name]``."""
    fields: dict[str, str] = {}
    for error in sorted(validator(name).iter_errors(value), key=lambda e: list(e.absolute_path)):
        for leaf in _leaves(error):
            for field in _fields_of(leaf):
                fields.setdefault(field, _problem(leaf))
    if fields:
        raise invalid(fields)


def check_field(field: str, name: str, value: Any) -> None:
    """Like ``check`` for the value of one field; reported names start with ``field``."""
    try:
        check(name, value)
    except ApiError as error:
        fields = error.fields or {}
        raise invalid({(f"{field}.{k}" if k != "body" else field): v for k, v in fields.items()}) from None


def _leaves(error: SchemaError) -> list[SchemaError]:
    """The most specific errors under an allOf/if-then wrapper."""
    if error.context:
        return [leaf for sub in error.context for leaf in _leaves(sub)]
    return [error]


MAX_DEPTH = 32


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def body(name: str) -> dict[str, Any]:
    """The request's JSON object (``json_object``) checked against ``SCHEMAS[name]``; 422 for bad fields."""
    data = json_object()
    check(name, data)
    return data


def json_object() -> dict[str, Any]:
    """The request's JSON object, not yet checked against a schema.

    415 for another content type; 400 for malformed JSON (NaN and Infinity
    included), a non-object, or nesting deeper than MAX_DEPTH; 413 over
    MAX_BODY_BYTES (Flask's MAX_CONTENT_LENGTH); 422 for strings the database
    cannot hold (a NUL, a lone surrogate).
    """
    if request.mimetype != "application/json":
        raise ApiError(415, "the request body must be application/json")
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    fields: dict[str, str] = {}
    _check_strings(data, "", 0, fields)
    if fields:
        raise invalid(fields)
    return data


def _check_strings(value: Any, path: str, depth: int, fields: dict[str, str]) -> None:
    """Every string (and key) storable as UTF-8 text without NUL; nesting bounded."""
    if depth > MAX_DEPTH:
        raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            fields.setdefault(path or "body", "must not contain a NUL character")
        elif not _encodable(value):
            fields.setdefault(path or "body", "must be valid Unicode text")
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if "\x00" in key or not _encodable(key):
                fields.setdefault(path or "body", "has a field name that is not valid text")
                continue
            _check_strings(item, child, depth + 1, fields)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_strings(item, f"{path}.{index}" if path else str(index), depth + 1, fields)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
