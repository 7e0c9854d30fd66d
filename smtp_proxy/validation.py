"""Field rules shared by the CLI, the API and the storage layer."""

from __future__ import annotations

import re

import idna

from smtp_proxy.errors import ValidationError

# An account name is also the SMTP AUTH user name, so keep it to plain ASCII.
_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


def account_name(value: object) -> str:
    if not isinstance(value, str) or not _ACCOUNT_NAME.fullmatch(value):
        raise ValidationError(
            "name",
            "must be 1-64 characters of letters, digits and . _ @ + -, starting with a letter or digit",
        )
    return value


def domain(value: object, field: str = "domain") -> str:
    """A lowercase DNS domain with at least two labels; IDNs in their A-label form."""
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    text = value.strip().lower().rstrip(".")
    if not text.isascii():
        # IDNA 2008 with UTS 46 mapping: "faß.de" is xn--fa-hia.de, not fass.de.
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise ValidationError(field, f"not a valid domain: {value!r}") from None
    labels = text.split(".")
    if len(text) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValidationError(field, f"not a valid domain: {value!r}")
    if labels[-1].isdigit():
        raise ValidationError(field, f"not a valid domain: {value!r}")
    return text


def domain_pattern(value: object, field: str = "allowed_domains") -> str:
    """``example.com`` (exactly that domain) or ``*.example.com`` (its subdomains)."""
    if isinstance(value, str) and value.strip().startswith("*."):
        return "*." + domain(value.strip()[2:], field)
    return domain(value, field)


def domain_patterns(values: object, field: str = "allowed_domains") -> list[str]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValidationError(field, "must be a non-empty list of domains")
    patterns: list[str] = []
    for item in values:
        pattern = domain_pattern(item, field)
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


def email(value: object, field: str = "email") -> str:
    """A contact address: dot-atom local part, a valid domain."""
    if not isinstance(value, str) or value.count("@") != 1 or len(value) > 254:
        raise ValidationError(field, f"not a valid email address: {value!r}")
    local, _, host = value.strip().partition("@")
    if not _LOCAL_PART.fullmatch(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValidationError(field, f"not a valid email address: {value!r}")
    return f"{local}@{domain(host, field)}"
