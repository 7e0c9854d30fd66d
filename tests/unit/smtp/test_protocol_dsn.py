"""SmtpSession and RFC 3461 (DSN): the extension announced, its MAIL and RCPT parameters parsed,
checked and handed over with the message; bad values get 501 5.5.4 saying what is wrong.

Plain strings through the core (``Driver`` of this folder's conftest).
"""

from __future__ import annotations

import pytest

from smtp_proxy.smtp.protocol import MessageReceived
from tests.unit.smtp.conftest import Driver
from tests.unit.smtp.test_protocol_relay import relay_driver

SENDER_OK = b"250 2.1.0 Sender OK\r\n"
RECIPIENT_OK = b"250 2.1.5 Recipient OK\r\n"
PARAMETERS = b"555 5.5.4 MAIL FROM/RCPT TO parameters not recognized or not implemented\r\n"
MAIL = b"MAIL FROM:<alice@example.com>"


def received(driver: Driver, commands: bytes) -> MessageReceived:
    """Send ``commands`` (MAIL and RCPT lines), then DATA and a message; the MessageReceived."""
    out = driver.send(commands + b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    (message,) = driver.received(out)
    return message


def bad_value(text: str) -> bytes:
    return b"501 5.5.4 " + text.encode() + b"\r\n"


# --- the extension -------------------------------------------------------------------------------


def test_ehlo_announces_dsn_before_and_after_tls(driver: Driver) -> None:
    assert b"250-DSN\r\n" in driver.wire(driver.ehlo())
    driver.starttls()
    assert b"250-DSN\r\n" in driver.wire(driver.ehlo())


# --- MAIL FROM: RET and ENVID --------------------------------------------------------------------


def test_ret_and_envid_are_handed_over_with_the_message(authed_driver: Driver) -> None:
    commands = MAIL + b" RET=HDRS ENVID=QQ+2B314+3D\r\nRCPT TO:<bob@dest.test>\r\n"
    message = received(authed_driver, commands)
    assert (message.dsn_ret, message.dsn_envid) == ("HDRS", "QQ+314=")  # xtext decoded
    assert message.dsn_recipients is None  # no recipient gave NOTIFY or ORCPT


@pytest.mark.parametrize(("given", "kept"), [(b"full", "FULL"), (b"Hdrs", "HDRS")])
def test_ret_is_case_insensitive(authed_driver: Driver, given: bytes, kept: str) -> None:
    message = received(authed_driver, MAIL + b" RET=" + given + b"\r\nRCPT TO:<bob@dest.test>\r\n")
    assert message.dsn_ret == kept and message.dsn_envid is None


def test_a_message_without_dsn_parameters_hands_none_over(authed_driver: Driver) -> None:
    message = received(authed_driver, MAIL + b"\r\nRCPT TO:<bob@dest.test>\r\n")
    assert (message.dsn_ret, message.dsn_envid, message.dsn_recipients) == (None, None, None)


def test_an_envid_of_100_characters_is_taken_and_101_is_not(authed_driver: Driver) -> None:
    assert authed_driver.wire(authed_driver.send(MAIL + b" ENVID=" + b"e" * 100 + b"\r\n")) == SENDER_OK
    authed_driver.send(b"RSET\r\n")
    out = authed_driver.send(MAIL + b" ENVID=" + b"e" * 101 + b"\r\n")
    assert authed_driver.wire(out) == bad_value("ENVID longer than 100 characters")


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        (b"RET=ALL", "RET must be FULL or HDRS"),
        (b"RET", "RET must be FULL or HDRS"),
        (b"ENVID", "ENVID needs a value"),
        (b"ENVID=a+2b", "ENVID is not valid xtext (RFC 3461 4)"),  # hex digits are upper case
        (b"ENVID=a+4", "ENVID is not valid xtext (RFC 3461 4)"),
        (b"ENVID=a+0D+0AX-Injected:+20yes", "ENVID must decode to printable ASCII"),
        (b"ENVID=+00", "ENVID must decode to printable ASCII"),
    ],
)
def test_a_bad_ret_or_envid_is_501_saying_what_is_wrong(
    authed_driver: Driver, params: bytes, problem: str
) -> None:
    out = authed_driver.send(MAIL + b" " + params + b"\r\n")
    assert authed_driver.wire(out) == bad_value(problem)
    # No transaction started: the next MAIL is taken.
    assert authed_driver.wire(authed_driver.send(MAIL + b"\r\n")) == SENDER_OK


