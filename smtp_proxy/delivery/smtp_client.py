"""The ``smtp`` provider's client: one message to an outside SMTP host, with smtplib, as one ``Outcome``.

The client side of SMTP, towards the provider's host; our own listener is the ``smtp`` package.

The session is EHLO, STARTTLS (tls "starttls"), AUTH (when a username is set), MAIL, RCPT per
recipient, DATA and QUIT; one connection per message.

Decisions a reader would otherwise have to guess:

- The host is resolved once and checked (``network.resolve_public``); the socket connects to those
  addresses only, while TLS verifies the certificate against the host *name* (DNS rebinding cannot
  move the connection, and a literal IP host is verified against the IP).
- Everything that fails before a TCP connection stands (the name does not resolve, it resolves to a
  private address, the connection is refused, it times out) is one deferred outcome with one text,
  ``could not connect to host:port``: the delivery log is the tenant's, and telling these apart
  would let a tenant map the operator's DNS and network. The operator's log has the detail
  (``delivery.connect_failed``, ``delivery.private_address_refused``).
- tls "none" means the operator chose plain text: STARTTLS is not attempted even when offered, and
  a provider with a username is refused outright (failed) instead of sending its password in clear.
- tls "starttls" requires STARTTLS. A server that does not offer it (or AUTH, when a username is
  set) is a misconfiguration of the provider or its settings, not a verdict on this message:
  deferred, so the tenant can fix it (or the worker fails over) without losing mail.
- Replies before MAIL (greeting, EHLO, STARTTLS) concern the connection, so any refusal there
  defers. From AUTH on, 4xx defers and 5xx fails (RFC 5321 4.2.1); a wrong password (535) fails.
- Recipients: all refused -> deferred if any refusal was temporary, else failed; some accepted ->
  the message goes to those and the outcome is delivered, naming the refused ones in its text and
  listing the temporarily refused ones in ``retry_recipients`` for a follow-up message. Permanent
  refusals that are about the recipient (``bounces.is_hard``: at RCPT, or at DATA when one
  recipient was left) are listed in ``bounced``, whatever the outcome, for the suppression list.
- The body is sent as received. Only two things change on the wire: a message that does not end in
  CRLF gets one (DATA can only end after a line break), and a bare CR or LF, which the SMTP
  listener never stores, becomes CRLF, so no provider can be shown a smuggled end of data.
- One attempt takes at most ``connect_timeout + send_timeout`` in all, or less when the worker's
  ``deadline`` (what is left of the message's attempt budget) comes sooner (``deadline.WATCHDOG``
  shuts the socket down then), and a reply at most ``MAX_REPLY`` bytes: a tenant's host that
  answers slowly but never finishes, or endlessly, cannot hold a worker thread or fill its memory.
- Network errors, timeouts, TLS failures and disconnects defer with a short text. A timeout after
  the body was sent may mean the provider took the message anyway: the retry can duplicate it, which
  RFC 5321 6.1 accepts as the price of never losing mail.
- No Outcome text contains the SMTP password.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from typing import Any, BinaryIO

from smtp_proxy.config import DeliveryConfig
from smtp_proxy.delivery import bounces, network
from smtp_proxy.delivery.deadline import WATCHDOG
from smtp_proxy.delivery.outcome import (
    Outcome,
    Outgoing,
    Refusal,
    Target,
    deferred,
    delivered,
    failed,
    from_smtp_reply,
    short_text,
)

log = logging.getLogger("smtp_proxy.delivery")

TLS_MODES = ("none", "starttls", "implicit")
# A host with many addresses that all time out must not hold a worker thread for minutes.
MAX_ADDRESSES = 3
# Body writes go out in chunks so that send_timeout bounds each write, not the whole message.
CHUNK = 256 * 1024
# QUIT is a courtesy once the outcome is known; a slow answer must not delay the next message.
QUIT_TIMEOUT = 5.0
# smtplib caps each reply line at 8 KiB but not the number of lines.
MAX_REPLY = 64 * 1024

# Control characters would split the command line; angle brackets would let an address close the
# path early and smuggle ESMTP parameters into MAIL or RCPT.
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_AUTH_MECHANISMS = {"CRAM-MD5", "PLAIN", "LOGIN"}  # what smtplib.SMTP.login can speak


class _Stop(Exception):
    """A step ended the session with a known outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


