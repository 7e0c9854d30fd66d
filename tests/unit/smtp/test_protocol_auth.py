"""SmtpSession: AUTH PLAIN and LOGIN (RFC 4954, RFC 4616), and the answers to CredentialsOffered."""

from __future__ import annotations

import base64

import pytest

from smtp_proxy.smtp.protocol import AuthOutcome, CredentialsOffered

AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"
CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
BAD_BASE64 = b"501 5.5.2 Cannot decode base64 response\r\n"
USERNAME = b"334 VXNlcm5hbWU6\r\n"
PASSWORD = b"334 UGFzc3dvcmQ6\r\n"
ALREADY = b"503 5.5.1 Already authenticated\r\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def account(driver):
    return driver.Account("alice", ("example.com",))


# --- preconditions -------------------------------------------------------------------------------


def test_auth_before_tls_is_530(driver, plain) -> None:
    driver.ehlo()
    out = driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert driver.wire(out) == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    assert not driver.events(out)


def test_auth_before_tls_without_initial_response_is_530(driver) -> None:
    driver.ehlo()
    out = driver.send(b"AUTH LOGIN\r\n")
    assert driver.wire(out) == b"530 5.7.0 Must issue a STARTTLS command first\r\n"


def test_auth_before_ehlo_is_503(driver, plain) -> None:
    out = driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert driver.wire(out) == b"503 5.5.1 Send EHLO first\r\n"
    assert not driver.events(out)


def test_auth_after_helo_with_implicit_tls_is_503(make_driver, plain) -> None:
    driver = make_driver(tls_active=True)
    driver.send(b"HELO client.test\r\n")
    assert driver.wire(driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")) == (
        b"503 5.5.1 Send EHLO first\r\n"
    )


def test_auth_with_implicit_tls_needs_no_starttls(make_driver, plain) -> None:
    driver = make_driver(tls_active=True)
    driver.ehlo()
    out = driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert out == [CredentialsOffered("PLAIN", "alice", "secret")]


# --- PLAIN ---------------------------------------------------------------------------------------


def test_auth_plain_with_initial_response_offers_credentials(secure_driver, plain) -> None:
    driver = secure_driver
    out = driver.send(f"AUTH PLAIN {plain('alice', 'pa ss:wörd')}\r\n")
    assert out == [CredentialsOffered(mechanism="PLAIN", username="alice", password="pa ss:wörd")]
    assert driver.session.paused
    assert driver.wire(driver.credentials_checked(AuthOutcome.OK, account(driver))) == AUTH_OK
    assert driver.session.connection.account == account(driver)


def test_auth_plain_with_matching_authzid_offers_credentials(secure_driver, plain) -> None:
    out = secure_driver.send(f"AUTH PLAIN {plain('alice', 'secret', authzid='alice')}\r\n")
    assert out == [CredentialsOffered("PLAIN", "alice", "secret")]


def test_auth_plain_with_other_authzid_is_535(secure_driver, plain) -> None:
    out = secure_driver.send(f"AUTH PLAIN {plain('alice', 'secret', authzid='root')}\r\n")
    assert secure_driver.wire(out) == INVALID
    assert not secure_driver.events(out)


def test_auth_mechanism_is_case_insensitive(secure_driver, plain) -> None:
    out = secure_driver.send(f"auth plain {plain('alice', 'secret')}\r\n")
    assert out == [CredentialsOffered("PLAIN", "alice", "secret")]


def test_auth_plain_without_initial_response_sends_empty_challenge(secure_driver, plain) -> None:
    driver = secure_driver
    assert driver.wire(driver.send(b"AUTH PLAIN\r\n")) == b"334 \r\n"
    out = driver.send(f"{plain('alice', 'secret')}\r\n")
    assert out == [CredentialsOffered("PLAIN", "alice", "secret")]
    assert driver.wire(driver.credentials_checked(AuthOutcome.OK, account(driver))) == AUTH_OK


def test_auth_plain_empty_response_is_535(secure_driver) -> None:
    driver = secure_driver
    driver.send(b"AUTH PLAIN\r\n")
    out = driver.send(b"=\r\n")
    assert driver.wire(out) == INVALID
    assert not driver.events(out)


def test_auth_plain_empty_initial_response_is_535(secure_driver) -> None:
    assert secure_driver.wire(secure_driver.send(b"AUTH PLAIN =\r\n")) == INVALID


def test_auth_plain_empty_password_is_535(secure_driver, plain) -> None:
    assert secure_driver.wire(secure_driver.send(f"AUTH PLAIN {plain('alice', '')}\r\n")) == INVALID


@pytest.mark.parametrize(
    "raw",
    [b"alice\x00secret", b"\x00alice\x00secret\x00x", b"\x00\xff\xfe\x00secret", b"\x00\x00secret"],
    ids=["one-nul", "three-nuls", "not-utf8", "empty-user"],
)
def test_auth_plain_malformed_message_is_535(secure_driver, raw: bytes) -> None:
    encoded = base64.b64encode(raw).decode("ascii")
    out = secure_driver.send(f"AUTH PLAIN {encoded}\r\n")
    assert secure_driver.wire(out) == INVALID
    assert not secure_driver.events(out)


