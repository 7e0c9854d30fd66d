"""The field rules and enums of the API contract, written once.

Every layer that states one of these rules imports it from here: the JSON
Schemas and the OpenAPI document built from them (``api/schemas.py``,
``api/openapi.py``), the validators the CLI and storage share
(``validation.py``), the models' column types and enum types
(``db/models.py``) and the SES transport. A test holds the migrated
PostgreSQL schema to the enums and lengths below.

Patterns are anchored and written in the subset that ECMA-262 (JSON Schema,
``pattern``) and Python's ``re`` read alike: ASCII classes only, so no ``\\d``,
which in Python also matches non-ASCII digits. Python callers use
``fullmatch``, which also refuses a trailing newline that ``$`` lets through.

Standard library only, so that every layer can import it.
"""

from __future__ import annotations

import enum


class ProviderType(enum.StrEnum):
    SENDGRID = "sendgrid"
    MAILGUN = "mailgun"
    SES = "ses"
    SMTP = "smtp"


class MessageStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DELIVERED = "delivered"
    FAILED = "failed"


class DeliveryStatus(enum.StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


class SuppressionReason(enum.StrEnum):
    """Why a recipient is on an account's suppression list."""

    HARD_BOUNCE = "hard_bounce"  # a provider refused it permanently (the worker added it)
    MANUAL = "manual"  # added through the API


class SmtpTls(enum.StrEnum):
    """How an smtp provider's connection is secured (``smtp_config.tls``)."""

    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class DkimAlgorithm(enum.StrEnum):
    """A DKIM key's signing algorithm, as the signature's ``a=`` tag names it."""

    RSA_SHA256 = "rsa-sha256"
    ED25519_SHA256 = "ed25519-sha256"


class MailgunRegion(enum.StrEnum):
    US = "us"
    EU = "eu"


def values(kind: type[enum.StrEnum]) -> list[str]:
    """The wire values of an enum in declaration order: a JSON Schema ``enum``."""
    return [member.value for member in kind]


# An account name is also the SMTP AUTH user name, so it stays plain ASCII.
ACCOUNT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"
ACCOUNT_NAME_MAX = 64
# An SMTP credential's user name: an account name's alphabet, long enough for "<account>.<label>".
CREDENTIAL_USERNAME = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,128}$"
CREDENTIAL_USERNAME_MAX = 129
# A credential's label: what the device or application is ("printer-2nd-floor", "billing.app").
CREDENTIAL_LABEL = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
CREDENTIAL_LABEL_MAX = 64
# The label of the credential an account's own login became (its user name is the account's name).
PRIMARY_CREDENTIAL_LABEL = "account"
NETWORK_MAX = 43  # an IPv6 CIDR: 39 characters of address, "/" and 3 of prefix
# A region is a host label in SES's default endpoint: AWS's shape, e.g. eu-west-1, us-gov-west-1.
SES_REGION = r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$"
# ACCESS_KEY_ID:SECRET, the form an ses provider's api_key takes.
SES_API_KEY = r"^[A-Z0-9]{16,128}:[^\s]{1,512}$"
# A header field name (RFC 5322 section 3.6.8: printable ASCII but the colon), within one line.
HEADER_NAME = r"^[!-9;-~]{1,76}$"

# A DKIM selector: one DNS label (RFC 6376 3.1 allows more; one is what operators publish).
DKIM_SELECTOR = r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"  # stored in lowercase
DKIM_SELECTOR_MAX = 63

EMAIL_MAX = 254  # RFC 5321's limit on a path, less the angle brackets
NAME_MAX = 100  # a provider's or a routing rule's name
DOMAIN_MAX = 253
PRIORITY_MAX = 2_147_483_647  # the integer column's range
MAX_LIMIT = 2_147_483_647  # a sending limit above this is a typo, not a quota

# The delivery events a webhook endpoint may ask for, in the order the API lists them.
WEBHOOK_EVENT_TYPES = ("message.delivered", "message.deferred", "message.failed", "message.suppressed")
