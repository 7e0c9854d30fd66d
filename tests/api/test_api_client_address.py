"""The API's client address behind a balancer or a proxy: what the per-address rate limit and the
request log see.

``X-Forwarded-For`` is taken from ``api.trusted_proxies`` only (Flask's test client, then a real
HAProxy in http mode); a PROXY protocol header from ``api.proxy_protocol_from`` only (waitress over
real sockets with hand-made headers, then a real HAProxy with ``send-proxy-v2``). The limit allows
two requests without a key per address and minute; the limiter's clock stands still, so no window
ends in the middle of a test.
"""

from __future__ import annotations

import http.client
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from smtp_proxy.api import create_app
from smtp_proxy.api.client_address import forwarded_client
from smtp_proxy.api.rate_limit import RateLimit
from smtp_proxy.config import config_from_dict
from smtp_proxy.db.session import Database
from smtp_proxy.proxy_protocol import V2_SIGNATURE
from tests.api.checks import assert_error
from tests.api.conftest import AppUnderTest, close_counters, serve, stop
from tests.waiting import wait_for

PROVIDERS = "/api/v1/providers"
NOW = 1_800_000_015.0
LIMIT = {"unauthenticated_rate_limit": "2/minute"}
GET = b"GET /api/v1/providers HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"


def frozen(app: Flask) -> None:
    app.extensions["smtp_proxy.rate_limit"] = RateLimit(
        app.extensions["smtp_proxy.config"], clock=lambda: NOW
    )


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Callable[[str], list[Any]]:
    caplog.set_level(logging.INFO, logger="smtp_proxy.api")
    return lambda event: [r for r in caplog.records if getattr(r, "event", None) == event]


# --- X-Forwarded-For ------------------------------------------------------------------------------------


TRUSTED = config_from_dict(
    {"api": {"trusted_proxies": ["192.0.2.1", "10.0.0.0/8"]}}, env={}
).api.trusted_proxies


@pytest.mark.parametrize(
    ("header", "client"),
    [
        ("203.0.113.5", "203.0.113.5"),
        ("203.0.113.5, 10.1.2.3", "203.0.113.5"),  # through a second, trusted proxy
        ("198.51.100.66, 203.0.113.5", "203.0.113.5"),  # the client's own claim is not believed
        ("198.51.100.66,203.0.113.5,10.1.2.3", "203.0.113.5"),
        ("unknown", "192.0.2.1"),  # no address: the proxy that wrote it is all we know
        ("203.0.113.5, unknown, 10.1.2.3", "10.1.2.3"),
        ("10.9.9.9, 10.1.2.3", "10.9.9.9"),  # trusted all the way: the farthest hop
        ("2001:db8::7", "2001:db8::7"),
        ("[2001:db8::7]", "192.0.2.1"),
        ("203.0.113.5:4711", "192.0.2.1"),
        (", ".join(["10.0.0.1"] * 100), "10.0.0.1"),
    ],
)
def test_the_client_is_the_rightmost_hop_that_is_not_a_trusted_proxy(header: str, client: str) -> None:
    assert forwarded_client(header, "192.0.2.1", TRUSTED) == client


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(make_app, pg_url: str, records) -> None:
    app: AppUnderTest = make_app(pg_url, api={**LIMIT, "trusted_proxies": ["192.0.2.1"]})
    frozen(app.app)

    def call(forwarded: str) -> Any:
        return app.call("GET", PROVIDERS, address="192.0.2.1", headers={"X-Forwarded-For": forwarded})

    for _ in range(2):
        assert_error(call("203.0.113.5"), 401, "unauthorized")
    assert_error(call("198.51.100.66, 203.0.113.5"), 429, "rate_limited")  # a forged hop changes nothing
    assert_error(call("203.0.113.6"), 401, "unauthorized")  # another client, its own budget
    assert [r.client_ip for r in records("api.request")] == ["203.0.113.5"] * 3 + ["203.0.113.6"]


@pytest.mark.parametrize("trusted", [[], ["192.0.2.1"]], ids=["none-trusted", "another-trusted"])
def test_x_forwarded_for_from_anyone_else_is_ignored(
    make_app, pg_url: str, records, trusted: list[str]
) -> None:
    app: AppUnderTest = make_app(pg_url, api={**LIMIT, "trusted_proxies": trusted})
    frozen(app.app)
    for forwarded in ("203.0.113.5", "203.0.113.6"):
        reply = app.call("GET", PROVIDERS, address="198.51.100.7", headers={"X-Forwarded-For": forwarded})
        assert_error(reply, 401, "unauthorized")
    reply = app.call("GET", PROVIDERS, address="198.51.100.7", headers={"X-Forwarded-For": "203.0.113.7"})
    assert_error(reply, 429, "rate_limited")
    assert {r.client_ip for r in records("api.request")} == {"198.51.100.7"}


# --- the PROXY protocol, at waitress ------------------------------------------------------------------


@pytest.fixture
def start_waitress(pg_url: str, make_config) -> Iterator[Callable[..., int]]:
    """The API under waitress as ``serve api`` builds it, its limiter frozen; returns the port."""
    started: list[tuple[Any, Any, Flask, Database]] = []

    def start(**api: Any) -> int:
        config = make_config(pg_url, api={**LIMIT, "read_timeout": "1s", **api})
        database = Database(config.database)
        app = create_app(config, database)
        frozen(app)
        server, thread, base_url = serve(app, config)
        started.append((server, thread, app, database))
        return int(base_url.rsplit(":", 1)[1])

    yield start
    for server, thread, app, database in started:
        stop(server, thread)
        close_counters(app)
        database.dispose()


