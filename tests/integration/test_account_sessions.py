"""Per-account session counts shared through Redis, as several listener processes use them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from smtp_proxy.smtp.account_sessions import SharedAccountSessions
from tests.conftest import free_port
from tests.waiting import wait_for


@pytest.fixture
def make_sessions(redis_url: str) -> Iterator[Callable[..., SharedAccountSessions]]:
    """One ``SharedAccountSessions`` per simulated process, each with its own Redis client."""
    made: list[tuple[SharedAccountSessions, redis.Redis]] = []

    def make(url: str = redis_url, **options: float) -> SharedAccountSessions:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        sessions = SharedAccountSessions(client, **options)
        made.append((sessions, client))
        return sessions

    yield make
    for sessions, client in made:
        sessions.close()
        client.close()


def test_the_limit_holds_across_processes_and_a_release_frees_a_slot(make_sessions) -> None:
    first, second = make_sessions(), make_sessions()
    account, other = uuid.uuid4(), uuid.uuid4()

    assert first.acquire(account, 2)
    assert second.acquire(account, 2)
    assert not first.acquire(account, 2)
    assert not second.acquire(account, 2)
    assert first.acquire(other, 2)  # another account has slots of its own
    assert first.count(account) == second.count(account) == 2

    second.release(account)
    assert first.count(account) == 1
    assert first.acquire(account, 2)
    assert not second.acquire(account, 2)


def test_leases_of_a_process_that_died_run_out_and_live_ones_are_renewed(make_sessions) -> None:
    crashed = make_sessions(lease=1.0, renew_every=60.0)  # never renews within the test
    alive = make_sessions(lease=1.0, renew_every=0.2)
    account = uuid.uuid4()
    assert crashed.acquire(account, 2)
    assert alive.acquire(account, 2)
    crashed.close()  # its session never says goodbye

    wait_for(lambda: alive.count(account) == 1, "the dead process's lease to run out", timeout=5)
    # The live session's lease is renewed past its first expiry, so the limit still counts it.
    wait_for(lambda: alive.acquire(account, 2), "a slot to free up", timeout=5)
    assert not alive.acquire(account, 2)
    assert alive.count(account) == 2


def test_without_redis_each_process_counts_its_own_sessions(make_sessions, caplog) -> None:
    sessions = make_sessions(f"redis://127.0.0.1:{free_port()}/0")
    account = uuid.uuid4()

    assert sessions.acquire(account, 2)
    assert sessions.acquire(account, 2)
    assert not sessions.acquire(account, 2)
    sessions.release(account)
    assert sessions.count(account) == 1
    assert sessions.acquire(account, 2)
    degraded = [r for r in caplog.records if getattr(r, "event", "") == "smtp.account_sessions_degraded"]
    assert len(degraded) == 1
