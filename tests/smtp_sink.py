"""A real SMTP server on 127.0.0.1 for tests: it records what it is given and answers as scripted.

``SmtpSink`` runs aiosmtpd's threaded ``Controller`` on a free port. It stands in for a provider's
SMTP host, so tests can check what arrived byte for byte and make the provider refuse, stall or
demand TLS and AUTH::

    with SmtpSink(tls="starttls", auth={"relay": "secret"}) as sink:
        target = Target(..., smtp_config=sink.provider_config(username="relay"), smtp_password="secret")
        ...
        [message] = sink.wait_for(1)
        assert message.data == body and message.tls and message.auth_user == "relay"

A message counts as received when the sink answers its DATA with 250; refused or abandoned
transactions are not in ``messages``. Scripted replies (``reply_to_*``, ``refuse``, ``queue_reply``)
can change at any time, from any thread; all state is behind one lock.

Notes on aiosmtpd that shape the options here:

- ``decode_data=False`` keeps the body as bytes; aiosmtpd then offers 8BITMIME (``hide`` removes
  any extension from the EHLO reply) and removes the transparency dots itself.
- aiosmtpd only counts STARTTLS as TLS. With implicit TLS it would never offer AUTH while
  ``auth_require_tls`` is on, so that is turned off for "implicit" (the connection is TLS from the
  first byte) and for "none" (so a client could be tempted to send a password in clear). The sink
  itself answers 530 to MAIL until the client authenticated, instead of aiosmtpd's
  ``auth_required``, which warns when TLS is not required.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import tempfile
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException

from smtp_proxy.devcert import write_self_signed

HOST = "127.0.0.1"


class _NoLoginDataNotice(logging.Filter):
    """aiosmtpd 1.4 logs a deprecation notice on every successful AUTH, even through the new
    ``authenticator`` API this sink uses; drop that one line, keep the rest of its log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Session.login_data is deprecated")


logging.getLogger("mail.log").addFilter(_NoLoginDataNotice())
TlsMode = Literal["none", "starttls", "implicit"]
# Steps whose reply can be scripted: "DATA" is the reply after the message,
# "DATA_COMMAND" the reply to the DATA command itself (instead of 354).
Step = Literal["MAIL", "RCPT", "DATA", "DATA_COMMAND"]
STEPS = ("MAIL", "RCPT", "DATA", "DATA_COMMAND")


@dataclass(frozen=True)
class Received:
    """One message the sink accepted."""

    mail_from: str  # "" for the null reverse-path (aiosmtpd reports it as "<>")
    rcpt_tos: tuple[str, ...]
    data: bytes  # the message as the client meant it: transparency dots removed, ends in CRLF
    mail_options: tuple[str, ...]  # upper-cased ESMTP parameters, e.g. ("BODY=8BITMIME", "SIZE=42")
    rcpt_options: tuple[str, ...]
    tls: bool  # the transaction ran over TLS (STARTTLS or implicit)
    auth_user: str | None  # the user name that authenticated, if any
    ehlo_name: str | None
    peer: tuple[str, int]