@pytest.mark.parametrize("response", ["not base64!", "YWJjZA===", "YWJjZA", "YW Jj"])
def test_auth_plain_bad_base64_initial_response_is_501(secure_driver, response: str) -> None:
    out = secure_driver.send(f"AUTH PLAIN {response}\r\n")
    assert secure_driver.wire(out) == BAD_BASE64


def test_auth_plain_bad_base64_response_is_501(secure_driver) -> None:
    secure_driver.send(b"AUTH PLAIN\r\n")
    assert secure_driver.wire(secure_driver.send(b"%%%\r\n")) == BAD_BASE64


def test_auth_plain_non_ascii_response_is_501(secure_driver) -> None:
    secure_driver.send(b"AUTH PLAIN\r\n")
    assert secure_driver.wire(secure_driver.send("ä\r\n".encode())) == BAD_BASE64


def test_auth_plain_cancelled_with_star_is_501(secure_driver) -> None:
    driver = secure_driver
    driver.send(b"AUTH PLAIN\r\n")
    out = driver.send(b"*\r\n")
    assert driver.wire(out) == CANCELLED
    assert not driver.events(out)
    # Back to the command state: the next line is a command again.
    assert driver.wire(driver.send(b"NOOP\r\n")) == b"250 2.0.0 OK\r\n"


def test_auth_initial_response_longer_than_command_limit_is_accepted(secure_driver, plain) -> None:
    password = "p" * 900
    line = f"AUTH PLAIN {plain('alice', password)}\r\n"
    assert len(line) > 512
    assert secure_driver.send(line) == [CredentialsOffered("PLAIN", "alice", password)]


def test_auth_response_longer_than_command_limit_is_accepted(secure_driver, plain) -> None:
    password = "p" * 900
    secure_driver.send(b"AUTH PLAIN\r\n")
    assert secure_driver.send(f"{plain('alice', password)}\r\n") == [
        CredentialsOffered("PLAIN", "alice", password)
    ]


# --- LOGIN ---------------------------------------------------------------------------------------


def test_auth_login_sends_both_challenges(secure_driver) -> None:
    driver = secure_driver
    assert driver.wire(driver.send(b"AUTH LOGIN\r\n")) == USERNAME
    assert driver.wire(driver.send(f"{b64('alice')}\r\n")) == PASSWORD
    out = driver.send(f"{b64('secret')}\r\n")
    assert out == [CredentialsOffered(mechanism="LOGIN", username="alice", password="secret")]
    assert driver.wire(driver.credentials_checked(AuthOutcome.OK, account(driver))) == AUTH_OK


def test_auth_login_with_initial_response_goes_to_password_challenge(secure_driver) -> None:
    driver = secure_driver
    assert driver.wire(driver.send(f"AUTH LOGIN {b64('alice')}\r\n")) == PASSWORD
    out = driver.send(f"{b64('secret')}\r\n")
    assert out == [CredentialsOffered("LOGIN", "alice", "secret")]


def test_auth_login_cancelled_at_username_is_501(secure_driver) -> None:
    driver = secure_driver
    driver.send(b"AUTH LOGIN\r\n")
    out = driver.send(b"*\r\n")
    assert driver.wire(out) == CANCELLED
    assert not driver.events(out)
    assert driver.wire(driver.send(b"NOOP\r\n")) == b"250 2.0.0 OK\r\n"


def test_auth_login_cancelled_at_password_is_501(secure_driver) -> None:
    driver = secure_driver
    driver.send(b"AUTH LOGIN\r\n")
    driver.send(f"{b64('alice')}\r\n")
    out = driver.send(b"*\r\n")
    assert driver.wire(out) == CANCELLED
    assert not driver.events(out)
    assert driver.wire(driver.send(b"NOOP\r\n")) == b"250 2.0.0 OK\r\n"


def test_auth_login_bad_base64_username_is_501(secure_driver) -> None:
    secure_driver.send(b"AUTH LOGIN\r\n")
    assert secure_driver.wire(secure_driver.send(b"!!!\r\n")) == BAD_BASE64


def test_auth_login_bad_base64_initial_response_is_501(secure_driver) -> None:
    assert secure_driver.wire(secure_driver.send(b"AUTH LOGIN !!!\r\n")) == BAD_BASE64


def test_auth_login_bad_base64_password_is_501(secure_driver) -> None:
    secure_driver.send(b"AUTH LOGIN\r\n")
    secure_driver.send(f"{b64('alice')}\r\n")
    out = secure_driver.send(b"!!!\r\n")
    assert secure_driver.wire(out) == BAD_BASE64
    assert not secure_driver.events(out)


def test_auth_login_empty_password_is_535(secure_driver) -> None:
    secure_driver.send(b"AUTH LOGIN\r\n")
    secure_driver.send(f"{b64('alice')}\r\n")
    assert secure_driver.wire(secure_driver.send(b"=\r\n")) == INVALID


