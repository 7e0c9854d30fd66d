"""Shared HTTP plumbing for the ESP transports: one pooled session per thread, one POST, no exceptions.

``post`` returns the provider's response, or a deferred ``Outcome`` when there was none (refused,
timed out, TLS failure, connection dropped). ``outcome`` maps a response onto an ``Outcome`` by its
status. Both scrub the secrets they are given out of every text, because an Outcome's text is stored
in the delivery log and shown to tenants. Redirects are never followed: a provider endpoint that
redirects is misconfigured, and following it would resend the credentials somewhere else.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.auth import AuthBase

from smtp_proxy import __version__
from smtp_proxy.config import DeliveryConfig
from smtp_proxy.delivery.outcome import Outcome, deferred, from_http_status

USER_AGENT = f"smtp-proxy/{__version__}"
REDACTED = "[redacted]"

_local = threading.local()


def session() -> requests.Session:
    """This thread's session, so that connections to a provider are reused from one message to the next.

    ``requests.Session`` is not documented as thread-safe, hence one per worker thread.
    """
    current: requests.Session | None = getattr(_local, "session", None)
    if current is None:
        current = requests.Session()
        current.headers["User-Agent"] = USER_AGENT
        _local.session = current
    return current


def close_session() -> None:
    """Close this thread's pooled connections; a worker thread calls it before it exits."""
    current: requests.Session | None = getattr(_local, "session", None)
    if current is not None:
        current.close()
        _local.session = None


class BearerAuth(AuthBase):
    """``Authorization: Bearer <token>``, set as an auth handler so that no ~/.netrc entry replaces it."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<redacted>)"


def post(
    url: str, settings: DeliveryConfig, *, secrets: Iterable[str] = (), **kwargs: Any
) -> requests.Response | Outcome:
    """POST once with the configured timeouts; no answer at all becomes ``deferred(None, reason)``.

    ``kwargs`` go to ``requests.Session.post`` (``json``, ``data``, ``files``, ``headers``, ``auth``).
    Pass ``auth`` explicitly: with trust_env (kept for HTTPS_PROXY and REQUESTS_CA_BUNDLE), requests
    would otherwise take credentials from ~/.netrc.
    """
    timeout = (settings.connect_timeout, settings.send_timeout)
    try:
        return session().post(url, timeout=timeout, allow_redirects=False, **kwargs)
    except requests.RequestException as error:
        return deferred(None, scrub(describe_error(error, url, settings), secrets))


def outcome(response: requests.Response, text: str | None = None, *, secrets: Iterable[str] = ()) -> Outcome:
    """Delivered, deferred or failed by the HTTP status (see ``from_http_status``), with a short text."""
    if text is None:
        text = response.text
    return from_http_status(response.status_code, scrub(text, secrets))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret; an ESP may echo a credential back in an error body."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def describe_error(error: requests.RequestException, url: str, settings: DeliveryConfig) -> str:
    """One short line that says what went wrong on the network, without the exception's repr.

    urllib3's messages carry object reprs and the full URL; this keeps the host and the reason only.
    """
    parts = urlsplit(url)
    host = parts.hostname or "the provider"
    if parts.port:
        host = f"{host}:{parts.port}"
    if isinstance(error, requests.ConnectTimeout):
        return f"connect timeout after {settings.connect_timeout:g}s to {host}"
    if isinstance(error, requests.ReadTimeout):
        return f"no answer from {host} within {settings.send_timeout:g}s"
    causes = list(_causes(error))
    if isinstance(error, requests.exceptions.SSLError):
        tls = next((c for c in causes if isinstance(c, ssl.SSLError)), None)
        reason = getattr(tls, "verify_message", None) or getattr(tls, "reason", None) or "handshake failed"
        return f"TLS error with {host}: {reason}"
    for cause in causes:
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused by {host}"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve {parts.hostname}"
        if isinstance(cause, ConnectionResetError):
            return f"connection reset by {host}"
        if isinstance(cause, TimeoutError):
            return f"timeout talking to {host}"
    if isinstance(error, requests.ConnectionError):
        return f"connection to {host} failed ({type(causes[-1]).__name__})"
    return f"HTTP request to {host} failed ({type(error).__name__})"


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it wraps: requests and urllib3 nest the OS error in args and ``reason``."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        nested = [*current.args, getattr(current, "reason", None), current.__cause__, current.__context__]
        stack.extend(n for n in nested if isinstance(n, BaseException))