class SmtpSink:
    """An SMTP server on 127.0.0.1 and a free port that records deliveries; see the module docstring.

    tls: "none" (plain; STARTTLS not offered), "starttls" (offered, and required before MAIL unless
    require_starttls=False) or "implicit" (TLS from the first byte). cert: (cert.pem, key.pem); when
    None and tls is not "none", a self-signed certificate for localhost and 127.0.0.1 is made, and
    ``cert_file`` names it so a client can trust it. auth: {"user": "password"} turns on AUTH (PLAIN
    and LOGIN, or auth_mechanisms) and makes it required; without it AUTH is not offered at all
    (aiosmtpd would offer it and refuse everyone). smtputf8: offer SMTPUTF8. hide: EHLO keywords to
    leave out of the EHLO reply, e.g. {"8BITMIME", "SIZE"}. max_line_length: refuse a message with a
    line longer than this many octets (CRLF not counted) with ``500 5.5.2 Line too long``, as providers
    that enforce RFC 5321 4.5.3.1.6 do (998 is the RFC's limit); without it aiosmtpd's own limit
    applies (lines of 1000 octets or more, and a 500 without an enhanced code).

    ``errors`` lists the exceptions raised inside sessions, except a client giving up a TLS
    handshake (a certificate it does not trust), which tests provoke on purpose.
    """

    def __init__(
        self,
        tls: TlsMode = "none",
        cert: tuple[Path, Path] | None = None,
        auth: dict[str, str] | None = None,
        *,
        require_starttls: bool = True,
        auth_mechanisms: tuple[str, ...] | None = None,
        smtputf8: bool = True,
        hide: frozenset[str] | set[str] = frozenset(),
        max_size: int = 32 * 1024 * 1024,
        max_line_length: int | None = None,
    ) -> None:
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError(f"tls must be none, starttls or implicit, not {tls!r}")
        self.tls = tls
        self.host = HOST
        self.port = 0
        self.auth = dict(auth) if auth else None
        self._hide = {word.upper() for word in hide} | ({"AUTH"} if auth is None else set())
        self._lock = threading.Condition()
        self._messages: list[Received] = []
        self._connections = 0
        self._standing: dict[str, str] = {}
        self._queued: defaultdict[str, deque[str]] = defaultdict(deque)
        self._refusals: dict[str, str] = {}
        self._data_delay = 0.0
        self.max_line_length = max_line_length
        self.errors: list[BaseException] = []
        self._tempdir: str | None = None
        self.cert_file: Path | None = None

        server_context = None
        if tls != "none":
            if cert is None:
                self._tempdir = tempfile.mkdtemp(prefix="smtp-sink-")
                cert = write_self_signed(Path(self._tempdir), "localhost")
            self.cert_file = Path(cert[0])
            server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_context.load_cert_chain(str(cert[0]), str(cert[1]))
        kwargs: dict[str, Any] = {
            "server_hostname": "sink.test",  # else aiosmtpd calls socket.getfqdn()
            "decode_data": False,
            "enable_SMTPUTF8": smtputf8,
            "data_size_limit": max_size,
            "auth_require_tls": tls == "starttls",
        }
        if tls == "implicit":
            kwargs["ssl_context"] = server_context
        elif tls == "starttls":
            kwargs.update(tls_context=server_context, require_starttls=require_starttls)
        if self.auth is not None:
            kwargs["authenticator"] = self._authenticate
            if auth_mechanisms is not None:
                wanted = {m.upper() for m in auth_mechanisms}
                kwargs["auth_exclude_mechanism"] = [m for m in ("PLAIN", "LOGIN") if m not in wanted]
        self._controller = _Controller(self, _Handler(self), **kwargs)
        self._running = False

    # -- lifecycle

    def start(self) -> SmtpSink:
        """Listen and wait until the server answers; ``port`` is then set."""
        self._controller.start()
        self.port = self._controller.port
        self._running = True
        with self._lock:
            self._connections = 0  # the Controller's own readiness probe does not count
        return self

    def stop(self) -> None:
        """Stop the server thread and close every connection; remove a generated certificate."""
        if self._running:
            self._running = False
            self._controller.stop()
        if self._tempdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def provider_config(self, username: str | None = None) -> dict[str, Any]:
        """An ``smtp_config`` for a provider that delivers here."""
        config: dict[str, Any] = {"host": self.host, "port": self.port, "tls": self.tls}
        if username is not None:
            config["username"] = username
        return config

    # -- what arrived

    @property
    def messages(self) -> list[Received]:
        """A snapshot of the accepted messages, in the order their DATA was answered."""
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """How many connections were accepted since start (TCP accept, before any TLS)."""
        with self._lock:
            return self._connections

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Wait until at least count messages arrived; AssertionError when they do not in time."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sink got {len(self._messages)} messages, expected {count}")
                self._lock.wait(left)
            return list(self._messages)

    # -- scripting

    def reply_to_mail(self, code: int | None, text: str = "") -> None:
        """Answer every later MAIL with this reply; None restores 250."""
        self._stand("MAIL", code, text)

    def reply_to_rcpt(self, code: int | None, text: str = "") -> None:
        """Answer every later RCPT with this reply (unless ``refuse`` names the recipient)."""
        self._stand("RCPT", code, text)

    def reply_to_data(self, code: int | None, text: str = "") -> None:
        """Answer every later message (the reply after the final dot) with this reply."""
        self._stand("DATA", code, text)

    def reply_to_data_command(self, code: int | None, text: str = "") -> None:
        """Answer every later DATA command with this reply instead of 354."""
        self._stand("DATA_COMMAND", code, text)

    def refuse(self, recipient: str, code: int, text: str = "") -> None:
        """Answer RCPT for this recipient (compared case-insensitively) with this reply."""
        with self._lock:
            self._refusals[recipient.lower()] = _line(code, text)

    def queue_reply(self, step: Step, code: int, text: str = "") -> None:
        """Use this reply once, for the next command of step, before any standing reply."""
        if step not in STEPS:
            raise ValueError(f"step must be one of {STEPS}")
        with self._lock:
            self._queued[step].append(_line(code, text))

    def delay_data(self, seconds: float) -> None:
        """Wait this long before answering each message's DATA (for client timeouts)."""
        with self._lock:
            self._data_delay = seconds

    def reset(self) -> None:
        """Forget the messages, the connection count and every scripted reply or delay."""
        with self._lock:
            self._messages.clear()
            self._connections = 0
            self._standing.clear()
            self._queued.clear()
            self._refusals.clear()
            self._data_delay = 0.0

    # -- called on the server thread

    def _stand(self, step: str, code: int | None, text: str) -> None:
        with self._lock:
            if code is None:
                self._standing.pop(step, None)
            else:
                self._standing[step] = _line(code, text)

    def _scripted(self, step: str, recipient: str | None = None) -> str | None:
        with self._lock:
            if recipient is not None and recipient.lower() in self._refusals:
                return self._refusals[recipient.lower()]
            if self._queued[step]:
                return self._queued[step].popleft()
            return self._standing.get(step)

    def _connected(self) -> None:
        with self._lock:
            self._connections += 1

    def _record(self, message: Received) -> None:
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self.auth is not None
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            if self.auth.get(user) == auth_data.password.decode("utf-8", "replace"):
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)


