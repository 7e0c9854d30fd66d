"""The listener's mail intake without a socket: MAIL FROM policy and the enqueue behind the 250.

Each test drives the protocol core to the event, hands it to the ``Intake`` as the socket
adapter does, and checks the replies the core then gives, the row in the real PostgreSQL
database, the sending limits, the metrics and the log lines. The storage-down paths use a
database URL on a port where nothing listens.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from smtp_proxy.counters import LocalCounters
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.sending_limits import SendingLimits
from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.account_state import AccountStates, MailPolicy
from smtp_proxy.smtp.credentials import AuthenticatedAccount
from smtp_proxy.smtp.intake import Intake
from smtp_proxy.smtp.protocol import AuthOutcome, MailFromOffered, MessageReceived, MessageRejected, State
from smtp_proxy.storage import accounts, messages
from smtp_proxy.storage.audit import CLI
from tests.logins import logged_in
from tests.pgcluster import free_port
from tests.unit.smtp.conftest import Driver, Live, plain_response

IP = "192.0.2.7"
TLS = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
CONTENT = b"From: app@example.com\r\nSubject: hello\r\n\r\nbody\r\n"
LIMITS = {"messages_per_day": None, "recipients_per_day": None}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def messages_total(result: str, reason: str) -> float:
    return sample("smtp_proxy_smtp_messages_total", result=result, reason=reason)


def limit_rejections(reason: str) -> float:
    return sample("smtp_proxy_smtp_limit_rejections_total", reason=reason)


@pytest.fixture
def database(live: Live) -> Iterator[Database]:
    db = Database(live.config.database)
    yield db
    db.dispose()


@pytest.fixture
def down(make_config) -> Iterator[Database]:
    """A database that does not answer: nothing listens on its port."""
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    db = Database(make_config(url, database={"connect_timeout": 1}).database)
    yield db
    db.dispose()


@pytest.fixture
def cipher(live: Live) -> Cipher:
    return Cipher.from_config(live.config.security)


@pytest.fixture
def tenant(database: Database) -> AuthenticatedAccount:
    with database.transaction() as session:
        account = accounts.create_account(
            session,
            name="tenant",
            email="ops@example.com",
            allowed_domains=["example.com"],
            password="correct horse battery",
            bcrypt_cost=4,
            actor=CLI,
        ).account
        tenant = logged_in(session, account)
    database.remove_session()
    return tenant


@pytest.fixture
def limits() -> SendingLimits:
    return SendingLimits(LocalCounters())


@pytest.fixture
def intake(database: Database, cipher: Cipher, live: Live, limits: SendingLimits) -> Intake:
    return Intake(database, cipher, live, MailPolicy(AccountStates(database), limits))


def change(database: Database, **values: object) -> None:
    """Set columns of the tenant's row, as an admin's API call or the CLI would."""
    with database.transaction() as session:
        account = accounts.get_account_by_name(session, "tenant")
        for key, value in values.items():
            setattr(account, key, value)
    database.remove_session()


def authenticated(account: AuthenticatedAccount) -> Driver:
    """A core after EHLO, STARTTLS, EHLO and AUTH as ``account``; MAIL FROM is answered by hand."""
    driver = Driver().secure()
    driver.answer_mail = False
    driver.send(f"AUTH PLAIN {plain_response(account.name, 'secret')}\r\n")
    assert Driver.codes(driver.session.credentials_checked(AuthOutcome.OK, account)) == [235]
    return driver


def mail_from(intake: Intake, driver: Driver, account: AuthenticatedAccount, sender: str = "app@example.com"):
    [offered] = driver.send(f"MAIL FROM:<{sender}>\r\n")
    assert isinstance(offered, MailFromOffered)
    return intake.mail_from(driver.session, account, offered.sender)


def data(driver: Driver, *recipients: str) -> MessageReceived:
    """RCPT for each recipient, DATA and the content: the core's MessageReceived."""
    for recipient in recipients:
        assert Driver.codes(driver.send(f"RCPT TO:<{recipient}>\r\n")) == [250]
    assert Driver.codes(driver.send(b"DATA\r\n")) == [354]
    [received] = Driver.received(driver.send(CONTENT + b".\r\n"))
    return received


