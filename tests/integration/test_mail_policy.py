"""The MAIL FROM policy against a real database: account state with its TTL, and sending limits.

The sending limits run on the ``limits`` library's memory storage with a fake clock, so a
minute's window passes without waiting a minute; the account state cache has its own fake
clock for its TTL. The account rows are real and changed the way the API and CLI change them.
"""

from __future__ import annotations

import uuid

import pytest
from limits.storage import MemoryStorage

from smtp_proxy.config import Config
from smtp_proxy.db.session import Database
from smtp_proxy.errors import DatabaseUnavailable
from smtp_proxy.sending_limits import SendingLimits
from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.account_state import AccountStates, MailPolicy
from smtp_proxy.smtp.credentials import AuthenticatedAccount
from smtp_proxy.storage import accounts
from smtp_proxy.storage.audit import CLI
from tests.logins import logged_in


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# 10:00:15 UTC on some day: 45 s left in the minute, 50,385 s left in the day.
DAY_START = 1_800_000_000 - 1_800_000_000 % 86400
NOW = DAY_START + 10 * 3600 + 15


@pytest.fixture
def tenant(database: Database) -> AuthenticatedAccount:
    with database.transaction() as session:
        created = accounts.create_account(
            session,
            name="tenant",
            email="ops@example.com",
            allowed_domains=["example.com"],
            password="correct horse battery",
            bcrypt_cost=4,
            actor=CLI,
        )
        return logged_in(session, created.account)


def change(database: Database, **values: object) -> None:
    """Set columns of the tenant's row, as an admin's API call or the CLI would."""
    with database.transaction() as session:
        account = accounts.get_account_by_name(session, "tenant")
        for key, value in values.items():
            setattr(account, key, value)
    database.remove_session()


class Policy:
    def __init__(self, database: Database, config: Config) -> None:
        self.state_clock = Clock(0.0)
        self.limit_clock = Clock(NOW)
        self.states = AccountStates(database, ttl=2.0, clock=self.state_clock)
        self.policy = MailPolicy(self.states, SendingLimits(MemoryStorage(), clock=self.limit_clock))
        self.config = config

    def check(self, account: AuthenticatedAccount, sender: str = "app@example.com"):
        return self.policy.check(account, sender, self.config)


