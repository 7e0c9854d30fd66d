"""SmtpSession: the mail transaction (MAIL, RCPT, DATA, RSET) and its preconditions."""

from __future__ import annotations

import pytest

from smtp_proxy.smtp.protocol import MessageReceived

SENDER_OK = b"250 2.1.0 Sender OK\r\n"
RECIPIENT_OK = b"250 2.1.5 Recipient OK\r\n"
NOT_ALLOWED = b"553 5.7.1 Sender address not allowed for this account\r\n"
BAD_SENDER = b"501 5.1.7 Bad sender address syntax\r\n"
BAD_RECIPIENT = b"501 5.1.3 Bad recipient address syntax\r\n"
PARAMETERS = b"555 5.5.4 MAIL FROM/RCPT TO parameters not recognized or not implemented\r\n"
# The limit in the reply: every test here that goes over it sets 1000 or 1024 octets.
TOO_BIG_1000 = b"552 5.3.4 Message size exceeds fixed maximum message size of 1000 bytes\r\n"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size of 1024 bytes (1 KiB)\r\n"
NEED_MAIL = b"503 5.5.1 Need MAIL command first\r\n"
NEED_RCPT = b"503 5.5.1 Need RCPT command first\r\n"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
MAIL = b"MAIL FROM:<alice@example.com>\r\n"


def finish(driver, body: bytes = b"hi\r\n") -> MessageReceived:
    """Send the message body and terminator; return the single MessageReceived."""
    out = driver.send(body + b".\r\n")
    (message,) = driver.received(out)
    return message


# --- preconditions -------------------------------------------------------------------------------


def test_mail_before_tls_is_530_starttls_first(driver) -> None:
    driver.ehlo()
    assert driver.wire(driver.send(MAIL)) == b"530 5.7.0 Must issue a STARTTLS command first\r\n"


def test_mail_after_tls_before_auth_is_530_authentication_required(secure_driver) -> None:
    assert secure_driver.wire(secure_driver.send(MAIL)) == b"530 5.7.0 Authentication required\r\n"


def test_mail_before_ehlo_is_503(driver) -> None:
    assert driver.wire(driver.send(MAIL)) == b"503 5.5.1 Send EHLO first\r\n"


@pytest.mark.parametrize("command", [b"RCPT TO:<bob@dest.test>\r\n", b"DATA\r\n"])
def test_transaction_command_before_tls_is_530(driver, command: bytes) -> None:
    driver.ehlo()
    assert driver.wire(driver.send(command)) == b"530 5.7.0 Must issue a STARTTLS command first\r\n"


@pytest.mark.parametrize("command", [b"RCPT TO:<bob@dest.test>\r\n", b"DATA\r\n"])
def test_transaction_command_before_auth_is_530(secure_driver, command: bytes) -> None:
    assert secure_driver.wire(secure_driver.send(command)) == b"530 5.7.0 Authentication required\r\n"


# --- MAIL FROM -----------------------------------------------------------------------------------


def test_mail_from_allowed_domain_is_250(authed_driver) -> None:
    assert authed_driver.wire(authed_driver.send(MAIL)) == SENDER_OK


def test_mail_from_allowed_domain_is_case_insensitive(authed_driver) -> None:
    assert authed_driver.wire(authed_driver.send(b"mail from:<Alice@EXAMPLE.com>\r\n")) == SENDER_OK


def test_mail_from_with_space_after_colon_is_250(authed_driver) -> None:
    assert authed_driver.wire(authed_driver.send(b"MAIL FROM: <alice@example.com>\r\n")) == SENDER_OK


def test_mail_from_subdomain_matches_wildcard_pattern(make_driver) -> None:
    driver = make_driver().authenticated(allowed_domains=("*.example.com",))
    assert driver.wire(driver.send(b"MAIL FROM:<alice@mail.example.com>\r\n")) == SENDER_OK