def send(
    target: Target, message: Outgoing, settings: DeliveryConfig, deadline: float | None = None
) -> Outcome:
    """Deliver message to the provider's SMTP host and say how it went; never raises for the network.

    ``deadline`` (time.monotonic) cuts the attempt short of ``connect_timeout + send_timeout``.
    """
    smtp_config: Mapping[str, Any] = target.smtp_config or {}
    host = str(smtp_config.get("host") or "")
    port = int(smtp_config.get("port") or 0)
    tls = smtp_config.get("tls", "starttls")
    username = smtp_config.get("username") or None
    password = target.smtp_password or ""
    if not host or not 0 < port < 65536 or tls not in TLS_MODES:
        return failed(None, "smtp provider settings are incomplete (host, port, tls)")
    if username and tls == "none":
        return failed(None, "refusing to send the SMTP password without TLS: set tls to starttls or implicit")
    problem = _envelope_problem(message)
    if problem:
        return failed(None, problem)

    context = None
    if tls != "none":
        try:
            context = tls_context(settings.ca_file)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            return deferred(None, f"cannot load delivery.ca_file: {_reason(error)}")
    try:
        addresses = network.resolve_public(host, port, settings.allow_private_networks)
    except network.ResolutionError as error:
        _log_connect_failure(host, port, error, None)
        return deferred(None, connect_failure_text(host, port))
    except network.PrivateAddressError as error:
        # Deferred like a name that does not resolve, so that neither the text nor the status tells
        # the tenant which of its host names lead into the operator's network.
        log.warning(
            "smtp provider host resolves to a private address (delivery.allow_private_networks is off)",
            extra={"event": "delivery.private_address_refused", "host": host, "address": error.address},
        )
        return deferred(None, connect_failure_text(host, port))

    client = PinnedSMTP(
        host, context if tls == "implicit" else None, settings.connect_timeout, settings.send_timeout
    )
    started = time.monotonic()
    limit, why = settings.connect_timeout + settings.send_timeout, "connect_timeout + send_timeout"
    if deadline is not None and deadline - started < limit:
        limit, why = max(0.0, deadline - started), "the rest of the attempt budget"
    watch = WATCHDOG.watch(started + limit, client.expire)
    try:
        _connect(client, addresses, port)
        outcome = _session(client, message, tls, context, username, password)
    except _Stop as stop:
        outcome = stop.outcome
    except OSError as error:  # socket and ssl errors, and every smtplib.SMTPException
        if not client.tcp_connected:
            _log_connect_failure(host, port, error, client.address)
            outcome = deferred(None, connect_failure_text(host, port))
        elif client.expired:
            text = f"gave up during {client.step} with {host}:{port}: the attempt took {limit:.3g}s"
            outcome = deferred(None, f"{text} ({why})")
        else:
            outcome = deferred(None, _describe(error, client.step, host, port))
    finally:
        WATCHDOG.cancel(watch)
        _quit(client)
    return _without(password, outcome)


