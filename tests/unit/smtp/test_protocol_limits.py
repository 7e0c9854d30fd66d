"""SmtpSession: the caller's limits: the MAIL FROM gate, recipient budget and timers."""

from __future__ import annotations

import pytest

from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.protocol import AuthOutcome, CredentialsOffered, MailFromOffered, State

MAIL = b"MAIL FROM:<alice@example.com>\r\n"
SENDER_OK = b"250 2.1.0 Sender OK\r\n"
RECIPIENT_OK = b"250 2.1.5 Recipient OK\r\n"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
NEED_MAIL = b"503 5.5.1 Need MAIL command first\r\n"
NEED_RCPT = b"503 5.5.1 Need RCPT command first\r\n"
RATE = b"451 4.7.1 Sending rate exceeded for this account, try again in 30 seconds\r\n"
DISABLED = b"421 4.7.0 Account disabled, closing connection\r\n"


@pytest.fixture
def gated(authed_driver):
    """An authenticated driver that leaves MailFromOffered for the test to answer."""
    authed_driver.answer_mail = False
    return authed_driver


# --- the MAIL FROM gate --------------------------------------------------------------------------


def test_mail_from_is_offered_and_nothing_is_sent_until_answered(gated) -> None:
    out = gated.send(MAIL)
    assert out == [MailFromOffered("alice@example.com")]
    assert gated.session.paused
    assert not gated.session.idle
    assert gated.session.state is State.READY  # no transaction before the answer


def test_mail_checked_accepts_and_starts_the_transaction(gated) -> None:
    gated.send(MAIL)
    assert gated.wire(gated.session.mail_checked()) == SENDER_OK
    assert gated.session.state is State.MAIL
    assert gated.session.envelope.sender.address == "alice@example.com"


def test_mail_from_offers_the_parsed_address_without_parameters(gated) -> None:
    out = gated.send(b"MAIL FROM:<alice@Example.COM> SIZE=10 BODY=8BITMIME\r\n")
    assert out == [MailFromOffered("alice@Example.COM")]


def test_pipelined_commands_wait_for_the_mail_answer(gated) -> None:
    out = gated.send(MAIL + b"RCPT TO:<bob@dest.test>\r\nDATA\r\n")
    assert out == [MailFromOffered("alice@example.com")]
    out = gated.session.mail_checked()
    assert gated.wire(out) == SENDER_OK + RECIPIENT_OK + START_DATA
    assert gated.session.state is State.DATA


def test_mail_refused_with_rate_exceeded_starts_no_transaction(gated) -> None:
    gated.send(MAIL)
    assert gated.wire(gated.session.mail_checked(R.rate_exceeded(30))) == RATE
    assert gated.session.state is State.READY
    assert gated.session.envelope.sender is None
    assert gated.session.connection.errors == 0  # a policy answer, not a client mistake
    assert gated.wire(gated.send(b"RCPT TO:<bob@dest.test>\r\n")) == NEED_MAIL


def test_mail_refused_then_retried_is_offered_again(gated) -> None:
    gated.send(MAIL)
    gated.session.mail_checked(R.rate_exceeded(30))
    assert gated.send(MAIL) == [MailFromOffered("alice@example.com")]
    assert gated.wire(gated.session.mail_checked()) == SENDER_OK


def test_mail_refusal_then_pipelined_commands_get_their_own_replies(gated) -> None:
    gated.send(MAIL + b"RCPT TO:<bob@dest.test>\r\nDATA\r\nNOOP\r\n")
    out = gated.session.mail_checked(R.rate_exceeded(30))
    # RFC 2920 3.1: each pipelined command is answered as if sent alone.
    assert gated.wire(out) == RATE + NEED_MAIL + NEED_MAIL + b"250 2.0.0 OK\r\n"


def test_mail_refused_with_a_closing_reply_closes_and_drops_the_pipeline(gated) -> None:
    gated.send(MAIL + b"RCPT TO:<bob@dest.test>\r\n")
    out = gated.session.mail_checked(R.R421_ACCOUNT_DISABLED)
    assert gated.wire(out) == DISABLED
    assert gated.session.closed
    assert gated.send(b"NOOP\r\n") == []


def test_mail_checked_without_an_offer_is_a_caller_bug(authed_driver) -> None:
    with pytest.raises(RuntimeError, match="MailFromOffered"):
        authed_driver.session.mail_checked()


def test_mail_from_core_checks_answer_without_an_event(gated) -> None:
    out = gated.send(b"MAIL FROM:<alice@other.test>\r\n")
    assert gated.wire(out) == b"553 5.7.1 Sender address not allowed for this account\r\n"
    assert gated.events(out) == []
    out = gated.send(b"MAIL FROM:<alice@example.com> SIZE=999999999\r\n")
    assert gated.codes(out) == [552]
    assert gated.events(out) == []
    assert not gated.session.paused


def test_the_driver_answers_mail_from_by_default(authed_driver) -> None:
    out = authed_driver.send(MAIL)
    assert out[0] == MailFromOffered("alice@example.com")
    assert authed_driver.wire(out) == SENDER_OK
    assert authed_driver.mail_offers == [MailFromOffered("alice@example.com")]


