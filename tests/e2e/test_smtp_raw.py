"""The listener at the byte level: pipelining, STARTTLS injection, smuggling, hostile clients."""

from __future__ import annotations

import socket
import time

import pytest

from tests.e2e.conftest import Listener, RawClient
from tests.waiting import wait_for

ENVELOPE = b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n"


def test_pipelined_commands_are_answered_in_order(listener: Listener, raw_client, client_tls) -> None:
    client: RawClient = raw_client()
    client.login(listener, client_tls)
    client.send(ENVELOPE + b"Subject: p\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
    replies = [client.reply() for _ in range(6)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"354", b"250", b"250", b"221"]
    assert replies[3].startswith(b"250 2.0.0 Ok: queued as ")
    assert len(listener.stored()) == 1


def test_commands_injected_behind_starttls_are_discarded(listener: Listener, raw_client, client_tls) -> None:
    """CVE-2011-0411: plaintext pipelined after STARTTLS must not run inside TLS."""
    client: RawClient = raw_client()
    assert client.reply().startswith(b"220 ")
    client.send(b"EHLO client.test\r\n")
    client.reply()
    client.send(b"STARTTLS\r\nRSET\r\n")
    # The 220 to STARTTLS arrives alone; the RSET is never answered, before or after the handshake.
    assert client.reply().startswith(b"220 2.0.0")
    client.starttls(client_tls)
    client.send(b"EHLO client.test\r\n")
    reply = client.reply()
    assert reply.startswith(b"250-mx.test") and b"AUTH PLAIN LOGIN" in reply
    client.send(b"NOOP\r\n")
    assert client.reply() == b"250 2.0.0 OK\r\n"


def test_plaintext_after_starttls_breaks_only_that_handshake(
    listener: Listener, raw_client, client_tls
) -> None:
    client: RawClient = raw_client()
    client.reply()
    client.send(b"EHLO client.test\r\nSTARTTLS\r\n")
    client.reply()
    client.reply()
    client.send(b"MAIL FROM:<x@example.com>\r\n")  # plaintext where a ClientHello belongs
    assert client.closed()
    other: RawClient = raw_client()
    other.login(listener, client_tls)
    other.send(b"NOOP\r\n")
    assert other.reply().startswith(b"250")


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\r.\r"]


@pytest.mark.parametrize("ending", SMUGGLING, ids=repr)
def test_smuggled_end_of_data_never_starts_a_second_message(
    listener: Listener, raw_client, client_tls, ending: bytes
) -> None:
    client: RawClient = raw_client()
    client.login(listener, client_tls)
    client.send(ENVELOPE)
    assert [client.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    smuggled = b"MAIL FROM:<app@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n"
    client.send(b"Subject: first\r\n\r\nhello" + ending + smuggled + b"\r\n.\r\n")
    final = client.reply()
    assert final[:3] in (b"250", b"554"), final
    client.send(b"NOOP\r\n")
    assert client.reply().startswith(b"250 2.0.0 OK")  # no stray replies queued up
    stored = listener.stored()
    assert len(stored) <= 1
    if stored:
        assert stored[0].recipients == ["a@example.net"]
        assert b"victim@example.net" in listener.body(stored[0])  # kept as content, never as a command


def test_http_request_is_answered_and_cut_off(listener: Listener, raw_client) -> None:
    client: RawClient = raw_client()
    client.reply()
    client.send(b"GET / HTTP/1.1\r\nHost: mx.test\r\n\r\n")
    assert client.reply().startswith(b"500 5.5.2")
    assert client.closed()


def test_megabyte_line_is_refused_and_session_survives(listener: Listener, raw_client) -> None:
    client: RawClient = raw_client()
    client.reply()
    for _ in range(16):
        client.send(b"A" * 65536)
    client.send(b"\r\nNOOP\r\n")
    assert client.reply().startswith(b"500 5.5.2")
    assert client.reply().startswith(b"250")


def test_repeated_errors_close_the_session(listener: Listener, raw_client) -> None:
    client: RawClient = raw_client()
    client.reply()
    client.send(b"BOGUS\r\n" * 12)
    replies = [client.reply() for _ in range(10)]
    assert replies[-1].startswith(b"421 4.7.0")
    assert client.closed()


def test_connection_over_max_connections_gets_421_at_once(start_listener) -> None:
    listener = start_listener(max_connections=3)
    held = [RawClient(listener.host, listener.port) for _ in range(3)]
    try:
        for client in held:
            assert client.reply().startswith(b"220 ")
        extra = RawClient(listener.host, listener.port)
        assert extra.reply().startswith(b"421 4.7.0")
        assert extra.closed()
        extra.close()
        held.pop().close()
        wait_for(lambda: listener.server.active_count < 3, "the closed session to end")
        again = RawClient(listener.host, listener.port)
        assert again.reply().startswith(b"220 ")
        again.close()
    finally:
        for client in held:
            client.close()


def test_idle_client_gets_421_after_read_timeout(start_listener) -> None:
    listener = start_listener(read_timeout="1s")
    client = RawClient(listener.host, listener.port)
    try:
        client.reply()
        started = time.monotonic()
        assert client.reply().startswith(b"421 4.4.2")
        assert 0.8 < time.monotonic() - started < 5
        assert client.closed()
    finally:
        client.close()


def test_per_account_session_limit(start_listener, client_tls) -> None:
    listener = start_listener(max_connections_per_account=1)
    first = RawClient(listener.host, listener.port)
    second = RawClient(listener.host, listener.port)
    try:
        first.login(listener, client_tls)
        assert second.auth(listener, client_tls).startswith(b"421 4.7.0")
        assert second.closed()
        first.close()
        wait_for(
            lambda: not listener.server.authenticator.sessions._counts, "the first session's count to drop"
        )
        third = RawClient(listener.host, listener.port)
        third.login(listener, client_tls)
        third.close()
    finally:
        first.close()
        second.close()


def test_implicit_tls_listener_speaks_tls_from_the_first_byte(start_listener, client_tls) -> None:
    listener = start_listener(implicit_tls=True)
    sock = client_tls.wrap_socket(
        socket.create_connection((listener.host, listener.port), timeout=10), server_hostname="localhost"
    )
    try:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert sock.recv(1024).startswith(b"220 mx.test")
        sock.sendall(b"EHLO client.test\r\n")
        reply = sock.recv(4096)
        assert b"AUTH PLAIN LOGIN" in reply and b"STARTTLS" not in reply
    finally:
        sock.close()


def test_failed_auth_is_throttled_then_refused(listener: Listener, raw_client, client_tls) -> None:
    import base64

    client: RawClient = raw_client()
    client.reply()
    client.send(b"EHLO c\r\nSTARTTLS\r\n")
    client.reply(), client.reply()
    client.starttls(client_tls)
    client.send(b"EHLO c\r\n")
    client.reply()
    bad = base64.b64encode(b"\0tenant\0wrong password").decode()
    codes = []
    for _ in range(7):
        client.send(f"AUTH PLAIN {bad}\r\n".encode())
        codes.append(client.reply()[:3])
        if codes[-1] == b"421":
            break
    assert b"535" in codes and b"454" in codes  # 454 past per_ip=5 failures