class PinnedSMTP(smtplib.SMTP):
    """smtplib.SMTP bound to checked addresses, with TLS verified against the provider's host name.

    ``connect_timeout`` covers the TCP connect and an implicit TLS handshake (and STARTTLS's);
    every later read and write has ``send_timeout``.
    """

    def __init__(
        self,
        host: str,
        implicit_tls: ssl.SSLContext | None,
        connect_timeout: float,
        send_timeout: float,
    ) -> None:
        super().__init__(local_hostname="localhost", timeout=connect_timeout)  # EHLO name set on connect
        self._host = host  # smtplib's starttls() passes it as server_hostname
        self.implicit_tls = implicit_tls
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.address: network.Address | None = None
        self.tcp_connected = False
        self.step = "connect"
        self.expired = False
        self._raw: socket.socket | None = None  # the socket being connected, before smtplib has it
        # Held while the watchdog shuts a socket down and while this thread closes one, so that
        # a descriptor number is never shut down after it was closed and handed out again.
        self._closing = threading.Lock()

    def expire(self) -> None:
        """The attempt's deadline passed (called from the watchdog thread): cut the connection."""
        with self._closing:
            self.expired = True
            for sock in (self.sock, self._raw):
                if sock is not None:
                    try:
                        # The plain socket's shutdown, also for an SSLSocket: no TLS state is touched
                        # while the delivery thread may be inside it, and its blocked call fails at once.
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:  # not connected yet, or closed already
                        pass

    def close(self) -> None:
        with self._closing:
            super().close()
            if self._raw is not None:
                self._raw.close()

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's reader, with at most MAX_REPLY bytes per reply."""
        if self.file is None and self.sock is not None:
            self.file = _Bounded(self.sock.makefile("rb"))  # smtplib would make an unbounded one
        if isinstance(self.file, _Bounded):
            self.file.budget = MAX_REPLY
        return super().getreply()

    def connect_to(self, address: network.Address, port: int) -> tuple[int, bytes]:
        """Connect to one checked address and read the greeting."""
        self.address, self.tcp_connected, self.step = address, False, "connect"
        return self.connect(address.ip, port)

    def _get_socket(self, host: str, port: int, timeout: float | None) -> socket.socket:
        # smtplib would call socket.create_connection(host), which resolves again: use the sockaddr.
        assert self.address is not None
        sock = self._raw = socket.socket(self.address.family, socket.SOCK_STREAM)
        try:
            if self.expired:
                raise TimeoutError("the attempt's deadline passed")
            sock.settimeout(self.connect_timeout)
            sock.connect(self.address.sockaddr)
            self.tcp_connected = True
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.local_hostname = _ehlo_name(sock.getsockname()[0])
            if self.implicit_tls is not None:
                self.step = "TLS handshake"
                sock = self._raw = self.implicit_tls.wrap_socket(sock, server_hostname=self._host)
            if self.expired:  # the deadline passed while the socket could not be shut down
                raise TimeoutError("the attempt's deadline passed")
            sock.settimeout(self.send_timeout)
            self.step = "greeting"
        except BaseException:
            with self._closing:
                sock.close()
            raise
        return sock

    def starttls_verified(self, context: ssl.SSLContext) -> tuple[int, bytes]:
        """STARTTLS with the handshake under connect_timeout; smtplib forgets pre-TLS state (RFC 3207)."""
        assert self.sock is not None
        self.sock.settimeout(self.connect_timeout)
        code, text = self.starttls(context=context)
        if self.sock is not None:
            self.sock.settimeout(self.send_timeout)
        return code, text

    def send_body(self, payload: bytes) -> None:
        """Write the dot-stuffed body and its terminator in chunks, each within send_timeout."""
        view = memoryview(payload)
        for start in range(0, len(view), CHUNK):
            self.send(view[start : start + CHUNK])


