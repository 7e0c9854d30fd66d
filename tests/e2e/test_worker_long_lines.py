"""Lines over 998 octets through the real listener, worker and a provider that enforces the limit.

The provider is the test sink with ``max_line_length=998``: it answers ``500 5.5.2 Line too long``
as strict providers do (RFC 5321 4.5.3.1.6), a permanent failure. A message the listener takes
must arrive there whole, read back with ``email`` to the same content, and still verify under the
account's DKIM signature; one the worker could not fix is refused at the end of DATA.
"""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import smtplib
import ssl
import subprocess
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from email.utils import getaddresses

import dkim as dkimpy
import pytest

from smtp_proxy import dkim
from smtp_proxy.db.models import MessageStatus
from smtp_proxy.storage import accounts, dkim_keys
from smtp_proxy.storage.audit import CLI
from tests.e2e.conftest import Listener
from tests.e2e.test_worker import Queue, delivery_config, start_worker  # noqa: F401
from tests.smtp_sink import SmtpSink
from tests.waiting import wait_for

RECIPIENTS = [f"user{n}@example.net" for n in range(100)]
LONG_TEXT = ("Grüße aus Köln, ein sehr langer Absatz ohne Zeilenumbruch. " * 26).strip()  # > 1,500 octets
ATTACHMENT = bytes(range(256)) * 64


@pytest.fixture
def strict() -> Iterator[SmtpSink]:
    with SmtpSink(max_line_length=998) as running:
        yield running
    assert running.errors == []


@dataclasses.dataclass
class Route:
    """The listener's tenant, routed to the strict sink, with a DKIM key for example.com."""

    listener: Listener
    queue: Queue
    dns: Callable[..., bytes | None]

    def delivered(self) -> uuid.UUID:
        """The id of the one message the tenant sent, once it is delivered."""
        (stored,) = self.listener.stored()
        wait_for(
            lambda: self.queue.message(stored.id).status is MessageStatus.DELIVERED,
            what="the message delivered",
            timeout=20,
        )
        return stored.id


@pytest.fixture
def route(start_listener, delivery_config, strict: SmtpSink) -> Iterator[Route]:  # noqa: F811
    listener: Listener = start_listener()
    queue = Queue(delivery_config(), account_name=listener.tenant)
    queue.rule(queue.smtp_provider(strict, "strict"), 0)
    with queue.database.transaction() as session:
        account = accounts.get_account_by_name(session, listener.tenant)
        key = dkim_keys.create_key(
            session,
            queue.cipher,
            account=account,
            domain="example.com",
            algorithm="ed25519-sha256",
            actor=CLI,
        )
        record = (dkim.record_name(key.selector, key.domain) + ".").encode()
        value = dkim.record_value(key.algorithm, key.public_key).encode()
    queue.database.remove_session()
    yield Route(listener, queue, lambda name, timeout=5: value if name == record else None)
    queue.database.dispose()


def lines_fit(data: bytes) -> bool:
    return max(map(len, data.split(b"\r\n"))) <= 998


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def submit(listener: Listener, client_tls: ssl.SSLContext, data: bytes, recipients: list[str]) -> None:
    with smtplib.SMTP(listener.host, listener.port, timeout=10) as client:
        client.starttls(context=client_tls)
        client.login(listener.tenant, listener.password)
        client.sendmail("app@example.com", recipients, data)


