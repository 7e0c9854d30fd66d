"""misaligned_header_address: the From:/Sender: header addresses against the account's domains."""

from __future__ import annotations

import pytest

from smtp_proxy.smtp import alignment
from smtp_proxy.smtp.alignment import MAX_FIELDS, MAX_VALUE, misaligned_header_address

ALLOWED = ("ok.example", "*.corp.example")
ENVELOPE = "me@ok.example"


def check(headers: bytes, allowed=ALLOWED, envelope: str = ENVELOPE) -> str | None:
    return misaligned_header_address(headers + b"\r\n\r\nbody\r\n", allowed, envelope)


@pytest.mark.parametrize(
    "value",
    [
        b"me@ok.example",
        b"<me@ok.example>",
        b"Me <me@ok.example>",
        b'"Doe, John" <john@ok.example>',
        b"John Q. Public <jqp@ok.example>",  # obsolete syntax: a period in a phrase
        b"me@ok.example (ceo@bank.example)",  # a comment is not an address
        b'"ceo@bank.example" <me@ok.example>',  # nor is a quoted display name
        b"=?utf-8?q?ceo@bank.example?= <me@ok.example>",  # nor an encoded one (RFC 2047)
        b"=?utf-8?b?Q0VPIDxjZW9AYmFuay5leGFtcGxlPg==?= <me@ok.example>",
        b"me@OK.Example",  # domains are case-insensitive
        b"me@mail.corp.example",  # wildcard pattern
        b"Ann <ann@ok.example>, Bob <bob@a.corp.example>",  # several mailboxes in one From:
        b"team: a@ok.example, b@x.corp.example;",  # a group (RFC 6854)
        b"Jos\xc3\xa9 <jose@ok.example>",  # raw UTF-8 display name (RFC 6532)
        b"<@relay.example:me@ok.example>",  # obsolete route, ignored by clients
        b"alice",  # no domain: read in the envelope sender's domain
        b"Alice <alice>",
        b'"ceo@bank.example"@ok.example',  # the domain is what follows the last @
    ],
)
def test_allowed_from_values(value: bytes) -> None:
    assert check(b"From: " + value) is None


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        (b"ceo@bank.example", "ceo@bank.example"),
        (b"CEO <ceo@BANK.example>", "ceo@BANK.example"),
        (b"me@ok.example.bank.example", "me@ok.example.bank.example"),
        (b"me@notok.example", "me@notok.example"),
        (b"me@corp.example", "me@corp.example"),  # a wildcard does not match the domain itself
        (b"Me <me@ok.example>, CEO <ceo@bank.example>", "ceo@bank.example"),
        (b"team: a@ok.example, b@bank.example;", "b@bank.example"),
        (b"=?utf-8?q?x?= <ceo@bank.example>", "ceo@bank.example"),
        (b'"a@ok.example"@bank.example', '"a@ok.example"@bank.example'),
        (b"me@=?utf-8?q?bank.example?=", "me@bank.example"),  # an encoded word in the domain
        (b"me@[192.0.2.1]", "me@[192.0.2.1]"),  # address literals are never an account's
    ],
)
def test_refused_from_values(value: bytes, refused: str) -> None:
    assert check(b"From: " + value) == refused


def test_an_encoded_word_that_decodes_to_an_address_is_judged_by_it() -> None:
    # Alone, the encoded word is the whole address a client shows.
    assert check(b"From: =?utf-8?q?ceo@bank.example?=") == '"ceo@bank.example"'


@pytest.mark.parametrize(
    "value",
    [
        b"garbage <<< >>> @@",
        b"ceo@bank.example <me@ok.example>",  # an unquoted address as a display name
        b"me@ok.example <ceo@bank.example>",  # the parser would keep only the first
        b"Name <me@ok.example> ceo@bank.example",
        b"me@ok.example ceo@bank.example",
        b"me@ok.example;ceo@bank.example",
        b"me@ok.example@bank.example",
        b"<>",
        b"team:;",  # no mailbox at all
        b"",
        b"me@ok.example.",  # RFC 5322 3.4.1: a dot-atom does not end with a dot
        pytest.param(b"(" * 500, id="nested-comments"),  # the parser recurses too deep on this
        b"me@ok.example\x00ceo@bank.example",
    ],
)
def test_unparseable_from_is_not_allowed(value: bytes) -> None:
    refused = check(b"From: " + value)
    assert refused is not None and refused != ""


def test_unparseable_value_is_returned_shortened_and_printable() -> None:
    refused = check(b"From: garbage <<< \x01 >>> @@ " + b"x" * 200)
    assert refused.startswith("garbage <<< ? >>> @@ xxx")
    assert len(refused) == 80 and refused.endswith("...")
    assert check(b"From:") == "(empty)"


def test_no_from_is_left_to_the_envelope() -> None:
    assert check(b"Subject: hi\r\nTo: bob@dest.test") is None
    assert misaligned_header_address(b"\r\nFrom: ceo@bank.example\r\n", ALLOWED, ENVELOPE) is None


def test_from_in_the_body_is_not_a_header() -> None:
    data = b"From: me@ok.example\r\n\r\nFrom: ceo@bank.example\r\n"
    assert misaligned_header_address(data, ALLOWED, ENVELOPE) is None


def test_a_message_without_an_empty_line_is_all_header() -> None:
    assert misaligned_header_address(b"Subject: x\r\nFrom: ceo@bank.example\r\n", ALLOWED, ENVELOPE) == (
        "ceo@bank.example"
    )