class _Bounded:
    """A reply reader with a byte budget, which ``PinnedSMTP.getreply`` resets for each reply."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.budget = MAX_REPLY

    def readline(self, size: int = -1) -> bytes:
        line = self.raw.readline(size)
        self.budget -= len(line)
        if self.budget < 0:
            raise OSError(f"reply longer than {MAX_REPLY // 1024} KiB")  # smtplib: a lost connection
        return line

    def close(self) -> None:
        self.raw.close()


def _connect(client: PinnedSMTP, addresses: list[network.Address], port: int) -> None:
    """Try the addresses in order until one answers; a failure after TCP connected is final."""
    error: OSError | None = None
    for address in addresses[:MAX_ADDRESSES]:
        try:
            code, text = client.connect_to(address, port)
        except OSError as exc:
            client.close()
            if client.tcp_connected:
                raise
            error = exc
            continue
        if code != 220:
            raise _Stop(_connection_refusal("greeting", code, text))
        return
    assert error is not None
    raise error


def _session(
    client: PinnedSMTP,
    message: Outgoing,
    tls: str,
    context: ssl.SSLContext | None,
    username: str | None,
    password: str,
) -> Outcome:
    client.step = "EHLO"
    code, text = client.ehlo()
    if code != 250:
        if tls == "starttls" or username:
            raise _Stop(_connection_refusal("EHLO", code, text))
        client.step = "HELO"
        code, text = client.helo()
        if code != 250:
            raise _Stop(_connection_refusal("HELO", code, text))

    if tls == "starttls":
        assert context is not None
        if not client.has_extn("starttls"):
            raise _Stop(deferred(None, "the provider does not offer STARTTLS (its tls setting is starttls)"))
        client.step = "STARTTLS"
        code, text = client.starttls_verified(context)
        if code != 220:
            raise _Stop(_connection_refusal("STARTTLS", code, text))
        client.step = "EHLO"
        code, text = client.ehlo()
        if code != 250:
            raise _Stop(_connection_refusal("EHLO", code, text))

    if username:
        _authenticate(client, username, password)
    return _transaction(client, message)


def _authenticate(client: PinnedSMTP, username: str, password: str) -> None:
    client.step = "AUTH"
    offered = set(client.esmtp_features.get("auth", "").upper().split())
    if not offered:
        raise _Stop(deferred(None, "the provider does not offer AUTH, but a username is set"))
    if not offered & _AUTH_MECHANISMS:
        raise _Stop(deferred(None, f"no AUTH mechanism in common (the provider offers {' '.join(offered)})"))
    if not (username.isascii() and password.isascii()):
        # smtplib encodes SASL responses as ASCII; retrying cannot help.
        raise _Stop(
            failed(None, "the SMTP username or password is not ASCII, which this transport cannot send")
        )
    try:
        client.login(username, password)
    except smtplib.SMTPAuthenticationError as error:
        raise _Stop(_reply("AUTH", error.smtp_code, error.smtp_error)) from None


def _transaction(client: PinnedSMTP, message: Outgoing) -> Outcome:
    body = wire_body(message.data)
    options = []
    addresses = (message.sender, *message.recipients)
    if not all(address.isascii() for address in addresses):
        if not client.has_extn("smtputf8"):
            return failed(None, "the provider does not support SMTPUTF8, which non-ASCII addresses need")
        options.append("SMTPUTF8")
        client.command_encoding = "utf-8"
    if not body.isascii() and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152; without it the 8-bit body is sent as it is
    if client.has_extn("size"):
        options.append(f"SIZE={len(body)}")  # RFC 1870: before dot-stuffing

    client.step = "MAIL FROM"
    code, text = client.docmd("MAIL", f"FROM:<{message.sender}>{''.join(' ' + o for o in options)}")
    if not 200 <= code < 300:
        return _reply("MAIL FROM", code, text)

    client.step = "RCPT TO"
    accepted: list[str] = []
    refused: list[tuple[str, int, bytes]] = []
    for recipient in message.recipients:
        code, text = client.docmd("RCPT", f"TO:<{recipient}>")
        if 200 <= code < 300:
            accepted.append(recipient)
        else:
            refused.append((recipient, code, text))
    # Hard bounces among the RCPT refusals, whatever becomes of the message (bounces.is_hard).
    bounced = tuple(
        Refusal(r, c, short_text(t)) for r, c, t in refused if bounces.is_hard(c, _text(t), at_data=False)
    )
    each = tuple(Refusal(r, c, short_text(t)) for r, c, t in refused)
    if not accepted:
        summary = "; ".join(f"<{r}> {c} {_text(t)}" for r, c, t in refused)
        temporary = [(c, t) for _, c, t in refused if not 500 <= c < 600]
        if temporary:
            outcome = deferred(
                temporary[0][0] if temporary[0][0] > 0 else None, f"RCPT TO refused: {summary}"
            )
        else:
            outcome = failed(refused[0][1], f"RCPT TO refused: {summary}")
        return outcome._replace(bounced=bounced, refused=each)

    client.step = "DATA"
    code, text = client.docmd("DATA")
    if code == 354:
        client.step = "end of DATA"
        client.send_body(dot_stuff(body) + b".\r\n")
        code, text = client.getreply()
        if 200 <= code < 300:
            return _delivered_to_some(message, code, text, refused, bounced)._replace(refused=each)
    # Refused at DATA: with one recipient left, the refusal may be that recipient's.
    if len(accepted) == 1 and bounces.is_hard(code, _text(text), at_data=True):
        bounced += (Refusal(accepted[0], code, short_text(text)),)
    return _reply(client.step, code, text)._replace(bounced=bounced)


def _delivered_to_some(
    message: Outgoing,
    code: int,
    text: bytes,
    refused: list[tuple[str, int, bytes]],
    bounced: tuple[Refusal, ...],
) -> Outcome:
    """The provider took the message; the refused recipients are named, the temporary ones retried."""
    if not refused:
        return delivered(code, text)
    names = "; ".join(f"<{r}> {c} {_text(t)}" for r, c, t in refused)
    outcome = delivered(code, f"{_text(text)}; {len(refused)} of {len(message.recipients)} refused: {names}")
    # The temporarily refused ones are retried as their own message (the worker's follow-up).
    retry = tuple(r for r, c, _ in refused if not 500 <= c < 600)
    return outcome._replace(retry_recipients=retry, bounced=bounced)


def _quit(client: PinnedSMTP) -> None:
    """QUIT politely if the session is still up; always close the socket."""
    try:
        if client.sock is not None:
            client.sock.settimeout(min(client.send_timeout, QUIT_TIMEOUT))
            client.quit()
    except OSError:  # includes SMTPServerDisconnected
        pass
    finally:
        client.close()


def wire_body(data: bytes) -> bytes:
    """The message as DATA carries it: CRLF line breaks only, ending in CRLF (an empty one stays empty)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        data = _LINE_BREAK.sub(b"\r\n", data)  # RFC 5321 2.3.8: no bare CR or LF on the wire
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def dot_stuff(body: bytes) -> bytes:
    """Double a leading dot on every line (RFC 5321 4.5.2); body has CRLF line breaks only."""
    body = body.replace(b"\r\n.", b"\r\n..")
    return b"." + body if body.startswith(b".") else body


