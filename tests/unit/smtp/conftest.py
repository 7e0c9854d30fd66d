"""A small driver for the pure SMTP core (smtp_proxy.smtp.protocol), offered as fixtures.

The driver feeds bytes to an ``SmtpSession`` and answers its events the way the server
adapter would. It answers ``MailFromOffered`` itself: it accepts, unless a test sets
``mail_refusal`` or ``recipients_left``, or turns ``answer_mail`` off to answer by hand.
``wire()`` renders outputs to the exact bytes a client would read, so tests can compare
reply lines verbatim. ``FakeAccount`` is plain data that satisfies the core's ``Account``
protocol, not a stand-in for code under test.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest

from smtp_proxy.config import Config
from smtp_proxy.smtp.protocol import (
    Account,
    AuthOutcome,
    CredentialsOffered,
    DataBudget,
    MailFromOffered,
    MessageReceived,
    MessageRejected,
    Output,
    SessionPolicy,
    SmtpSession,
    TlsRequested,
)
from smtp_proxy.smtp.replies import Reply

HOSTNAME = "mx.test"
DEFAULT_MAX_MESSAGE_SIZE = 1_048_576
DEFAULT_MAX_RECIPIENTS = 50


@dataclass(frozen=True)
class FakeAccount:
    name: str
    allowed_domains: tuple[str, ...]
    header_from_check: bool = True


def plain_response(username: str, password: str, authzid: str = "") -> str:
    """The base64 SASL PLAIN message (RFC 4616) for these credentials."""
    raw = f"{authzid}\x00{username}\x00{password}".encode()
    return base64.b64encode(raw).decode("ascii")


class Driver:
    """Drives one SmtpSession; every method returns the outputs it produced."""

    Account = FakeAccount

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        tls_available: bool = True,
        tls_active: bool = False,
        data_budget: DataBudget | None = None,
    ) -> None:
        self.policy = SessionPolicy(
            hostname=HOSTNAME,
            max_message_size=max_message_size,
            max_recipients=max_recipients,
            tls_available=tls_available,
            tls_active=tls_active,
        )
        self.session = SmtpSession(self.policy, data_budget)
        # How the driver answers MailFromOffered, as the adapter would after its own checks.
        self.answer_mail = True
        self.mail_refusal: Reply | None = None
        self.recipients_left: int | None = None
        self.recipients_refusal: Reply | None = None
        self.mail_offers: list[MailFromOffered] = []

    # --- feeding -------------------------------------------------------------------------------

    def send(self, data: str | bytes) -> list[Output]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        return self.resolve(self.session.receive(data))

    def send_chunks(self, data: bytes, size: int) -> list[Output]:
        """Feed ``data`` in pieces of ``size`` bytes; the outputs of all calls, in order."""
        out: list[Output] = []
        for start in range(0, len(data), size):
            out.extend(self.resolve(self.session.receive(data[start : start + size])))
        return out

    def resolve(self, outputs: list[Output]) -> list[Output]:
        """Answer each trailing MailFromOffered (when ``answer_mail``); the event stays in the list."""
        out = list(outputs)
        while self.answer_mail and out and isinstance(out[-1], MailFromOffered):
            self.mail_offers.append(out[-1])
            out.extend(
                self.session.mail_checked(
                    self.mail_refusal,
                    recipients_left=self.recipients_left,
                    recipients_refusal=self.recipients_refusal,
                )
            )
        return out

    # --- answering the core's events, then resolving what follows -------------------------------

    def message_queued(self, message_id: str) -> list[Output]:
        return self.resolve(self.session.message_queued(message_id))

    def message_deferred(self) -> list[Output]:
        return self.resolve(self.session.message_deferred())

    def credentials_checked(self, outcome: AuthOutcome, account: Account | None = None) -> list[Output]:
        return self.resolve(self.session.credentials_checked(outcome, account))

    def tls_started(self) -> list[Output]:
        return self.resolve(self.session.tls_started())

    # --- rendering -----------------------------------------------------------------------------

    @staticmethod
    def wire(outputs: Iterable[Output]) -> bytes:
        """The bytes the client would read: the replies among the outputs, in order."""
        return b"".join(item.to_bytes() for item in outputs if isinstance(item, Reply))

    @staticmethod
    def replies(outputs: Iterable[Output]) -> list[Reply]:
        return [item for item in outputs if isinstance(item, Reply)]

    @staticmethod
    def codes(outputs: Iterable[Output]) -> list[int]:
        return [item.code for item in outputs if isinstance(item, Reply)]

    @staticmethod
    def events(outputs: Iterable[Output]) -> list[Output]:
        return [item for item in outputs if not isinstance(item, Reply)]

    @staticmethod
    def received(outputs: Iterable[Output]) -> list[MessageReceived]:
        return [item for item in outputs if isinstance(item, MessageReceived)]

    @staticmethod
    def rejected(outputs: Iterable[Output]) -> list[MessageRejected]:
        return [item for item in outputs if isinstance(item, MessageRejected)]

    # --- walking through the session -----------------------------------------------------------

    def ehlo(self, name: str = "client.test") -> list[Output]:
        out = self.send(f"EHLO {name}\r\n")
        assert self.codes(out) == [250], self.wire(out)
        return out

    def starttls(self) -> list[Output]:
        """STARTTLS, then the handshake's success; returns the outputs of tls_started()."""
        out = self.send(b"STARTTLS\r\n")
        assert self.wire(out) == b"220 2.0.0 Ready to start TLS\r\n"
        assert out[-1] == TlsRequested()
        return self.session.tls_started()

    def auth_plain(
        self,
        username: str = "alice",
        password: str = "secret",
        allowed_domains: tuple[str, ...] = ("example.com",),
    ) -> list[Output]:
        """AUTH PLAIN with an initial response, answered OK; returns the answer's outputs."""
        out = self.send(f"AUTH PLAIN {plain_response(username, password)}\r\n")
        assert out == [CredentialsOffered("PLAIN", username, password)], out
        return self.session.credentials_checked(AuthOutcome.OK, FakeAccount(username, allowed_domains))

    def secure(self) -> Driver:
        """EHLO, STARTTLS and EHLO again: ready for AUTH."""
        self.ehlo()
        assert self.starttls() == []
        self.ehlo()
        return self

    def authenticated(self, allowed_domains: tuple[str, ...] = ("example.com",)) -> Driver:
        """EHLO, STARTTLS, EHLO, AUTH PLAIN: ready for MAIL."""
        self.secure()
        out = self.auth_plain(allowed_domains=allowed_domains)
        assert self.wire(out) == b"235 2.7.0 Authentication successful\r\n"
        return self

    def open_data(
        self, sender: str = "alice@example.com", recipients: Iterable[str] = ("bob@dest.test",)
    ) -> None:
        """MAIL, RCPT and DATA, each checked; the session is then reading message data."""
        assert self.codes(self.send(f"MAIL FROM:<{sender}>\r\n")) == [250]
        for recipient in recipients:
            assert self.codes(self.send(f"RCPT TO:<{recipient}>\r\n")) == [250]
        assert self.wire(self.send(b"DATA\r\n")) == b"354 End data with <CR><LF>.<CR><LF>\r\n"


@pytest.fixture
def make_driver() -> Callable[..., Driver]:
    """A factory: ``make_driver(max_message_size=..., max_recipients=..., data_budget=...)``."""
    return Driver


@pytest.fixture
def driver() -> Driver:
    """A fresh session right after the greeting."""
    return Driver()


@pytest.fixture
def secure_driver() -> Driver:
    """EHLO, STARTTLS, EHLO done: TLS is active, not yet authenticated."""
    return Driver().secure()


@pytest.fixture
def authed_driver() -> Driver:
    """Authenticated as alice, allowed to send from example.com."""
    return Driver().authenticated()


@pytest.fixture
def plain() -> Callable[..., str]:
    """``plain(username, password, authzid="")``: a base64 SASL PLAIN message."""
    return plain_response


class Live:
    """The live config as the listener's parts see it: a test may swap it between calls."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self) -> Config:
        return self.config


@pytest.fixture
def live(make_config, pg_url: str) -> Live:
    """The config of a listener on a fresh PostgreSQL database (for the parts that reach it)."""
    return Live(make_config(pg_url))
