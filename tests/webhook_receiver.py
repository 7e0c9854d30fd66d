"""A local HTTP receiver for webhook tests: records each POST, answers with scripted statuses."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class Receiver:
    """An HTTP server that records each POST and answers with the next scripted status (default 200)."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    hold: threading.Event | None = None  # set: every request waits for it before answering
    keep_alive: bool = True  # HTTP/1.1 with persistent connections, else HTTP/1.0 (one request each)
    server: http.server.ThreadingHTTPServer | None = None
    connections: set[tuple[str, int]] = field(default_factory=set)  # the clients' (address, port)s

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def bodies(self) -> list[dict]:
        return [json.loads(body) for _path, _headers, body in self.requests]


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    started: list[http.server.ThreadingHTTPServer] = []

    def start(**fields) -> Receiver:
        state = Receiver(**fields)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if state.keep_alive else "HTTP/1.0"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                state.connections.add(self.client_address)
                state.requests.append((self.path, dict(self.headers), body))
                if state.hold is not None:
                    state.hold.wait(10)
                status = state.statuses.pop(0) if state.statuses else 200
                self.send_response(status)
                if status in (301, 302, 307):
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        state.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        started.append(state.server)
        threading.Thread(target=state.server.serve_forever, daemon=True).start()
        return state

    yield start
    for server in started:
        server.shutdown()
        server.server_close()
