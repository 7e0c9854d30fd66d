"""Lines over 998 octets (RFC 5322 2.1.1): whether a message can be made to fit, and the fit.

A server may refuse a line longer than 1000 octets with its CRLF (RFC 5321 4.5.3.1.6), and some
providers do, with ``500 Line too long``: a message the listener already answered 250 would be
lost there. So the worker makes every message fit before it signs and sends it (``fit``), and the
listener refuses at the end of DATA what cannot be made to fit (``refusal``). Both run the same
walk of the MIME structure, so the listener never accepts what the worker cannot fix.

Only what holds a long line changes, and never its meaning:

- a header line is folded before whitespace (RFC 5322 2.2.3), after a comma where it can and to
  78 octets where it can; unfolding gives back the same value. An address list written without
  spaces ("a@x,b@y", as swaks writes one) first gets a space after each comma between
  addresses, which changes no address (RFC 5322 3.4);
- a leaf part in 7bit, 8bit, binary or no Content-Transfer-Encoding is encoded quoted-printable
  (RFC 2045 6.7), its header says so (and the message's ``MIME-Version`` when it had none); a
  quoted-printable line gets soft line breaks, base64 is wrapped again: decoded, it is the same;
- a message/rfc822 part is walked into like the message itself.

Refused, as ``Unfixable``: a header line with no whitespace to fold at; a long line inside
multipart/signed or multipart/encrypted (any change breaks the signature), under a transfer
encoding not named above, in message/partial or message/external-body (fragments that must not
be re-encoded), in a multipart's preamble or epilogue, in a multipart without its boundary, in a
multipart or message/rfc822 under a transfer encoding (RFC 2045 6.4 forbids one: readers ignore
it, so re-encoding the body would destroy the parts), or in parts nested over MAX_DEPTH deep
(Postfix's ``mime_nesting_limit``; deeper would exhaust the stack).

Every other byte stays as it was: parts are cut out of the message at their boundaries and put
back, never rebuilt through ``email.generator``. The ``email`` package only reads a part's
header fields.

Pure, part of the listener's core: standard library only, no I/O.
"""

from __future__ import annotations

import binascii
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

__all__ = ["MAX_LINE", "Unfixable", "fit", "has_long_line", "refusal"]

MAX_LINE = 998  # octets, without the CRLF (RFC 5322 2.1.1)
MAX_DEPTH = 100  # multiparts and messages within each other, the message itself included
FOLD_AT = 78  # what a folded header line keeps to where it can (RFC 5322 2.1.1)
_WINDOW = 1 << 16  # octets of a message looked at at once for long lines
_LINE_OR_NOT = bytes(octet if octet in b"\r\n" else ord("a") for octet in range(256))
_RUN = b"a" * (MAX_LINE + 1)
QP_LINE = 76  # the longest encoded line, soft break included (RFC 2045 6.7 (5))
BASE64_LINE = 76  # RFC 2045 6.8

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_WSP = re.compile(rb"[ \t]")
_FIELD_END = re.compile(rb"\n(?![ \t])")  # a line break not followed by a continuation line
_TEXT = re.compile(rb"[^ \t]")
# The first line that is neither a field's first line (its name and colon, obsolete WSP before
# the colon allowed, RFC 5322 4.5) nor a continuation: the empty line, or the body's first.
# Searched in C (a header may be huge): a sixth of the time of matching the fields themselves.
_NOT_A_FIELD = re.compile(rb"^(?![!-9;-~]+[ \t]*:|[ \t])", re.MULTILINE)
# The fields that say how a part is encoded; the email package reads only these.
_MIME_FIELD = re.compile(
    rb"^(?:content-type|content-transfer-encoding|mime-version)[ \t]*:[^\n]*\n?(?:[ \t][^\n]*\n?)*",
    re.IGNORECASE | re.MULTILINE,
)
_WHITESPACE = re.compile(rb"\s+")
_IDENTITY = frozenset({"", "7bit", "8bit", "binary"})
_MESSAGES = frozenset({"message/rfc822", "message/global"})
_FRAGMENTS = frozenset({"message/partial", "message/external-body"})
_SEALED = frozenset({"multipart/signed", "multipart/encrypted"})
_COMMA, _SPACE, _TAB, _QUOTE, _BACKSLASH = (ord(c) for c in ', \t"\\')
_OPENING, _CLOSING = b"(<[", b")>]"
_ADDRESS_SPECIAL = re.compile(rb'[\\"(<\[)>\],]')
_ADDRESS_NESTING = re.compile(rb'[\\"(<\[]')
_BARE_COMMA = re.compile(rb",(?![ \t\r])")
# An address field is read octet by octet for its commas only up to this size (a few ms);
# past it (no real list is that long) it is folded at the whitespace it has.
MAX_SPACED = 1 << 20
# RFC 5322 3.6.2, 3.6.3 and 3.6.6: the fields that hold address lists.
_ADDRESS_FIELDS = frozenset(
    b"from sender reply-to to cc bcc resent-from resent-sender resent-to resent-cc resent-bcc".split()
)


