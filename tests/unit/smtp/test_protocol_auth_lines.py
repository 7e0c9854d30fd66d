"""SmtpSession: an overlong SASL response line ends the AUTH exchange (RFC 4954 4 and 6).

Found by fuzzing: the exchange stayed open after ``500 5.5.2``, so the client's next command
was read as base64 and counted as a credential.
"""

from __future__ import annotations

import base64

import pytest

from smtp_proxy.smtp.protocol import MAX_AUTH_LINE, CredentialsOffered, State

AUTH_LINE_TOO_LONG = b"500 5.5.6 Authentication Exchange line is too long\r\n"
OK = b"250 2.0.0 OK\r\n"
OVERLONG = b"QUFB" * (MAX_AUTH_LINE // 4 + 1)  # valid base64, one line over the limit


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def start(driver, step: str) -> None:
    """Open an exchange and walk it to ``step``: plain, login-user or login-password."""
    if step == "plain":
        driver.send(b"AUTH PLAIN\r\n")
        assert driver.session.state is State.AUTH_PLAIN
    else:
        driver.send(b"AUTH LOGIN\r\n")
        if step == "login-password":
            driver.send(b64("alice") + b"\r\n")
            assert driver.session.state is State.AUTH_LOGIN_SECRET
        else:
            assert driver.session.state is State.AUTH_LOGIN_USER


STEPS = ["plain", "login-user", "login-password"]


@pytest.mark.parametrize("step", STEPS)
def test_overlong_sasl_line_ends_the_exchange(secure_driver, step: str) -> None:
    start(secure_driver, step)
    out = secure_driver.send(OVERLONG + b"\r\nRSET\r\n")
    assert secure_driver.wire(out) == AUTH_LINE_TOO_LONG + OK  # RSET is a command again
    assert secure_driver.events(out) == []
    assert secure_driver.session.state is State.READY
    assert secure_driver.session._login_username == ""


@pytest.mark.parametrize("step", STEPS)
def test_overlong_sasl_line_in_pieces_ends_the_exchange(secure_driver, step: str) -> None:
    start(secure_driver, step)
    for _ in range(4):  # the discarding path: no LF for more than MAX_AUTH_LINE octets
        assert secure_driver.send(b"QUFB" * 1024) == []
    out = secure_driver.send(b"QUFB\r\nRSET\r\n")
    assert secure_driver.wire(out) == AUTH_LINE_TOO_LONG + OK
    assert secure_driver.events(out) == []
    assert secure_driver.session.state is State.READY
    assert secure_driver.session._login_username == ""


def test_line_after_overlong_login_password_is_not_a_credential(secure_driver) -> None:
    start(secure_driver, "login-password")
    out = secure_driver.send(OVERLONG + b"\r\n" + b64("guess") + b"\r\n")
    assert secure_driver.events(out) == []
    assert secure_driver.codes(out) == [500, 500]  # the base64 line is an unknown command


def test_auth_works_again_after_an_overlong_line(secure_driver, plain) -> None:
    start(secure_driver, "login-password")
    secure_driver.send(OVERLONG + b"\r\n")
    out = secure_driver.send(f"AUTH PLAIN {plain('bob', 'pw')}\r\n")
    assert out == [CredentialsOffered("PLAIN", "bob", "pw")]


def test_overlong_command_line_outside_auth_is_still_5_5_2(secure_driver) -> None:
    out = secure_driver.send(b"NOOP " + b"x" * 600 + b"\r\n")
    assert secure_driver.wire(out) == b"500 5.5.2 Line too long\r\n"
