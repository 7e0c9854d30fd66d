"""Field checks shared by the CLI, the API and the storage layer; the rules they apply are in ``contract``."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import idna

from smtp_proxy.config import SENDING_LIMITS
from smtp_proxy.contract import ACCOUNT_NAME, CREDENTIAL_LABEL, CREDENTIAL_USERNAME, MAX_LIMIT
from smtp_proxy.errors import ValidationError

_ACCOUNT_NAME = re.compile(ACCOUNT_NAME)
_CREDENTIAL_USERNAME = re.compile(CREDENTIAL_USERNAME)
_CREDENTIAL_LABEL = re.compile(CREDENTIAL_LABEL)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


def account_name(value: object) -> str:
    if not isinstance(value, str) or not _ACCOUNT_NAME.fullmatch(value):
        raise ValidationError(
            "name",
            "must be 1-64 characters of letters, digits and . _ @ + -, starting with a letter or digit",
        )
    return value


def credential_username(value: object, field: str = "username") -> str:
    """An SMTP user name: an account name's alphabet, up to 129 characters (``<account>.<label>``)."""
    if not isinstance(value, str) or not _CREDENTIAL_USERNAME.fullmatch(value):
        raise ValidationError(
            field,
            "must be 1-129 characters of letters, digits and . _ @ + -, starting with a letter or digit",
        )
    return value


def credential_label(value: object, field: str = "label") -> str:
    if not isinstance(value, str) or not _CREDENTIAL_LABEL.fullmatch(value):
        raise ValidationError(
            field, "must be 1-64 characters of letters, digits and . _ -, starting with a letter or digit"
        )
    return value


def network(value: object, field: str = "network") -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR ("192.0.2.0/24", "2001:db8::/48"; a bare address is one host), host bits clear."""
    if not isinstance(value, str) or not value or len(value) > 50 or not value.isascii():
        raise ValidationError(field, "must be a network in CIDR notation, such as 192.0.2.0/24")
    try:
        parsed = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as error:
        reason = "has host bits set" if "host bits" in str(error) else "is not a network in CIDR notation"
        raise ValidationError(field, f"{reason} ({value!r}); for example 192.0.2.0/24") from None
    if isinstance(parsed, ipaddress.IPv6Network) and parsed.network_address.ipv4_mapped is not None:
        raise ValidationError(field, "must name IPv4 networks in IPv4 notation, not as ::ffff:a.b.c.d")
    return parsed


def networks(values: object, field: str = "allowed_ips") -> list[str]:
    """A list of CIDRs, canonical and without repeats (may be empty)."""
    if not isinstance(values, (list, tuple)):
        raise ValidationError(field, "must be a list of networks in CIDR notation")
    if len(values) > 100:
        raise ValidationError(field, "must hold at most 100 networks")
    found: list[str] = []
    for index, item in enumerate(values):
        text = str(network(item, f"{field}[{index}]"))
        if text not in found:
            found.append(text)
    return found


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


def limit_overrides(value: object, field: str = "limits") -> dict[str, int | None]:
    """An account's own sending limits: a subset of SENDING_LIMITS, each a positive integer or null.

    A name left out takes the config's default; null means unlimited.
    """
    if not isinstance(value, dict):
        raise ValidationError(field, "must be an object")
    overrides: dict[str, int | None] = {}
    for name, limit in value.items():
        if name not in SENDING_LIMITS:
            raise ValidationError(f"{field}.{name}", "is not a known limit: " + ", ".join(SENDING_LIMITS))
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValidationError(f"{field}.{name}", "must be a positive integer or null (unlimited)")
        if limit is not None and limit > MAX_LIMIT:
            raise ValidationError(f"{field}.{name}", f"must be at most {MAX_LIMIT}")
        overrides[name] = limit
    return {name: overrides[name] for name in SENDING_LIMITS if name in overrides}


# --- sender domains: one domain, one tenant ------------------------------------------------------------
#
# What a pattern covers is what smtp.addresses.domain_allowed accepts: "example.com" exactly that
# domain; "*.example.com" every subdomain at any depth, but not example.com itself.


def _bare(pattern: str) -> str:
    return pattern.strip().lower().rstrip(".")


def patterns_overlap(first: str, second: str) -> bool:
    """Whether some domain is covered by both patterns (so the two cannot go to two tenants)."""
    a, b = _bare(first), _bare(second)
    a_wild, b_wild = a.startswith("*."), b.startswith("*.")
    if a_wild and b_wild:
        # *.x and *.y share a name exactly when one base is the other or lies under it.
        x, y = a[2:], b[2:]
        return x == y or x.endswith("." + y) or y.endswith("." + x)
    if a_wild:
        return b.endswith(a[1:])  # a[1:] keeps the dot: b is a strict subdomain
    if b_wild:
        return a.endswith(b[1:])
    return a == b


def pattern_within(pattern: str, patterns: Iterable[str]) -> bool:
    """Whether every domain ``pattern`` covers is covered by one of ``patterns`` too."""
    wanted = _bare(pattern)
    for other in patterns:
        held = _bare(other)
        if held == wanted:
            return True
        if held.startswith("*."):
            base = held[1:]  # with the dot: only strict subdomains
            if wanted.startswith("*.") and wanted[1:].endswith(base):
                return True
            if not wanted.startswith("*.") and wanted.endswith(base):
                return True
    return False


def first_overlap(wanted: Iterable[str], held: Iterable[str]) -> tuple[str, str] | None:
    """The first (wanted, held) pair of patterns that overlap, or None."""
    held = list(held)
    for pattern in wanted:
        for other in held:
            if patterns_overlap(pattern, other):
                return pattern, other
    return None
