"""The private-network guard: a tenant's provider host may only lead to the public internet."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from smtp_proxy.delivery import network
from smtp_proxy.delivery.network import PrivateAddressError, ResolutionError, is_public, resolve_public

NOT_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "::1",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "100.64.0.1",  # shared address space (carrier-grade NAT)
    "0.0.0.0",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "224.0.0.1",  # multicast: is_global says True
    "239.255.255.250",
    "ff02::1",
    "ff0e::1",  # global-scope multicast: is_global says True
    "fec0::1",  # site-local: is_global says True
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking
    "2001:db8::1",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b:1::1",  # local-use NAT64
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "::a00:1",  # IPv4-compatible, deprecated
]
PUBLIC = [
    "93.184.215.14",
    "8.8.8.8",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",  # IPv4-mapped form of a public address reaches that address
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8: an IPv6-only network's way to reach IPv4 providers
    "2002:808:808::1",  # 6to4 of 8.8.8.8
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_is_public_false_for_non_public_address(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_is_public_true_for_public_address(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "::1", "10.0.0.5", "172.16.5.4", "192.168.0.10", "169.254.169.254", "fe80::1", "fc00::1",
     "100.64.1.1", "0.0.0.0", "::ffff:127.0.0.1", "224.0.0.1", "ff02::1", "localhost", "127.1", "0x7f000001"],
)  # fmt: skip
def test_resolve_public_refuses_host_with_non_public_address(host: str) -> None:
    with pytest.raises(PrivateAddressError) as caught:
        resolve_public(host, 25, allow_private=False)
    assert caught.value.host == host
    assert not is_public(ipaddress.ip_address(caught.value.address.partition("%")[0]))


def test_resolve_public_accepts_public_literal() -> None:
    [address] = resolve_public("93.184.215.14", 587, allow_private=False)
    assert address.family is socket.AF_INET
    assert address.sockaddr == ("93.184.215.14", 587)
    assert address.ip == "93.184.215.14"


def test_resolve_public_accepts_public_ipv6_literal() -> None:
    [address] = resolve_public("2606:4700:4700::1111", 465, allow_private=False)
    assert address.family is socket.AF_INET6
    assert address.ip == "2606:4700:4700::1111"
    assert address.sockaddr[1] == 465


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.0.0.5", "fe80::1", "localhost"])
def test_resolve_public_lets_private_through_when_allowed(host: str) -> None:
    addresses = resolve_public(host, 25, allow_private=True)
    assert addresses
    assert all(not is_public(ipaddress.ip_address(a.ip)) for a in addresses)


def test_resolve_public_refuses_when_any_address_is_private(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that answers with one public and one private address is refused as a whole."""
    answers = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 25)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 25)),
    ]
    monkeypatch.setattr(network.socket, "getaddrinfo", lambda *args, **kwargs: answers)
    with pytest.raises(PrivateAddressError) as caught:
        resolve_public("mixed.example", 25)
    assert caught.value.address == "10.0.0.7"
    assert "10.0.0.7" in str(caught.value)


def test_resolve_public_keeps_order_and_drops_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2606:4700:4700::1111", 25, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 25)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 25)),
    ]
    monkeypatch.setattr(network.socket, "getaddrinfo", lambda *args, **kwargs: answers)
    assert [a.ip for a in resolve_public("mx.example", 25)] == ["2606:4700:4700::1111", "93.184.215.14"]


@pytest.mark.parametrize(
    ("errno", "text"),
    [
        (socket.EAI_NONAME, "Name or service not known"),
        (socket.EAI_AGAIN, "Temporary failure in name resolution"),
    ],
)
def test_resolve_public_resolver_failure_is_a_resolution_error(
    monkeypatch: pytest.MonkeyPatch, errno: int, text: str
) -> None:
    """Both "no such name" and "DNS is down" may be fixed later (DNS recovers, the tenant edits the host)."""

    def fail(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(errno, text)

    monkeypatch.setattr(network.socket, "getaddrinfo", fail)
    with pytest.raises(ResolutionError, match=f"cannot resolve mx.example: {text}"):
        resolve_public("mx.example", 25)


def test_resolve_public_name_without_usable_address_is_a_resolution_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(network.socket, "getaddrinfo", lambda *args, **kwargs: [])
    with pytest.raises(ResolutionError, match="no IPv4 or IPv6 address"):
        resolve_public("mx.example", 25)


def test_resolve_public_invalid_idna_name_is_a_resolution_error() -> None:
    with pytest.raises(ResolutionError):
        resolve_public("x" * 64 + ".example", 25)  # a label over 63 octets cannot be encoded
