"""The OpenAPI 3.1 document of /api/v1, built from the schemas the API validates with and the contract."""

from __future__ import annotations

from typing import Any

from smtp_proxy import __version__, contract
from smtp_proxy.api import pages
from smtp_proxy.api.schemas import MAX_BODY_BYTES, SCHEMAS, Schema, list_of, page_of
from smtp_proxy.contract import MessageStatus

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_COMMON_ERRORS = {
    "401": "Missing, malformed or unknown API key, or a deactivated account.",
    "429": (
        "Rate limited; see Retry-After. A verified key has api.rate_limit; requests without a "
        "valid key share api.unauthenticated_rate_limit per client address."
    ),
    "503": "The database is not answering; see Retry-After.",
}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_CREDENTIAL_ID = {
    "name": "credential_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_PAGE_PARAMS = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": pages.MAX_LIMIT}},
    {
        "name": "cursor",
        "in": "query",
        "schema": {"type": "string"},
        "description": "next_cursor of the page before.",
    },
]
_MESSAGE_PARAMS = [
    {
        "name": "status",
        "in": "query",
        "schema": {"enum": contract.values(MessageStatus)},
    },
    {
        "name": "credential_id",
        "in": "query",
        "schema": {"type": "string", "format": "uuid"},
        "description": "Only the messages this SMTP credential submitted.",
    },
    {
        "name": "is_bounce",
        "in": "query",
        "schema": {"enum": ["true", "false"]},
        "description": "true: only the delivery status notifications sent to senders; false: only the rest.",
    },
    {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
    {"name": "until", "in": "query", "schema": {"type": "string", "format": "date-time"}},
    *_PAGE_PARAMS,
]

_SUPPRESSION_PARAMS = [
    {"name": "reason", "in": "query", "schema": {"enum": contract.values(contract.SuppressionReason)}},
    {"name": "address", "in": "query", "schema": {"type": "string"}, "description": "One address."},
    {
        "name": "account_id",
        "in": "query",
        "schema": {"type": "string", "format": "uuid"},
        "description": "Admins only: another account's list.",
    },
    *_PAGE_PARAMS,
]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(
    summary: str,
    ok: tuple[str, Schema | None],
    *,
    body: str | None = None,
    errors: tuple[str, ...] = (),
    params: list[dict[str, Any]] | None = None,
    notes: dict[str, str] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    status, schema = ok
    responses: dict[str, Any] = {
        status: {"description": "Success."}
        if schema is None
        else {"description": "Success.", "content": {"application/json": {"schema": schema}}}
    }
    descriptions = {
        "400": "Malformed JSON.",
        "403": "Needs an admin account.",
        "404": "No such resource (or another tenant's).",
        "409": "The name is taken.",
        "413": f"The body is too large; the limit ({MAX_BODY_BYTES} bytes) is in error.message.",
        "415": "The body is not application/json.",
        "422": "Invalid fields; error.fields names each one.",
    }
    descriptions.update(notes or {})
    for code in errors:
        responses[code] = {"description": descriptions[code], "content": _ERROR}
    for code, text in _COMMON_ERRORS.items():
        responses[code] = {"description": text, "content": _ERROR}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if description:
        operation["description"] = description
    if body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if params:
        operation["parameters"] = params
    return operation


_WRITE = ("400", "413", "415", "422")


def document() -> dict[str, Any]:
    paths = {
        "/accounts": {
            "post": _op(
                "Create an account (admin)",
                ("201", _ref("AccountCreated")),
                body="AccountCreate",
                errors=(*_WRITE, "403", "409"),
                notes={"409": "The name is taken (conflict), or a domain is (domain_taken)."},
            ),
            "get": _op("List accounts (an admin all, a tenant itself)", ("200", list_of("Account"))),
        },
        "/accounts/{id}": {
            "parameters": [_ID],
            "get": _op("One account", ("200", _ref("Account")), errors=("404",)),
            "put": _op(
                "Update an account",
                ("200", _ref("Account")),
                body="AccountUpdate",
                errors=(*_WRITE, "403", "404", "409"),
                notes={
                    "403": "A tenant named a field only an admin may set (forbidden_field).",
                    "409": "A domain is granted to another active account (domain_taken).",
                },
            ),
            "delete": _op("Deactivate an account (data kept)", ("204", None), errors=("404",)),
        },
        "/accounts/{id}/usage": {
            "parameters": [_ID],
            "get": _op(
                "Sending counts and limits of an account (an admin any, a tenant itself)",
                ("200", _ref("Usage")),
                errors=("404",),
                description=(
                    "Read from limits.storage. With memory:// each process counts on its own, and this "
                    "shows only what was counted in the API's own process; with redis:// the counts of "
                    "every listener, API and worker instance."
                ),
            ),
        },
        "/accounts/{id}/rotate-key": {
            "parameters": [_ID],
            "post": _op(
                "Issue a new API key; the old one stops working", ("200", _ref("ApiKey")), errors=("404",)
            ),
        },
        "/accounts/{id}/smtp-credentials": {
            "parameters": [_ID],
            "post": _op(
                "Add an SMTP credential to an account (an admin any, a tenant itself)",
                ("201", _ref("SmtpCredentialCreated")),
                body="SmtpCredentialCreate",
                errors=(*_WRITE, "404", "409"),
                notes={"409": "The account has a credential with this label, or the user name is taken."},
            ),
            "get": _op(
                "List an account's SMTP credentials, oldest first",
                ("200", list_of("SmtpCredential")),
                errors=("404",),
            ),
        },
        "/accounts/{id}/smtp-credentials/{credential_id}": {
            "parameters": [_ID, _CREDENTIAL_ID],
            "get": _op("One SMTP credential", ("200", _ref("SmtpCredential")), errors=("404",)),
            "patch": _op(
                "Change an SMTP credential's label, state, restrictions or password",
                ("200", _ref("SmtpCredential")),
                body="SmtpCredentialUpdate",
                errors=(*_WRITE, "404", "409"),
                notes={"409": "The account has another credential with this label."},
            ),
            "delete": _op(
                "Delete an SMTP credential; its open sessions end at their next MAIL FROM",
                ("204", None),
                errors=("404",),
            ),
        },
        "/providers": {
            "post": _op(
                "Add a provider",
                ("201", _ref("Provider")),
                body="ProviderCreate",
                errors=(*_WRITE, "409"),
                notes={"422": "Invalid fields, or limits.max_providers_per_account reached."},
            ),
            "get": _op("List providers", ("200", list_of("Provider"))),
        },
        "/providers/{id}": {
            "parameters": [_ID],
            "get": _op("One provider", ("200", _ref("Provider")), errors=("404",)),
            "put": _op(
                "Update a provider",
                ("200", _ref("Provider")),
                body="ProviderUpdate",
                errors=(*_WRITE, "404", "409"),
            ),
            "delete": _op("Delete a provider and its rules", ("204", None), errors=("404",)),
        },
        "/routing-rules": {
            "post": _op(
                "Add a routing rule",
                ("201", _ref("RoutingRule")),
                body="RoutingRuleCreate",
                errors=_WRITE,
                notes={"422": "Invalid fields, or limits.max_rules_per_account reached."},
            ),
            "get": _op("List routing rules, lowest priority first", ("200", list_of("RoutingRule"))),
        },
        "/routing-rules/{id}": {
            "parameters": [_ID],
            "get": _op("One routing rule", ("200", _ref("RoutingRule")), errors=("404",)),
            "put": _op(
                "Update a routing rule",
                ("200", _ref("RoutingRule")),
                body="RoutingRuleUpdate",
                errors=(*_WRITE, "404"),
            ),
            "delete": _op("Delete a routing rule", ("204", None), errors=("404",)),
        },
        "/messages": {
            "get": _op(
                "A page of messages, newest first",
                ("200", page_of("Message")),
                errors=("422",),
                params=_MESSAGE_PARAMS,
            ),
        },
        "/messages/{id}": {
            "parameters": [_ID],
            "get": _op(
                "One message with its delivery log (never its body)",
                ("200", _ref("MessageDetail")),
                errors=("404",),
            ),
        },
        "/suppressions": {
            "get": _op(
                "A page of the suppression list, newest first",
                ("200", page_of("Suppression")),
                errors=("404", "422"),
                params=_SUPPRESSION_PARAMS,
            ),
            "post": _op(
                "Suppress an address (reason manual)",
                ("201", _ref("Suppression")),
                body="SuppressionCreate",
                errors=(*_WRITE, "404", "409"),
                notes={"409": "The address is on the list already."},
            ),
        },
        "/suppressions/{id}": {
            "parameters": [_ID],
            "get": _op("One suppression", ("200", _ref("Suppression")), errors=("404",)),
            "delete": _op(
                "Take an address off the list; the worker sends to it again", ("204", None), errors=("404",)
            ),
        },
        "/audit-log": {
            "get": _op(
                "A page of audit entries, newest first",
                ("200", page_of("AuditEntry")),
                errors=("422",),
                params=_PAGE_PARAMS,
            ),
        },
    }
    paths.update(_dkim_paths())
    paths.update(_webhook_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "smtp-proxy management API", "version": __version__},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _dkim_paths() -> dict[str, Any]:
    return {
        "/dkim-keys": {
            "post": _op(
                "Create a DKIM key for one of the account's domains",
                ("201", _ref("DkimKey")),
                body="DkimKeyCreate",
                errors=(*_WRITE, "409"),
                notes={
                    "409": "The domain has a key with this selector.",
                    "422": "Invalid fields, or a domain outside the account's allowed domains.",
                },
            ),
            "get": _op("List DKIM keys", ("200", list_of("DkimKey"))),
        },
        "/dkim-keys/{id}": {
            "parameters": [_ID],
            "get": _op("One DKIM key with its DNS record", ("200", _ref("DkimKey")), errors=("404",)),
            "patch": _op(
                "Enable or disable a DKIM key",
                ("200", _ref("DkimKey")),
                body="DkimKeyUpdate",
                errors=(*_WRITE, "404"),
            ),
            "delete": _op("Delete a DKIM key", ("204", None), errors=("404",)),
        },
        "/dkim-keys/{id}/verify": {
            "parameters": [_ID],
            "post": _op(
                "Look the key's TXT record up in the DNS",
                ("200", _ref("DkimVerification")),
                errors=("404", "502"),
                notes={"502": "The DNS did not answer (dns_unavailable)."},
            ),
        },
    }


_EVENT_ID = {**_ID, "name": "event_id"}


def _webhook_paths() -> dict[str, Any]:
    return {
        "/webhooks": {
            "post": _op(
                "Add a webhook endpoint; its secret is shown this once",
                ("201", _ref("WebhookWithSecret")),
                body="WebhookCreate",
                errors=_WRITE,
                notes={"422": "Invalid fields, or the account has 10 endpoints already."},
                description="Events are POSTed as WebhookEvent objects, signed (see WebhookWithSecret).",
            ),
            "get": _op("List webhook endpoints", ("200", list_of("Webhook"))),
        },
        "/webhooks/{id}": {
            "parameters": [_ID],
            "get": _op("One webhook endpoint", ("200", _ref("Webhook")), errors=("404",)),
            "patch": _op(
                "Change an endpoint's URL, events or enabled",
                ("200", _ref("Webhook")),
                body="WebhookUpdate",
                errors=(*_WRITE, "404"),
            ),
            "delete": _op("Delete an endpoint and what is still owed to it", ("204", None), errors=("404",)),
        },
        "/webhooks/{id}/rotate-secret": {
            "parameters": [_ID],
            "post": _op(
                "A new secret, shown this once; the previous one signs too for 24 hours",
                ("200", _ref("WebhookWithSecret")),
                errors=("404",),
            ),
        },
        "/webhooks/{id}/deliveries": {
            "parameters": [_ID],
            "get": _op(
                "The endpoint's 100 most recent deliveries, newest first",
                ("200", list_of("WebhookDelivery")),
                errors=("404",),
            ),
        },
        "/webhooks/{id}/deliveries/{event_id}/redeliver": {
            "parameters": [_ID, _EVENT_ID],
            "post": _op(
                "Send the event to the endpoint again, now (24 more hours of retries)",
                ("202", None),
                errors=("404",),
            ),
        },
    }
