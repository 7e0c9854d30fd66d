"""The listener driven by Python's smtplib: STARTTLS, AUTH PLAIN and LOGIN, enqueue."""

from __future__ import annotations

import re
import smtplib
import uuid

import pytest

from tests.e2e.conftest import Listener

MESSAGE = (
    b"From: App <app@example.com>\r\n"
    b"To: Someone <someone@example.net>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".leading dot stays\r\n"
    b"\r\n"
    b"Bye\r\n"
)


def test_starttls_auth_plain_and_send_commits_the_message(listener: Listener, smtp_client) -> None:
    client = smtp_client()
    code, reply = client.mail("app@example.com")
    assert code == 250
    client.rcpt("someone@example.net")
    client.rcpt("other@example.net")
    code, reply = client.data(MESSAGE)
    assert code == 250
    match = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9a-f-]{36})", reply)
    assert match, reply
    [stored] = listener.stored()
    assert stored.id == uuid.UUID(match.group(1).decode())
    assert stored.sender == "app@example.com"
    assert stored.recipients == ["someone@example.net", "other@example.net"]
    assert stored.subject == "Grüße"
    assert stored.status.value == "queued"
    assert len(stored.correlation_id) == 32
    received, content = listener.received_and_content(stored)
    assert content == MESSAGE
    assert stored.size == len(listener.body(stored))
    # RFC 5321 4.4: the trace field names the client, this server, the protocol and the id the
    # client was given; with two recipients, neither (7.2).
    assert re.fullmatch(
        rf"Received: from client\.test \(\[127\.0\.0\.1\]\) \(using TLSv1\.[23] with cipher [A-Z0-9_-]+\)"
        rf" by mx\.test \(smtp-proxy\) with ESMTPSA id {stored.id};"
        r" \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000",
        received,
    ), received
    assert stored.headers[0][0] == "Received"


def test_one_recipient_is_named_in_the_received_field(listener: Listener, smtp_client) -> None:
    client = smtp_client()
    client.sendmail("app@example.com", ["someone@example.net"], MESSAGE)
    [stored] = listener.stored()
    received, content = listener.received_and_content(stored)
    assert content == MESSAGE
    assert f" id {stored.id} for <someone@example.net>; " in received


def test_dsn_parameters_are_stored_with_the_message(listener: Listener, smtp_client) -> None:
    """RFC 3461: RET and ENVID of MAIL FROM, NOTIFY and ORCPT of each RCPT TO, kept for the worker."""
    client = smtp_client()
    assert client.has_extn("dsn")
    refused = client.sendmail(
        "app@example.com",
        ["someone@example.net"],
        MESSAGE,
        mail_options=["RET=HDRS", "ENVID=abc+2B1"],
        rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;someone@example.net"],
    )
    assert refused == {}
    assert client.docmd("MAIL", "FROM:<app@example.com> RET=EVERYTHING") == (
        501,
        b"5.5.4 RET must be FULL or HDRS",
    )
    client.sendmail("app@example.com", ["plain@example.net"], MESSAGE)  # no parameters: nothing kept
    with_dsn, plain = sorted(listener.stored(), key=lambda m: m.created_at)
    assert (with_dsn.dsn_ret, with_dsn.dsn_envid, with_dsn.is_bounce) == ("HDRS", "abc+1", False)
    assert with_dsn.dsn_recipients == {
        "someone@example.net": {"notify": ["FAILURE", "DELAY"], "orcpt": "rfc822;someone@example.net"}
    }
    assert (plain.dsn_ret, plain.dsn_envid, plain.dsn_recipients, plain.is_bounce) == (
        None,
        None,
        None,
        False,
    )


def test_auth_login_works_too(listener: Listener, smtp_client) -> None:
    client = smtp_client(login=False)
    client.ehlo()
    client.user, client.password = listener.tenant, listener.password
    code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
    assert code == 235
    client.sendmail("app@example.com", ["a@example.net"], MESSAGE)
    assert len(listener.stored()) == 1