def exchange(port: int, data: bytes, source: str | None = None) -> bytes:
    """Send ``data`` and read until the server closes: its whole answer (empty: none)."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(source, 0) if source else None
    ) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    return int(answer[9:12])


def v1(client: str) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 40000 8080\r\n".encode()


def v2(client: str, command: int = 0x21) -> bytes:
    block = (
        socket.inet_aton(client)
        + socket.inet_aton("127.0.0.1")
        + (40000).to_bytes(2, "big")
        + (8080).to_bytes(2, "big")
    )
    return V2_SIGNATURE + bytes([command, 0x11]) + len(block).to_bytes(2, "big") + block


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_a_balancers_header_names_the_client(start_waitress, records, header: Callable[[str], bytes]) -> None:
    port = start_waitress(proxy_protocol_from=["127.0.0.1/32"])
    assert [status(exchange(port, header("203.0.113.5") + GET)) for _ in range(3)] == [401, 401, 429]
    assert status(exchange(port, header("203.0.113.6") + GET)) == 401
    lines = wait_for(
        lambda: len(records("api.request")) == 4 and records("api.request"), "four request lines"
    )
    assert [r.client_ip for r in lines] == ["203.0.113.5"] * 3 + ["203.0.113.6"]


def test_a_balancers_local_connection_is_served_as_the_balancer(start_waitress, records) -> None:
    port = start_waitress(proxy_protocol_from=["127.0.0.1/32"])
    answer = exchange(
        port, v2("192.0.2.9", command=0x20) + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status(answer) == 200
    [line] = wait_for(lambda: records("api.request"), "the request line")
    assert line.client_ip == "127.0.0.1"


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (GET, "not_proxy"),  # a balancer set up without send-proxy
        (b"PROXY TCP4 203.0.113.05 127.0.0.1 40000 8080\r\n" + GET, "bad_address"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "too_long"),
        (b"PROXY TCP4 203.0.113.5 ", "timeout"),  # and then nothing, for longer than api.read_timeout
        (b"", "timeout"),
    ],
    ids=["no-header", "bad-address", "oversized", "cut-short", "silent"],
)
def test_a_balancer_without_a_good_header_is_closed_unanswered(
    start_waitress, records, sent: bytes, reason: str
) -> None:
    port = start_waitress(proxy_protocol_from=["127.0.0.1/32"])
    assert exchange(port, sent) == b""
    [refused] = wait_for(lambda: records("api.proxy_header_refused"), "the refusal's log line")
    assert (refused.client_ip, refused.reason) == ("127.0.0.1", reason)
    assert not records("api.request")


@pytest.mark.parametrize("trusted", [[], ["192.0.2.0/24"]], ids=["none-trusted", "others-trusted"])
@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_a_header_from_anyone_else_is_refused(
    start_waitress, records, trusted: list[str], header: Callable[[str], bytes]
) -> None:
    port = start_waitress(proxy_protocol_from=trusted)
    assert exchange(port, header("203.0.113.5") + GET) == b""
    [refused] = wait_for(lambda: records("api.proxy_header_refused"), "the refusal's log line")
    assert (refused.client_ip, refused.reason) == ("127.0.0.1", "untrusted")
    assert status(exchange(port, GET)) == 401  # without a header, that peer is served as ever


# --- through a real HAProxy -----------------------------------------------------------------------------


def get_from(port: int, source: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", PROVIDERS)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("api", "relay_options"),
    [
        ({"proxy_protocol_from": ["127.0.0.1/32"]}, {"send": "send-proxy-v2"}),
        ({"trusted_proxies": ["127.0.0.1/32"]}, {"mode": "http", "options": "option forwardfor"}),
    ],
    ids=["send-proxy-v2", "x-forwarded-for"],
)
def test_behind_haproxy_the_rate_limit_and_the_log_see_each_client(
    start_waitress, start_haproxy, records, api: dict[str, Any], relay_options: dict[str, str]
) -> None:
    front = start_haproxy(start_waitress(**api), **relay_options)
    assert [get_from(front, "127.0.0.2") for _ in range(3)] == [401, 401, 429]
    assert get_from(front, "127.0.0.3") == 401
    lines = wait_for(
        lambda: len(records("api.request")) == 4 and records("api.request"), "four request lines"
    )
    assert [r.client_ip for r in lines] == ["127.0.0.2"] * 3 + ["127.0.0.3"]


def test_the_audit_log_records_the_real_client_of_each_api_change(make_app, pg_url: str) -> None:
    app: AppUnderTest = make_app(pg_url, api={"trusted_proxies": ["192.0.2.1"]})
    through_proxy = app.call(
        "PUT",
        f"/api/v1/accounts/{app.admin_id}",
        app.admin_key,
        body={"email": "ops@proxied.example"},
        address="192.0.2.1",
        headers={"X-Forwarded-For": "198.51.100.66, 203.0.113.5"},
    )
    assert through_proxy.status_code == 200, through_proxy.text
    direct = app.call(
        "PUT",
        f"/api/v1/accounts/{app.admin_id}",
        app.admin_key,
        body={"email": "ops@direct.example"},
        address="198.51.100.7",
        headers={"X-Forwarded-For": "203.0.113.9"},  # not from a trusted proxy: ignored
    )
    assert direct.status_code == 200, direct.text
    listed = app.call("GET", "/api/v1/audit-log", app.admin_key)
    assert listed.status_code == 200, listed.text
    updates = [e["client_ip"] for e in listed.json()["items"] if e["action"] == "update"]
    assert updates == ["198.51.100.7", "203.0.113.5"]  # newest first
