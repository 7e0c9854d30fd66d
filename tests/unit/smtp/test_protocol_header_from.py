"""SmtpSession: the From:/Sender: header check at the end of DATA (smtp_proxy.smtp.alignment)."""

from __future__ import annotations

from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.budget import InFlightBudget
from smtp_proxy.smtp.protocol import AuthOutcome, MessageRejected, State

SENDER = "alice@example.com"
RECIPIENT = "bob@dest.test"
HEADER_FROM = b"550 5.7.1 From: header address not allowed for this account\r\n"


def authenticated(driver, plain, header_from_check: bool):
    """Authenticated as alice of example.com, with or without the header check."""
    driver.secure()
    driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    account = driver.Account("alice", ("example.com",), header_from_check=header_from_check)
    assert driver.codes(driver.credentials_checked(AuthOutcome.OK, account)) == [235]
    driver.open_data(SENDER, [RECIPIENT])
    return driver


def test_a_foreign_from_is_refused_and_nothing_is_stored(authed_driver) -> None:
    authed_driver.open_data(SENDER, [RECIPIENT])
    out = authed_driver.send(b"From: CEO <ceo@bank.example>\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert out == [
        MessageRejected(SENDER, 1, 48, "header_from", R.R550_HEADER_FROM, "ceo@bank.example"),
        R.R550_HEADER_FROM,
    ]
    assert authed_driver.wire(out) == HEADER_FROM
    assert authed_driver.received(out) == []
    assert authed_driver.session.state is State.READY
    assert not authed_driver.session.paused
    assert authed_driver.session.connection.messages_rejected == 1


def test_a_foreign_sender_is_refused(authed_driver) -> None:
    authed_driver.open_data(SENDER, [RECIPIENT])
    out = authed_driver.send(b"From: alice@example.com\r\nSender: x@bank.example\r\n\r\nhi\r\n.\r\n")
    assert authed_driver.rejected(out)[0].detail == "x@bank.example"


def test_an_aligned_from_is_accepted(authed_driver) -> None:
    authed_driver.open_data(SENDER, [RECIPIENT])
    out = authed_driver.send(b"From: Alice <alice@EXAMPLE.com>\r\n\r\nFrom: ceo@bank.example\r\n.\r\n")
    assert len(authed_driver.received(out)) == 1


def test_a_message_without_from_is_accepted(authed_driver) -> None:
    authed_driver.open_data(SENDER, [RECIPIENT])
    assert len(authed_driver.received(authed_driver.send(b"Subject: x\r\n\r\nhi\r\n.\r\n"))) == 1


def test_an_exempt_account_may_send_any_from(driver, plain) -> None:
    authenticated(driver, plain, header_from_check=False)
    out = driver.send(b"From: ceo@bank.example\r\n\r\nhi\r\n.\r\n")
    assert len(driver.received(out)) == 1


def test_a_checked_account_is_refused_the_same_from(driver, plain) -> None:
    authenticated(driver, plain, header_from_check=True)
    assert driver.wire(driver.send(b"From: ceo@bank.example\r\n\r\nhi\r\n.\r\n")) == HEADER_FROM


def test_a_refused_header_gives_the_budget_back(make_driver) -> None:
    budget = InFlightBudget(10_000)
    driver = make_driver(data_budget=budget).authenticated()
    driver.open_data(SENDER, [RECIPIENT])
    driver.send(b"From: ceo@bank.example\r\n\r\nhi\r\n.\r\n")
    assert budget.held == 0


def test_the_session_goes_on_after_a_header_refusal(authed_driver) -> None:
    authed_driver.open_data(SENDER, [RECIPIENT])
    out = authed_driver.send(
        b"From: ceo@bank.example\r\n\r\nhi\r\n.\r\n"
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@dest.test>\r\nDATA\r\n"
        b"From: alice@example.com\r\n\r\nhi\r\n.\r\n"
    )
    assert authed_driver.codes(out) == [550, 250, 250, 354]
    assert len(authed_driver.received(out)) == 1
