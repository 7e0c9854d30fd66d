"""Where the worker may connect: a tenant's provider host must resolve to public addresses only.

Tenants choose the host of an ``smtp`` provider. Without this guard a tenant could point the worker
at the operator's own network (a database on 10.0.0.5:5432, a metadata service on 169.254.169.254,
an admin port on 127.0.0.1) and read the banners back from the delivery log. So the host is resolved
once, every address is checked, and the transport connects to exactly those addresses: it never
lets anything resolve the name again, or a second lookup could answer differently (DNS rebinding).

``delivery.allow_private_networks`` turns the check off, for installations whose providers really
live on a private network (and for tests on 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 6052 well-known NAT64 prefix: the last 32 bits are an IPv4 address that a NAT64 gateway
# reaches on our behalf, so they are judged as that IPv4 address. (64:ff9b:1::/48, the RFC 8215
# local-use prefix, stays refused: ``is_reserved`` covers it.)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class ResolutionError(Exception):
    """The host name did not resolve. Temporary: DNS may answer later, or the tenant fixes the host."""


class PrivateAddressError(Exception):
    """The host resolves to at least one address that is not on the public internet. Permanent."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, which is not a public address")
        self.host = host
        self.address = address


class Address(NamedTuple):
    """One checked address, ready for ``socket.socket(family).connect(sockaddr)``."""

    family: socket.AddressFamily
    sockaddr: tuple  # (ip, port) or (ip, port, flowinfo, scope_id): keeps a link-local scope

    @property
    def ip(self) -> str:
        return self.sockaddr[0]


def is_public(ip: IPAddress) -> bool:
    """True when ip is a unicast address on the public internet.

    ``is_global`` alone is not enough: it is true for multicast (224/4, ff0e::/16) and for IPv6
    site-local fec0::/10, and addresses that embed an IPv4 address (IPv4-mapped, 6to4, NAT64) must be
    judged by that IPv4 address: ::ffff:10.0.0.1 reaches 10.0.0.1 on a dual-stack socket.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            return is_public(ip.sixtofour)
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def resolve_public(host: str, port: int, allow_private: bool = False) -> list[Address]:
    """Resolve host for TCP and return its addresses in resolver order, without duplicates.

    A literal IP address is checked the same way. Unless allow_private, one non-public address
    refuses the whole host: a name that mixes public and private answers is not trusted either.

    Raises ResolutionError when the name does not resolve, PrivateAddressError when it resolves
    to a non-public address.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as error:  # gaierror is an OSError; an invalid IDNA label is not
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ResolutionError(f"cannot resolve {host}: {reason}") from None
    addresses: list[Address] = []
    seen: set[str] = set()
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = sockaddr[0]
        if not allow_private and not is_public(ipaddress.ip_address(ip.partition("%")[0])):
            raise PrivateAddressError(host, ip)
        if ip not in seen:
            seen.add(ip)
            addresses.append(Address(socket.AddressFamily(family), tuple(sockaddr)))
    if not addresses:
        raise ResolutionError(f"cannot resolve {host}: no IPv4 or IPv6 address")
    return addresses