def test_every_from_field_is_checked() -> None:
    headers = b"From: me@ok.example\r\nSubject: x\r\nFROM: ceo@bank.example"
    assert check(headers) == "ceo@bank.example"


def test_sender_is_checked_when_present() -> None:
    assert check(b"From: me@ok.example\r\nSender: ceo@bank.example") == "ceo@bank.example"
    assert check(b"From: me@ok.example\r\nSender: Me <me@ok.example>") is None


def test_from_is_reported_before_sender() -> None:
    headers = b"Sender: s@bank.example\r\nFrom: f@bank.example"
    assert check(headers) == "f@bank.example"


def test_folded_from_is_unfolded() -> None:
    headers = b"From: Me\r\n <me@ok.example>,\r\n\tCEO <ceo@bank.example>"
    assert check(headers) == "ceo@bank.example"


def test_bare_lf_header_lines_are_read_too() -> None:
    data = b"Subject: x\nFrom: ceo@bank.example\n\nbody\n"
    assert misaligned_header_address(data, ALLOWED, ENVELOPE) == "ceo@bank.example"


def test_a_field_after_a_malformed_line_is_still_found() -> None:
    # email.parser would end the header block at the line without a colon.
    assert check(b"Subject: x\r\nnot a header line\r\nFrom: ceo@bank.example") == "ceo@bank.example"


def test_from_with_space_before_the_colon_is_checked() -> None:
    # RFC 5322 4.5.3 obsolete syntax; email.parser takes "From " for an mbox separator.
    assert check(b"Subject: x\r\nFrom : ceo@bank.example") == "ceo@bank.example"


def test_similar_field_names_are_not_checked() -> None:
    headers = b"From: me@ok.example\r\nX-From: ceo@bank.example\r\nResent-Sender: ceo@bank.example"
    assert check(headers) is None


def test_continuation_lines_of_other_fields_are_not_fields() -> None:
    assert check(b"From: me@ok.example\r\nX-Note: a\r\n From: ceo@bank.example") is None


def test_address_without_domain_takes_the_envelope_domain() -> None:
    assert check(b"From: alice", envelope="alice@bank.example") == "alice"
    assert check(b"From: alice", envelope="") == "alice"


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        ("me@bücher.example", ("xn--bcher-kva.example",)),
        ("me@BÜCHER.example", ("bücher.example",)),
        ("me@xn--bcher-kva.example", ("bücher.example",)),
        ("me@mail.bücher.example", ("*.bücher.example",)),
        ("me@ok\uff0eexample", ("ok.example",)),  # a full-width dot is a dot (IDNA)
    ],
)
def test_internationalised_domains_compare_in_a_label_form(value: str, allowed: tuple[str, ...]) -> None:
    assert check(b"From: " + value.encode(), allowed=allowed) is None


def test_internationalised_lookalike_domain_is_refused() -> None:
    assert check("From: me@οk.example".encode(), allowed=("ok.example",)) == "me@οk.example"  # Greek omicron


def test_invalid_utf8_in_a_domain_is_refused() -> None:
    assert check(b"From: me@ok\xff.example") is not None


def test_overlong_value_is_refused_unread() -> None:
    value = b"Me <me@ok.example>" + b" " * MAX_VALUE
    assert check(b"From: " + value + b"(x)") is not None


def test_too_many_fields_are_refused() -> None:
    headers = b"\r\n".join([b"From: me@ok.example"] * (MAX_FIELDS + 1))
    assert check(headers) == "me@ok.example"
    assert check(b"\r\n".join([b"From: me@ok.example"] * MAX_FIELDS)) is None


def test_a_large_header_block_is_read_quickly() -> None:
    data = b"X-Filler: a\r\n" * 300_000 + b"From: ceo@bank.example\r\n\r\n"
    assert misaligned_header_address(data, ALLOWED, ENVELOPE) == "ceo@bank.example"


PLAIN_VALUES = [
    "app@example.com",
    "App <app@example.com>",
    "Bench Corp <bench@example.com>",
    "o'brien@example.com",
    "first.last+tag@sub.example.com",
    "a-b_c <x@EXAMPLE.com>",
    "ceo@bank.example",
    "Bank <ceo@bank.example>",
    "<app@example.com>",
    "x@example.com.evil.example",
    "~weird!#$%&*/^`{|}@example.com",
]


@pytest.mark.parametrize("value", PLAIN_VALUES)
def test_the_plain_pattern_reads_a_value_as_the_full_parser_does(value: str) -> None:
    """The shortcut for ordinary values must never disagree with the RFC 5322 parser."""
    assert alignment._PLAIN.fullmatch(value) is not None
    patterns = ["example.com", "*.example.com"]
    assert alignment._refused_address(value, patterns, "example.com") == alignment._parsed_refusal(
        value, patterns, "example.com"
    )


@pytest.mark.parametrize(
    "value",
    [
        "=?utf-8?q?ceo@bank.example?= <me@example.com>",
        '"ceo@bank.example" <me@example.com>',
        "a@example.com, b@bank.example",
        "team: a@example.com;",
        "me@example.com (ceo@bank.example)",
        "Name <a@example.com",
        "a..b@example.com",
        ".a@example.com",
        "a@example.com.",
        "a@[127.0.0.1]",
        "Ceo <ceo@bank.example> <me@example.com>",
    ],
)
def test_values_with_any_special_character_go_to_the_full_parser(value: str) -> None:
    assert alignment._PLAIN.fullmatch(value) is None
