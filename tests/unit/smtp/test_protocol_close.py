"""Why the core closed a session: ``close_reason``, the outcome the listener reports for it.

The values are the outcome labels of ``smtp_proxy_smtp_sessions_total`` and the close log
line, so each is checked verbatim.
"""

from __future__ import annotations

import pytest

from smtp_proxy.smtp import replies as R
from tests.unit.smtp.conftest import Driver


def test_an_open_session_has_no_close_reason(driver: Driver) -> None:
    driver.ehlo()
    assert not driver.session.closed and driver.session.close_reason is None


def test_quit_closes_for_quit(driver: Driver) -> None:
    assert driver.wire(driver.send(b"QUIT\r\n")) == R.R221_BYE.to_bytes()
    assert driver.session.close_reason == "quit"


def test_too_many_errors_close_for_closed_421(driver: Driver) -> None:
    out = driver.send(b"BOGUS\r\n" * driver.policy.max_errors)
    assert driver.replies(out)[-1] == R.R421_TOO_MANY_ERRORS
    assert driver.session.close_reason == "closed_421"


def test_an_http_request_closes_for_closed_500(driver: Driver) -> None:
    assert driver.wire(driver.send(b"GET / HTTP/1.1\r\n")) == R.R500_HTTP.to_bytes()
    assert driver.session.close_reason == "closed_500"


@pytest.mark.parametrize(
    ("clock", "reply", "reason"),
    [
        ("timed_out", R.R421_IDLE_TIMEOUT, "timeout"),
        ("auth_timed_out", R.R421_AUTH_TIMEOUT, "auth_timeout"),
        ("session_expired", R.R421_SESSION_TIME, "session_time"),
        ("shutting_down", R.R421_SHUTTING_DOWN, "shutdown"),
    ],
)
def test_the_callers_clocks_close_for_their_own_reason(
    driver: Driver, clock: str, reply, reason: str
) -> None:
    driver.ehlo()
    assert getattr(driver.session, clock)() == [reply]
    assert driver.session.closed and driver.session.close_reason == reason


def test_a_closing_mail_refusal_closes_for_the_callers_reason(authed_driver: Driver) -> None:
    authed_driver.answer_mail = False
    authed_driver.send(b"MAIL FROM:<alice@example.com>\r\n")
    out = authed_driver.session.mail_checked(R.R421_ACCOUNT_DISABLED, reason="account_disabled")
    assert out == [R.R421_ACCOUNT_DISABLED]
    assert authed_driver.session.close_reason == "account_disabled"


def test_a_refusal_that_does_not_close_sets_no_reason(authed_driver: Driver) -> None:
    authed_driver.answer_mail = False
    authed_driver.send(b"MAIL FROM:<alice@example.com>\r\n")
    authed_driver.session.mail_checked(R.rate_exceeded(30), reason="messages_per_minute")
    assert not authed_driver.session.closed and authed_driver.session.close_reason is None
