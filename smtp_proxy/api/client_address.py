"""The API client's real address behind a load balancer or an HTTP proxy.

Two ways in, each trusted only from configured addresses, since either could name any address:

- ``api.proxy_protocol_from``: a TCP balancer (HAProxy ``send-proxy``/``send-proxy-v2``) opens
  each connection with a PROXY protocol header. ``ProxyProtocolChannel`` (a waitress channel)
  takes it off the stream and makes its client the channel's address, from which waitress builds
  ``REMOTE_ADDR``. A trusted peer whose header is missing, bad or not complete within
  ``api.read_timeout`` is closed, and so is any other peer that sends one.
- ``api.trusted_proxies``: an HTTP proxy appends the address it saw to ``X-Forwarded-For``.
  ``ForwardedFor`` (WSGI middleware) walks that list from the right while the hops are trusted
  proxies, and takes the first that is not.

Everything after them (the rate limit per address, the request log line) reads ``REMOTE_ADDR``.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer

from smtp_proxy import proxy_protocol
from smtp_proxy.proxy_protocol import Network

log = logging.getLogger("smtp_proxy.api")

# X-Forwarded-For hops looked at, from the right: more proxies than this in a row is no real chain.
MAX_FORWARDED_HOPS = 16


class ProxyProtocolChannel(HTTPChannel):
    """An HTTP channel that takes a trusted balancer's PROXY header off the front of the stream.

    ``trusted`` and ``header_timeout`` are set on a subclass per server (``install``).
    """

    trusted: tuple[Network, ...] = ()
    header_timeout: float = 10.0

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.peer_ip = str(addr[0]) if addr else ""
        self.awaiting_header = proxy_protocol.is_trusted(self.peer_ip, self.trusted)
        self.first_bytes = True
        self.header_bytes = b""

    def received(self, data: bytes) -> bool:
        if self.awaiting_header:
            return self._take_header(data)
        if self.first_bytes:
            self.first_bytes = False
            if proxy_protocol.looks_like_header(data):
                self._refuse(
                    "untrusted", "a PROXY protocol header from an address not in api.proxy_protocol_from"
                )
                return False
        return bool(super().received(data))

    def readable(self) -> bool:
        # Called by waitress's loop at least once a second: it also keeps the header's clock.
        if self.awaiting_header and time.time() - self.creation_time > self.header_timeout:
            self._refuse("timeout", "no complete header in time")
            return False
        return bool(super().readable())

    def _take_header(self, data: bytes) -> bool:
        seen = self.header_bytes + data
        try:
            header = proxy_protocol.parse(seen)
        except proxy_protocol.ProxyHeaderError as error:
            self._refuse(error.reason, str(error))
            return False
        if not isinstance(header, proxy_protocol.ProxyHeader):
            self.header_bytes = seen
            return True
        self.awaiting_header, self.first_bytes, self.header_bytes = False, False, b""
        if header.source is not None:  # LOCAL, UNKNOWN: the balancer itself
            self.addr = header.source
        rest = seen[header.length :]
        return bool(super().received(rest)) if rest else True

    def _refuse(self, reason: str, detail: str) -> None:
        self.awaiting_header = False
        self.will_close = True  # waitress closes it from its loop
        log.warning(
            "PROXY protocol header refused",
            extra={
                "event": "api.proxy_header_refused",
                "client_ip": self.peer_ip,
                "reason": reason,
                "detail": detail,
            },
        )


def install(socket_map: dict[int, Any], trusted: tuple[Network, ...], header_timeout: float) -> None:
    """Serve every waitress server in ``socket_map`` with ``ProxyProtocolChannel``.

    Also with nothing trusted: then every connection is checked for a header nobody may send.
    """
    channel = type(
        "ProxyProtocolChannel",
        (ProxyProtocolChannel,),
        {"trusted": trusted, "header_timeout": header_timeout},
    )
    for dispatcher in socket_map.values():
        if isinstance(dispatcher, BaseWSGIServer):
            dispatcher.channel_class = channel


class ForwardedFor:
    """WSGI middleware: ``REMOTE_ADDR`` from ``X-Forwarded-For``, when the peer is a trusted proxy."""

    def __init__(self, app: Callable[..., Iterable[bytes]], trusted: tuple[Network, ...]) -> None:
        self.app = app
        self.trusted = trusted

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        peer = environ.get("REMOTE_ADDR", "")
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded and proxy_protocol.is_trusted(peer, self.trusted):
            environ["REMOTE_ADDR"] = forwarded_client(forwarded, peer, self.trusted)
        return self.app(environ, start_response)


def forwarded_client(header: str, peer: str, trusted: tuple[Network, ...]) -> str:
    """The rightmost hop that is not a trusted proxy; where a hop is no address, the last one
    before it (what is left of it was written by someone we do not trust)."""
    client = peer
    for hop in reversed(header.rsplit(",", MAX_FORWARDED_HOPS)):
        try:
            client = str(ipaddress.ip_address(hop.strip()))
        except ValueError:
            break
        if not proxy_protocol.is_trusted(client, trusted):
            break
    return client
