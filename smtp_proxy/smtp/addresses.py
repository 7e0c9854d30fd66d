"""RFC 5321 paths and ESMTP parameters of MAIL FROM / RCPT TO, and allowed-domain matching.

Part of the pure protocol core: this module imports only the standard library.
Parsing follows the grammar of RFC 5321 4.1.2 strictly, because whatever passes here is
queued and relayed under our name. It is lenient in one place only, the single space after
the colon that many clients send. SMTPUTF8 (RFC 6531) is not offered, so only printable
ASCII is accepted, and every length below is in octets.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Path", "PathError", "decode_xtext", "domain_allowed", "parse_mail_from", "parse_rcpt_to"]

PathErrorKind = Literal["syntax", "too_long", "param", "value"]

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3, angle brackets included
MAX_LABEL = 63  # RFC 1035 2.3.4

_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")  # RFC 5321 4.1.2 Dot-string
# RFC 5321 4.1.2: Quoted-string = DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_SUB_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")  # Let-dig [Ldh-str]
_IPV6_TEXT = re.compile(r"[0-9A-Fa-f:.]+")
# RFC 5321 4.1.2: esmtp-keyword ["=" esmtp-value]; the value is 1*(%d33-60 / %d62-126)
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")  # RFC 1870 size-value = 1*20DIGIT
_BODY_VALUES = frozenset({"7BIT", "8BITMIME"})  # RFC 6152 2
# RFC 3461 4: xtext = *( xchar / hexchar ); xchar is "!".."~" but "+" and "="; hexchar is "+" and
# two upper-case hex digits. _PARAM already keeps "=" and anything outside "!".."~" out.
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
# What a decoded ENVID or ORCPT may hold: printable ASCII. They are written into the header of
# a delivery status notification (RFC 3464 2.2.1, 2.3.2), so no control character, CR or LF.
_DECODED = re.compile(r"[\x20-\x7e]+")
MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2
_RET_VALUES = frozenset({"FULL", "HDRS"})  # RFC 3461 4.3
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})  # RFC 3461 4.1, or NEVER alone


class PathError(ValueError):
    """A MAIL FROM / RCPT TO argument that cannot be accepted; ``kind`` says which reply fits.

    ``syntax``: the path is malformed; ``too_long``: a length limit of RFC 5321 4.5.3.1 is
    exceeded; ``param``: an ESMTP parameter is unknown, malformed or repeated; ``value``: a
    known parameter has a value it may not have (the message says what is wrong).
    """

    def __init__(self, kind: PathErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: PathErrorKind = kind


@dataclass(frozen=True)
class Path:
    """A parsed reverse- or forward-path and its ESMTP parameters (keywords upper-cased).

    Values are normalised: BODY, RET and NOTIFY upper-cased (NOTIFY as "FAILURE,DELAY"),
    ENVID xtext-decoded, ORCPT as "rfc822;" and the decoded address.
    """

    address: str  # "local@domain" as sent, "" for the null path, or "Postmaster"
    params: dict[str, str | None] = field(default_factory=dict, hash=False)

    @property
    def domain(self) -> str:
        """The lower-cased domain ("" when there is none); an address literal as sent."""
        _, at, domain = self.address.rpartition("@")
        if not at:
            return ""
        return domain if domain.startswith("[") else domain.lower()


def parse_mail_from(argument: str, allowed_params: frozenset[str] = frozenset({"SIZE", "BODY"})) -> Path:
    """Parse ``FROM:<reverse-path> [params]``; raises PathError.

    ``allowed_params`` holds the upper-case keywords of the extensions announced in EHLO.
    """
    inner, rest = _split_argument(argument, "FROM")
    address = _parse_path(inner) if inner else ""  # RFC 5321 4.5.5: <> is the null reverse-path
    return Path(address, _parse_params(rest, allowed_params))


def parse_rcpt_to(argument: str, allowed_params: frozenset[str] = frozenset()) -> Path:
    """Parse ``TO:<forward-path> [params]``; raises PathError.

    No RCPT parameter is offered by default, so any parameter is refused.
    """
    inner, rest = _split_argument(argument, "TO")
    if inner.lower() == "postmaster":
        address = "Postmaster"  # RFC 5321 4.1.1.3: <Postmaster> needs no domain
    elif not inner:
        raise PathError("syntax", "the null path is not a valid recipient")
    else:
        address = _parse_path(inner)
    return Path(address, _parse_params(rest, allowed_params))


def domain_allowed(domain: str, patterns: Iterable[str]) -> bool:
    """Whether ``domain`` matches one of ``patterns`` ("example.com" or "*.example.com").

    A wildcard matches subdomains at any depth but not the domain itself. The null path and
    address literals never match: an account may only send from its own names.
    """
    name = _normalise(domain)
    if not name or name.startswith("["):
        return False
    for pattern in patterns:
        wanted = _normalise(pattern)
        if wanted.startswith("*."):
            # Keep the dot of "*." so that "badexample.com" does not end with ".example.com".
            suffix = wanted[1:]
            if name.endswith(suffix) and len(name) > len(suffix):
                return True
        elif wanted and name == wanted:
            return True
    return False


def _normalise(domain: str) -> str:
    domain = domain.lower()
    return domain[:-1] if domain.endswith(".") else domain


def _split_argument(argument: str, keyword: str) -> tuple[str, str]:
    """The text between the angle brackets, and what follows the closing bracket."""
    if _NOT_PRINTABLE.search(argument):
        raise PathError("syntax", "only printable ASCII is accepted")  # no SMTPUTF8 (RFC 6531)
    prefix = keyword + ":"
    if argument[: len(prefix)].upper() != prefix:
        raise PathError("syntax", f"expected {prefix}<address>")
    text = argument[len(prefix) :]
    # "MAIL FROM: <a@b.c>" is outside the grammar but common; one space is tolerated.
    if text.startswith(" "):
        text = text[1:]
    if not text.startswith("<"):
        raise PathError("syntax", "the address must be enclosed in angle brackets")
    end = _closing_bracket(text)
    rest = text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise PathError("syntax", "unexpected text after the closing angle bracket")
    return text[1:end], rest


def _closing_bracket(text: str) -> int:
    """The index of the ">" that closes ``text[0]``; a quoted local part may contain ">"."""
    quoted = escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == ">":
            return index
    raise PathError("syntax", "missing closing angle bracket")


def _parse_path(inner: str) -> str:
    """The mailbox of ``<inner>`` as sent, without any source route; raises PathError."""
    mailbox = inner
    if inner.startswith("@"):
        # RFC 5321 4.1.1.3: a source route (A-d-l) must be accepted, and may be ignored.
        route, colon, mailbox = inner.partition(":")
        if not colon or not all(hop.startswith("@") and _is_domain(hop[1:]) for hop in route.split(",")):
            raise PathError("syntax", "malformed source route")
    if mailbox.startswith('"'):
        match = _QUOTED_STRING.match(mailbox)
        if match is None:
            raise PathError("syntax", "malformed quoted local part")
        local, rest = match.group(), mailbox[match.end() :]
    else:
        local, at, domain = mailbox.partition("@")
        rest = at + domain
        if not _DOT_STRING.fullmatch(local):
            raise PathError("syntax", "malformed local part")
    if not rest.startswith("@"):
        raise PathError("syntax", "the address has no domain")
    domain = rest[1:]
    if not (_is_domain(domain) or _is_address_literal(domain)):
        raise PathError("syntax", "malformed domain")
    if len(local) > MAX_LOCAL_PART:
        raise PathError("too_long", f"local part longer than {MAX_LOCAL_PART} octets")
    if len(domain) > MAX_DOMAIN:
        raise PathError("too_long", f"domain longer than {MAX_DOMAIN} octets")
    if not domain.startswith("[") and any(len(label) > MAX_LABEL for label in domain.split(".")):
        raise PathError("too_long", f"domain label longer than {MAX_LABEL} octets")
    if len(inner) + 2 > MAX_PATH:
        raise PathError("too_long", f"path longer than {MAX_PATH} octets")
    return mailbox


def is_host(text: str) -> bool:
    """True for a Domain or an address literal: what an EHLO argument should be (RFC 5321 4.1.1.1)."""
    return _is_domain(text) or _is_address_literal(text)


def _is_domain(text: str) -> bool:
    """A Domain of RFC 5321 4.1.2 with at least two labels and a top label that is not numeric.

    A single label cannot be relayed anywhere, and "a@1.2.3.4" is an address literal in
    disguise (RFC 1123 2.1): both are refused.
    """
    labels = text.split(".")
    return (
        len(labels) >= 2
        and all(_SUB_DOMAIN.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _is_address_literal(text: str) -> bool:
    """``[IPv4]`` or ``[IPv6:...]`` (RFC 5321 4.1.3); other tagged literals cannot be routed."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    body = text[1:-1]
    if body[:5].upper() == "IPV6:":
        address = body[5:]
        # ipaddress accepts a zone id ("%eth0"), which RFC 5321 4.1.3 does not.
        if not _IPV6_TEXT.fullmatch(address):
            return False
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        return True
    try:
        # ipaddress refuses leading zeros ("010"), which some stacks read as octal.
        ipaddress.IPv4Address(body)
    except ValueError:
        return False
    return True


