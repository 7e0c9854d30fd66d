"""The Received: field the listener puts at the top of each message it accepts (RFC 5321 4.4).

RFC 5321 makes the trace field a MUST for every server that takes a message in. It names the
client (its EHLO name and the address it came from), this server, the protocol (RFC 3848:
ESMTPSA for ESMTP with TLS and AUTH; ESMTPS or ESMTP for a relay network's clients), the
message id the API shows, the recipient when there is exactly one (RFC 5321 7.2: more would
reveal Bcc recipients to each other) and the time.

Pure: the adapter passes in what it knows of the connection and the clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime

from smtp_proxy.smtp.addresses import is_host


def protocol(*, tls: bool, authenticated: bool) -> str:
    """RFC 3848's protocol name: ESMTP, plus S with TLS, plus A with AUTH (a relay network's
    clients send without AUTH, and some of them without TLS)."""
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def address_literal(ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``; an IPv4-mapped address is shown as the IPv4 one."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return "[unknown]"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            return f"[IPv6:{address.compressed}]"
        address = address.ipv4_mapped
    return f"[{address}]"


def received_field(
    *,
    helo: str | None,
    client_ip: str,
    hostname: str,
    message_id: str,
    recipients: Sequence[str],
    when: datetime,
    tls: tuple[str, str] | None = None,
    authenticated: bool = True,
) -> bytes:
    """The whole field, folded, ending in CRLF, to put before the message's first line.

    helo is what the client sent, which may be any printable text: it is named only when it is a
    domain or an address literal, so the field always parses. tls is (version, cipher).
    """
    literal = address_literal(client_ip)
    origin = helo if helo and is_host(helo) else literal
    lines = [f"Received: from {origin} ({literal})"]
    if tls is not None:
        lines.append(f"\t(using {tls[0]} with cipher {tls[1]})")
    with_ = protocol(tls=tls is not None, authenticated=authenticated)
    lines.append(f"\tby {hostname} (smtp-proxy) with {with_}")
    lines.append(f"\tid {message_id}")
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>")
    lines[-1] += ";"
    lines.append(f"\t{format_datetime(when)}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")