def test_ehlo_offers_starttls_but_never_auth_before_tls(listener: Listener, smtp_client, client_tls) -> None:
    client = smtp_client(login=False, starttls=False)
    client.ehlo()
    assert client.has_extn("starttls") and client.has_extn("pipelining") and client.has_extn("8bitmime")
    assert client.has_extn("enhancedstatuscodes") and not client.has_extn("auth")
    assert client.esmtp_features["size"] == str(listener.config.smtp.max_message_size)
    client.starttls(context=client_tls)
    client.ehlo()
    assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    assert not client.has_extn("starttls")


def test_auth_before_starttls_is_refused(listener: Listener, smtp_client) -> None:
    client = smtp_client(login=False, starttls=False)
    client.ehlo()
    assert client.docmd("AUTH", "PLAIN AHRlbmFudABjb3JyZWN0") == (
        530,
        b"5.7.0 Must issue a STARTTLS command first",
    )
    assert client.docmd("MAIL", "FROM:<app@example.com>")[0] == 530


@pytest.mark.parametrize(
    "user,password", [("tenant", "wrong password!"), ("nobody", "correct horse battery")]
)
def test_bad_credentials_get_535(listener: Listener, smtp_client, user: str, password: str) -> None:
    client = smtp_client(login=False)
    with pytest.raises(smtplib.SMTPAuthenticationError) as raised:
        client.login(user, password)
    assert raised.value.smtp_code == 535
    assert raised.value.smtp_error.startswith(b"5.7.8")


def test_mail_without_auth_is_refused(listener: Listener, smtp_client) -> None:
    client = smtp_client(login=False)
    client.ehlo()
    assert client.mail("app@example.com") == (530, b"5.7.0 Authentication required")


@pytest.mark.parametrize(
    "sender,code",
    [("app@example.com", 250), ("x@sub.example.org", 250), ("x@example.org", 553), ("x@evil.test", 553)],
)
def test_sender_domain_must_be_allowed(listener: Listener, smtp_client, sender: str, code: int) -> None:
    client = smtp_client()
    assert client.mail(sender)[0] == code


def test_oversize_message_is_read_to_the_end_and_refused_then_session_goes_on(
    start_listener, client_tls
) -> None:
    listener = start_listener(max_message_size=2048)
    client = smtplib.SMTP(listener.host, listener.port, timeout=10)
    client.starttls(context=client_tls)
    client.login(listener.tenant, listener.password)
    client.mail("app@example.com")
    client.rcpt("a@example.net")
    code, reply = client.data(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 100 + b"y" * 5000 + b"\r\n")
    # The reply names the limit, so the sender knows what would fit.
    assert (code, reply) == (
        552,
        b"5.3.4 Message size exceeds fixed maximum message size of 2048 bytes (2 KiB)",
    )
    assert listener.stored() == []
    client.sendmail("app@example.com", ["a@example.net"], b"Subject: small\r\n\r\nok\r\n")
    assert len(listener.stored()) == 1
    client.quit()


def test_declared_size_over_the_limit_is_refused_at_mail(listener: Listener, smtp_client) -> None:
    client = smtp_client()
    too_big = listener.config.smtp.max_message_size + 1
    assert client.mail("app@example.com", [f"SIZE={too_big}"])[0] == 552


def test_too_many_recipients_get_452(start_listener, client_tls) -> None:
    listener = start_listener(max_recipients=2)
    client = smtplib.SMTP(listener.host, listener.port, timeout=10)
    client.starttls(context=client_tls)
    client.login(listener.tenant, listener.password)
    client.mail("app@example.com")
    assert client.rcpt("a@example.net")[0] == 250
    assert client.rcpt("b@example.net")[0] == 250
    assert client.rcpt("c@example.net") == (452, b"4.5.3 Too many recipients")
    client.quit()


def test_bad_recipient_syntax_gets_501(listener: Listener, smtp_client) -> None:
    client = smtp_client()
    client.mail("app@example.com")
    assert client.docmd("RCPT", "TO:<" + "a" * 65 + "@example.net>")[0] == 501
    assert client.docmd("RCPT", "TO:<no-at-sign>")[0] == 501


def test_quit_says_bye(listener: Listener, smtp_client) -> None:
    client = smtp_client()
    assert client.quit()[0] == 221