# --- the recipient budget ------------------------------------------------------------------------


def open_with_budget(driver, left: int, refusal=None) -> None:
    driver.recipients_left = left
    driver.recipients_refusal = refusal
    assert driver.wire(driver.send(MAIL)) == SENDER_OK


def test_recipients_beyond_the_budget_get_the_callers_refusal(authed_driver) -> None:
    open_with_budget(authed_driver, 2, R.rate_exceeded(30))
    out = authed_driver.send(b"RCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\nRCPT TO:<c@dest.test>\r\n")
    assert authed_driver.wire(out) == RECIPIENT_OK + RECIPIENT_OK + RATE
    assert authed_driver.session.envelope.recipients == ["a@dest.test", "b@dest.test"]
    assert authed_driver.session.connection.errors == 0


def test_recipients_budget_counts_distinct_recipients(authed_driver) -> None:
    open_with_budget(authed_driver, 1, R.rate_exceeded(30))
    out = authed_driver.send(b"RCPT TO:<a@dest.test>\r\nRCPT TO:<a@dest.test>\r\n")
    assert authed_driver.wire(out) == RECIPIENT_OK + RECIPIENT_OK


def test_data_after_a_refused_recipient_goes_to_the_accepted_ones(authed_driver) -> None:
    open_with_budget(authed_driver, 1, R.rate_exceeded(30))
    authed_driver.send(b"RCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\n")
    assert authed_driver.wire(authed_driver.send(b"DATA\r\n")) == START_DATA
    (message,) = authed_driver.received(authed_driver.send(b"hi\r\n.\r\n"))
    assert message.recipients == ("a@dest.test",)


def test_a_zero_recipient_budget_refuses_every_recipient(authed_driver) -> None:
    open_with_budget(authed_driver, 0, R.rate_exceeded(30))
    assert authed_driver.wire(authed_driver.send(b"RCPT TO:<a@dest.test>\r\n")) == RATE
    assert authed_driver.wire(authed_driver.send(b"DATA\r\n")) == NEED_RCPT


def test_a_recipient_budget_without_refusal_answers_452(authed_driver) -> None:
    open_with_budget(authed_driver, 0)
    out = authed_driver.send(b"RCPT TO:<a@dest.test>\r\n")
    assert authed_driver.wire(out) == b"452 4.5.3 Too many recipients\r\n"


def test_the_policy_recipient_limit_still_applies_under_a_larger_budget(make_driver) -> None:
    driver = make_driver(max_recipients=1).authenticated()
    open_with_budget(driver, 5, R.rate_exceeded(30))
    out = driver.send(b"RCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\n")
    assert driver.wire(out) == RECIPIENT_OK + b"452 4.5.3 Too many recipients\r\n"


def test_the_recipient_budget_belongs_to_one_transaction(authed_driver) -> None:
    open_with_budget(authed_driver, 0, R.rate_exceeded(30))
    assert authed_driver.codes(authed_driver.send(b"RSET\r\n")) == [250]
    open_with_budget(authed_driver, None)
    out = authed_driver.send(b"RCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\n")
    assert authed_driver.wire(out) == RECIPIENT_OK + RECIPIENT_OK


# --- timers the caller runs ----------------------------------------------------------------------


def test_auth_timed_out_closes_with_421(secure_driver) -> None:
    out = secure_driver.session.auth_timed_out()
    assert secure_driver.wire(out) == b"421 4.7.0 Authentication time limit reached, closing connection\r\n"
    assert out[0].close
    assert secure_driver.session.closed
    assert secure_driver.send(b"NOOP\r\n") == []


def test_session_expired_closes_with_421(authed_driver) -> None:
    out = authed_driver.session.session_expired()
    assert authed_driver.wire(out) == b"421 4.7.0 Session time limit reached, closing connection\r\n"
    assert authed_driver.session.closed


def test_idle_before_and_between_transactions(driver) -> None:
    assert driver.session.idle  # greeted
    driver.ehlo()
    assert driver.session.idle


def test_not_idle_inside_a_transaction(authed_driver) -> None:
    authed_driver.send(MAIL)
    assert not authed_driver.session.idle
    authed_driver.send(b"RCPT TO:<a@dest.test>\r\nDATA\r\n")
    assert not authed_driver.session.idle
    authed_driver.send(b".\r\n")  # MessageReceived awaits its answer
    assert not authed_driver.session.idle
    authed_driver.message_queued("Q1")
    assert authed_driver.session.idle


def test_not_idle_during_an_auth_exchange_or_its_check(secure_driver, plain) -> None:
    secure_driver.send(b"AUTH LOGIN\r\n")
    assert not secure_driver.session.idle
    secure_driver.send(b"*\r\n")
    assert secure_driver.session.idle
    out = secure_driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert isinstance(out[-1], CredentialsOffered)
    assert not secure_driver.session.idle


def test_authenticated_follows_the_auth_answer(secure_driver, plain) -> None:
    assert not secure_driver.session.authenticated
    secure_driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert not secure_driver.session.authenticated
    secure_driver.credentials_checked(AuthOutcome.OK, secure_driver.Account("alice", ("example.com",)))
    assert secure_driver.session.authenticated
