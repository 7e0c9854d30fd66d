"""long_lines: long lines folded or re-encoded with their meaning kept, or refused; plain bytes."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from email.message import Message
from email.utils import getaddresses

import pytest

from smtp_proxy.long_lines import MAX_DEPTH, MAX_LINE, Unfixable, fit, has_long_line, refusal

RECIPIENTS = [f"Recipient Number {n} <recipient{n}@example.net>" for n in range(100)]
ATTACHMENT = bytes(range(256)) * 40  # 10 KiB that no text codec could pass through


def lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def longest(data: bytes) -> int:
    return max(map(len, data.splitlines()))


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def unfolded(data: bytes, name: str) -> list[bytes]:
    """The raw values of the fields ``name`` in the header block, unfolded (RFC 5322 2.2.3)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    found = re.findall(
        rb"^" + name.encode() + rb":([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.MULTILINE | re.IGNORECASE
    )
    return [re.sub(rb"\r\n(?=[ \t])", b"", value) for value in found]


def multipart(*parts: bytes, boundary: bytes = b"==b1==", subtype: bytes = b"mixed") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return (
        b"From: App <app@example.com>\r\nTo: someone@example.net\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/" + subtype + b'; boundary="' + boundary + b'"\r\n\r\n'
        b"This is a MIME message.\r\n" + body + b"--" + boundary + b"--\r\n"
    )


def base64_part(name: str = "data.bin", payload: bytes = ATTACHMENT) -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        f'Content-Type: application/octet-stream; name="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'
    ).encode() + encoded.rstrip(b"\r\n")


# --- nothing to do --------------------------------------------------------------------------------


def test_a_message_with_short_lines_comes_back_as_the_same_object() -> None:
    data = b"Subject: hi\r\n\r\n" + b"x" * MAX_LINE + b"\r\n" + b"\xff\xfe binary-ish\r\n"
    assert not has_long_line(data)
    assert fit(data) is data
    assert refusal(data) is None


def test_the_limit_is_998_octets_whatever_ends_the_line() -> None:
    for ending in (b"\r\n", b"\n", b"\r"):
        assert not has_long_line(b"a\r\n" + b"x" * 998 + ending + b"b")
        assert has_long_line(b"a\r\n" + b"x" * 999 + ending + b"b")
    assert not has_long_line(b"a\r\n" + b"x" * 998)  # the last line, without a line break
    assert has_long_line(b"a\r\n" + b"x" * 999)


@pytest.mark.parametrize("offset", [0, 1, 997, 998, 999, 65_535 - 999, 65_535, 65_536, 65_537, 131_000])
def test_a_long_line_is_found_wherever_it_starts_and_a_998_octet_one_never(offset: int) -> None:
    """The search looks at overlapping windows of 64 KiB: a line across their edge counts whole."""
    short = b"\r\n".join([b"s" * 998] * 200)  # 200 kB of lines exactly at the limit
    assert not has_long_line(short)
    data = short[:offset] + b"\r\n" + b"L" * 999 + b"\r\n" + short[offset:]
    assert has_long_line(data)
    assert not has_long_line(data.replace(b"L" * 999, b"L" * 998))


# --- header fields --------------------------------------------------------------------------------


def test_a_long_address_list_is_folded_after_commas_and_its_value_is_unchanged() -> None:
    to = b"To: " + ", ".join(RECIPIENTS).encode() + b"\r\n"
    data = b"From: App <app@example.com>\r\n" + to + b"Subject: many\r\n\r\nbody\r\n"
    assert len(to) > 4000

    fitted = fit(data)

    header = fitted.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in lines(header))
    assert unfolded(fitted, "To") == unfolded(data, "To")
    # Each fold comes right after an address's comma; no address is cut.
    continuation = [line for line in lines(header) if line.startswith(b" ")]
    assert continuation and all(re.fullmatch(rb" Recipient Number \d+ <.*>,?", line) for line in continuation)
    assert [value.replace("\r\n", "") for value in parse(fitted).get_all("To")] == [", ".join(RECIPIENTS)]
    # Only the long field changed: the rest is byte for byte.
    assert fitted.replace(header, b"") == data.replace(data.split(b"\r\n\r\n")[0], b"")
    assert fitted.startswith(b"From: App <app@example.com>\r\nTo: ") and b"\r\nSubject: many\r\n" in fitted