def tls_context(ca_file: str) -> ssl.SSLContext:
    """The client context for ca_file ("" = system store only); rebuilt when the file changes.

    Raises OSError when ca_file cannot be read, ssl.SSLError when it holds no usable certificate.
    """
    if not ca_file:
        return _context(ca_file, (0, 0))
    stat = os.stat(ca_file)
    return _context(ca_file, (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _context(ca_file: str, _version: tuple[int, int]) -> ssl.SSLContext:
    context = ssl.create_default_context()  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        context.load_verify_locations(cafile=ca_file)  # in addition to the system store
    return context


@functools.cache
def _own_hostname() -> str | None:
    """This machine's name if it looks fully qualified; never asks DNS (socket.getfqdn can hang)."""
    name = socket.gethostname()
    return name if "." in name and re.fullmatch(r"[A-Za-z0-9.-]+", name) else None


def _ehlo_name(local_ip: str) -> str:
    """The EHLO argument: our host name, else an address literal of our end (RFC 5321 4.1.3)."""
    name = _own_hostname()
    if name:
        return name
    ip = local_ip.partition("%")[0]
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def _envelope_problem(message: Outgoing) -> str | None:
    if not message.recipients:
        return "the message has no recipients"
    for address in (message.sender, *message.recipients):
        if _UNSAFE_ADDRESS.search(address):
            return f"unusable envelope address {address!r}"
    return None


def _without(password: str, outcome: Outcome) -> Outcome:
    """The outcome with the password masked, should a server or an error message echo it."""
    text = outcome.text
    for form in {password, " ".join(password.split())} - {""}:
        text = text.replace(form, "********")
    return outcome._replace(text=text)


def _text(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(text.split())


def _reply(step: str, code: int, text: bytes | str) -> Outcome:
    """A refusal from MAIL on: 4xx deferred, 5xx failed, anything unexpected deferred."""
    if 400 <= code < 600:
        return from_smtp_reply(code, f"{step} refused: {_text(text)}")
    return deferred(code if code > 0 else None, f"{step}: unexpected reply {code} {_text(text)}")


def _connection_refusal(step: str, code: int, text: bytes | str) -> Outcome:
    """A refusal before MAIL says nothing about this message: always deferred."""
    return deferred(code if code > 0 else None, f"{step} refused: {code} {_text(text)}")


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return str(error.verify_message)
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def connect_failure_text(host: str, port: int) -> str:
    """The one delivery-log text for every failure before a TCP connection stands."""
    return f"could not connect to {host}:{port}"


def _log_connect_failure(host: str, port: int, error: BaseException, address: network.Address | None) -> None:
    """The detail the tenant's text leaves out, for the operator."""
    log.warning(
        "could not connect to the smtp provider",
        extra={
            "event": "delivery.connect_failed",
            "host": host,
            "port": port,
            "address": address.ip if address is not None else None,
            "error": type(error).__name__,
            "reason": _reason(error),
        },
    )


def _describe(error: BaseException, step: str, host: str, port: int) -> str:
    """One line for a network-level failure, with no traceback."""
    where = f"{host}:{port}"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate of {where} not accepted: {_reason(error)}"
    if isinstance(error, ssl.SSLError):
        return f"TLS with {where} failed during {step}: {_reason(error)}"
    if isinstance(error, TimeoutError) or isinstance(error.__context__, TimeoutError):
        return f"timed out during {step} with {where}"  # smtplib turns a read timeout into a disconnect
    if isinstance(error, smtplib.SMTPServerDisconnected):
        return f"connection to {where} lost during {step}: {error}"
    return f"error during {step} with {where}: {_reason(error)}"
