"""The PROXY protocol, versions 1 and 2 (HAProxy's specification): bytes in, a header or an error out.

A load balancer that relays TCP connections (HAProxy's ``send-proxy`` and ``send-proxy-v2``)
sends one header before the client's first byte, naming the client's address and port. The
listeners take it only from the addresses their config trusts (``smtp.proxy_protocol_from``,
``api.proxy_protocol_from``): anyone else could forge an address with it.

Rules of this module: no sockets, no clock, no config; only the standard library. ``parse``
takes the bytes read so far and answers ``NEED_DATA``, a ``ProxyHeader`` (with the number of
bytes it took, so that the caller consumes exactly those and not the client's first bytes),
or raises ``ProxyHeaderError`` with a short stable reason for logs and metrics.

Strict on purpose: a balancer writes these headers, never a person, so anything beyond the
specification's exact form (leading zeros, a port over 65535, a zone in an IPv6 address, a
second space) is a broken or hostile sender.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

V1_PREFIX: Final = b"PROXY "
# The specification's longest v1 line: "PROXY TCP6" with two full IPv6 addresses, two ports, CRLF.
V1_MAX_LENGTH: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16
# Address block plus TLVs. IPv6 takes 36 bytes (AF_UNIX 216); what HAProxy can add as TLVs
# (ALPN, authority up to 255, unique id up to 128, the SSL sub-TLVs, netns, CRC32C) stays well
# under 1 KiB, and a bound this small keeps a hostile balancer from making us buffer 64 KiB.
V2_MAX_PAYLOAD: Final = 1024
MAX_HEADER_LENGTH: Final = V2_FIXED_LENGTH + V2_MAX_PAYLOAD

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_INET, _AF_INET6 = 0x1, 0x2
_STREAM = 0x1
_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # no zone (%eth0), no brackets
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")

Address = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()  # not a whole header yet; more bytes may complete it


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. ``source`` None: LOCAL (v2) or UNKNOWN (v1), so the specification says
    to use the connection's own endpoints (a balancer's health check, or a client family it
    cannot name)."""

    version: int
    length: int  # bytes of the stream the header took
    source: Address | None = None
    destination: Address | None = None