def _line(code: int, text: str) -> str:
    return f"{code} {text}".rstrip()


class _Handler:
    """aiosmtpd hooks; each one asks the sink for a scripted reply first."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # with this hook, aiosmtpd leaves it to us
        keep = [line for line in responses[1:-1] if line[4:].split(" ")[0].upper() not in self.sink._hide]
        return [responses[0], *keep, responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.sink.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        scripted = self.sink._scripted("MAIL")
        if scripted:
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        scripted = self.sink._scripted("RCPT", address)
        if scripted:
            return scripted
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_exception(self, error: BaseException) -> str:
        # Replaces aiosmtpd's log.exception, which would print a traceback for every client that
        # rejects the certificate; the session is closed either way.
        if not isinstance(error, TLSSetupException):
            with self.sink._lock:
                self.sink.errors.append(error)
        return "421 4.3.0 sink error"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        delay = self.sink._data_delay
        if delay:
            await asyncio.sleep(delay)  # cancelled when the client hangs up: nothing is recorded
        scripted = self.sink._scripted("DATA")
        if scripted:
            return scripted
        assert server.transport is not None and isinstance(envelope.content, bytes)
        limit = self.sink.max_line_length
        if limit is not None and max(map(len, envelope.content.split(b"\r\n"))) > limit:
            return "500 5.5.2 Line too long"
        self.sink._record(
            Received(
                mail_from="" if envelope.mail_from == "<>" else str(envelope.mail_from),
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=envelope.content,
                mail_options=tuple(envelope.mail_options),
                rcpt_options=tuple(envelope.rcpt_options),
                tls=server.transport.get_extra_info("ssl_object") is not None,
                auth_user=session.auth_data if session.authenticated else None,
                ehlo_name=session.host_name,
                peer=session.peer,
            )
        )
        return "250 2.0.0 OK: queued"


class _SinkSMTP(SMTP):
    """aiosmtpd's server with a connection count and a scriptable reply to the DATA command."""

    def __init__(self, sink: SmtpSink, handler: _Handler, **kwargs: Any) -> None:
        if sink.max_line_length is not None:
            # Read lines of any length (aiosmtpd's reader stops at 1001 octets), and judge them in DATA.
            self.line_length_limit = 1 << 24
        super().__init__(handler, **kwargs)
        self.sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the second call that follows STARTTLS
            self.sink._connected()
        super().connection_made(transport)

    async def smtp_DATA(self, arg: str) -> None:
        if self.envelope is not None and self.envelope.rcpt_tos:
            scripted = self.sink._scripted("DATA_COMMAND")
            if scripted:
                await self.push(scripted)
                return
        await super().smtp_DATA(arg)


class _Controller(Controller):
    """Binds port 0 and learns the port the system chose: no race for a "free" port."""

    def __init__(self, sink: SmtpSink, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, hostname=HOST, port=0, **kwargs)
        self.sink = sink

    def factory(self) -> SMTP:
        return _SinkSMTP(self.sink, self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()
