"""The Received: field (RFC 5321 4.4): its grammar, and what it shows of a hostile EHLO name."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime

import pytest

from smtp_proxy.smtp.trace import address_literal, received_field

WHEN = datetime(2026, 11, 25, 8, 9, 10, tzinfo=UTC)
ID = "0b6c2a4e-4c1f-4a63-9d55-4f3f4b1c2d3e"


def field(**overrides) -> str:
    arguments = dict(
        helo="client.example.org",
        client_ip="192.0.2.7",
        hostname="relay.example.net",
        message_id=ID,
        recipients=("someone@example.net",),
        when=WHEN,
        tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
    )
    arguments.update(overrides)
    return received_field(**arguments).decode("ascii")


def unfolded(text: str) -> str:
    assert text.endswith("\r\n")
    return re.sub(r"\r\n[ \t]", " ", text[:-2])


def test_one_recipient_full_field() -> None:
    assert field() == (
        "Received: from client.example.org ([192.0.2.7])\r\n"
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
        "\tby relay.example.net (smtp-proxy) with ESMTPSA\r\n"
        f"\tid {ID}\r\n"
        "\tfor <someone@example.net>;\r\n"
        "\tWed, 25 Nov 2026 08:09:10 +0000\r\n"
    )


def test_several_recipients_are_not_named() -> None:
    """RFC 5321 7.2: a for clause with every recipient would show Bcc recipients to the others."""
    text = field(recipients=("a@example.net", "hidden@example.org"))
    assert "for" not in unfolded(text).split(";")[0].split(" id ")[1]
    assert "hidden@example.org" not in text and "a@example.net" not in text
    assert unfolded(text).endswith(f"id {ID}; Wed, 25 Nov 2026 08:09:10 +0000")


@pytest.mark.parametrize(
    "helo",
    [
        "evil (comment",
        "a;b",
        "x) by forged.example (smtp-proxy",
        "localhost",  # one label: not a domain a message could be traced back to
        "[300.1.1.1]",
        "\\",
        None,
    ],
)
def test_an_ehlo_name_that_is_not_a_host_is_replaced_by_the_address(helo: str | None) -> None:
    text = unfolded(field(helo=helo))
    assert text.startswith("Received: from [192.0.2.7] ([192.0.2.7]) (using")
    if helo:
        assert helo not in text


@pytest.mark.parametrize("helo", ["[192.0.2.7]", "[IPv6:2001:db8::1]", "Mail.Client.Example"])
def test_an_address_literal_or_domain_ehlo_is_kept(helo: str) -> None:
    assert unfolded(field(helo=helo)).startswith(f"Received: from {helo} ([192.0.2.7])")


@pytest.mark.parametrize(
    "ip,literal",
    [
        ("203.0.113.9", "[203.0.113.9]"),
        ("2001:db8:0:0:0:0:0:1", "[IPv6:2001:db8::1]"),
        ("::ffff:198.51.100.4", "[198.51.100.4]"),  # a dual-stack socket's view of an IPv4 client
        ("fe80::1%eth0", "[IPv6:fe80::1]"),
        ("not an address", "[unknown]"),
    ],
)
def test_address_literal(ip: str, literal: str) -> None:
    assert address_literal(ip) == literal


def test_without_tls_details_the_comment_is_left_out() -> None:
    text = field(tls=None)
    assert "using" not in text
    assert text.startswith("Received: from client.example.org ([192.0.2.7])\r\n\tby relay.example.net")


def test_the_field_parses_as_a_header_and_lines_stay_short() -> None:
    text = field(recipients=("x" * 64 + "@" + "d" * 60 + ".example",))
    message = email.message_from_bytes(
        (text + "Subject: hi\r\n\r\nbody\r\n").encode(), policy=email.policy.SMTP
    )
    assert message["Subject"] == "hi"
    received = message.get_all("Received")
    assert len(received) == 1 and f"id {ID}" in received[0]
    assert all(len(line) <= 998 for line in text.split("\r\n"))
    assert all(len(line) <= 78 for line in field().split("\r\n"))
