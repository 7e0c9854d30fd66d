"""Webhook POSTs to a tenant's URL, behind the same address guard as smtp providers.

The tenant chooses the URL, so it could name the operator's own network. The host is
resolved once per ``Endpoint`` (``delivery.network.resolve_public``: no private, loopback or
link-local address unless ``delivery.allow_private_networks``), and every connection goes to
exactly a checked address: the TLS certificate is still verified for the host name, and
nothing resolves the name a second time (DNS rebinding). ``http.client`` sends the requests,
so no redirect is ever followed, and at most ``MAX_RESPONSE`` bytes of an answer are read.

An ``Endpoint`` keeps its connection open between POSTs while the receiver does (HTTP/1.1
keep-alive), so a batch of events costs one TCP and TLS handshake, not one each. Every
failure is an ``Answer`` with an error, never an exception.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import NamedTuple
from urllib.parse import urlsplit

from smtp_proxy import __version__
from smtp_proxy.delivery.network import Address, PrivateAddressError, ResolutionError, resolve_public

MAX_RESPONSE = 64 * 1024
TIMEOUT = 10.0
USER_AGENT = f"smtp-proxy-webhooks/{__version__}"
# What a kept-alive connection the receiver has meanwhile closed fails with, before any answer:
# the request is sent again once on a new connection.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class Answer(NamedTuple):
    """The receiver's status (None when there was no HTTP answer) and what went wrong, if anything."""

    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP connection that (re)connects only to checked addresses, with TLS for ``https``."""

    def __init__(
        self, host: str, addresses: list[Address], tls: ssl.SSLContext | None, timeout: float
    ) -> None:
        super().__init__(host, timeout=timeout)
        self._addresses = addresses
        self._tls = tls
        self.last_error = "no address answered"

    def connect(self) -> None:
        """The first checked address that accepts; http.client calls this for each new connection."""
        for address in self._addresses:
            sock = socket.socket(address.family, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(address.sockaddr)
            except OSError as error:
                sock.close()
                self.last_error = f"cannot connect to {address.ip}: {error.strerror or error}"
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_hostname=self.host)
                except BaseException:
                    sock.close()
                    raise
            self.sock = sock
            return
        raise _Unreachable(self.last_error)


class _Unreachable(OSError):
    """No checked address accepted a connection."""


class Endpoint:
    """POSTs to one URL over a connection kept open between them; one thread at a time.

    The address guard runs at the first POST. ``close`` ends the connection.
    """

    def __init__(
        self,
        url: str,
        *,
        allow_private: bool,
        timeout: float = TIMEOUT,
        context: ssl.SSLContext | None = None,
    ) -> None:
        """``context`` verifies the receiver's certificate (default: the system's)."""
        parts = urlsplit(url)
        self._host = parts.hostname or ""
        self._https = parts.scheme == "https"
        self._port = parts.port or (443 if self._https else 80)
        self._netloc = parts.netloc.rpartition("@")[2]
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._allow_private = allow_private
        self._timeout = timeout
        self._context = context
        self._connection: _PinnedConnection | None = None
        self._refused: str | None = None

    def post(self, body: bytes, headers: dict[str, str]) -> Answer:
        """POST ``body`` with ``headers`` (beside ours); the answer's status, or why there was none."""
        connection = self._connection or self._open()
        if connection is None:
            return Answer(None, self._refused)
        sent = {
            "Host": self._netloc,
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            **headers,
        }
        reused = connection.sock is not None
        try:
            try:
                return self._exchange(connection, body, sent)
            except _STALE:
                if not reused:
                    raise
                connection.close()  # the receiver closed the kept-alive connection: once more, anew
                return self._exchange(connection, body, sent)
        except _Unreachable as error:
            return Answer(None, str(error))
        except ssl.SSLError as error:
            connection.close()
            return Answer(None, f"TLS failed: {error.reason or error}")
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            return Answer(None, f"{type(error).__name__}: {error}"[:200])

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()

    def _open(self) -> _PinnedConnection | None:
        if self._refused is not None:
            return None
        if not self._https and not self._allow_private:
            self._refused = "http is allowed only with delivery.allow_private_networks"
            return None
        try:
            addresses = resolve_public(self._host, self._port, allow_private=self._allow_private)
        except (ResolutionError, PrivateAddressError) as error:
            self._refused = str(error)
            return None
        tls = (self._context or ssl.create_default_context()) if self._https else None
        self._connection = _PinnedConnection(self._host, addresses, tls, self._timeout)
        return self._connection

    def _exchange(self, connection: _PinnedConnection, body: bytes, headers: dict[str, str]) -> Answer:
        connection.request("POST", self._target, body=body, headers=headers, encode_chunked=False)
        response = connection.getresponse()
        response.read(MAX_RESPONSE)  # read (and bound) what the receiver says; the status decides
        if not response.isclosed():  # longer than we read: this connection cannot carry another
            connection.close()
        return Answer(response.status, None)


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
    timeout: float = TIMEOUT,
    context: ssl.SSLContext | None = None,
) -> Answer:
    """One POST on a connection of its own."""
    endpoint = Endpoint(url, allow_private=allow_private, timeout=timeout, context=context)
    try:
        return endpoint.post(body, headers)
    finally:
        endpoint.close()
