"""The listener behind a load balancer: a real HAProxy (``send-proxy``, ``send-proxy-v2``) in front,
clients on other loopback addresses than the balancer's, and hand-made headers straight at the
listener (truncated, oversized, wrong signature, TLVs, unknown family, from an untrusted address).

The balancer connects from 127.0.0.1 and its clients from 127.0.0.2 and 127.0.0.3, so whatever is
keyed by the client's address (the per-address cap, the AUTH throttle, the logs, the Received:
field) shows whether the listener took the header's address or the balancer's.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from smtp_proxy.proxy_protocol import V2_SIGNATURE
from smtp_proxy.smtp.replies import R421_TOO_MANY_FROM_IP, R554_PROXY_HEADER
from smtp_proxy.storage import accounts
from smtp_proxy.storage.audit import CLI
from tests.e2e.conftest import Listener, RawClient, closed_after_test
from tests.waiting import wait_for

BALANCER = ["127.0.0.1/32"]
SENDS = ["send-proxy", "send-proxy-v2"]
MESSAGE = b"From: App <app@example.com>\r\nSubject: behind a balancer\r\n\r\nbody\r\n"
V1_HEADER = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 587\r\n"


def v2_header(family: int = 0x11, tlvs: bytes = b"", command: int = 0x21) -> bytes:
    """PROXY (or LOCAL, ``command=0x20``) from 192.0.2.7:40000 over TCP/IPv4, with ``tlvs``."""
    block = bytes([192, 0, 2, 7, 127, 0, 0, 1]) + (40000).to_bytes(2, "big") + (587).to_bytes(2, "big") + tlvs
    return V2_SIGNATURE + bytes([command, family]) + len(block).to_bytes(2, "big") + block


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("smtp_proxy_smtp_proxy_header_failures_total", {"reason": reason}) or 0.0


def per_ip_rejections() -> float:
    return REGISTRY.get_sample_value("smtp_proxy_smtp_limit_rejections_total", {"reason": "per_ip"}) or 0.0


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Callable[[str], list[Any]]:
    """The listener's log records of one event, as they come."""
    caplog.set_level(logging.INFO, logger="smtp_proxy.smtp")
    return lambda event: [r for r in caplog.records if getattr(r, "event", None) == event]