def test_a_message_is_committed_with_its_trace_field_before_the_250(
    intake: Intake,
    database: Database,
    cipher: Cipher,
    tenant: AuthenticatedAccount,
    limits: SendingLimits,
    caplog: pytest.LogCaptureFixture,
) -> None:
    driver = authenticated(tenant)
    outputs, recipients_refusal = mail_from(intake, driver, tenant)
    assert Driver.wire(outputs) == R.R250_SENDER_OK.to_bytes() and recipients_refusal is None
    received = data(driver, "bob@dest.test")
    accepted = messages_total("accepted", "")
    commits = sample("smtp_proxy_smtp_commit_seconds_count")
    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp"):
        outputs = intake.message(
            driver.session, received, account=tenant, client_ip=IP, tls=TLS, correlation_id="c0ffee"
        )
    [reply] = Driver.replies(outputs)
    match = re.fullmatch(r"Ok: queued as ([0-9a-f-]{36})", reply.lines[0])
    assert reply.code == 250 and match, reply
    message_id = uuid.UUID(match.group(1))
    # Committed when the 250 is returned: another connection reads it.
    with database.read() as session:
        row = messages.get_message(session, message_id, tenant.id)
        assert (row.sender, row.recipients, row.correlation_id) == (
            "app@example.com",
            ["bob@dest.test"],
            "c0ffee",
        )
        body = messages.message_body(cipher, row)
    trace, content = body.split(b";\r\n\t", 1)
    assert trace == (
        b"Received: from client.test ([192.0.2.7])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
        b"\tby mx.test (smtp-proxy) with ESMTPSA\r\n"
        b"\tid " + str(message_id).encode() + b"\r\n"
        b"\tfor <bob@dest.test>"
    )
    assert content.split(b"\r\n", 1)[1] == CONTENT  # after the date line, the content as sent
    assert driver.session.connection.messages_accepted == 1
    assert messages_total("accepted", "") == accepted + 1
    assert sample("smtp_proxy_smtp_commit_seconds_count") == commits + 1
    used = {usage.name: usage.used for usage in limits.usage(tenant.id, LIMITS)}
    assert (used["messages_per_day"], used["recipients_per_day"]) == (1, 1)
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "smtp.message_accepted"]
    assert (
        record.message_id,
        record.account,
        record.sender,
        record.recipients,
        record.size,
        record.code,
    ) == (
        str(message_id),
        "tenant",
        "app@example.com",
        1,
        len(body),
        250,
    )