@pytest.mark.parametrize("params", [b"RET=FULL RET=HDRS", b"ENVID=a envid=b"])
def test_a_mail_parameter_given_twice_is_555(authed_driver: Driver, params: bytes) -> None:
    assert authed_driver.wire(authed_driver.send(MAIL + b" " + params + b"\r\n")) == PARAMETERS


# --- RCPT TO: NOTIFY and ORCPT -------------------------------------------------------------------


def test_notify_and_orcpt_are_kept_per_recipient(authed_driver: Driver) -> None:
    commands = (
        MAIL + b"\r\n"
        b"RCPT TO:<bob@dest.test> NOTIFY=failure,Delay ORCPT=RFC822;Bob+40dest.test\r\n"
        b"RCPT TO:<carol@dest.test>\r\n"
        b"RCPT TO:<dave@dest.test> NOTIFY=NEVER\r\n"
        b"RCPT TO:<erin@dest.test> ORCPT=rfc822;erin+2Bold@dest.test\r\n"
    )
    message = received(authed_driver, commands)
    assert message.recipients == ("bob@dest.test", "carol@dest.test", "dave@dest.test", "erin@dest.test")
    assert message.dsn_recipients == {
        "bob@dest.test": {"notify": ["FAILURE", "DELAY"], "orcpt": "rfc822;Bob@dest.test"},
        "dave@dest.test": {"notify": ["NEVER"], "orcpt": None},
        "erin@dest.test": {"notify": None, "orcpt": "rfc822;erin+old@dest.test"},
    }


def test_notify_keeps_every_value_once_in_the_order_given(authed_driver: Driver) -> None:
    message = received(authed_driver, MAIL + b"\r\nRCPT TO:<bob@dest.test> NOTIFY=DELAY,SUCCESS,FAILURE\r\n")
    assert message.dsn_recipients == {
        "bob@dest.test": {"notify": ["DELAY", "SUCCESS", "FAILURE"], "orcpt": None}
    }


def test_a_repeated_recipient_keeps_its_first_parameters(authed_driver: Driver) -> None:
    commands = (
        MAIL + b"\r\nRCPT TO:<bob@dest.test> NOTIFY=SUCCESS\r\nRCPT TO:<bob@dest.test> NOTIFY=NEVER\r\n"
    )
    message = received(authed_driver, commands)
    assert message.dsn_recipients == {"bob@dest.test": {"notify": ["SUCCESS"], "orcpt": None}}