def test_an_address_list_without_spaces_gets_one_after_each_comma_between_addresses() -> None:
    """swaks writes ``--to a,b,c`` as one To: line with no whitespace at all."""
    addresses = [f"user{n}@example.net" for n in range(100)]
    quoted = '"Smith,John" <js@example.net>,(a,comment)jd@example.net,<@route,@r2:x@example.net>'
    to = ",".join([quoted, *addresses])
    data = b"From: app@example.com\r\nTo: " + to.encode() + b"\r\nSubject: swaks\r\n\r\nbody\r\n"

    fitted = fit(data)

    assert longest(fitted) <= 78
    (value,) = unfolded(fitted, "To")
    assert value.replace(b", ", b",") == b" " + to.encode()  # only spaces after commas were added
    assert value.startswith(b' "Smith,John" <js@example.net>, (a,comment)jd@example.net, <@route,@r2:x@ex')
    assert getaddresses(parse(fitted).get_all("To")) == getaddresses([to])
    assert [address for _name, address in getaddresses([to])][-100:] == addresses
    # Not an address field: a Subject has no addresses to space out, and no whitespace to fold at.
    assert refusal(b"Subject: " + to.replace(" ", "").encode() + b"\r\n\r\nbody\r\n") is not None


def test_a_long_subject_without_commas_folds_at_spaces_and_keeps_its_utf8() -> None:
    subject = ("Grüße aus Köln " * 120).strip().encode()
    data = b"Subject: " + subject + b"\r\nX-Short: kept\r\n\r\nbody\r\n"

    fitted = fit(data)

    assert longest(fitted) <= 78
    assert unfolded(fitted, "Subject") == [b" " + subject]
    assert b"\r\nX-Short: kept\r\n\r\nbody\r\n" in fitted


def test_a_header_with_only_far_apart_whitespace_folds_under_998_not_78() -> None:
    words = [b"a" * 600, b"b" * 900, b"c" * 400]
    data = b"X-Tokens: " + b" ".join(words) + b"\r\n\r\nbody\r\n"

    fitted = fit(data)

    assert longest(fitted) <= MAX_LINE
    assert lines(fitted)[:3] == [b"X-Tokens: " + words[0], b" " + words[1], b" " + words[2]]
    assert unfolded(fitted, "X-Tokens") == unfolded(data, "X-Tokens")


def test_a_header_is_never_folded_into_a_line_of_whitespace_only() -> None:
    data = b"X-Gap: " + b" " * 500 + b"word " * 300 + b"\r\n\r\nbody\r\n"

    fitted = fit(data)

    header = fitted.split(b"\r\n\r\n")[0]
    assert all(line.strip() for line in lines(header))
    assert longest(fitted) <= MAX_LINE
    assert unfolded(fitted, "X-Gap") == unfolded(data, "X-Gap")


def test_a_long_header_line_without_whitespace_cannot_be_fixed() -> None:
    data = b"X-Token: " + b"t" * 1200 + b"\r\nSubject: hi\r\n\r\nbody\r\n"
    with pytest.raises(Unfixable, match="no whitespace to fold at"):
        fit(data)
    assert refusal(data) == "a header line over 998 octets with no whitespace to fold at"


def test_whitespace_before_the_colon_is_no_place_to_fold() -> None:
    data = b"X-Token  : " + b"t" * 1200 + b"\r\n\r\nbody\r\n"
    assert refusal(data) is not None


# --- bodies ----------------------------------------------------------------------------------------


def test_a_long_8bit_utf8_body_line_becomes_quoted_printable_and_decodes_the_same() -> None:
    text = ("Grüße aus Köln, " * 120 + "Ende.\r\nZweite Zeile  \r\n.punkt\r\n").encode()
    data = (
        b"From: App <app@example.com>\r\nSubject: umlauts\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text
    )

    fitted = fit(data)

    assert longest(fitted) <= 76
    message = parse(fitted)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert message.get_payload(decode=True) == text
    assert message.get_content_charset() == "utf-8"
    assert fitted.startswith(b"From: App <app@example.com>\r\nSubject: umlauts\r\nMIME-Version: 1.0\r\n")
    assert fitted.isascii()


def test_a_plain_message_without_mime_headers_gets_them_with_the_encoding() -> None:
    text = b"word " * 400 + b"\r\nlast line\r\n"
    data = b"From: app@example.com\r\nSubject: plain\r\n\r\n" + text

    fitted = fit(data)

    message = parse(fitted)
    assert (message["MIME-Version"], message["Content-Transfer-Encoding"]) == ("1.0", "quoted-printable")
    assert message.get_payload(decode=True) == text
    assert longest(fitted) <= 76


def test_a_message_without_any_header_gets_a_header_block() -> None:
    text = b"y" * 1500 + b"\r\n"
    fitted = fit(text)
    message = parse(fitted)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_payload(decode=True) == text