def _parse_params(text: str, allowed: frozenset[str]) -> dict[str, str | None]:
    """ESMTP parameters after the path (RFC 5321 4.1.2 Mail-parameters); raises PathError."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        match = _PARAM.fullmatch(item)
        if match is None:
            raise PathError("param", "malformed parameter")
        keyword, value = match.group(1).upper(), match.group(2)
        if keyword not in allowed:
            raise PathError("param", f"unknown parameter {keyword}")
        if keyword in params:
            raise PathError("param", f"repeated parameter {keyword}")
        if keyword == "SIZE" and (value is None or not _SIZE_VALUE.fullmatch(value)):
            raise PathError("param", "SIZE must be a decimal number of at most 20 digits")  # RFC 1870 6
        if keyword == "BODY":
            if value is None or value.upper() not in _BODY_VALUES:
                raise PathError("param", "BODY must be 7BIT or 8BITMIME")  # RFC 6152 2
            value = value.upper()
        elif keyword in _DSN_VALUES:
            value = _DSN_VALUES[keyword](value)
        params[keyword] = value
    return params


def decode_xtext(text: str) -> str:
    """The text an RFC 3461 xtext stands for; raises ValueError when it is not xtext."""
    if not _XTEXT.fullmatch(text):
        raise ValueError("not xtext")
    return _HEXCHAR.sub(lambda match: chr(int(match.group(1), 16)), text)


def _ret(value: str | None) -> str:
    if value is None or value.upper() not in _RET_VALUES:
        raise PathError("value", "RET must be FULL or HDRS")  # RFC 3461 4.3
    return value.upper()


def _envid(value: str | None) -> str:
    if value is None:
        raise PathError("value", "ENVID needs a value")
    if len(value) > MAX_ENVID:
        raise PathError("value", f"ENVID longer than {MAX_ENVID} characters")  # RFC 3461 4.4
    return _decoded(value, "ENVID")


def _notify(value: str | None) -> str:
    """RFC 3461 4.1: NEVER, or a list of SUCCESS, FAILURE and DELAY, each at most once."""
    keywords = (value or "").upper().split(",")
    if keywords == ["NEVER"]:
        return "NEVER"
    if "NEVER" in keywords:
        raise PathError("value", "NOTIFY=NEVER cannot be combined with other values")
    if not all(keyword in _NOTIFY_VALUES for keyword in keywords):
        raise PathError("value", "NOTIFY must be NEVER or a comma list of SUCCESS, FAILURE, DELAY")
    if len(set(keywords)) != len(keywords):
        raise PathError("value", "NOTIFY names a value twice")
    return ",".join(keywords)


def _orcpt(value: str | None) -> str:
    """RFC 3461 4.2: ``addr-type ";" xtext``; only the rfc822 type is taken."""
    if value is None:
        raise PathError("value", "ORCPT needs a value: rfc822;address")
    if len(value) > MAX_ORCPT:
        raise PathError("value", f"ORCPT longer than {MAX_ORCPT} characters")
    kind, semicolon, address = value.partition(";")
    if not semicolon or kind.lower() != "rfc822":
        raise PathError("value", "ORCPT must be rfc822;address")
    return "rfc822;" + _decoded(address, "ORCPT")


def _decoded(value: str, keyword: str) -> str:
    try:
        text = decode_xtext(value)
    except ValueError:
        raise PathError("value", f"{keyword} is not valid xtext (RFC 3461 4)") from None
    if not text:
        raise PathError("value", f"{keyword} is empty")
    if not _DECODED.fullmatch(text):
        raise PathError("value", f"{keyword} must decode to printable ASCII")
    return text


_DSN_VALUES = {"RET": _ret, "ENVID": _envid, "NOTIFY": _notify, "ORCPT": _orcpt}