def test_the_parameters_do_not_outlive_their_transaction(authed_driver: Driver) -> None:
    authed_driver.send(MAIL + b" RET=HDRS ENVID=one\r\nRCPT TO:<bob@dest.test> NOTIFY=NEVER\r\nRSET\r\n")
    message = received(authed_driver, MAIL + b"\r\nRCPT TO:<bob@dest.test>\r\n")
    assert (message.dsn_ret, message.dsn_envid, message.dsn_recipients) == (None, None, None)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        (b"NOTIFY=NEVER,FAILURE", "NOTIFY=NEVER cannot be combined with other values"),
        (b"NOTIFY=FAILURE,never", "NOTIFY=NEVER cannot be combined with other values"),
        (b"NOTIFY=ALWAYS", "NOTIFY must be NEVER or a comma list of SUCCESS, FAILURE, DELAY"),
        (b"NOTIFY=FAILURE,", "NOTIFY must be NEVER or a comma list of SUCCESS, FAILURE, DELAY"),
        (b"NOTIFY", "NOTIFY must be NEVER or a comma list of SUCCESS, FAILURE, DELAY"),
        (b"NOTIFY=FAILURE,FAILURE", "NOTIFY names a value twice"),
        (b"ORCPT", "ORCPT needs a value: rfc822;address"),
        (b"ORCPT=bob@dest.test", "ORCPT must be rfc822;address"),
        (b"ORCPT=x400;bob", "ORCPT must be rfc822;address"),
        (b"ORCPT=rfc822;", "ORCPT is empty"),
        (b"ORCPT=rfc822;bob+40dest.test+0D+0A", "ORCPT must decode to printable ASCII"),
        (b"ORCPT=rfc822;bob+4Gdest.test", "ORCPT is not valid xtext (RFC 3461 4)"),
    ],
)
def test_a_bad_notify_or_orcpt_is_501_saying_what_is_wrong(
    authed_driver: Driver, params: bytes, problem: str
) -> None:
    authed_driver.send(MAIL + b"\r\n")
    out = authed_driver.send(b"RCPT TO:<bob@dest.test> " + params + b"\r\n")
    assert authed_driver.wire(out) == bad_value(problem)
    # The transaction goes on without that recipient.
    message = received(authed_driver, b"RCPT TO:<carol@dest.test>\r\n")
    assert message.recipients == ("carol@dest.test",) and message.dsn_recipients is None


@pytest.mark.parametrize(
    "params", [b"NOTIFY=NEVER NOTIFY=NEVER", b"ORCPT=rfc822;a+40b.test orcpt=rfc822;c+40d.test"]
)
def test_a_rcpt_parameter_given_twice_is_555(authed_driver: Driver, params: bytes) -> None:
    authed_driver.send(MAIL + b"\r\n")
    assert (
        authed_driver.wire(authed_driver.send(b"RCPT TO:<bob@dest.test> " + params + b"\r\n")) == PARAMETERS
    )


def test_bad_values_count_as_client_errors(make_driver) -> None:
    driver = make_driver().authenticated()
    out = driver.send(b"MAIL FROM:<alice@example.com> RET=NONE\r\n" * 12)
    assert driver.codes(out) == [501] * 9 + [421]
    assert driver.session.closed


# --- only when announced -------------------------------------------------------------------------


def helo_relay() -> Driver:
    """A relay network's client (no AUTH, no TLS needed) that greets with HELO: nothing announced."""
    driver = relay_driver(require_tls=False)
    assert driver.codes(driver.send(b"HELO printer.office.example\r\n")) == [250]
    return driver


@pytest.mark.parametrize("params", [b"RET=HDRS", b"ENVID=abc"])
def test_dsn_mail_parameters_after_helo_are_555(params: bytes) -> None:
    driver = helo_relay()
    out = driver.send(b"MAIL FROM:<scanner@office.example> " + params + b"\r\n")
    assert driver.wire(out) == PARAMETERS


@pytest.mark.parametrize("params", [b"NOTIFY=NEVER", b"ORCPT=rfc822;a+40b.test"])
def test_dsn_rcpt_parameters_after_helo_are_555(params: bytes) -> None:
    driver = helo_relay()
    assert driver.wire(driver.send(b"MAIL FROM:<scanner@office.example>\r\n")) == SENDER_OK
    assert driver.wire(driver.send(b"RCPT TO:<bob@dest.test> " + params + b"\r\n")) == PARAMETERS


def test_size_after_helo_is_still_taken() -> None:
    """SIZE and BODY were taken after HELO before DSN came, and still are."""
    driver = helo_relay()
    assert driver.wire(driver.send(b"MAIL FROM:<scanner@office.example> SIZE=10\r\n")) == SENDER_OK


def test_the_same_relay_client_after_ehlo_may_give_them() -> None:
    driver = relay_driver(require_tls=False)
    driver.ehlo()
    commands = b"MAIL FROM:<scanner@office.example> RET=FULL\r\nRCPT TO:<bob@dest.test> NOTIFY=SUCCESS\r\n"
    message = received(driver, commands)
    assert message.dsn_ret == "FULL"
    assert message.dsn_recipients == {"bob@dest.test": {"notify": ["SUCCESS"], "orcpt": None}}
