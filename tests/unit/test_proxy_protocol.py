"""The PROXY protocol parser on plain bytes: every header HAProxy sends, and what a broken or hostile
sender might put in its place (truncated at every byte, oversized, wrong signature, bad version,
TLVs, unknown families, leading zeros, out-of-range ports)."""

from __future__ import annotations

import ipaddress

import pytest

from smtp_proxy.proxy_protocol import (
    MAX_HEADER_LENGTH,
    NEED_DATA,
    REASONS,
    V1_MAX_LENGTH,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    is_trusted,
    looks_like_header,
    parse,
)

CLIENT_BYTES = b"EHLO client.test\r\n"


def v2(
    command: int = 1,
    family: int = 0x11,
    addresses: bytes | None = None,
    tlvs: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """A v2 header: by default PROXY over TCP/IPv4 from 192.0.2.7:40000 to 198.51.100.1:587."""
    if addresses is None:
        addresses = (
            bytes([192, 0, 2, 7, 198, 51, 100, 1]) + (40000).to_bytes(2, "big") + (587).to_bytes(2, "big")
        )
    payload = addresses + tlvs
    size = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + size.to_bytes(2, "big") + payload


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


V6_ADDRESSES = (
    ipaddress.IPv6Address("2001:db8::7").packed
    + ipaddress.IPv6Address("2001:db8::1").packed
    + (40000).to_bytes(2, "big")
    + (587).to_bytes(2, "big")
)
V1_TCP4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 587\r\n"
FULL_V6 = b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
V1_TCP6_LONGEST = b"PROXY TCP6 " + FULL_V6 + b" " + FULL_V6 + b" 65535 65535\r\n"
# The specification's worst case, 107 bytes with its CRLF.
V1_LONGEST = V1_TCP6_LONGEST.replace(b"TCP6", b"UNKNOWN")
# HAProxy's send-proxy-v2 with a unique id, an authority and a NOOP padding TLV.
V2_WITH_TLVS = v2(tlvs=tlv(0x05, b"4F3A-11") + tlv(0x02, b"mail.example.com") + tlv(0x04, b"\0" * 7))

VALID = {
    "v1 TCP4": (V1_TCP4, ProxyHeader(1, len(V1_TCP4), ("192.0.2.7", 40000), ("198.51.100.1", 587))),
    "v1 TCP6": (V1_TCP6, ProxyHeader(1, len(V1_TCP6), ("2001:db8::7", 40000), ("2001:db8::1", 587))),
    "v1 TCP6 longest": (
        V1_TCP6_LONGEST,
        ProxyHeader(
            1,
            104,
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
    ),
    "v1 longest": (V1_LONGEST, ProxyHeader(1, 107)),
    "v1 UNKNOWN": (b"PROXY UNKNOWN\r\n", ProxyHeader(1, 15)),
    "v1 UNKNOWN with addresses": (
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ProxyHeader(1, len(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")),
    ),
    "v2 IPv4": (v2(), ProxyHeader(2, 28, ("192.0.2.7", 40000), ("198.51.100.1", 587))),
    "v2 IPv6": (
        v2(family=0x21, addresses=V6_ADDRESSES),
        ProxyHeader(2, 52, ("2001:db8::7", 40000), ("2001:db8::1", 587)),
    ),
    "v2 TLVs": (V2_WITH_TLVS, ProxyHeader(2, len(V2_WITH_TLVS), ("192.0.2.7", 40000), ("198.51.100.1", 587))),
    "v2 LOCAL": (v2(command=0, family=0x00, addresses=b""), ProxyHeader(2, 16)),
    "v2 LOCAL with IPv4": (v2(command=0), ProxyHeader(2, 28)),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_a_valid_header_parses_and_takes_exactly_its_own_bytes(name: str) -> None:
    header, expected = VALID[name]
    assert parse(header) == expected
    assert parse(header + CLIENT_BYTES) == expected  # the client's first bytes stay the client's
    assert expected.length == len(header)


@pytest.mark.parametrize("name", sorted(VALID))
def test_a_header_cut_at_any_byte_needs_more_data(name: str) -> None:
    header, _expected = VALID[name]
    for end in range(len(header)):
        assert parse(header[:end]) is NEED_DATA, header[:end]


def test_local_and_unknown_carry_no_address() -> None:
    """The specification: use the connection's own endpoints (a balancer's own health check)."""
    for header in (b"PROXY UNKNOWN\r\n", v2(command=0)):
        parsed = parse(header)
        assert isinstance(parsed, ProxyHeader)
        assert parsed.source is None and parsed.destination is None


def reason(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as raised:
        parse(data)
    assert raised.value.reason in REASONS
    assert str(raised.value)  # a message for the log line
    return raised.value.reason


# --- wrong signature -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.test\r\n",
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        b"PROXZ TCP4",
        b"proxy TCP4 192.0.2.7 198.51.100.1 40000 587\r\n",
        b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c",
        b"\r\n\r\n\x01",
        b" PROXY TCP4",
    ],
)
def test_anything_else_is_not_a_proxy_header(data: bytes) -> None:
    assert reason(data) == "not_proxy"


def test_the_first_wrong_byte_is_enough_to_refuse() -> None:
    """No waiting for a timeout: the signature is known from its first byte."""
    assert reason(b"E") == "not_proxy"
    assert reason(b"PROXX") == "not_proxy"
    assert reason(b"\r\n\r\n\x00\r\nQ\x00") == "not_proxy"


# --- version 1 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"PROXY TCP4 192.168.01.1 198.51.100.1 40000 587", "bad_address"),  # leading zero
        (b"PROXY TCP4 256.0.2.7 198.51.100.1 40000 587", "bad_address"),
        (b"PROXY TCP4 192.0.2 198.51.100.1 40000 587", "bad_address"),
        (b"PROXY TCP4 2001:db8::7 2001:db8::1 40000 587", "bad_address"),  # family mismatch
        (b"PROXY TCP6 192.0.2.7 198.51.100.1 40000 587", "bad_address"),
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40000 587", "bad_address"),  # a zone
        (b"PROXY TCP6 [2001:db8::7] 2001:db8::1 40000 587", "bad_address"),
        (b"PROXY TCP6 2001:db8:::7 2001:db8::1 40000 587", "bad_address"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 587", "bad_port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 587", "bad_port"),  # leading zero
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 587", "bad_port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 587", "bad_port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 0x24b", "bad_port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000", "malformed"),  # a field missing
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587 1", "malformed"),  # one too many
        (b"PROXY TCP4 192.0.2.7  198.51.100.1 40000 587", "malformed"),  # two spaces
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587 ", "malformed"),
        (b"PROXY tcp4 192.0.2.7 198.51.100.1 40000 587", "malformed"),
        (b"PROXY UDP4 192.0.2.7 198.51.100.1 40000 587", "malformed"),
        (b"PROXY ", "malformed"),
        (b"PROXY TCP4 192.0.2.7\t198.51.100.1 40000 587", "malformed"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587\r", "malformed"),  # CR CR LF
        ("PROXY TCP4 192.0.2.7 198.51.100.1 40000 58\u0667".encode(), "malformed"),  # non-ASCII digit
    ],
)
def test_a_bad_v1_line_is_refused_with_its_reason(line: bytes, expected: str) -> None:
    assert reason(line + b"\r\n") == expected


def test_a_bare_lf_or_nul_refuses_v1_at_once() -> None:
    assert reason(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587\n") == "malformed"
    assert reason(b"PROXY TCP4 192.0\x00") == "malformed"
    assert reason(b"PROXY TCP4 192.0\rX") == "malformed"


def test_a_v1_line_past_107_bytes_is_too_long() -> None:
    assert len(V1_LONGEST) == V1_MAX_LENGTH
    assert parse(b"PROXY " + b"A" * (V1_MAX_LENGTH - 7)) is NEED_DATA  # 106 bytes: may still end
    assert reason(b"PROXY " + b"A" * (V1_MAX_LENGTH - 6)) == "too_long"
    longer = V1_LONGEST.replace(b"UNKNOWN f", b"UNKNOWN 0f")  # 108 bytes with its CRLF
    assert reason(longer) == "too_long"
    assert reason(b"PROXY " + b"A" * 5000) == "too_long"


# --- version 2 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 1, 3, 15])
def test_a_v2_signature_with_another_version_is_refused(version: int) -> None:
    assert reason(v2(version=version)[:16]) == "bad_version"


@pytest.mark.parametrize("command", [2, 3, 15])
def test_a_v2_command_other_than_local_or_proxy_is_refused(command: int) -> None:
    assert reason(v2(command=command)[:16]) == "bad_command"


@pytest.mark.parametrize(
    "family",
    [
        0x00,  # AF_UNSPEC
        0x31,  # AF_UNIX stream
        0x12,  # AF_INET over DGRAM
        0x22,  # AF_INET6 over DGRAM
        0x10,  # AF_INET, transport unspecified
        0x41,  # no such family
        0xF1,
    ],
)
def test_proxy_over_any_family_but_tcp_is_refused_and_local_accepted(family: int) -> None:
    assert reason(v2(family=family)) == "unsupported_family"
    assert parse(v2(command=0, family=family)) == ProxyHeader(2, 28)


def test_an_address_block_shorter_than_its_family_is_malformed() -> None:
    assert reason(v2(addresses=b"\x00" * 11)) == "malformed"
    assert reason(v2(family=0x21, addresses=b"\x00" * 35)) == "malformed"
    assert reason(v2(family=0x21, addresses=b"\x00" * 12)) == "malformed"  # IPv4-sized under IPv6


def test_an_oversized_v2_header_is_refused_before_its_payload_arrives() -> None:
    assert reason(v2(length=V2_MAX_PAYLOAD + 1)[:16]) == "too_long"
    assert reason(v2(length=0xFFFF)[:16]) == "too_long"


def test_a_v2_header_of_the_largest_size_is_accepted() -> None:
    padding = tlv(0x04, b"\0" * (V2_MAX_PAYLOAD - 12 - 3))
    header = v2(tlvs=padding)
    assert len(header) == MAX_HEADER_LENGTH
    parsed = parse(header + CLIENT_BYTES)
    assert isinstance(parsed, ProxyHeader) and parsed.length == MAX_HEADER_LENGTH


@pytest.mark.parametrize(
    "tlvs",
    [
        b"\x04",  # a type, no length
        b"\x04\x00",
        tlv(0x04, b"ab")[:-1],  # a value cut short
        tlv(0x02, b"example.com") + b"\x05\x00\x10abc",  # the second runs past the end
    ],
)
def test_a_tlv_running_past_the_header_is_refused(tlvs: bytes) -> None:
    assert reason(v2(tlvs=tlvs)) == "bad_tlv"


def test_a_v2_header_counts_its_length_not_the_bytes_after_it() -> None:
    header = v2(family=0x21, addresses=V6_ADDRESSES)
    parsed = parse(header + V2_SIGNATURE)  # a second header is the client's problem, not this one
    assert isinstance(parsed, ProxyHeader) and parsed.length == len(header)


# --- helpers for the listeners -----------------------------------------------------------------------------


def test_looks_like_header() -> None:
    assert looks_like_header(V1_TCP4)
    assert looks_like_header(v2())
    assert looks_like_header(b"PROXY UNKNOWN\r\n")
    assert not looks_like_header(b"PROXY")
    assert not looks_like_header(V2_SIGNATURE[:11])
    assert not looks_like_header(b"EHLO client.test\r\n")


def test_is_trusted() -> None:
    networks = (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("2001:db8::/64"))
    assert is_trusted("10.0.0.9", networks)
    assert is_trusted("::ffff:10.0.0.9", networks)  # a dual-stack listener's view of IPv4
    assert is_trusted("2001:db8::5", networks)
    assert not is_trusted("10.0.1.9", networks)
    assert not is_trusted("2001:db8:0:1::5", networks)
    assert not is_trusted("not an address", networks)
    assert not is_trusted("10.0.0.9", ())