@pytest.fixture
def clients() -> Iterator[Callable[..., RawClient]]:
    opened: list[RawClient] = []

    def connect(port: int, source: str | None = None) -> RawClient:
        client = RawClient("127.0.0.1", port, source=source)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def auth_plain(password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0tenant\0{password}".encode()) + b"\r\n"


# --- through a real HAProxy ---------------------------------------------------------------------------


@pytest.mark.parametrize("send", SENDS)
def test_the_per_address_cap_counts_each_client_behind_the_balancer(
    start_listener, start_haproxy, clients, send: str
) -> None:
    listener: Listener = start_listener(proxy_protocol_from=BALANCER, max_connections_per_ip=2)
    front = start_haproxy(listener.port, send=send)
    refused = per_ip_rejections()
    for _ in range(2):
        assert clients(front, "127.0.0.2").reply().startswith(b"220 ")
    third = clients(front, "127.0.0.2")
    assert third.reply() == R421_TOO_MANY_FROM_IP.to_bytes()
    assert third.closed()
    assert clients(front, "127.0.0.3").reply().startswith(b"220 ")
    # Three sessions from the balancer's one address, past a cap of two: the clients are counted.
    wait_for(lambda: listener.server.active_count == 3, "the refused session to end")
    assert per_ip_rejections() == refused + 1


@pytest.mark.parametrize("send", SENDS)
def test_the_auth_throttle_counts_each_client_behind_the_balancer(
    start_listener, start_haproxy, clients, client_tls: ssl.SSLContext, records, send: str
) -> None:
    """The fixture's throttle allows 5 failures per address; the 6th guess gets 454, the tenant
    on another address behind the same balancer still logs in."""
    listener: Listener = start_listener(proxy_protocol_from=BALANCER)
    front = start_haproxy(listener.port, send=send)
    guesser = clients(front, "127.0.0.2")
    assert guesser.auth(dataclasses.replace(listener, password="wrong"), client_tls).startswith(b"535 5.7.8")
    for _ in range(4):
        guesser.send(auth_plain("still wrong"))
        assert guesser.reply().startswith(b"535 5.7.8")
    guesser.send(auth_plain(listener.password))
    assert guesser.reply().startswith(b"454 4.7.0")
    clients(front, "127.0.0.3").login(listener, client_tls)
    assert {r.client_ip for r in records("smtp.auth_failed")} == {"127.0.0.2"}  # what fail2ban reads


def test_a_relay_network_holds_the_client_behind_the_balancer_not_the_balancer(
    start_listener, start_haproxy, clients
) -> None:
    """The tenant's relay network is 127.0.0.2: that client sends without AUTH through the
    balancer; another client behind the same balancer (127.0.0.3) must still log in."""
    listener: Listener = start_listener(proxy_protocol_from=BALANCER)
    with listener.database.transaction() as session:
        account = accounts.get_account_by_name(session, listener.tenant)
        accounts.update_account(
            session,
            account,
            {"relay_networks": [{"network": "127.0.0.2/32", "require_tls": False}]},
            actor=CLI,
            bcrypt_cost=4,
            unique_domains=True,
        )
    listener.database.remove_session()
    front = start_haproxy(listener.port, send="send-proxy-v2")
    for source, reply in (("127.0.0.2", b"250 "), ("127.0.0.3", b"530 5.7.0")):
        client = clients(front, source)
        assert client.reply().startswith(b"220 ")
        client.send(b"EHLO client.test\r\n")
        assert client.reply().startswith(b"250")
        client.send(b"MAIL FROM:<app@example.com>\r\n")
        assert client.reply().startswith(reply), source


def test_logs_and_the_received_field_name_the_client_not_the_balancer(
    start_listener, start_haproxy, client_tls: ssl.SSLContext, records
) -> None:
    listener: Listener = start_listener(proxy_protocol_from=BALANCER)
    front = start_haproxy(listener.port, send="send-proxy-v2")
    client = closed_after_test(
        smtplib.SMTP(
            "127.0.0.1", front, local_hostname="client.test", timeout=10, source_address=("127.0.0.2", 0)
        )
    )
    client.starttls(context=client_tls)
    client.login(listener.tenant, listener.password)
    client.sendmail("app@example.com", ["someone@example.net"], MESSAGE)
    client.quit()
    [stored] = listener.stored()
    received, content = listener.received_and_content(stored)
    assert received.startswith("Received: from client.test ([127.0.0.2]) (using TLSv1.")
    assert content == MESSAGE
    [closed] = wait_for(lambda: records("smtp.disconnect"), "the session's close line")
    assert (closed.client_ip, closed.proxy_ip, closed.account) == ("127.0.0.2", "127.0.0.1", "tenant")


# --- hand-made headers from a trusted balancer ----------------------------------------------------------


def test_a_header_in_pieces_with_tlvs_is_taken_whole_and_names_the_client(
    start_listener, clients, records
) -> None:
    listener: Listener = start_listener(proxy_protocol_from=BALANCER)
    header = v2_header(tlvs=b"\x02\x00\x10mail.example.com" + b"\x04\x00\x03\0\0\0")
    client = clients(listener.port)
    for byte in range(len(header)):
        client.send(header[byte : byte + 1])
    assert client.reply().startswith(b"220 mx.test ESMTP")
    client.send(b"EHLO client.test\r\n")
    assert client.reply().startswith(b"250-mx.test")
    client.send(b"QUIT\r\n")
    assert client.reply().startswith(b"221 ")
    [closed] = wait_for(lambda: records("smtp.disconnect"), "the session's close line")
    assert (closed.client_ip, closed.proxy_ip) == ("192.0.2.7", "127.0.0.1")


def test_the_bytes_after_the_header_stay_the_clients(start_listener, clients) -> None:
    """Sent with the header, before the greeting, a command is early talk: the listener read the
    header and not one byte more."""
    listener: Listener = start_listener(proxy_protocol_from=BALANCER)
    client = clients(listener.port)
    client.send(V1_HEADER + b"QUIT\r\n")
    assert client.reply().startswith(b"554 5.5.1 Protocol error: data sent before the greeting")
    assert client.closed()


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", v2_header(command=0x20), v2_header(family=0x31, command=0x20)],
    ids=["v1-unknown", "v2-local", "v2-local-unix"],
)
def test_local_and_unknown_are_served_as_the_balancer_itself(
    start_listener, clients, records, header: bytes
) -> None:
    """A balancer's health check greets and quits; the specification says to use the real endpoints."""
    listener: Listener = start_listener(proxy_protocol_from=BALANCER)
    client = clients(listener.port)
    client.send(header)
    assert client.reply().startswith(b"220 ")
    client.send(b"QUIT\r\n")
    assert client.reply().startswith(b"221 ")
    assert client.closed()
    [closed] = wait_for(lambda: records("smtp.disconnect"), "the session's close line")
    assert (closed.client_ip, closed.outcome) == ("127.0.0.1", "quit")


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (V2_SIGNATURE + b"\x21\x11\x07\xd0", "too_long"),  # announces 2,000 bytes
        (b"PROXY " + b"A" * 200, "too_long"),
        (b"EHLO client.test\r\n", "not_proxy"),  # a balancer set up without send-proxy
        (b"GET / HTTP/1.1\r\n", "not_proxy"),
        (V2_SIGNATURE[:6] + b"QUIT\n", "not_proxy"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12, "bad_version"),
        (v2_header(family=0x31), "unsupported_family"),  # AF_UNIX
        (v2_header(family=0x00), "unsupported_family"),  # AF_UNSPEC with PROXY
        (v2_header(family=0x12), "unsupported_family"),  # UDP
        (v2_header(tlvs=b"\x02\x00\x40short"), "bad_tlv"),
        (b"PROXY TCP4 192.0.2.007 127.0.0.1 40000 587\r\n", "bad_address"),
        (b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 65536\r\n", "bad_port"),
        (b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 587\n", "malformed"),
    ],
    ids=[
        "v2-oversized",
        "v1-oversized",
        "smtp",
        "http",
        "v2-wrong-signature",
        "v2-version-3",
        "v2-unix",
        "v2-unspec",
        "v2-udp",
        "v2-tlv-past-end",
        "v1-leading-zero",
        "v1-port-65536",
        "v1-bare-lf",
    ],
)
def test_a_bad_header_from_the_balancer_closes_without_a_greeting(
    start_listener, clients, records, sent: bytes, reason: str
) -> None:
    listener: Listener = start_listener(proxy_protocol_from=BALANCER)
    before = failures(reason)
    client = clients(listener.port)
    client.send(sent)
    assert client.closed()  # and nothing sent before closing
    [refused] = wait_for(lambda: records("smtp.proxy_header_refused"), "the refusal's log line")
    assert (refused.client_ip, refused.reason) == ("127.0.0.1", reason)
    assert failures(reason) == before + 1
    [closed] = wait_for(lambda: records("smtp.disconnect"), "the session's close line")
    assert closed.outcome == "proxy_header_refused"


