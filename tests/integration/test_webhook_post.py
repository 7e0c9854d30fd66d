"""webhooks.post.Endpoint against raw HTTP servers on 127.0.0.1: the 64 KiB bound on an answer, a
kept-alive connection the receiver closed, TLS verified for the URL's host name, and http refused
unless private networks are allowed."""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smtp_proxy.devcert import write_self_signed
from smtp_proxy.webhooks.post import MAX_RESPONSE, Endpoint

# What a handler does with one connection: (its socket, the server's record) -> None.
Behaviour = Callable[[socket.socket, "Served"], None]


class Served:
    """What a test server saw: connections accepted and requests read."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.lock = threading.Lock()

    def connected(self) -> None:
        with self.lock:
            self.connections += 1

    def read_request(self, sock: socket.socket) -> bool:
        """Read one request (head and Content-Length body); False when the client closed instead."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        while len(body) < length:
            body += sock.recv(65536)
        with self.lock:
            self.requests += 1
        return True


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Served]]]:
    started: list[socketserver.ThreadingTCPServer] = []

    def start(behaviour: Behaviour, tls: ssl.SSLContext | None = None) -> tuple[int, Served]:
        served = Served()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                if tls is not None:
                    try:
                        sock = tls.wrap_socket(sock, server_side=True)
                    except (ssl.SSLError, OSError):
                        return  # a client that did not trust the certificate
                served.connected()
                try:
                    behaviour(sock, served)
                except OSError:
                    return
                finally:
                    sock.close()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        running = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        running.daemon_threads = True
        threading.Thread(target=running.serve_forever, daemon=True).start()
        started.append(running)
        return running.server_address[1], served

    yield start
    for running in started:
        running.shutdown()
        running.server_close()


def keep_alive(sock: socket.socket, served: Served) -> None:
    while served.read_request(sock):
        sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")


def test_a_kept_alive_connection_carries_the_next_post(server) -> None:
    port, served = server(keep_alive)
    endpoint = Endpoint(f"http://127.0.0.1:{port}/hook", allow_private=True)
    assert [endpoint.post(b"{}", {}).status for _ in range(3)] == [204, 204, 204]
    endpoint.close()
    assert (served.connections, served.requests) == (1, 3)


def test_an_answer_is_read_up_to_64_kib_and_its_connection_is_not_reused(server) -> None:
    def endless(sock: socket.socket, served: Served) -> None:
        while served.read_request(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
            for _ in range(2000):  # 64 MiB at most; the client hangs up long before
                sock.sendall(b"x" * 32768)

    port, served = server(endless)
    endpoint = Endpoint(f"http://127.0.0.1:{port}/hook", allow_private=True)
    first = endpoint.post(b"{}", {})
    second = endpoint.post(b"{}", {})
    endpoint.close()
    assert (first.status, second.status) == (200, 200)
    assert (served.connections, served.requests) == (2, 2)  # the unread rest ended the first one
    assert MAX_RESPONSE == 64 * 1024


def test_a_kept_alive_connection_the_receiver_closed_is_replaced_once(server) -> None:
    def one_request_then_close(sock: socket.socket, served: Served) -> None:
        if served.read_request(sock):  # answers as if it kept the connection, then drops it
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    port, served = server(one_request_then_close)
    endpoint = Endpoint(f"http://127.0.0.1:{port}/hook", allow_private=True)
    answers = [endpoint.post(b"{}", {}) for _ in range(3)]
    endpoint.close()
    assert [a.status for a in answers] == [200, 200, 200] and all(a.error is None for a in answers)
    assert (served.connections, served.requests) == (3, 3)


def test_tls_is_verified_for_the_urls_host_name(server, tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path, "localhost")
    served_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served_tls.load_cert_chain(cert, key)
    port, served = server(keep_alive, tls=served_tls)
    trusting = ssl.create_default_context(cafile=str(cert))
    endpoint = Endpoint(f"https://localhost:{port}/hook", allow_private=True, context=trusting)
    assert endpoint.post(b"{}", {}).status == 204
    endpoint.close()
    refused = Endpoint(f"https://localhost:{port}/hook", allow_private=True).post(b"{}", {})  # system CAs
    assert refused.status is None and "TLS failed" in (refused.error or "")
    assert served.requests == 1


def test_http_and_private_addresses_need_allow_private_networks(server) -> None:
    port, served = server(keep_alive)
    plain = Endpoint(f"http://127.0.0.1:{port}/hook", allow_private=False).post(b"{}", {})
    assert plain.status is None and "http is allowed only" in (plain.error or "")
    private = Endpoint(f"https://127.0.0.1:{port}/hook", allow_private=False).post(b"{}", {})
    assert private.status is None and "not a public address" in (private.error or "")
    assert served.connections == 0