class Unfixable(ValueError):
    """A line over MAX_LINE octets that cannot be shortened without changing the message; the
    text says where, for the logs."""


def has_long_line(data: bytes) -> bool:
    """True when a line of ``data`` is longer than MAX_LINE octets (CR, LF or CRLF ends a line).

    What a message that needs nothing pays: about 2 ms per MB whatever its lines, in C. Every
    octet but CR and LF becomes "a", and a run of MAX_LINE + 1 of them is searched for (a regex
    costs six times that; ``splitlines`` makes an object per line, a second per 3 MB of empty
    lines). One window at a time, so the copy stays small: a line that starts in a window has its
    first MAX_LINE + 1 octets in it (windows overlap by that much), and a piece of a line is never
    longer than the line, so no long line is missed and none is imagined.
    """
    size = len(data)
    if size <= MAX_LINE:
        return False
    for start in range(0, size, _WINDOW):
        if _RUN in data[start : start + _WINDOW + MAX_LINE + 1].translate(_LINE_OR_NOT):
            return True
    return False


def refusal(data: bytes) -> str | None:
    """Why ``data`` cannot be made to fit (the ``Unfixable`` text), or None when it fits or can."""
    if not has_long_line(data):
        return None
    try:
        fit(data)
    except Unfixable as error:
        return str(error)
    return None


def fit(data: bytes) -> bytes:
    """``data`` with every line at most MAX_LINE octets, the same message once decoded; ``data``
    itself when no line is too long. Line breaks become CRLF when something is changed.

    Raises Unfixable.
    """
    if not has_long_line(data):
        return data
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        data = _LINE_BREAK.sub(b"\r\n", data)  # RFC 5321 2.3.8, as the message goes out anyway
    return _fit_entity(data, "text/plain", message=True, depth=1)


def _fit_entity(entity: bytes, default_type: str, *, message: bool, depth: int) -> bytes:
    """A message or body part made to fit; ``message``: it is a whole message (it may need
    MIME-Version); ``depth``: how many entities hold it, itself included."""
    if not has_long_line(entity):
        return entity
    if depth > MAX_DEPTH:
        raise Unfixable(f"a line over {MAX_LINE} octets in parts nested over {MAX_DEPTH} deep")
    header, separator, body = _split(entity)
    fields = BytesHeaderParser(policy=compat32).parsebytes(b"".join(_MIME_FIELD.findall(header)))
    fields.set_default_type(default_type)
    header = _fold_header(header)
    if not has_long_line(body):
        return header + separator + body
    content_type = fields.get_content_type()
    encoding = str(fields.get("Content-Transfer-Encoding", "")).strip().lower()
    if content_type in _SEALED:
        raise Unfixable(f"a line over {MAX_LINE} octets inside {content_type}")
    if content_type.startswith("multipart/") or content_type in _MESSAGES:
        if encoding not in _IDENTITY:
            raise Unfixable(
                f"a line over {MAX_LINE} octets in a {content_type} under Content-Transfer-Encoding "
                f"{encoding[:40]} (RFC 2045 6.4 allows only 7bit, 8bit or binary)"
            )
        if content_type in _MESSAGES:
            return header + separator + _fit_entity(body, "text/plain", message=True, depth=depth + 1)
        return header + separator + _fit_multipart(body, fields, content_type, depth)
    if content_type in _FRAGMENTS:
        raise Unfixable(f"a line over {MAX_LINE} octets inside {content_type}")
    if encoding in _IDENTITY:
        header = _set_field(header, b"Content-Transfer-Encoding", b"quoted-printable")
        if message and fields.get("MIME-Version") is None:
            header = _set_field(header, b"MIME-Version", b"1.0")  # else the encoding goes unread
        return header + (separator or b"\r\n") + _quoted_printable(body, text=encoding != "binary")
    if encoding == "quoted-printable":
        return header + separator + _soft_breaks(body)
    if encoding == "base64":
        return header + separator + _rewrap_base64(body)
    raise Unfixable(f"a line over {MAX_LINE} octets under Content-Transfer-Encoding {encoding[:40]}")


