"""SmtpSession with a RelayGrant: a client in an account's relay network sends as that account
without AUTH, needs TLS unless the grant says otherwise, and AUTH still takes over.

Plain strings through the core (``Driver`` of this folder's conftest); the trace field's protocol
names for such sessions are at the end.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.protocol import (
    AuthOutcome,
    CredentialsOffered,
    MailFromOffered,
    MessageReceived,
    MessageRejected,
    Output,
    RelayGrant,
    SessionPolicy,
    SmtpSession,
    State,
    TlsRequested,
)
from smtp_proxy.smtp.trace import protocol, received_field
from tests.unit.smtp.conftest import Driver, FakeAccount, plain_response

PRINTER = FakeAccount("office", ("office.example", "*.office.example"))
APP = FakeAccount("app", ("app.example",))
SENDER = "scanner@office.example"
RECIPIENT = "someone@dest.test"
MESSAGE = b"From: scanner@office.example\r\nSubject: scan\r\n\r\npage 1\r\n.\r\n"


def relay_driver(require_tls: bool = True, account: FakeAccount = PRINTER, **policy: bool | int) -> Driver:
    """A Driver whose session the adapter found in ``account``'s relay network."""
    driver = Driver(**policy)  # type: ignore[arg-type]
    driver.session = SmtpSession(driver.policy, relay=RelayGrant(account, require_tls))
    return driver


AUTH_APP = f"AUTH PLAIN {plain_response('app', 'secret-password')}\r\n"


def auth_as_app(driver: Driver) -> list[Output]:
    """AUTH PLAIN as the app's credential, answered OK; the answer's outputs."""
    assert driver.send(AUTH_APP) == [CredentialsOffered("PLAIN", "app", "secret-password")]
    return driver.credentials_checked(AuthOutcome.OK, APP)


def send_message(driver: Driver, sender: str = SENDER, content: bytes = MESSAGE) -> list[Output]:
    """MAIL, RCPT and DATA checked, then the content; the outputs of the content."""
    driver.open_data(sender, [RECIPIENT])
    return driver.send(content)


# --- TLS required --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["MAIL FROM:<scanner@office.example>", "RCPT TO:<a@dest.test>", "DATA"])
def test_a_grant_requiring_tls_refuses_a_transaction_in_the_clear(command: str) -> None:
    """Before STARTTLS every transaction command is 530 5.7.0, and no event reaches the adapter."""
    driver = relay_driver(require_tls=True)
    driver.ehlo()
    out = driver.send(f"{command}\r\n")
    assert driver.wire(out) == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    assert driver.events(out) == []
    assert driver.session.state is State.READY


def test_a_grant_requiring_tls_sends_after_starttls_without_auth() -> None:
    """STARTTLS and EHLO again, then MAIL is the account's at once: no AUTH, one message."""
    driver = relay_driver(require_tls=True)
    driver.ehlo()
    assert driver.starttls() == []
    driver.ehlo()
    out = driver.send(f"MAIL FROM:<{SENDER}>\r\n")
    assert out[0] == MailFromOffered(SENDER)
    assert driver.replies(out) == [R.R250_SENDER_OK]
    assert driver.session.connection.account is None  # no AUTH happened
    assert driver.codes(driver.send(f"RCPT TO:<{RECIPIENT}>\r\n")) == [250]
    assert driver.codes(driver.send(b"DATA\r\n")) == [354]
    [received] = driver.received(driver.send(MESSAGE))
    assert (received.sender, received.recipients) == (SENDER, (RECIPIENT,))
    assert received.data.endswith(b"page 1\r\n")


