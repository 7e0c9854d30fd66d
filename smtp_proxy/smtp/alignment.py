"""Whether a message's From: and Sender: header addresses belong to the sending account.

Part of the pure protocol core: standard library only (the ``email`` package), no I/O.
MAIL FROM is checked against the account's domains when it arrives; this checks the other
half of a spoof, the header address a mail client shows and DMARC aligns on (RFC 7489 3.1).

The attack here is a parser differential: a value read as "me@ok.example" here but shown as
"ceo@bank.example" by the recipient's client. So the checks are strict:

- The fields are found by a search of the header block, up to the first empty line
  (RFC 5322 2.1). ``email.parser`` ends the header block at the first line without a colon,
  and reads "From : x" (RFC 5322 4.5.3 obsolete syntax) as an mbox separator, so a From:
  field after either would go unseen.
- Each value is parsed by the ``email`` package's RFC 5322 address parser
  (``policy.default``): display names, RFC 2047 encoded words, comments and groups are read
  as a client reads them, and only real addresses are judged, never display names.
- A value the parser had to repair (an ``InvalidHeaderDefect``: it skipped text it could not
  read) is not allowed as a whole. Obsolete syntax (RFC 5322 4) and an address without a
  domain, read in the envelope sender's domain, are accepted.
"""

from __future__ import annotations

import email.errors
import email.policy
import re
from collections.abc import Iterator, Sequence
from itertools import islice

from smtp_proxy.smtp.addresses import domain_allowed

__all__ = ["misaligned_header_address"]

_CHECKED_FIELDS = ("from", "sender")
# The address parser is quadratic on some inputs (a long run of '"'), so a value longer
# than a header line may be (RFC 5322 2.1.1) and more fields than a sane message has are
# refused unread. RFC 5322 3.6 allows one From: and one Sender:.
MAX_VALUE = 998
MAX_FIELDS = 4
_SHOWN = 80  # characters of an unreadable value returned for the logs
# The empty line that ends the header block (RFC 5322 2.1), or an empty first line.
_END_OF_HEADER = re.compile(rb"(?:^|\n)\r?\n")
# A field and its continuation lines; "From :" is obsolete syntax (RFC 5322 4.5.3) that
# some clients still read. Searched at C speed: a message may be all header lines.
_FIELD = re.compile(rb"^(from|sender)[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_LINE_BREAK = re.compile(rb"\r?\n")
_HARMLESS_DEFECTS = (email.errors.ObsoleteHeaderDefect, email.errors.NonASCIILocalPartDefect)
# The header class the parser builds; HeaderRegistry makes a new class on every lookup.
_ADDRESS_HEADER = email.policy.default.header_factory["from"]
# What nearly every message has: "addr" or "Plain Name <addr>", with no character that could
# start a quoted string, comment, group, encoded word or second address. Such a value means
# the same to every parser, so it is judged without the full one (a seventh of a session's CPU).
_DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/^_`{|}~-]+)*"
_PLAIN = re.compile(
    rf"(?:[A-Za-z0-9 '_-]*<(?P<bracketed>{_DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
    rf"|(?P<bare>{_DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*))"
)


def misaligned_header_address(
    data: bytes, allowed_domains: Sequence[str], envelope_sender: str
) -> str | None:
    """The first From:, then Sender:, address outside ``allowed_domains``, or None.

    An unreadable value is returned shortened, as not allowed. None also when there is no
    From: at all: the envelope sender, already checked, is then all a client can show.
    """
    patterns = [pattern for pattern in map(_ascii_pattern, allowed_domains) if pattern]
    envelope_domain = envelope_sender.rpartition("@")[2] if "@" in envelope_sender else ""
    fields = sorted(islice(_fields(data), MAX_FIELDS + 1), key=lambda field: _CHECKED_FIELDS.index(field[0]))
    if len(fields) > MAX_FIELDS:
        return _shorten(fields[MAX_FIELDS][1])
    for _name, value in fields:
        refused = _refused_address(value, patterns, envelope_domain)
        if refused is not None:
            return refused
    return None


def _fields(data: bytes) -> Iterator[tuple[str, str]]:
    """(lower-case name, unfolded value) of each From:/Sender: field in the header block."""
    end = _END_OF_HEADER.search(data)
    block = data if end is None else data[: end.start()]
    for match in _FIELD.finditer(block):
        # RFC 5322 2.2.3: unfolding removes only the line breaks.
        value = _LINE_BREAK.sub(b"", match.group(2))
        yield match.group(1).lower().decode("ascii"), value.decode("utf-8", "replace").strip()


def _refused_address(value: str, patterns: list[str], envelope_domain: str) -> str | None:
    if len(value) > MAX_VALUE:
        return _shorten(value)
    plain = _PLAIN.fullmatch(value)
    if plain is not None:
        address = plain.group("bracketed") or plain.group("bare")
        return None if domain_allowed(address.rpartition("@")[2], patterns) else address
    return _parsed_refusal(value, patterns, envelope_domain)


def _parsed_refusal(value: str, patterns: list[str], envelope_domain: str) -> str | None:
    """The full RFC 5322 reading of a value, for everything the plain pattern does not take."""
    try:
        header = _ADDRESS_HEADER("from", value)
        addresses = header.addresses
    except Exception:  # noqa: BLE001 - the parser raises on some garbage ("((((..." recurses too deep)
        return _shorten(value)
    if not addresses or any(_serious(defect) for defect in header.defects):
        return _shorten(value)
    for address in addresses:
        username, domain = address.username, address.domain
        if not username and not domain:
            return _shorten(value)  # "<>": no address at all
        if not domain:
            # An encoded word may decode to a whole address ("=?utf-8?q?ceo@bank.example?="):
            # judge what a client would show; a bare local part is read in the envelope's domain.
            domain = username.rpartition("@")[2] if "@" in username else envelope_domain
        ascii_domain = _ascii_domain(domain)
        if ascii_domain is None or not domain_allowed(ascii_domain, patterns):
            return address.addr_spec
    return None


def _serious(defect: email.errors.MessageDefect) -> bool:
    """A defect that means the parser skipped or mended text, so the addresses may be wrong."""
    if isinstance(defect, _HARMLESS_DEFECTS):
        return False
    # The parser's own words for a local part alone ("alice"), which RFC 5322 4.4 allows.
    return not (isinstance(defect, email.errors.InvalidHeaderDefect) and "no domain" in str(defect))


def _ascii_domain(domain: str) -> str | None:
    """The A-label form (RFC 5890), so "bücher.example" matches "xn--bcher-kva.example"; None if invalid."""
    if domain.isascii():
        return domain
    try:
        # The idna codec also maps the ideographic and full-width dots to ".".
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def _ascii_pattern(pattern: str) -> str | None:
    if pattern.startswith("*."):
        rest = _ascii_domain(pattern[2:])
        return None if rest is None else "*." + rest
    return _ascii_domain(pattern)


def _shorten(value: str) -> str:
    shown = "".join(char if char.isprintable() else "?" for char in " ".join(value.split()))
    if not shown:
        return "(empty)"
    return shown if len(shown) <= _SHOWN else shown[: _SHOWN - 3] + "..."