@pytest.mark.parametrize(
    "sent", [b"", b"PROXY TCP4 192.0.2.7 ", V2_SIGNATURE + b"\x21"], ids=["nothing", "v1-part", "v2-part"]
)
def test_a_balancer_whose_header_does_not_come_in_time_is_closed_without_a_greeting(
    start_listener, clients, records, sent: bytes
) -> None:
    listener: Listener = start_listener(proxy_protocol_from=BALANCER, proxy_protocol_timeout="300ms")
    before = failures("timeout")
    client = clients(listener.port)
    client.send(sent)
    assert client.closed()
    [refused] = wait_for(lambda: records("smtp.proxy_header_refused"), "the refusal's log line")
    assert refused.reason == "timeout"
    assert failures("timeout") == before + 1


def test_a_balancer_that_hangs_up_inside_its_header_is_counted_as_closed(
    start_listener, clients, records
) -> None:
    listener: Listener = start_listener(proxy_protocol_from=BALANCER)
    client = clients(listener.port)
    client.send(V1_HEADER[:20])
    client.sock.shutdown(socket.SHUT_WR)
    assert client.closed()
    [refused] = wait_for(lambda: records("smtp.proxy_header_refused"), "the refusal's log line")
    assert refused.reason == "closed"


def test_a_second_header_from_the_balancer_is_refused(start_listener, clients, records) -> None:
    listener: Listener = start_listener(proxy_protocol_from=BALANCER)
    client = clients(listener.port)
    client.send(V1_HEADER)
    assert client.reply().startswith(b"220 ")
    client.send(b"PROXY TCP4 198.51.100.9 127.0.0.1 1 587\r\n")
    assert client.reply().startswith(b"554 5.7.1 PROXY protocol header not accepted")
    assert client.closed()
    [refused] = wait_for(lambda: records("smtp.proxy_header_refused"), "the refusal's log line")
    assert (refused.client_ip, refused.reason) == ("192.0.2.7", "repeated")


def test_the_header_comes_before_tls_on_the_implicit_tls_port(
    start_listener, clients, client_tls: ssl.SSLContext, records
) -> None:
    """HAProxy in TCP mode in front of port 465 sends its header, then relays the client's TLS."""
    listener: Listener = start_listener(implicit_tls=True, proxy_protocol_from=BALANCER)
    client = clients(listener.port)
    client.send(v2_header())
    client.starttls(client_tls)
    assert client.reply().startswith(b"220 ")
    client.send(b"QUIT\r\n")
    assert client.reply().startswith(b"221 ")
    [closed] = wait_for(lambda: records("smtp.disconnect"), "the session's close line")
    assert (closed.client_ip, closed.tls_version is not None) == ("192.0.2.7", True)


# --- a header from anyone else ------------------------------------------------------------------------


@pytest.mark.parametrize("trusted", [[], ["192.0.2.0/24"]], ids=["none-trusted", "others-trusted"])
@pytest.mark.parametrize("header", [V1_HEADER, v2_header()], ids=["v1", "v2"])
def test_a_header_from_an_untrusted_address_is_refused(
    start_listener, clients, records, trusted: list[str], header: bytes
) -> None:
    """It could name any address. Sent at once it usually beats the greeting; if the greeting
    wins, the header is still the first thing the session reads, and is refused the same way."""
    listener: Listener = start_listener(proxy_protocol_from=trusted)
    before = failures("untrusted")
    client = clients(listener.port)
    client.send(header)
    reply = client.reply()
    if reply.startswith(b"220 "):
        reply = client.reply()
    assert reply == R554_PROXY_HEADER.to_bytes()
    assert client.closed()
    [refused] = wait_for(lambda: records("smtp.proxy_header_refused"), "the refusal's log line")
    assert (refused.client_ip, refused.reason) == ("127.0.0.1", "untrusted")
    assert failures("untrusted") == before + 1
