"""The reply table's sanity (after aiosmtpd's qa checks): names, codes, enhanced codes, wire form."""

from __future__ import annotations

import re

import pytest

from smtp_proxy.smtp import replies
from smtp_proxy.smtp.replies import Reply

NAMED = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}
CODED = {name: value for name, value in NAMED.items() if re.match(r"R\d+_", name)}
BUILT = {
    "greeting": replies.greeting("mx.test"),
    "helo": replies.helo("mx.test"),
    "ehlo": replies.ehlo("mx.test", ["SIZE 1048576", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]),
    "queued": replies.queued("0123456789abcdef"),
    "challenge-empty": replies.challenge(""),
    "challenge": replies.challenge("VXNlcm5hbWU6"),
    "rate_exceeded": replies.rate_exceeded(30),
}
ALL = {**NAMED, **BUILT}
# RFC 3463 2: class "." subject "." detail, 1-3 digits each; the class is 2, 4 or 5.
ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
CLOSING = {"R221_BYE", "R554_EARLY_TALKER", "R554_PROXY_HEADER", "R500_HTTP"}


def test_reply_table_is_not_empty() -> None:
    assert len(CODED) >= 40
    assert set(CODED) == set(NAMED)


@pytest.mark.parametrize("name", sorted(CODED))
def test_reply_name_digits_equal_code(name: str) -> None:
    digits = re.match(r"R(\d+)_", name).group(1)
    assert int(digits) == CODED[name].code


@pytest.mark.parametrize("name", sorted(ALL))
def test_reply_code_is_a_valid_smtp_code(name: str) -> None:
    code = ALL[name].code
    assert 200 <= code <= 599
    assert code // 100 in (2, 3, 4, 5)


@pytest.mark.parametrize("name", sorted(name for name, reply in NAMED.items() if reply.status is not None))
def test_reply_enhanced_status_class_matches_code(name: str) -> None:
    reply = NAMED[name]
    assert ENHANCED.match(reply.status), reply.status
    assert reply.status[0] == str(reply.code)[0]


@pytest.mark.parametrize("name", sorted(NAMED))
def test_reply_without_enhanced_status_is_intermediate_only(name: str) -> None:
    # RFC 2034 3: every 2xx, 4xx and 5xx reply after the greeting and EHLO carries one.
    reply = NAMED[name]
    if reply.status is None:
        assert reply.code // 100 == 3


def test_reply_queued_carries_enhanced_status() -> None:
    assert replies.queued("x").status == "2.0.0"


@pytest.mark.parametrize("name", sorted(ALL))
def test_reply_wire_form_is_ascii_crlf_and_short(name: str) -> None:
    wire = ALL[name].to_bytes()
    wire.decode("ascii")
    assert wire.endswith(b"\r\n")
    lines = wire.split(b"\r\n")[:-1]
    assert len(lines) == len(ALL[name].lines)
    for line in lines:
        assert len(line) + 2 <= 512
        assert b"\r" not in line and b"\n" not in line


@pytest.mark.parametrize("name", sorted(ALL))
def test_reply_lines_use_dash_on_all_but_last(name: str) -> None:
    reply = ALL[name]
    lines = reply.to_bytes().split(b"\r\n")[:-1]
    code = str(reply.code).encode()
    for line in lines[:-1]:
        assert line.startswith(code + b"-")
    assert lines[-1].startswith(code + b" ")


def test_reply_multiline_ehlo_wire_form() -> None:
    assert BUILT["ehlo"].to_bytes() == (
        b"250-mx.test\r\n250-SIZE 1048576\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
    )


def test_reply_multiline_with_status_repeats_it_on_every_line() -> None:
    reply = Reply(250, "2.0.0", ("one", "two"))
    assert reply.to_bytes() == b"250-2.0.0 one\r\n250 2.0.0 two\r\n"


@pytest.mark.parametrize("name", sorted(NAMED))
def test_reply_closes_only_on_221_421_and_fatal_5xx(name: str) -> None:
    reply = NAMED[name]
    should_close = name in CLOSING or reply.code == 421
    assert reply.close == should_close


@pytest.mark.parametrize("name", sorted(BUILT))
def test_reply_built_replies_do_not_close(name: str) -> None:
    assert not BUILT[name].close


def test_reply_greeting_has_no_enhanced_status() -> None:
    assert replies.greeting("mx.test").to_bytes() == b"220 mx.test ESMTP smtp-proxy\r\n"


def test_reply_rate_exceeded_names_the_wait() -> None:
    assert replies.rate_exceeded(42).to_bytes() == (
        b"451 4.7.1 Sending rate exceeded for this account, try again in 42 seconds\r\n"
    )