def test_a_grant_requiring_tls_on_an_implicit_tls_listener_needs_no_starttls() -> None:
    driver = relay_driver(require_tls=True, tls_active=True)
    driver.ehlo()
    assert driver.codes(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [250]


def test_a_grant_requiring_tls_cannot_send_where_tls_is_unavailable() -> None:
    """No certificate on the listener: STARTTLS is 454, and MAIL stays refused."""
    driver = relay_driver(require_tls=True, tls_available=False)
    driver.ehlo()
    assert driver.replies(driver.send(b"STARTTLS\r\n")) == [R.R454_TLS_UNAVAILABLE]
    assert driver.replies(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [R.R530_STARTTLS_FIRST]


def test_commands_pipelined_behind_starttls_are_dropped_for_a_relay_client_too() -> None:
    """CVE-2011-0411: a MAIL sent in the clear behind STARTTLS never runs inside TLS as the account's."""
    driver = relay_driver(require_tls=True)
    driver.ehlo()
    out = driver.send(f"STARTTLS\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n")
    assert out == [R.R220_TLS_READY, TlsRequested()]
    assert driver.session.tls_started() == []
    assert driver.mail_offers == []
    # The session starts over: EHLO first, then MAIL.
    assert driver.replies(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [R.R503_EHLO_FIRST]


def test_transaction_commands_in_the_clear_count_as_errors_until_the_session_closes() -> None:
    """A device that never does STARTTLS is closed like any confused client (max_errors)."""
    driver = relay_driver(require_tls=True)
    driver.ehlo()
    limit = driver.policy.max_errors
    for _ in range(limit - 1):
        assert driver.codes(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [530]
    assert driver.replies(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [R.R421_TOO_MANY_ERRORS]
    assert driver.session.closed


# --- TLS not required ----------------------------------------------------------------------------


def test_a_grant_without_tls_sends_in_the_clear() -> None:
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    [received] = driver.received(send_message(driver))
    assert received.recipients == (RECIPIENT,)
    assert not driver.session.connection.tls_active


def test_a_grant_without_tls_accepts_helo() -> None:
    """Old appliances speak HELO; the grant does not need EHLO."""
    driver = relay_driver(require_tls=False)
    assert driver.codes(driver.send(b"HELO printer.office.example\r\n")) == [250]
    assert len(driver.received(send_message(driver))) == 1


def test_a_grant_without_tls_still_needs_a_greeting_first() -> None:
    driver = relay_driver(require_tls=False)
    assert driver.replies(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [R.R503_EHLO_FIRST]


def test_a_grant_without_tls_may_still_use_starttls() -> None:
    driver = relay_driver(require_tls=False)
    driver.secure()
    assert len(driver.received(send_message(driver))) == 1


def test_a_pipelined_transaction_in_the_clear_waits_for_each_answer() -> None:
    """RFC 2920: MAIL, RCPT and DATA in one packet; RCPT waits until MAIL FROM is answered."""
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    driver.answer_mail = False
    out = driver.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode() + MESSAGE)
    assert out == [MailFromOffered(SENDER)]
    assert driver.session.paused
    out = driver.session.mail_checked(None)
    assert driver.codes(out) == [250, 250, 354]
    [received] = driver.received(out)
    assert received.sender == SENDER


def test_a_message_queued_answer_is_250_for_a_relay_session() -> None:
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    send_message(driver)
    out = driver.message_queued("id-1")
    assert driver.wire(out) == b"250 2.0.0 Ok: queued as id-1\r\n"
    assert driver.session.connection.messages_accepted == 1


# --- the account's domains -----------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["x@other.example", "x@notoffice.example", "x@office.example.com"])
def test_a_sender_outside_the_accounts_domains_is_553(sender: str) -> None:
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    out = driver.send(f"MAIL FROM:<{sender}>\r\n")
    assert driver.wire(out) == b"553 5.7.1 Sender address not allowed for this account\r\n"
    assert driver.events(out) == []


@pytest.mark.parametrize("sender", ["x@office.example", "x@scan.office.example", "x@a.b.office.example"])
def test_a_sender_in_the_accounts_domains_or_their_subdomains_is_accepted(sender: str) -> None:
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    assert driver.codes(driver.send(f"MAIL FROM:<{sender}>\r\n")) == [250]


def test_a_foreign_header_from_is_refused_for_a_relay_session() -> None:
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    out = send_message(driver, content=b"From: ceo@bank.example\r\n\r\nhi\r\n.\r\n")
    assert driver.received(out) == []
    [rejected] = driver.rejected(out)
    assert (rejected.reason, rejected.detail) == ("header_from", "ceo@bank.example")
    assert driver.replies(out) == [R.R550_HEADER_FROM]


def test_an_exempt_relay_account_may_send_any_header_from() -> None:
    driver = relay_driver(require_tls=False, account=FakeAccount("office", ("office.example",), False))
    driver.ehlo()
    out = send_message(driver, content=b"From: ceo@bank.example\r\n\r\nhi\r\n.\r\n")
    assert len(driver.received(out)) == 1


# --- AUTH during a relay session -----------------------------------------------------------------


def test_auth_during_a_relay_session_takes_over() -> None:
    """AUTH's account replaces the network's: its domains count from then on."""
    driver = relay_driver(require_tls=True)
    driver.secure()
    assert driver.wire(auth_as_app(driver)) == b"235 2.7.0 Authentication successful\r\n"
    assert driver.session.account == APP
    assert driver.replies(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [R.R553_SENDER_NOT_ALLOWED]
    assert driver.codes(driver.send(b"MAIL FROM:<noreply@app.example>\r\n")) == [250]


def test_a_second_auth_after_taking_over_is_503() -> None:
    driver = relay_driver(require_tls=True)
    driver.secure()
    auth_as_app(driver)
    out = driver.send(AUTH_APP)
    assert driver.replies(out) == [R.R503_ALREADY_AUTHENTICATED]


def test_a_failed_auth_leaves_the_relay_session_the_networks() -> None:
    """535 for the wrong password; the client is still in the network, so it still sends as it."""
    driver = relay_driver(require_tls=True)
    driver.secure()
    driver.send(f"AUTH PLAIN {plain_response('app', 'wrong-password!!')}\r\n")
    out = driver.credentials_checked(AuthOutcome.INVALID)
    assert driver.replies(out) == [R.R535_AUTH_INVALID]
    assert driver.session.account == PRINTER
    assert driver.codes(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [250]


def test_auth_in_the_clear_is_refused_even_where_the_grant_allows_the_clear() -> None:
    """The grant lets the network's account send without TLS; passwords still need TLS."""
    driver = relay_driver(require_tls=False)
    out = driver.ehlo()
    assert "AUTH PLAIN LOGIN" not in driver.replies(out)[0].lines
    out = driver.send(AUTH_APP)
    assert driver.replies(out) == [R.R530_STARTTLS_FIRST]
    assert driver.events(out) == []


def test_auth_is_advertised_to_a_relay_client_once_tls_is_on() -> None:
    driver = relay_driver(require_tls=True)
    driver.ehlo()
    driver.starttls()
    assert "AUTH PLAIN LOGIN" in driver.replies(driver.ehlo())[0].lines


def test_auth_inside_a_relay_transaction_is_503() -> None:
    driver = relay_driver(require_tls=True)
    driver.secure()
    driver.send(f"MAIL FROM:<{SENDER}>\r\n")
    out = driver.send(AUTH_APP)
    assert driver.replies(out) == [R.R503_AUTH_IN_TRANSACTION]


# --- the caller's view: authenticated, account, account_changed ----------------------------------


def test_a_session_without_grant_or_auth_is_nobodys() -> None:
    session = SmtpSession(SessionPolicy("mx.test", 1000, 10))
    assert not session.authenticated
    assert session.account is None


def test_a_relay_session_is_the_networks_account_from_the_start() -> None:
    """Authenticated before any command: the adapter's AUTH clock does not apply to it."""
    driver = relay_driver()
    assert driver.session.authenticated
    assert driver.session.account == PRINTER


def test_after_auth_the_account_is_auths() -> None:
    driver = relay_driver()
    driver.secure()
    auth_as_app(driver)
    assert driver.session.authenticated
    assert driver.session.account == APP
    assert driver.session.connection.relay == RelayGrant(PRINTER, True)


def test_account_changed_gives_a_relay_session_new_domains_and_keeps_its_tls_rule() -> None:
    driver = relay_driver(require_tls=True)
    narrowed = FakeAccount("office", ("scan.office.example",))
    driver.session.account_changed(narrowed)
    assert driver.session.account == narrowed
    assert driver.session.connection.relay == RelayGrant(narrowed, True)
    assert driver.session.connection.account is None
    driver.ehlo()
    assert driver.codes(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [530]  # still needs TLS
    driver.starttls()
    driver.ehlo()
    assert driver.codes(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [553]
    assert driver.codes(driver.send(b"MAIL FROM:<x@scan.office.example>\r\n")) == [250]


def test_account_changed_after_auth_changes_auths_account_not_the_grant() -> None:
    driver = relay_driver(require_tls=True)
    driver.secure()
    auth_as_app(driver)
    changed = FakeAccount("app", ("app.example",), header_from_check=False)
    driver.session.account_changed(changed)
    assert driver.session.account == changed
    assert driver.session.connection.relay == RelayGrant(PRINTER, True)


def test_account_changed_without_an_account_gives_none() -> None:
    """Only a session that already is an account's can have it changed."""
    session = SmtpSession(SessionPolicy("mx.test", 1000, 10))
    session.account_changed(APP)
    assert session.account is None and not session.authenticated


def test_a_header_from_exemption_given_mid_session_applies_to_the_next_message() -> None:
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    foreign = b"From: ceo@bank.example\r\n\r\nhi\r\n.\r\n"
    assert driver.rejected(send_message(driver, content=foreign))
    driver.session.account_changed(FakeAccount("office", PRINTER.allowed_domains, header_from_check=False))
    assert len(driver.received(send_message(driver, content=foreign))) == 1


def test_rset_and_a_new_ehlo_keep_the_grant() -> None:
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    driver.send(f"MAIL FROM:<{SENDER}>\r\n")
    assert driver.codes(driver.send(b"RSET\r\n")) == [250]
    driver.ehlo("again.office.example")
    assert driver.session.account == PRINTER
    assert driver.codes(driver.send(f"MAIL FROM:<{SENDER}>\r\n")) == [250]


def test_a_refused_mail_from_ends_a_relay_session_like_any_other() -> None:
    """The adapter's 421 (the account deactivated since) closes it; nothing more is read."""
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    driver.mail_refusal = R.R421_ACCOUNT_DISABLED
    out = driver.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n")
    assert driver.replies(out) == [R.R421_ACCOUNT_DISABLED]
    assert driver.session.closed
    assert driver.session.close_reason == "policy"


def test_several_messages_in_one_relay_session() -> None:
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    for number in range(3):
        out = send_message(driver)
        assert isinstance(out[-1], MessageReceived)
        driver.message_queued(f"id-{number}")
    assert driver.session.connection.messages_accepted == 3
    assert not any(isinstance(item, MessageRejected) for item in out)


# --- the trace field's protocol names (RFC 3848) -------------------------------------------------


@pytest.mark.parametrize(
    "tls,authenticated,name",
    [(True, True, "ESMTPSA"), (True, False, "ESMTPS"), (False, False, "ESMTP"), (False, True, "ESMTPA")],
)
def test_protocol_names(tls: bool, authenticated: bool, name: str) -> None:
    assert protocol(tls=tls, authenticated=authenticated) == name


@pytest.mark.parametrize(
    "tls,authenticated,name",
    [
        (("TLSv1.3", "TLS_AES_256_GCM_SHA384"), True, "ESMTPSA"),
        (("TLSv1.3", "TLS_AES_256_GCM_SHA384"), False, "ESMTPS"),
        (None, False, "ESMTP"),
    ],
)
def test_the_received_field_names_the_sessions_protocol(
    tls: tuple[str, str] | None, authenticated: bool, name: str
) -> None:
    text = received_field(
        helo="printer.office.example",
        client_ip="192.0.2.7",
        hostname="mx.test",
        message_id="id-1",
        recipients=(RECIPIENT,),
        when=datetime(2026, 12, 2, tzinfo=UTC),
        tls=tls,
        authenticated=authenticated,
    ).decode("ascii")
    assert f"\tby mx.test (smtp-proxy) with {name}\r\n" in text