def test_storage_down_at_the_end_of_data_is_451_and_costs_no_quota(
    down: Database,
    database: Database,
    cipher: Cipher,
    live: Live,
    tenant: AuthenticatedAccount,
    limits: SendingLimits,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MAIL FROM still reads the account; the database goes away before the end of DATA.
    intake = Intake(down, cipher, live, MailPolicy(AccountStates(database), limits))
    driver = authenticated(tenant)
    assert Driver.codes(mail_from(intake, driver, tenant)[0]) == [250]
    received = data(driver, "bob@dest.test", "carol@dest.test")
    deferred = messages_total("rejected", "storage_unavailable")
    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp"):
        outputs = intake.message(
            driver.session, received, account=tenant, client_ip=IP, tls=None, correlation_id="c0ffee"
        )
    assert Driver.wire(outputs) == b"451 4.3.0 Temporary storage failure, try again later\r\n"
    session = driver.session
    assert not session.closed and session.state is State.READY  # the client may retry at once
    assert (session.connection.messages_accepted, session.connection.messages_rejected) == (0, 1)
    assert messages_total("rejected", "storage_unavailable") == deferred + 1
    used = {usage.name: usage.used for usage in limits.usage(tenant.id, LIMITS)}
    assert (used["messages_per_day"], used["recipients_per_day"]) == (0, 0)
    [record] = [r for r in caplog.records if r.name == "smtp_proxy.smtp"]
    assert (record.levelno, record.event, record.code, record.recipients, record.error_class) == (
        logging.WARNING,
        "smtp.message_deferred",
        451,
        2,
        "DatabaseUnavailable",
    )
    assert record.size > len(CONTENT)  # the trace field was added before the attempt


def test_storage_down_at_mail_from_is_451_and_no_transaction(
    down: Database, cipher: Cipher, live: Live, tenant: AuthenticatedAccount
) -> None:
    intake = Intake(down, cipher, live)  # its own policy, on the database that does not answer
    driver = authenticated(tenant)
    outputs, recipients_refusal = mail_from(intake, driver, tenant)
    assert Driver.wire(outputs) == R.R451_STORAGE_DOWN.to_bytes() and recipients_refusal is None
    assert not driver.session.closed
    assert Driver.wire(driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == R.R503_NEED_MAIL.to_bytes()


def test_a_deactivated_account_gets_421_and_the_core_closes_for_account_disabled(
    intake: Intake, database: Database, tenant: AuthenticatedAccount, caplog: pytest.LogCaptureFixture
) -> None:
    change(database, active=False)
    driver = authenticated(tenant)
    before = limit_rejections("account_disabled")
    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp"):
        outputs, _refusal = mail_from(intake, driver, tenant)
    assert Driver.wire(outputs) == R.R421_ACCOUNT_DISABLED.to_bytes()
    assert driver.session.closed and driver.session.close_reason == "account_disabled"
    assert limit_rejections("account_disabled") == before + 1
    [record] = caplog.records
    assert (record.event, record.account, record.sender, record.reason, record.code) == (
        "smtp.mail_refused",
        "tenant",
        "app@example.com",
        "account_disabled",
        421,
    )


def test_what_an_admin_changed_since_auth_is_what_the_core_judges_by(
    intake: Intake, database: Database, tenant: AuthenticatedAccount
) -> None:
    change(database, allowed_domains=["example.com", "example.net"], allow_any_header_from=True)
    driver = authenticated(tenant)
    assert Driver.codes(mail_from(intake, driver, tenant)[0]) == [250]
    current = driver.session.connection.account
    assert current is not None
    assert (current.allowed_domains, current.header_from_check) == (("example.com", "example.net"), False)


def test_the_days_recipient_budget_caps_rcpt_with_the_refusal_the_adapter_counts(
    intake: Intake, live: Live, make_config, pg_url: str, tenant: AuthenticatedAccount
) -> None:
    live.config = make_config(pg_url, limits={"recipients_per_day": 1})
    driver = authenticated(tenant)
    outputs, recipients_refusal = mail_from(intake, driver, tenant)
    assert Driver.codes(outputs) == [250]
    assert recipients_refusal is not None and recipients_refusal.code == 451
    assert Driver.codes(driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == [250]
    [refused] = Driver.replies(driver.send(b"RCPT TO:<carol@dest.test>\r\n"))
    assert refused is recipients_refusal  # the adapter knows it by identity when it goes out
    before = limit_rejections("recipients_per_day")
    intake.recipient_refused()
    assert limit_rejections("recipients_per_day") == before + 1


@pytest.mark.parametrize(("reason", "limit"), [("header_from", "header_from"), ("too_big", None)])
def test_a_message_the_core_refused_is_counted_and_logged(
    reason: str, limit: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    rejected = MessageRejected("app@example.com", 2, 1234, reason, R.R550_HEADER_FROM)
    messages_before = messages_total("rejected", reason)
    limits_before = {name: limit_rejections(name) for name in ("header_from", "data_in_flight")}
    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp"):
        Intake.rejected(rejected)
    assert messages_total("rejected", reason) == messages_before + 1
    assert {name: limit_rejections(name) for name in limits_before} == {
        name: count + (name == limit) for name, count in limits_before.items()
    }
    [record] = caplog.records
    assert (record.event, record.reason, record.sender, record.recipients, record.size, record.code) == (
        "smtp.message_rejected",
        reason,
        "app@example.com",
        2,
        1234,
        550,
    )
