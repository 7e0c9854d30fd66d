"""parse_headers: the header block of an accepted message, read by hand."""

from __future__ import annotations

import pytest

from smtp_proxy.storage.messages import MAX_HEADER_FIELDS, parse_headers


def test_folded_fields_are_unfolded_and_subject_decoded() -> None:
    data = b"Subject: =?utf-8?q?caf=C3=A9?=\r\n  au lait\r\nTo: a@example.net,\r\n\tb@example.net\r\n\r\nbody"
    headers, subject = parse_headers(data)
    assert headers == [["Subject", "=?utf-8?q?caf=C3=A9?=  au lait"], ["To", "a@example.net,\tb@example.net"]]
    assert subject == "café au lait"


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"\r\nSubject: not a header\r\n", []),
        (b"From sender Tue Nov 25 2026\r\nX-A: 1\r\n\r\n", [["X-A", "1"]]),
        (b"X-A: 1\r\nnot a field line\r\nX-B: 2\r\n\r\n", [["X-A", "1"]]),
        (b"X-A: 1\nX-B: 2\n\nX-C: body\n", [["X-A", "1"], ["X-B", "2"]]),
        (b"X-A: no blank line at all", [["X-A", "no blank line at all"]]),
        (b" continuation first\r\nX-A: 1\r\n\r\n", []),
    ],
)
def test_header_block_ends_where_rfc_5322_says(data: bytes, expected: list) -> None:
    assert parse_headers(data)[0] == expected


def test_body_lines_that_look_like_fields_are_not_headers() -> None:
    headers, subject = parse_headers(b"X-A: 1\r\n\r\nSubject: in the body\r\n")
    assert headers == [["X-A", "1"]] and subject is None


def test_undecodable_bytes_and_nul_are_replaced() -> None:
    headers, _ = parse_headers(b"X-Bin: a\xff\x00b\r\n\r\n")
    assert headers == [["X-Bin", "a\ufffd\ufffdb"]]


def test_field_count_is_capped() -> None:
    data = b"".join(b"X-N: %d\r\n" % n for n in range(MAX_HEADER_FIELDS + 50)) + b"\r\nbody"
    assert len(parse_headers(data)[0]) == MAX_HEADER_FIELDS