def test_a_binary_part_keeps_every_octet_through_quoted_printable() -> None:
    payload = b"\x00\r\n\x01" + b"z" * 2000 + b"\r\n\r\n\xff"  # no bare CR or LF: SMTP cannot carry them
    part = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n" + payload
    data = multipart(b"Content-Type: text/plain\r\n\r\nshort\r\n", part)

    fitted = fit(data)

    assert longest(fitted) <= 76
    (_text, binary) = parse(fitted).get_payload()
    assert binary["Content-Transfer-Encoding"] == "quoted-printable"
    assert binary.get_payload(decode=True) == payload


def test_bare_line_endings_become_crlf_before_the_fix() -> None:
    data = b"Subject: lf\nContent-Type: text/plain\n\n" + b"x" * 1200 + b"\nend\n"
    fitted = fit(data)
    assert b"\n" not in fitted.replace(b"\r\n", b"")
    assert parse(fitted).get_payload(decode=True) == b"x" * 1200 + b"\r\nend\r\n"


def test_multipart_the_long_text_part_is_reencoded_and_the_attachment_kept_byte_for_byte() -> None:
    text = ("Ein langer Absatz über alles. " * 60).encode() + b"\r\n"
    html = b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>short</p>"
    attachment = base64_part()
    data = multipart(b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text, html, attachment)

    fitted = fit(data)

    assert longest(fitted) <= 76
    assert b"\r\n" + attachment + b"\r\n--==b1==--\r\n" in fitted  # untouched, byte for byte
    assert b"\r\n--==b1==\r\n" + html + b"\r\n--==b1==\r\n" in fitted
    assert fitted.startswith(data.split(b"\r\n--==b1==\r\n")[0])  # headers and preamble
    plain, html_part, binary = parse(fitted).get_payload()
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert plain.get_payload(decode=True) == text
    assert html_part.get_payload(decode=True) == b"<p>short</p>"
    assert binary.get_payload(decode=True) == ATTACHMENT


def test_nested_multiparts_and_an_attached_message_are_walked_into() -> None:
    inner_message = (
        b"From: other@example.org\r\nTo: "
        + ", ".join(RECIPIENTS).encode()
        + b"\r\nSubject: fwd\r\n\r\n"
        + b"forwarded " * 200
        + b"\r\n"
    )
    alternative = multipart(
        b"Content-Type: text/plain\r\n\r\n" + b"plain " * 300,
        b"Content-Type: text/html\r\n\r\n<p>" + b"html " * 300 + b"</p>",
        boundary=b"alt",
        subtype=b"alternative",
    ).split(b"\r\n", 4)[4]  # its Content-Type and body: drop From/To/Subject/MIME-Version
    data = multipart(alternative, b"Content-Type: message/rfc822\r\n\r\n" + inner_message, base64_part())

    fitted = fit(data)

    assert longest(fitted) <= 78
    parsed = parse(fitted)
    alternative_part, attached, binary = parsed.get_payload()
    plain, html = alternative_part.get_payload()
    assert plain.get_payload(decode=True) == b"plain " * 300
    assert html.get_payload(decode=True) == b"<p>" + b"html " * 300 + b"</p>"
    (forwarded,) = attached.get_payload()
    assert forwarded["To"].replace("\r\n", "") == ", ".join(RECIPIENTS)
    assert forwarded.get_payload(decode=True) == b"forwarded " * 200 + b"\r\n"
    assert binary.get_payload(decode=True) == ATTACHMENT


def test_a_quoted_printable_line_too_long_gets_soft_breaks_outside_escapes() -> None:
    line = b"caf=C3=A9 " * 150  # 1,500 octets of valid quoted-printable on one line
    part = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    data = b"Subject: qp\r\nMIME-Version: 1.0\r\n" + part + line + b"\r\n"

    fitted = fit(data)

    assert longest(fitted) <= 76
    assert parse(fitted).get_payload(decode=True) == parse(data).get_payload(decode=True)
    assert parse(fitted).get_payload(decode=True) == "café ".encode() * 150 + b"\r\n"


def test_base64_on_one_long_line_is_wrapped_and_decodes_the_same() -> None:
    part = base64_part().split(b"\r\n\r\n")[0] + b"\r\n\r\n" + base64.b64encode(ATTACHMENT)
    data = multipart(b"Content-Type: text/plain\r\n\r\nsee attached", part)

    fitted = fit(data)

    assert longest(fitted) <= 76
    assert parse(fitted).get_payload()[1].get_payload(decode=True) == ATTACHMENT
    assert b"see attached" in fitted


# --- what cannot be fixed --------------------------------------------------------------------------