def test_mail_from_parent_domain_does_not_match_wildcard_pattern(make_driver) -> None:
    driver = make_driver().authenticated(allowed_domains=("*.example.com",))
    assert driver.wire(driver.send(MAIL)) == NOT_ALLOWED


def test_mail_from_disallowed_domain_is_553(authed_driver) -> None:
    out = authed_driver.send(b"MAIL FROM:<alice@evil.test>\r\n")
    assert authed_driver.wire(out) == NOT_ALLOWED
    # No transaction was started.
    assert authed_driver.wire(authed_driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == NEED_MAIL


def test_mail_from_lookalike_domain_is_553(authed_driver) -> None:
    assert authed_driver.wire(authed_driver.send(b"MAIL FROM:<alice@badexample.com>\r\n")) == NOT_ALLOWED


def test_mail_from_null_sender_is_553(authed_driver) -> None:
    assert authed_driver.wire(authed_driver.send(b"MAIL FROM:<>\r\n")) == NOT_ALLOWED


@pytest.mark.parametrize(
    "argument",
    [b"FROM:alice@example.com", b"FROM:<alice>", b"FROM:<alice@example.com", b"TO:<alice@example.com>", b""],
    ids=["no-brackets", "no-domain", "unclosed", "wrong-keyword", "empty"],
)
def test_mail_from_bad_syntax_is_501(authed_driver, argument: bytes) -> None:
    assert authed_driver.wire(authed_driver.send(b"MAIL " + argument + b"\r\n")) == BAD_SENDER


def test_mail_from_declared_size_over_limit_is_552(make_driver) -> None:
    driver = make_driver(max_message_size=1000).authenticated()
    out = driver.send(b"MAIL FROM:<alice@example.com> SIZE=1001\r\n")
    assert driver.wire(out) == TOO_BIG_1000
    assert driver.wire(driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == NEED_MAIL


def test_mail_from_declared_size_within_limit_is_250(make_driver) -> None:
    driver = make_driver(max_message_size=1000).authenticated()
    assert driver.wire(driver.send(b"MAIL FROM:<alice@example.com> SIZE=1000\r\n")) == SENDER_OK


def test_mail_from_unknown_parameter_is_555(authed_driver) -> None:
    assert authed_driver.wire(authed_driver.send(b"MAIL FROM:<alice@example.com> SMTPUTF8\r\n")) == PARAMETERS


def test_mail_from_malformed_size_is_555(authed_driver) -> None:
    assert authed_driver.wire(authed_driver.send(b"MAIL FROM:<alice@example.com> SIZE=big\r\n")) == PARAMETERS


@pytest.mark.parametrize("body", [b"8BITMIME", b"7BIT", b"8bitmime"])
def test_mail_from_body_parameter_is_250(authed_driver, body: bytes) -> None:
    out = authed_driver.send(b"MAIL FROM:<alice@example.com> BODY=" + body + b"\r\n")
    assert authed_driver.wire(out) == SENDER_OK


def test_mail_from_nested_is_503(authed_driver) -> None:
    authed_driver.send(MAIL)
    assert authed_driver.wire(authed_driver.send(MAIL)) == b"503 5.5.1 Sender already specified\r\n"


def test_mail_from_nested_after_rcpt_is_503(authed_driver) -> None:
    authed_driver.send(MAIL + b"RCPT TO:<bob@dest.test>\r\n")
    assert authed_driver.wire(authed_driver.send(MAIL)) == b"503 5.5.1 Sender already specified\r\n"


# --- RCPT TO -------------------------------------------------------------------------------------


def test_rcpt_before_mail_is_503(authed_driver) -> None:
    assert authed_driver.wire(authed_driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == NEED_MAIL


def test_rcpt_to_valid_recipient_is_250(authed_driver) -> None:
    authed_driver.send(MAIL)
    assert authed_driver.wire(authed_driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == RECIPIENT_OK


def test_rcpt_to_any_domain_is_accepted(authed_driver) -> None:
    authed_driver.send(MAIL)
    assert authed_driver.wire(authed_driver.send(b"RCPT TO:<bob@elsewhere.example.org>\r\n")) == RECIPIENT_OK


@pytest.mark.parametrize(
    "argument",
    [
        b"TO:bob@dest.test",
        b"TO:<>",
        b"TO:<bob>",
        b"TO:<bob@dest.test",
        b"TO:<b ob@dest.test>",
        b"FROM:<bob@dest.test>",
        b"TO:<" + b"a" * 65 + b"@dest.test>",
        b"TO:<" + b"a" * 64 + b"@" + b".".join([b"d" * 60] * 4) + b".test>",
    ],
    ids=[
        "no-brackets",
        "null",
        "no-domain",
        "unclosed",
        "space",
        "wrong-keyword",
        "local-65",
        "path-over-256",
    ],
)
def test_rcpt_to_bad_recipient_is_501(authed_driver, argument: bytes) -> None:
    authed_driver.send(MAIL)
    assert authed_driver.wire(authed_driver.send(b"RCPT " + argument + b"\r\n")) == BAD_RECIPIENT


def test_rcpt_to_local_part_of_64_octets_is_accepted(authed_driver) -> None:
    authed_driver.send(MAIL)
    out = authed_driver.send(b"RCPT TO:<" + b"a" * 64 + b"@dest.test>\r\n")
    assert authed_driver.wire(out) == RECIPIENT_OK


def test_rcpt_to_path_over_256_octets_fixture_is_long_enough() -> None:
    path = b"<" + b"a" * 64 + b"@" + b".".join([b"d" * 60] * 4) + b".test>"
    assert len(path) > 256
    assert all(len(label) <= 63 for label in path[66:-1].split(b"."))


def test_rcpt_to_with_unknown_parameter_is_555(authed_driver) -> None:
    authed_driver.send(MAIL)
    out = authed_driver.send(b"RCPT TO:<bob@dest.test> X-PRIORITY=1\r\n")
    assert authed_driver.wire(out) == PARAMETERS


def test_rcpt_over_max_recipients_is_452_and_earlier_are_kept(make_driver) -> None:
    driver = make_driver(max_recipients=3).authenticated()
    driver.send(MAIL)
    out = driver.send(b"".join(b"RCPT TO:<r%d@dest.test>\r\n" % n for n in range(1, 5)))
    assert driver.wire(out) == RECIPIENT_OK * 3 + b"452 4.5.3 Too many recipients\r\n"
    assert driver.codes(driver.send(b"DATA\r\n")) == [354]
    message = finish(driver)
    assert message.recipients == ("r1@dest.test", "r2@dest.test", "r3@dest.test")


def test_rcpt_over_max_recipients_does_not_count_as_error(make_driver) -> None:
    driver = make_driver(max_recipients=1).authenticated()
    driver.send(MAIL + b"RCPT TO:<r0@dest.test>\r\n")
    out = driver.send(b"".join(b"RCPT TO:<r%d@dest.test>\r\n" % n for n in range(1, 15)))
    assert driver.codes(out) == [452] * 14
    assert not driver.session.closed


def test_rcpt_duplicate_recipient_is_kept_once(authed_driver) -> None:
    driver = authed_driver
    driver.send(MAIL)
    out = driver.send(b"RCPT TO:<bob@dest.test>\r\nRCPT TO:<carol@dest.test>\r\nRCPT TO:<bob@dest.test>\r\n")
    assert driver.wire(out) == RECIPIENT_OK * 3
    driver.send(b"DATA\r\n")
    assert finish(driver).recipients == ("bob@dest.test", "carol@dest.test")


def test_rcpt_duplicate_at_limit_is_250(make_driver) -> None:
    driver = make_driver(max_recipients=1).authenticated()
    driver.send(MAIL + b"RCPT TO:<bob@dest.test>\r\n")
    assert driver.wire(driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == RECIPIENT_OK


# --- DATA ----------------------------------------------------------------------------------------


def test_data_before_mail_is_503(authed_driver) -> None:
    assert authed_driver.wire(authed_driver.send(b"DATA\r\n")) == NEED_MAIL


def test_data_before_rcpt_is_503(authed_driver) -> None:
    authed_driver.send(MAIL)
    assert authed_driver.wire(authed_driver.send(b"DATA\r\n")) == NEED_RCPT


def test_data_with_argument_is_501(authed_driver) -> None:
    authed_driver.send(MAIL + b"RCPT TO:<bob@dest.test>\r\n")
    out = authed_driver.send(b"DATA now\r\n")
    assert authed_driver.wire(out) == b"501 5.5.4 Syntax error in parameters or arguments\r\n"
    # Still in the transaction: a plain DATA is accepted afterwards.
    assert authed_driver.wire(authed_driver.send(b"DATA\r\n")) == START_DATA


def test_data_after_rcpt_is_354(authed_driver) -> None:
    authed_driver.send(MAIL + b"RCPT TO:<bob@dest.test>\r\n")
    assert authed_driver.wire(authed_driver.send(b"DATA\r\n")) == START_DATA


def test_data_delivers_envelope_in_message_received(authed_driver) -> None:
    authed_driver.send(MAIL + b"RCPT TO:<bob@dest.test>\r\nDATA\r\n")
    message = finish(authed_driver, b"Subject: x\r\n\r\nhello\r\n")
    assert message == MessageReceived("alice@example.com", ("bob@dest.test",), b"Subject: x\r\n\r\nhello\r\n")


# --- resets --------------------------------------------------------------------------------------


def test_rset_clears_the_envelope(authed_driver) -> None:
    driver = authed_driver
    driver.send(MAIL + b"RCPT TO:<bob@dest.test>\r\n")
    assert driver.wire(driver.send(b"RSET\r\n")) == b"250 2.0.0 OK\r\n"
    assert driver.wire(driver.send(b"RCPT TO:<carol@dest.test>\r\n")) == NEED_MAIL
    assert driver.wire(driver.send(b"DATA\r\n")) == NEED_MAIL
    driver.send(b"MAIL FROM:<other@example.com>\r\nRCPT TO:<carol@dest.test>\r\nDATA\r\n")
    assert finish(driver) == MessageReceived("other@example.com", ("carol@dest.test",), b"hi\r\n")


def test_rset_keeps_authentication(authed_driver) -> None:
    authed_driver.send(b"RSET\r\n")
    assert authed_driver.wire(authed_driver.send(MAIL)) == SENDER_OK


def test_ehlo_mid_transaction_clears_the_envelope(authed_driver) -> None:
    driver = authed_driver
    driver.send(MAIL + b"RCPT TO:<bob@dest.test>\r\n")
    assert driver.codes(driver.send(b"EHLO client.test\r\n")) == [250]
    assert driver.wire(driver.send(b"DATA\r\n")) == NEED_MAIL
    assert driver.wire(driver.send(b"RCPT TO:<carol@dest.test>\r\n")) == NEED_MAIL
    driver.send(MAIL + b"RCPT TO:<carol@dest.test>\r\nDATA\r\n")
    assert finish(driver).recipients == ("carol@dest.test",)


def test_helo_mid_transaction_clears_the_envelope(authed_driver) -> None:
    authed_driver.send(MAIL)
    assert authed_driver.wire(authed_driver.send(b"HELO client.test\r\n")) == b"250 mx.test\r\n"
    assert authed_driver.wire(authed_driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == NEED_MAIL


def test_next_transaction_starts_empty_after_message(authed_driver) -> None:
    driver = authed_driver
    driver.send(MAIL + b"RCPT TO:<bob@dest.test>\r\nDATA\r\n")
    finish(driver)
    driver.message_queued("Q1")
    assert driver.wire(driver.send(b"RCPT TO:<carol@dest.test>\r\n")) == NEED_MAIL
    driver.send(MAIL + b"RCPT TO:<carol@dest.test>\r\nDATA\r\n")
    assert finish(driver).recipients == ("carol@dest.test",)