def _split(entity: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block, the empty line after it or b"", body). The header block ends at the first
    empty line, or at the first line that is neither a field nor a continuation (the body starts
    there, as ``email.parser`` reads it)."""
    found = _NOT_A_FIELD.search(entity)
    end = found.start() if found else len(entity)
    if entity.startswith(b"\r\n", end):
        return entity[:end], b"\r\n", entity[end + 2 :]
    return entity[:end], b"", entity[end:]


def _fold_header(header: bytes) -> bytes:
    """The header block with each field that has a line over MAX_LINE folded; every other
    field as it was. The long lines are found in C, so a header of many fields costs little."""
    if not has_long_line(header):
        return header
    shape = header.translate(_LINE_OR_NOT)
    pieces = []
    done = 0
    while (long := shape.find(_RUN, done)) >= 0:
        start = header.rfind(b"\n", 0, long) + 1
        while start > done and header[start] in (_SPACE, _TAB):  # back to the field's first line
            start = header.rfind(b"\n", 0, start - 1) + 1
        after = _FIELD_END.search(header, long)
        end = after.end() if after else len(header)
        field = header[start:end]
        ending = b"\r\n" if field.endswith(b"\r\n") else b""
        pieces += [header[done:start], _fold_field(field.removesuffix(b"\r\n")) + ending]
        done = end
    pieces.append(header[done:])
    return b"".join(pieces)


def _fold_field(field: bytes) -> bytes:
    """One header field, its lines over MAX_LINE folded (an address list spaced first)."""
    name, colon, _value = field.partition(b":")
    if colon and name.strip().lower() in _ADDRESS_FIELDS:
        field = _spaced_commas(field, len(name) + 1)
    lines = field.split(b"\r\n")
    return b"\r\n".join(piece for number, line in enumerate(lines) for piece in _fold_line(line, number == 0))


def _spaced_commas(field: bytes, start: int) -> bytes:
    """An address field with a space after each comma between addresses that has none, so it
    can be folded there: "a@x,b@y" (as swaks writes a list) means what "a@x, b@y" means, since
    CFWS may surround every address (RFC 5322 3.4). Commas in quoted strings, comments, angle
    brackets and domain literals are not between addresses and are left alone. A field over
    MAX_SPACED octets with any of those is left as it is."""
    if not _ADDRESS_NESTING.search(field, start):
        return field[:start] + _BARE_COMMA.sub(b", ", field[start:])  # the usual case, in C
    if len(field) > MAX_SPACED:
        return field
    cuts = []
    quoted = False
    nested = 0  # comments, angle brackets, domain literals
    position = start
    while special := _ADDRESS_SPECIAL.search(field, position):
        octet = field[special.start()]
        position = special.end()
        if octet == _BACKSLASH:
            position += quoted or nested > 0  # a quoted pair: the next octet is text
        elif octet == _QUOTE and not nested:
            quoted = not quoted
        elif quoted:
            continue
        elif octet in _OPENING:
            nested += 1
        elif octet in _CLOSING:
            nested = max(0, nested - 1)
        elif octet == _COMMA and not nested and field[position : position + 1] not in (b" ", b"\t", b"\r"):
            cuts.append(position)
    if not cuts:
        return field
    pieces = [field[begin:end] for begin, end in zip([0, *cuts], [*cuts, len(field)], strict=True)]
    return b" ".join(pieces)


def _fold_line(line: bytes, first: bool) -> list[bytes]:
    """``line`` cut before whitespace into lines of at most FOLD_AT octets where it can, and at
    most MAX_LINE always; itself alone when it is not over MAX_LINE. Each break goes before a
    run of whitespace, after a comma if one is in reach (an address list breaks between
    addresses), and leaves text on the line it ends (RFC 5322 2.2.3: no line of whitespace
    only). ``first``: the field's first line, which breaks only inside its value, past the
    colon and the first word (a line of the name alone gains nothing). Raises Unfixable."""
    if len(line) <= MAX_LINE:
        return [line]
    after = 0
    if first:
        value = _TEXT.search(line, line.find(b":") + 1)
        after = value.start() if value else len(line)
    pieces = []
    start = 0
    while len(line) - start > FOLD_AT:
        text = _TEXT.search(line, start)
        floor = max(after, text.start() if text else len(line))  # a break must come after this
        reach = start + FOLD_AT
        at = max(line.rfind(b", ", floor, reach + 1), line.rfind(b",\t", floor, reach + 1))
        if at >= 0:
            at += 1  # after the comma of an address list
        else:
            at = max(line.rfind(b" ", floor + 1, reach + 1), line.rfind(b"\t", floor + 1, reach + 1))
            while at - 1 > floor and line[at - 1] in (_SPACE, _TAB):
                at -= 1  # to the start of the run of whitespace
        if at < 0:
            beyond = _WSP.search(line, max(floor + 1, reach + 1))
            at = beyond.start() if beyond else -1
        if at < 0 or at - start > MAX_LINE:
            if len(line) - start <= MAX_LINE:
                break
            raise Unfixable(f"a header line over {MAX_LINE} octets with no whitespace to fold at")
        pieces.append(line[start:at])
        start = at
    pieces.append(line[start:])
    return pieces


def _fit_multipart(body: bytes, fields: Message, content_type: str, depth: int) -> bytes:
    """A multipart body (at ``depth``) with its long-lined parts made to fit, every other byte
    as it was."""
    boundary = fields.get_boundary()
    if not boundary:
        raise Unfixable(f"a line over {MAX_LINE} octets in a {content_type} without a boundary")
    marker = re.escape(boundary.encode("ascii", "surrogateescape"))
    # RFC 2046 5.1.1: "--" boundary, "--" again on the last, transport padding; the CRLF before
    # a delimiter belongs to it, not to the part.
    delimiters = list(re.finditer(rb"^--" + marker + rb"(--)?[ \t]*\r?$", body, re.MULTILINE))
    if not delimiters:
        raise Unfixable(f"a line over {MAX_LINE} octets in a {content_type} without a boundary")
    if has_long_line(body[: delimiters[0].start()]):
        raise Unfixable(f"a line over {MAX_LINE} octets in a multipart preamble")
    default_type = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
    pieces = []
    done = 0
    for number, delimiter in enumerate(delimiters):
        if delimiter.group(1):  # the close delimiter: what follows is the epilogue
            if has_long_line(body[delimiter.end() :]):
                raise Unfixable(f"a line over {MAX_LINE} octets in a multipart epilogue")
            break
        start = delimiter.end() + 1  # past the LF of the delimiter line
        if number + 1 < len(delimiters):
            end = max(start, delimiters[number + 1].start() - 2)
        else:
            end = len(body)  # no close delimiter: the part runs to the end
        part = body[start:end]
        if has_long_line(part):
            pieces += [body[done:start], _fit_entity(part, default_type, message=False, depth=depth + 1)]
            done = end
    pieces.append(body[done:])
    return b"".join(pieces)


def _set_field(header: bytes, name: bytes, value: bytes) -> bytes:
    """``header`` with the field ``name`` set to ``value``: the first one replaced, any other
    removed, or added at the end of the block."""
    field = re.compile(
        rb"^" + re.escape(name) + rb"[ \t]*:.*\r?\n(?:[ \t].*\r?\n)*", re.IGNORECASE | re.MULTILINE
    )
    line = name + b": " + value + b"\r\n"
    first = field.search(header)
    if first is not None:
        return header[: first.start()] + line + field.sub(b"", header[first.end() :])
    if header and not header.endswith(b"\n"):
        header += b"\r\n"
    return header + line


def _quoted_printable(body: bytes, *, text: bool) -> bytes:
    """``body`` encoded quoted-printable with CRLF line breaks. ``text``: its CRLFs are line
    breaks and stay so; else (binary) every octet is data, and a final CRLF is kept as the hard
    break that ends the last line."""
    if text:
        encoded = binascii.b2a_qp(body, istext=True)
    elif body.endswith(b"\r\n"):
        encoded = binascii.b2a_qp(body[:-2], istext=False) + b"\r\n"
    else:
        encoded = binascii.b2a_qp(body, istext=False)
    return _BARE_LF.sub(b"\r\n", encoded)  # soft breaks come as LF when the input has no CRLF


def _soft_breaks(body: bytes) -> bytes:
    """A quoted-printable body with each line over QP_LINE cut by soft line breaks, never
    inside an =XX escape; decoded, it is the same."""
    lines = body.split(b"\r\n")
    for number, line in enumerate(lines):
        if len(line) <= MAX_LINE:
            continue
        pieces = []
        start = 0
        while len(line) - start > QP_LINE:
            cut = start + QP_LINE - 1  # room for the "="
            escape = line.rfind(b"=", cut - 2, cut)
            if escape > start:
                cut = escape
            pieces.append(line[start:cut] + b"=")
            start = cut
        pieces.append(line[start:])
        lines[number] = b"\r\n".join(pieces)
    return b"\r\n".join(lines)


def _rewrap_base64(body: bytes) -> bytes:
    """A base64 body in lines of BASE64_LINE; decoders skip line breaks, so it decodes the same."""
    letters = _WHITESPACE.sub(b"", body)
    wrapped = b"\r\n".join(letters[i : i + BASE64_LINE] for i in range(0, len(letters), BASE64_LINE))
    return wrapped + b"\r\n" if body.endswith(b"\r\n") else wrapped
