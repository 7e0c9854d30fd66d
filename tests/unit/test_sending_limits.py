"""SendingLimits on the process's counters: every window refuses at its limit and recovers when it ends."""

from __future__ import annotations

import uuid

import pytest

from smtp_proxy.config import LimitsConfig
from smtp_proxy.counters import LocalCounters, open_storage
from smtp_proxy.sending_limits import SendingLimits, effective_limits
from tests.waiting import wait_for

UNLIMITED = {name: None for name in effective_limits(LimitsConfig(), {})}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("name", "seconds"),
    [("messages_per_minute", 60), ("messages_per_hour", 3600), ("messages_per_day", 86400)],
)
def test_a_message_window_refuses_at_its_limit_until_it_ends(name: str, seconds: int) -> None:
    start = 10 * 86400.0 + 1  # one second into a minute, an hour and a UTC day
    clock = Clock(start)
    limits = SendingLimits(LocalCounters(clock=clock), clock=clock)
    account = uuid.uuid4()
    quota = {**UNLIMITED, name: 2}
    for _ in range(2):
        assert limits.retry_after(account, quota) is None
        limits.record(account, recipients=1)
    assert limits.retry_after(account, quota) == seconds - 1
    clock.now = start + seconds - 2
    assert limits.retry_after(account, quota) == 1
    clock.now = start + seconds - 1  # the window's last second is over: a new window
    assert limits.retry_after(account, quota) is None
    other = uuid.uuid4()
    assert limits.retry_after(other, {**UNLIMITED, name: 1}) is None  # counted per account


def test_the_recipient_budget_counts_recipients_and_refuses_mail_once_spent() -> None:
    clock = Clock(20 * 86400.0)
    limits = SendingLimits(LocalCounters(clock=clock), clock=clock)
    account = uuid.uuid4()
    quota = {**UNLIMITED, "recipients_per_day": 5}
    assert limits.recipients_left(account, quota) == (5, 86400)
    limits.record(account, recipients=3)
    assert limits.recipients_left(account, quota) == (2, 86400)
    assert limits.retry_after(account, quota) is None
    limits.record(account, recipients=2)
    assert limits.retry_after(account, quota) == 86400
    clock.now += 86400
    assert limits.recipients_left(account, quota) == (5, 86400)


def test_usage_lists_every_window_with_its_count() -> None:
    clock = Clock(30 * 86400.0 + 30)
    limits = SendingLimits(LocalCounters(clock=clock), clock=clock)
    account = uuid.uuid4()
    limits.record(account, recipients=4)
    usage = {
        w.name: (w.limit, w.used, w.resets_in)
        for w in limits.usage(account, {**UNLIMITED, "messages_per_hour": 9})
    }
    assert usage == {
        "messages_per_minute": (None, 1, 30),
        "messages_per_hour": (9, 1, 3570),
        "messages_per_day": (None, 1, 86370),
        "recipients_per_day": (None, 4, 86370),
    }


def test_an_accounts_own_limits_override_the_defaults_and_null_means_unlimited() -> None:
    defaults = LimitsConfig(messages_per_minute=10, messages_per_day=100)
    own = {"messages_per_minute": None, "recipients_per_day": 7}
    assert effective_limits(defaults, own) == {
        "messages_per_minute": None,
        "messages_per_hour": None,
        "messages_per_day": 100,
        "recipients_per_day": 7,
    }


def test_on_a_shared_storage_counts_are_sent_by_one_thread_and_seen_at_once_here(redis_url: str) -> None:
    """The session thread does not wait for Redis to count; this process's reads add what is unsent."""
    here = SendingLimits(open_storage(redis_url))
    elsewhere = SendingLimits(open_storage(redis_url))
    account = uuid.uuid4()
    quota = {**UNLIMITED, "messages_per_day": 2}
    here.record(account, recipients=1)
    here.record(account, recipients=1)
    assert here.retry_after(account, quota) is not None  # its own unsent counts
    wait_for(
        lambda: elsewhere.retry_after(account, quota) is not None,
        "the other process to see the quota used",
        timeout=5.0,
    )
    usage = {w.name: w.used for w in elsewhere.usage(account, quota)}
    assert usage["messages_per_day"] == 2 and usage["recipients_per_day"] == 2
    here.record(account, recipients=3)
    here.flush()
    assert {w.name: w.used for w in elsewhere.usage(account, quota)}["recipients_per_day"] == 5
    for limits in (here, elsewhere):  # nothing is pending: the flushing thread opens no new connection
        limits.storage.storage.connection_pool.disconnect()