@pytest.mark.parametrize("subtype", [b"signed", b"encrypted"])
def test_a_long_line_under_a_signature_or_encryption_cannot_be_fixed(subtype: bytes) -> None:
    signed = b"Content-Type: text/plain\r\n\r\n" + b"s" * 1200
    signature = b"Content-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----"
    data = multipart(signed, signature, subtype=subtype)
    assert refusal(data) == f"a line over 998 octets inside multipart/{subtype.decode()}"


def test_a_long_header_line_of_a_signed_message_itself_is_folded() -> None:
    """The outer header of multipart/signed is not signed (RFC 1847 2.1): folding it is safe."""
    signed = b"Content-Type: text/plain\r\n\r\nshort"
    data = multipart(signed, b"Content-Type: application/pgp-signature\r\n\r\nsig", subtype=b"signed")
    data = data.replace(b"To: someone@example.net", b"To: " + ", ".join(RECIPIENTS).encode())
    fitted = fit(data)
    assert longest(fitted) <= 78
    assert fitted.split(b"\r\n\r\n", 1)[1] == data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    ("part", "why"),
    [
        (
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n" + b"u" * 1200,
            "a line over 998 octets under Content-Transfer-Encoding x-uuencode",
        ),
        (
            b"Content-Type: message/partial; id=x; number=1\r\n\r\n" + b"p" * 1200,
            "a line over 998 octets inside message/partial",
        ),
        (
            b"Content-Type: multipart/mixed\r\n\r\n" + b"m" * 1200,
            "a line over 998 octets in a multipart/mixed without a boundary",
        ),
    ],
)
def test_a_long_line_in_a_part_we_must_not_reencode_cannot_be_fixed(part: bytes, why: str) -> None:
    assert refusal(multipart(b"Content-Type: text/plain\r\n\r\nok", part)) == why


def test_a_long_line_in_the_preamble_cannot_be_fixed() -> None:
    data = multipart(b"Content-Type: text/plain\r\n\r\nok").replace(b"This is a MIME message.", b"p" * 1200)
    assert refusal(data) == "a line over 998 octets in a multipart preamble"


def test_what_refusal_accepts_fit_fixes_and_what_it_refuses_fit_raises_on() -> None:
    """One walk decides both: the listener never takes what the worker cannot fix."""
    samples = [
        b"Subject: " + b"w " * 800 + b"\r\n\r\nbody\r\n",
        b"X-T: " + b"t" * 1200 + b"\r\n\r\nbody\r\n",
        multipart(b"Content-Type: text/plain\r\n\r\n" + b"x" * 1500, base64_part()),
        multipart(b"Content-Type: text/plain\r\n\r\n" + b"x" * 1500, b"sig", subtype=b"signed"),
    ]
    for data in samples:
        why = refusal(data)
        if why is None:
            assert longest(fit(data)) <= MAX_LINE
        else:
            with pytest.raises(Unfixable, match=re.escape(why)):
                fit(data)


@pytest.mark.parametrize("kind", [b"multipart/mixed; boundary=B", b"message/rfc822"])
@pytest.mark.parametrize("encoding", [b"base64", b"quoted-printable"])
def test_a_multipart_or_message_under_a_transfer_encoding_is_refused_not_flattened(
    kind: bytes, encoding: bytes
) -> None:
    """RFC 2045 6.4 forbids it and readers ignore it: re-encoding the body as the encoding names
    would have destroyed the parts."""
    inner = (
        b"--B\r\nContent-Type: text/plain\r\n\r\nhello world\r\n--B\r\n\r\n" + b"long " * 300 + b"\r\n--B--"
    )
    data = (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: " + kind + b"\r\n"
        b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n" + inner + b"\r\n"
    )
    why = refusal(data)
    assert why is not None and f"under Content-Transfer-Encoding {encoding.decode()}" in why
    assert "RFC 2045 6.4" in why
    with pytest.raises(Unfixable):
        fit(data)


def nested(depth: int) -> bytes:
    """A message of ``depth`` entities within each other (itself included), a long line innermost."""
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
        for level in range(depth - 1)
    )
    closing = b"".join(b"\r\n--b%d--" % level for level in reversed(range(depth - 1)))
    return (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
        + opening
        + b"Content-Type: text/plain\r\n\r\n"
        + b"x" * 1200
        + closing
        + b"\r\n"
    )


def test_parts_nested_up_to_the_limit_are_fitted_and_deeper_ones_refused_without_exhausting_the_stack() -> (
    None
):
    fitted = fit(nested(MAX_DEPTH))
    assert longest(fitted) <= MAX_LINE
    assert b"Content-Transfer-Encoding: quoted-printable" in fitted
    for depth in (MAX_DEPTH + 1, 600):  # 600 overflowed the stack once, a 421 and a traceback
        assert refusal(nested(depth)) == f"a line over 998 octets in parts nested over {MAX_DEPTH} deep"