def test_an_account_within_its_limits_may_start_a_transaction(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    policy = Policy(database, make_config(db_url))
    decision = policy.check(tenant)
    assert (decision.refusal, decision.reason, decision.recipients_left) == (None, None, None)
    assert decision.account == tenant


def test_messages_per_minute_refuses_until_the_minute_is_over(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    policy = Policy(database, make_config(db_url, limits={"messages_per_minute": 2}))
    for _ in range(2):
        assert policy.check(tenant).refusal is None
        policy.policy.stored(tenant.id, 1)
    decision = policy.check(tenant)
    assert decision.refusal == R.rate_exceeded(45)
    assert decision.refusal.to_bytes() == (
        b"451 4.7.1 Sending rate exceeded for this account, try again in 45 seconds\r\n"
    )
    assert decision.reason == "messages_per_minute"
    policy.limit_clock.now += 44
    assert policy.check(tenant).refusal == R.rate_exceeded(1)
    policy.limit_clock.now += 1  # the next minute
    assert policy.check(tenant).refusal is None


def test_the_longest_spent_window_names_the_refusal(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    limits = {"messages_per_minute": 1, "messages_per_hour": 1}
    policy = Policy(database, make_config(db_url, limits=limits))
    policy.policy.stored(tenant.id, 1)
    decision = policy.check(tenant)
    assert decision.reason == "messages_per_hour"
    assert decision.refusal == R.rate_exceeded(3600 - 15)


def test_the_day_recipient_budget_caps_recipients_then_refuses_mail(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    policy = Policy(database, make_config(db_url, limits={"recipients_per_day": 5}))
    day_left = 86400 - (NOW - DAY_START)
    decision = policy.check(tenant)
    assert (decision.recipients_left, decision.recipients_refusal) == (5, R.rate_exceeded(day_left))
    policy.policy.stored(tenant.id, 3)
    assert policy.check(tenant).recipients_left == 2
    policy.policy.stored(tenant.id, 2)
    decision = policy.check(tenant)
    assert (decision.refusal, decision.reason) == (R.rate_exceeded(day_left), "recipients_per_day")
    policy.limit_clock.now += day_left  # midnight UTC
    assert policy.check(tenant).recipients_left == 5


def test_an_accounts_own_limits_override_the_defaults(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    config = make_config(db_url, limits={"messages_per_minute": 1, "messages_per_hour": 100})
    change(database, limits={"messages_per_minute": None, "messages_per_hour": 2})
    policy = Policy(database, config)
    for _ in range(2):
        assert policy.check(tenant).refusal is None  # no per-minute limit for this account
        policy.policy.stored(tenant.id, 1)
    assert policy.check(tenant).reason == "messages_per_hour"


def test_nothing_is_counted_without_stored(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    policy = Policy(database, make_config(db_url, limits={"messages_per_minute": 1}))
    for _ in range(5):
        assert policy.check(tenant).refusal is None


def test_a_deactivation_refuses_with_421_once_the_state_is_older_than_its_ttl(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    policy = Policy(database, make_config(db_url))
    assert policy.check(tenant).refusal is None
    with database.transaction() as session:
        accounts.deactivate_account(session, accounts.get_account_by_name(session, "tenant"), actor=CLI)
    database.remove_session()
    policy.state_clock.now += 1.9
    assert policy.check(tenant).refusal is None  # the state read 1.9 s ago
    policy.state_clock.now += 0.1
    decision = policy.check(tenant)
    assert (decision.refusal, decision.reason) == (R.R421_ACCOUNT_DISABLED, "account_disabled")
    assert decision.refusal.close


def test_an_account_gone_or_replaced_reads_as_disabled(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    policy = Policy(database, make_config(db_url))
    impostor = AuthenticatedAccount(uuid.uuid4(), "tenant", ("example.com",))
    assert policy.check(impostor).refusal == R.R421_ACCOUNT_DISABLED
    ghost = AuthenticatedAccount(uuid.uuid4(), "ghost", ("example.com",))
    assert policy.check(ghost).refusal == R.R421_ACCOUNT_DISABLED


def test_changed_domains_and_header_from_exemption_reach_a_live_session(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    policy = Policy(database, make_config(db_url))
    assert policy.check(tenant).account.header_from_check
    change(database, allowed_domains=["example.net"], allow_any_header_from=True)
    policy.state_clock.now += 2
    decision = policy.check(tenant, "app@example.com")
    assert (decision.refusal, decision.reason) == (R.R553_SENDER_NOT_ALLOWED, "sender_domain")
    decision = policy.check(tenant, "app@example.net")
    assert decision.refusal is None
    assert decision.account.allowed_domains == ("example.net",)
    assert decision.account.header_from_check is False


def test_header_from_check_off_in_the_config_exempts_everybody(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    policy = Policy(database, make_config(db_url, smtp={"header_from_check": False}))
    assert policy.check(tenant).account.header_from_check is False


def test_without_the_database_a_state_read_before_is_used(
    database: Database, tenant: AuthenticatedAccount, make_config, db_url: str
) -> None:
    config = make_config(db_url)
    policy = Policy(database, config)
    assert policy.check(tenant).refusal is None
    down = make_config("postgresql://u:p@127.0.0.1:1/x", database={"connect_timeout": "1s"})
    unreachable = Database(down.database)
    try:
        stale = Policy(unreachable, config)
        with pytest.raises(DatabaseUnavailable):
            stale.check(tenant)
        # A cache that has the state keeps using it, however old, while the database is away.
        policy.states._database = unreachable
        policy.state_clock.now += 60
        assert policy.check(tenant).refusal is None
    finally:
        unreachable.dispose()