def test_the_strict_provider_refuses_a_long_line_for_good(strict: SmtpSink) -> None:
    """What happened before the fix: the provider's 500 after our 250 (and this sink enforces it)."""
    data = b"Subject: long\r\n\r\n" + b"x" * 999 + b"\r\n"
    with smtplib.SMTP(strict.host, strict.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("app@example.com", ["someone@example.net"], data)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (500, b"5.5.2 Line too long")
        client.sendmail("app@example.com", ["someone@example.net"], data.replace(b"x" * 999, b"x" * 998))
    assert len(strict.messages) == 1


def test_swaks_with_a_hundred_recipients_on_one_to_line_arrives_folded_and_signed(
    route: Route,
    strict: SmtpSink,
    start_worker,  # noqa: F811
) -> None:
    """swaks writes ``--to a,b,...`` as one To: line with no whitespace, here 2,000 octets long,
    with a 1,500-octet UTF-8 body line after it."""
    listener = route.listener
    result = subprocess.run(
        [
            "swaks",
            *("--server", f"{listener.host}:{listener.port}", "--helo", "client.test", "--tls"),
            *("--auth", "PLAIN", "--auth-user", listener.tenant, "--auth-password", listener.password),
            *("--from", "app@example.com", "--to", ",".join(RECIPIENTS)),
            *("--header", "Subject: to a hundred", "--body", LONG_TEXT, "--timeout", "10"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    (stored,) = listener.stored()
    _trace, sent = listener.received_and_content(stored)
    assert b"\r\nTo: " + ",".join(RECIPIENTS).encode() + b"\r\n" in sent  # as swaks wrote it, as stored

    start_worker()
    (received,) = strict.wait_for(1, timeout=20)
    route.delivered()

    assert sorted(received.rcpt_tos) == sorted(RECIPIENTS)
    assert lines_fit(received.data)
    message = parse(received.data)
    assert [address for _name, address in getaddresses(message.get_all("To"))] == RECIPIENTS
    assert message["Subject"] == "to a hundred"
    assert message.get_payload(decode=True).decode("utf-8").rstrip("\r\n") == LONG_TEXT
    assert dkimpy.verify(received.data, dnsfunc=route.dns) is True


def test_a_long_8bit_text_part_is_reencoded_and_the_base64_attachment_arrives_byte_for_byte(
    route: Route,
    strict: SmtpSink,
    start_worker,  # noqa: F811
    client_tls: ssl.SSLContext,
) -> None:
    attachment = base64.encodebytes(ATTACHMENT).replace(b"\n", b"\r\n")
    text = LONG_TEXT.encode() + b"\r\nzweite Zeile\r\n"
    data = (
        b"From: App <app@example.com>\r\nTo: someone@example.net\r\nSubject: attached\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + text
        + b"\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="data.bin"\r\n\r\n' + attachment + b"\r\n--b1--\r\n"
    )
    assert not lines_fit(data)
    submit(route.listener, client_tls, data, ["someone@example.net"])

    start_worker()
    (received,) = strict.wait_for(1, timeout=20)
    route.delivered()

    assert lines_fit(received.data)
    assert b"\r\n\r\n" + attachment + b"\r\n--b1--\r\n" in received.data  # untouched, byte for byte
    text_part, binary = parse(received.data).get_payload()
    assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_part.get_payload(decode=True) == text
    assert binary.get_payload(decode=True) == ATTACHMENT
    assert dkimpy.verify(received.data, dnsfunc=route.dns) is True


def test_a_header_line_that_cannot_be_folded_is_refused_and_the_session_goes_on(
    route: Route, strict: SmtpSink, client_tls: ssl.SSLContext
) -> None:
    listener = route.listener
    token = uuid.uuid4().hex * 38  # 1,216 octets, no whitespace
    refused = f"From: app@example.com\r\nX-Token: {token}\r\nSubject: refused\r\n\r\nbody\r\n".encode()
    accepted = b"From: app@example.com\r\nSubject: next\r\n\r\nbody\r\n"
    with smtplib.SMTP(listener.host, listener.port, timeout=10) as client:
        client.starttls(context=client_tls)
        client.login(listener.tenant, listener.password)
        with pytest.raises(smtplib.SMTPDataError) as error:
            client.sendmail("app@example.com", ["someone@example.net"], refused)
        assert (error.value.smtp_code, error.value.smtp_error) == (
            550,
            b"5.6.0 Line too long (RFC 5322 2.1.1)",
        )
        assert listener.stored() == []  # nothing stored
        client.sendmail("app@example.com", ["someone@example.net"], accepted)  # same session
    (stored,) = listener.stored()
    assert listener.received_and_content(stored)[1] == accepted