class ProxyHeaderError(ValueError):
    """Not a header we accept. ``reason`` is one stable word (``REASONS``); the message is for logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Every reason parse() raises, so that a metric can show each one from the start.
REASONS = (
    "not_proxy",
    "too_long",
    "malformed",
    "bad_version",
    "bad_command",
    "unsupported_family",
    "bad_address",
    "bad_port",
    "bad_tlv",
)


def parse(data: bytes) -> ProxyHeader | _NeedData:
    """The header at the start of ``data``, or NEED_DATA; raises ProxyHeaderError.

    Bytes after the header are the client's and are never looked at.
    """
    head = data[: len(V2_SIGNATURE)]
    if V2_SIGNATURE.startswith(head):  # also when empty: both versions may follow
        return _parse_v2(data) if len(head) == len(V2_SIGNATURE) else NEED_DATA
    if V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        return _parse_v1(data) if len(data) >= len(V1_PREFIX) else NEED_DATA
    raise ProxyHeaderError("not_proxy", "the connection does not start with a PROXY protocol header")


def looks_like_header(data: bytes) -> bool:
    """Whether ``data`` starts the way a v1 or v2 header does (for peers not trusted to send one)."""
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE)


def client_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address for matching against networks, None if ``text`` is none.

    An IPv4 client seen as an IPv4-mapped IPv6 address (a dual-stack socket) is the IPv4 one.
    """
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``address`` (an IPv4-mapped IPv6 address counts as its IPv4) is in ``networks``."""
    ip = client_address(address) if networks else None
    return ip is not None and any(ip in network for network in networks)


# --- version 1: one line of text ---------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | _NeedData:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        seen = data[:V1_MAX_LENGTH].removesuffix(b"\r")  # the CR of a CRLF still on its way
        if not _PRINTABLE.fullmatch(seen):  # a bare LF, a NUL, ...: no valid line can follow
            raise ProxyHeaderError("malformed", "a v1 header holds printable ASCII and ends in CRLF")
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError("too_long", f"no CRLF within the {V1_MAX_LENGTH} bytes of a v1 header")
        return NEED_DATA
    line = data[:end]
    if not _PRINTABLE.fullmatch(line):
        raise ProxyHeaderError("malformed", "a v1 header holds printable ASCII and ends in CRLF")
    fields = line.split(b" ")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        # The specification: ignore whatever follows, use the connection's own endpoints.
        return ProxyHeader(version=1, length=end + 2)
    if protocol not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ProxyHeaderError("malformed", "a v1 header is PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    parse_ip = _ipv4 if protocol == b"TCP4" else _ipv6
    source, destination = parse_ip(fields[2]), parse_ip(fields[3])
    return ProxyHeader(
        version=1,
        length=end + 2,
        source=(source, _port(fields[4])),
        destination=(destination, _port(fields[5])),
    )


def _ipv4(text: bytes) -> str:
    return _address(text, _IPV4, ipaddress.IPv4Address, "IPv4")


def _ipv6(text: bytes) -> str:
    return _address(text, _IPV6, ipaddress.IPv6Address, "IPv6")


def _address(
    text: bytes,
    form: re.Pattern[bytes],
    make: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address],
    family: str,
) -> str:
    """The address in its canonical text, if ``text`` has the strict ``form`` and is one."""
    if form.fullmatch(text):
        try:
            return str(make(text.decode("ascii")))
        except ValueError:
            pass
    raise ProxyHeaderError("bad_address", f"not an {family} address: {text[:50]!r}")


def _port(text: bytes) -> int:
    if _PORT.fullmatch(text) and int(text) <= 65535:
        return int(text)
    raise ProxyHeaderError("bad_port", f"not a port number: {text[:10]!r}")


# --- version 2: binary ------------------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | _NeedData:
    if len(data) < V2_FIXED_LENGTH:
        return NEED_DATA
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError("bad_version", f"a v2 signature with version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError("bad_command", f"v2 command {command} is neither LOCAL nor PROXY")
    payload_length = int.from_bytes(data[14:16], "big")
    if payload_length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(
            "too_long", f"a v2 header of {payload_length} bytes (at most {V2_MAX_PAYLOAD})"
        )
    length = V2_FIXED_LENGTH + payload_length
    if len(data) < length:
        return NEED_DATA
    if command == _V2_LOCAL:
        # The specification: the address block, family included, is ignored.
        return ProxyHeader(version=2, length=length)
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family not in (_AF_INET, _AF_INET6) or transport != _STREAM:
        raise ProxyHeaderError(
            "unsupported_family", f"v2 PROXY over family {family}, transport {transport} (TCP only)"
        )
    payload = memoryview(data)[V2_FIXED_LENGTH:length]
    size = 4 if family == _AF_INET else 16
    if len(payload) < 2 * size + 4:
        raise ProxyHeaderError("malformed", f"a v2 address block of {len(payload)} bytes is too short")
    make = ipaddress.IPv4Address if family == _AF_INET else ipaddress.IPv6Address
    source = str(make(bytes(payload[:size])))
    destination = str(make(bytes(payload[size : 2 * size])))
    ports = payload[2 * size : 2 * size + 4]
    _check_tlvs(payload[2 * size + 4 :])
    return ProxyHeader(
        version=2,
        length=length,
        source=(source, int.from_bytes(ports[:2], "big")),
        destination=(destination, int.from_bytes(ports[2:], "big")),
    )


def _check_tlvs(tlvs: memoryview) -> None:
    """Each TLV is a type byte, a 2-byte length and that many bytes; none may run past the header.

    Their contents are not used: the address is all the listeners need.
    """
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyHeaderError("bad_tlv", "a v2 TLV cut short")
        offset += 3 + int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        if offset > len(tlvs):
            raise ProxyHeaderError("bad_tlv", "a v2 TLV runs past the end of the header")
