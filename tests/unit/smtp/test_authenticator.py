"""The listener's AUTH policy without a socket: a real verifier and throttle over a real database.

Each test drives the protocol core to a ``CredentialsOffered``, hands it to the
``Authenticator`` as the socket adapter does, and answers the core with its verdict, so
the replies checked are the ones a client would read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import REGISTRY

from smtp_proxy.db.session import Database
from smtp_proxy.smtp.authenticator import Authenticator
from smtp_proxy.smtp.credentials import AuthenticatedAccount, AuthThrottle, CredentialVerifier
from smtp_proxy.smtp.protocol import AuthOutcome, CredentialsOffered
from smtp_proxy.storage import accounts
from smtp_proxy.storage.audit import CLI
from tests.pgcluster import free_port
from tests.unit.smtp.conftest import Driver, Live, plain_response

PASSWORD = "correct horse battery staple"
IP = "192.0.2.7"


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("smtp_proxy_smtp_auth_failures_total", {"reason": reason}) or 0.0


@pytest.fixture
def database(pg_url: str, make_config) -> Iterator[Database]:
    db = Database(make_config(pg_url).database)
    with db.transaction() as session:
        accounts.create_account(
            session,
            name="alice",
            email="alice@example.com",
            allowed_domains=["example.com"],
            password=PASSWORD,
            bcrypt_cost=4,
            actor=CLI,
        )
    db.remove_session()
    yield db
    db.dispose()


@pytest.fixture
def make_authenticator(database: Database, live: Live) -> Callable[..., Authenticator]:
    def make(**throttle: int) -> Authenticator:
        return Authenticator(CredentialVerifier(database, dummy_cost=4), AuthThrottle(**throttle), live)

    return make


def offer(username: str = "alice", password: str = PASSWORD) -> tuple[Driver, CredentialsOffered]:
    """A core with TLS up that has just offered these credentials (AUTH PLAIN)."""
    driver = Driver().secure()
    [offered] = driver.send(f"AUTH PLAIN {plain_response(username, password)}\r\n")
    assert isinstance(offered, CredentialsOffered)
    return driver, offered


def answer(authenticator: Authenticator, username: str = "alice", password: str = PASSWORD):
    """Offer the credentials, let the authenticator decide, answer the core: (outcome, account, wire)."""
    driver, offered = offer(username, password)
    outcome, account = authenticator.authenticate(offered, IP)
    return outcome, account, Driver.wire(driver.credentials_checked(outcome, account)), driver


def test_the_right_password_gives_the_account_and_holds_one_session_slot(
    make_authenticator, caplog: pytest.LogCaptureFixture
) -> None:
    authenticator = make_authenticator()
    with caplog.at_level(logging.DEBUG, logger="smtp_proxy.smtp"):
        outcome, account, wire, driver = answer(authenticator)
    assert outcome is AuthOutcome.OK
    assert isinstance(account, AuthenticatedAccount)
    assert (account.name, account.allowed_domains, account.header_from_check) == (
        "alice",
        ("example.com",),
        True,
    )
    assert wire == b"235 2.7.0 Authentication successful\r\n"
    assert driver.session.authenticated
    assert authenticator.sessions.count(account.id) == 1
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "smtp.auth_ok"]
    assert (record.levelno, record.client_ip, record.account) == (logging.DEBUG, IP, "alice")
    authenticator.release(account)
    assert authenticator.sessions.count(account.id) == 0


def test_a_wrong_password_is_535_counted_and_logged_without_the_password(
    make_authenticator, caplog: pytest.LogCaptureFixture
) -> None:
    authenticator = make_authenticator()
    before = failures("invalid_credentials")
    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp"):
        outcome, account, wire, _driver = answer(authenticator, password="wrong horse")
    assert (outcome, account) == (AuthOutcome.INVALID, None)
    assert wire == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert failures("invalid_credentials") == before + 1
    [record] = caplog.records
    assert (record.levelno, record.getMessage(), record.event) == (
        logging.WARNING,
        "SMTP AUTH failed",
        "smtp.auth_failed",
    )
    assert (record.client_ip, record.username, record.mechanism, record.reason) == (
        IP,
        "alice",
        "PLAIN",
        "invalid_credentials",
    )
    assert "wrong horse" not in caplog.text


def test_an_address_over_its_limit_is_throttled_with_454_before_any_check(
    make_authenticator, caplog: pytest.LogCaptureFixture
) -> None:
    authenticator = make_authenticator(per_ip=2)
    for _ in range(2):
        assert answer(authenticator, password="guess")[0] is AuthOutcome.INVALID
    before = failures("throttled_ip")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp"):
        # Even the right password: the address already spent its guesses.
        outcome, account, wire, _driver = answer(authenticator)
    assert (outcome, account) == (AuthOutcome.THROTTLED, None)
    assert wire.startswith(b"454 4.7.0 ")
    assert failures("throttled_ip") == before + 1
    assert [(r.event, r.reason) for r in caplog.records] == [("smtp.auth_failed", "throttled_ip")]


def test_a_database_outage_is_454_and_neither_a_logged_failure_nor_a_counted_guess(
    make_config, live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    down = Database(
        make_config(
            f"postgresql://nobody@127.0.0.1:{free_port()}/none", database={"connect_timeout": 1}
        ).database
    )
    throttle = AuthThrottle(per_ip=1)
    authenticator = Authenticator(CredentialVerifier(down, dummy_cost=4), throttle, live)
    before = failures("database_unavailable")
    try:
        with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp"):
            outcome, account, wire, driver = answer(authenticator)
    finally:
        down.dispose()
    assert (outcome, account) == (AuthOutcome.TEMPORARY, None)
    assert wire.startswith(b"454 4.7.0 ")
    assert not driver.session.closed
    assert failures("database_unavailable") == before + 1
    assert not [r for r in caplog.records if getattr(r, "event", None) == "smtp.auth_failed"]
    assert throttle.over(IP, "alice") is None  # per_ip=1, yet nothing was counted


def test_past_max_connections_per_account_the_core_closes_with_421_account_limit(
    make_authenticator, live: Live, make_config, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    live.config = make_config(pg_url, smtp={"max_connections_per_account": 1})
    authenticator = make_authenticator()
    first, account, _wire, _driver = answer(authenticator)
    assert first is AuthOutcome.OK and account is not None
    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp"):
        outcome, refused, wire, driver = answer(authenticator)
    assert (outcome, refused) == (AuthOutcome.TOO_MANY_SESSIONS, None)
    assert wire == b"421 4.7.0 Too many concurrent sessions for this account\r\n"
    assert driver.session.closed and driver.session.close_reason == "account_limit"
    [record] = caplog.records
    assert (record.levelno, record.event, record.client_ip, record.account) == (
        logging.WARNING,
        "smtp.account_limit",
        IP,
        "alice",
    )
    assert authenticator.sessions.count(account.id) == 1  # the refused session took no slot
    authenticator.release(account)
    assert answer(authenticator)[0] is AuthOutcome.OK


def test_the_live_config_applies_from_the_next_attempt(
    make_authenticator, live: Live, make_config, pg_url: str
) -> None:
    authenticator = make_authenticator()
    outcome, account, _wire, _driver = answer(authenticator)
    assert outcome is AuthOutcome.OK and account is not None and account.header_from_check
    live.config = make_config(pg_url, smtp={"header_from_check": False, "max_connections_per_account": 1})
    assert answer(authenticator)[0] is AuthOutcome.TOO_MANY_SESSIONS
    authenticator.release(account)
    outcome, account, _wire, _driver = answer(authenticator)
    assert outcome is AuthOutcome.OK and account is not None
    assert not account.header_from_check