def test_auth_login_empty_username_is_535(secure_driver) -> None:
    driver = secure_driver
    driver.send(b"AUTH LOGIN\r\n")
    assert driver.wire(driver.send(b"=\r\n")) == PASSWORD
    out = driver.send(f"{b64('secret')}\r\n")
    assert driver.wire(out) == INVALID
    assert not driver.events(out)


def test_auth_login_username_with_nul_is_535(secure_driver) -> None:
    secure_driver.send(b"AUTH LOGIN\r\n")
    username = b64("al\x00ice")
    assert secure_driver.wire(secure_driver.send(f"{username}\r\n")) == INVALID


# --- other mechanisms and syntax -----------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "XOAUTH2", "SCRAM-SHA-256 abc"])
def test_auth_unknown_mechanism_is_504(secure_driver, mechanism: str) -> None:
    out = secure_driver.send(f"AUTH {mechanism}\r\n")
    assert secure_driver.wire(out) == b"504 5.5.4 Unrecognized authentication mechanism\r\n"


def test_auth_without_mechanism_is_501(secure_driver) -> None:
    out = secure_driver.send(b"AUTH\r\n")
    assert secure_driver.wire(out) == b"501 5.5.4 Syntax error in parameters or arguments\r\n"


def test_auth_second_after_success_is_503(authed_driver, plain) -> None:
    out = authed_driver.send(f"AUTH PLAIN {plain('bob', 'secret')}\r\n")
    assert authed_driver.wire(out) == ALREADY
    assert not authed_driver.events(out)


def test_auth_during_transaction_is_503(authed_driver, plain) -> None:
    driver = authed_driver
    assert driver.codes(driver.send(b"MAIL FROM:<alice@example.com>\r\n")) == [250]
    out = driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert driver.codes(out) == [503]
    assert driver.wire(out).startswith(b"503 5.5.1 ")
    assert not driver.events(out)
    # The transaction is untouched.
    assert driver.codes(driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == [250]


# --- outcomes ------------------------------------------------------------------------------------


def test_auth_outcome_invalid_is_535(secure_driver, plain) -> None:
    driver = secure_driver
    driver.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n")
    out = driver.credentials_checked(AuthOutcome.INVALID)
    assert driver.wire(out) == INVALID
    assert driver.session.connection.account is None
    assert driver.wire(driver.send(b"MAIL FROM:<alice@example.com>\r\n")) == (
        b"530 5.7.0 Authentication required\r\n"
    )


def test_auth_outcome_temporary_is_454(secure_driver, plain) -> None:
    driver = secure_driver
    driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    out = driver.credentials_checked(AuthOutcome.TEMPORARY)
    assert driver.wire(out) == b"454 4.7.0 Temporary authentication failure, try again later\r\n"
    assert not driver.session.closed


def test_auth_outcome_throttled_is_454(secure_driver, plain) -> None:
    driver = secure_driver
    driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    out = driver.credentials_checked(AuthOutcome.THROTTLED)
    assert driver.wire(out) == b"454 4.7.0 Too many failed authentication attempts, try again later\r\n"
    assert not driver.session.closed


def test_auth_outcome_too_many_sessions_is_421_and_closes(secure_driver, plain) -> None:
    driver = secure_driver
    driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\nNOOP\r\n")
    out = driver.credentials_checked(AuthOutcome.TOO_MANY_SESSIONS)
    assert driver.wire(out) == b"421 4.7.0 Too many concurrent sessions for this account\r\n"
    assert out[-1].close
    assert driver.session.closed
    assert driver.send(b"NOOP\r\n") == []


def test_auth_retry_after_failure_succeeds(secure_driver, plain) -> None:
    driver = secure_driver
    driver.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n")
    assert driver.wire(driver.credentials_checked(AuthOutcome.INVALID)) == INVALID
    out = driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert out == [CredentialsOffered("PLAIN", "alice", "secret")]
    assert driver.wire(driver.credentials_checked(AuthOutcome.OK, account(driver))) == AUTH_OK
    assert driver.codes(driver.send(b"MAIL FROM:<alice@example.com>\r\n")) == [250]


def test_auth_retry_after_temporary_failure_succeeds(secure_driver, plain) -> None:
    driver = secure_driver
    driver.send(f"AUTH LOGIN {b64('alice')}\r\n")
    driver.send(f"{b64('secret')}\r\n")
    assert driver.codes(driver.credentials_checked(AuthOutcome.TEMPORARY)) == [454]
    driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert driver.wire(driver.credentials_checked(AuthOutcome.OK, account(driver))) == AUTH_OK


def test_credentials_offered_repr_hides_password(secure_driver, plain) -> None:
    password = "hunter2-very-secret"
    (event,) = secure_driver.send(f"AUTH PLAIN {plain('alice', password)}\r\n")
    assert isinstance(event, CredentialsOffered)
    assert event.password == password
    assert password not in repr(event)
    assert password not in str(event)
    assert "alice" in repr(event)


def test_credentials_offered_repr_hides_login_password(secure_driver) -> None:
    password = "hunter2-very-secret"
    secure_driver.send(f"AUTH LOGIN {b64('alice')}\r\n")
    (event,) = secure_driver.send(f"{b64(password)}\r\n")
    assert password not in repr(event)
