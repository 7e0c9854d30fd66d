"""One webhook POST to a tenant's URL, behind the same address guard as smtp providers.

The tenant chooses the URL, so it could name the operator's own network. The host is
resolved once (``delivery.network.resolve_public``: no private, loopback or link-local
address unless ``delivery.allow_private_networks``), and the connection goes to exactly
the checked address: the TLS certificate is still verified for the host name, and nothing
resolves the name a second time (DNS rebinding). ``http.client`` on that socket sends the
request, so no redirect is ever followed, and at most ``MAX_RESPONSE`` bytes of the answer
are read. Every failure is an ``Answer`` with an error, never an exception.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import NamedTuple
from urllib.parse import urlsplit

from smtp_proxy import __version__
from smtp_proxy.delivery.network import PrivateAddressError, ResolutionError, resolve_public

MAX_RESPONSE = 64 * 1024
TIMEOUT = 10.0
USER_AGENT = f"smtp-proxy-webhooks/{__version__}"


class Answer(NamedTuple):
    """The receiver's status (None when there was no HTTP answer) and what went wrong, if anything."""

    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
    timeout: float = TIMEOUT,
    context: ssl.SSLContext | None = None,
) -> Answer:
    """POST ``body`` to ``url``; ``context`` verifies the receiver's certificate (default: the system's)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    if not https and not allow_private:
        return Answer(None, "http is allowed only with delivery.allow_private_networks")
    try:
        addresses = resolve_public(host, port, allow_private=allow_private)
    except (ResolutionError, PrivateAddressError) as error:
        return Answer(None, str(error))
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    sent = {
        "Host": parts.netloc.rpartition("@")[2],
        "User-Agent": USER_AGENT,
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
        **headers,
    }
    last_error = "no address answered"
    for address in addresses:
        try:
            sock = socket.socket(address.family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address.sockaddr)
        except OSError as error:
            sock.close()
            last_error = f"cannot connect to {address.ip}: {error.strerror or error}"
            continue
        try:
            return _exchange(sock, host, https, target, body, sent, context)
        finally:
            sock.close()
    return Answer(None, last_error)


def _exchange(
    sock: socket.socket,
    host: str,
    https: bool,
    target: str,
    body: bytes,
    headers: dict[str, str],
    context: ssl.SSLContext | None,
) -> Answer:
    try:
        if https:
            sock = (context or ssl.create_default_context()).wrap_socket(sock, server_hostname=host)
        connection = http.client.HTTPConnection(host)
        connection.sock = sock  # connected to the checked address; http.client never resolves
        connection.request("POST", target, body=body, headers=headers, encode_chunked=False)
        response = connection.getresponse()
        response.read(MAX_RESPONSE)  # read (and bound) what the receiver says; the status decides
        return Answer(response.status, None)
    except ssl.SSLError as error:
        return Answer(None, f"TLS failed: {error.reason or error}")
    except (OSError, http.client.HTTPException) as error:
        return Answer(None, f"{type(error).__name__}: {error}"[:200])
