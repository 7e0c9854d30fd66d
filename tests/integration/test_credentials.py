"""SMTP AUTH verification against a real database, with real bcrypt at cost 4.

Nothing is mocked: bcrypt calls are counted and timed through a subclass that
wraps the ``_check_hash`` seam.
"""

from __future__ import annotations

import functools
import threading
import time

import pytest
from limits.storage import MemoryStorage

from smtp_proxy.counters import LocalCounters, open_storage
from smtp_proxy.db.session import Database
from smtp_proxy.errors import DatabaseUnavailable
from smtp_proxy.smtp.credentials import AuthenticatedAccount, AuthThrottle, CredentialVerifier, authenticate
from smtp_proxy.storage import accounts
from smtp_proxy.storage.audit import CLI
from tests.logins import logged_in
from tests.waiting import wait_for

BCRYPT_COST = 4
PASSWORD = "correct horse battery staple"
DOMAINS = ["example.com", "*.example.org"]


class CountingVerifier(CredentialVerifier):
    """Counts bcrypt checks and the most that ran at once; can hold or slow each check."""

    def __init__(self, *args, hold: float = 0.0, **kwargs) -> None:
        self.checks = 0
        self.running = 0
        self.max_running = 0
        self.hold = hold
        self.release: threading.Event | None = None
        self._count_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _check_hash(self, password: str, password_hash: str) -> bool:
        with self._count_lock:
            self.checks += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.release is not None:
                assert self.release.wait(10)
            time.sleep(self.hold)  # a slow bcrypt is the behaviour under test
            return super()._check_hash(password, password_hash)
        finally:
            with self._count_lock:
                self.running -= 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_verifier(database: Database, **kwargs) -> CountingVerifier:
    return CountingVerifier(database, dummy_cost=BCRYPT_COST, **kwargs)


def create(database: Database, name: str = "alice", password: str = PASSWORD) -> AuthenticatedAccount:
    with database.transaction() as session:
        created = accounts.create_account(
            session,
            name=name,
            email=f"{name}@example.com",
            # One sender domain belongs to one active account (security.unique_sender_domains).
            allowed_domains=DOMAINS if name == "alice" else [f"{name}.example.net"],
            bcrypt_cost=BCRYPT_COST,
            password=password,
            actor=CLI,
        )
        account = created.account
        return logged_in(session, account)


def run_threads(count: int, target) -> list:
    """Start ``count`` threads on ``target(i)`` at once and return their results in order."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = target(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    return results


def test_verify_right_password_returns_the_account(database: Database) -> None:
    expected = create(database)
    verifier = make_verifier(database)
    account = verifier.verify("alice", PASSWORD)
    assert account == expected
    assert account.allowed_domains == ("example.com", "*.example.org")
    assert verifier.checks == 1


def test_verify_wrong_password_returns_none(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    assert verifier.verify("alice", "wrong horse battery staple") is None
    assert verifier.verify("alice", "") is None
    assert verifier.verify("alice", PASSWORD + "x" * 100) is None


def test_verify_unknown_user_returns_none_after_one_bcrypt_check(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    assert verifier.verify("bob", PASSWORD) is None
    assert verifier.checks == 1


@pytest.mark.parametrize("username", ["", "bad\x00name", "a" * 65, "-dash", "caf\udce9", "x' OR '1'='1"])
def test_verify_impossible_user_name_returns_none_after_one_bcrypt_check(
    database: Database, username: str
) -> None:
    create(database)
    verifier = make_verifier(database)
    assert verifier.verify(username, PASSWORD) is None
    assert verifier.checks == 1


def test_verify_password_with_lone_surrogate_returns_none(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    assert verifier.verify("alice", "caf\udce9-password") is None


def test_verify_user_name_is_case_sensitive(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    assert verifier.verify("ALICE", PASSWORD) is None


def test_verify_deactivated_account_returns_none_after_one_bcrypt_check(database: Database) -> None:
    create(database)
    with database.transaction() as session:
        accounts.deactivate_account(session, accounts.get_account_by_name(session, "alice"), actor=CLI)
    verifier = make_verifier(database)
    assert verifier.verify("alice", PASSWORD) is None
    assert verifier.checks == 1


def test_verify_second_time_is_answered_from_the_cache(database: Database) -> None:
    expected = create(database)
    verifier = make_verifier(database)
    assert verifier.verify("alice", PASSWORD) == expected
    assert verifier.verify("alice", PASSWORD) == expected
    assert verifier.checks == 1


def test_verify_wrong_password_is_not_answered_from_the_cache(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    assert verifier.verify("alice", PASSWORD) is not None
    assert verifier.verify("alice", "wrong horse battery staple") is None
    assert verifier.checks == 2


def test_verify_failures_are_not_cached(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    assert verifier.verify("alice", "wrong horse battery staple") is None
    assert verifier.verify("alice", "wrong horse battery staple") is None
    assert verifier.checks == 2


def test_verify_after_password_change_rejects_the_cached_password_at_once(database: Database) -> None:
    expected = create(database)
    verifier = make_verifier(database)
    assert verifier.verify("alice", PASSWORD) == expected
    with database.transaction() as session:
        accounts.set_password(
            session,
            accounts.get_account_by_name(session, "alice"),
            BCRYPT_COST,
            "a brand new password",
            actor=CLI,
        )
    assert verifier.verify("alice", PASSWORD) is None
    assert verifier.verify("alice", "a brand new password") == expected
    assert verifier.checks == 3


def test_verify_after_deactivation_rejects_a_cached_login_at_once(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    assert verifier.verify("alice", PASSWORD) is not None
    with database.transaction() as session:
        accounts.deactivate_account(session, accounts.get_account_by_name(session, "alice"), actor=CLI)
    assert verifier.verify("alice", PASSWORD) is None


def test_verify_cache_hit_returns_current_allowed_domains(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    verifier.verify("alice", PASSWORD)
    with database.transaction() as session:
        accounts.get_account_by_name(session, "alice").allowed_domains = ["example.net"]
    account = verifier.verify("alice", PASSWORD)
    assert account is not None and account.allowed_domains == ("example.net",)
    assert verifier.checks == 1


def test_verify_cache_entry_expires_after_ttl(database: Database) -> None:
    create(database)
    clock = FakeClock()
    verifier = make_verifier(database, cache_ttl=300.0, clock=clock)
    verifier.verify("alice", PASSWORD)
    clock.now += 299.0
    assert verifier.verify("alice", PASSWORD) is not None
    assert verifier.checks == 1
    clock.now += 1.0
    assert verifier.verify("alice", PASSWORD) is not None
    assert verifier.checks == 2
    assert verifier.verify("alice", PASSWORD) is not None
    assert verifier.checks == 2


def test_verify_cache_ttl_zero_disables_the_cache(database: Database) -> None:
    create(database)
    verifier = make_verifier(database, cache_ttl=0)
    verifier.verify("alice", PASSWORD)
    verifier.verify("alice", PASSWORD)
    assert verifier.checks == 2


def test_verify_cache_is_bounded_and_evicts_the_oldest(database: Database) -> None:
    for name in ("alice", "bob", "carol"):
        create(database, name)
    verifier = make_verifier(database, cache_size=2)
    for name in ("alice", "bob", "carol"):
        verifier.verify(name, PASSWORD)
    assert verifier.checks == 3
    verifier.verify("carol", PASSWORD)
    verifier.verify("bob", PASSWORD)
    assert verifier.checks == 3
    verifier.verify("alice", PASSWORD)
    assert verifier.checks == 4


def test_verify_cache_holds_no_password(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    verifier.verify("alice", PASSWORD)
    [(name, mac)] = verifier._cache
    assert name == "alice" and len(mac) == 32 and PASSWORD.encode() not in mac
    assert PASSWORD not in repr(verifier._cache)


def test_verify_concurrent_same_credentials_run_bcrypt_once(database: Database) -> None:
    expected = create(database)
    # No cache, so a thread that arrived after the check would run bcrypt again:
    # only single-flight can keep the count at one.
    verifier = make_verifier(database, cache_ttl=0, bcrypt_slots=8)
    verifier.release = threading.Event()
    entered = threading.Semaphore(0)

    def attempt(_i: int) -> AuthenticatedAccount | None:
        try:
            entered.release()
            return verifier.verify("alice", PASSWORD)
        finally:
            database.remove_session()

    def open_gate() -> None:
        for _ in range(8):
            assert entered.acquire(timeout=10)
        wait_for(lambda: verifier.checks == 1 and followers() == 7, "one check and 7 followers", timeout=10)
        verifier.release.set()

    def followers() -> int:
        """Threads waiting on the flight's answer (its Event's condition)."""
        with verifier._lock:
            flights = list(verifier._flights.values())
        return sum(len(flight.done._cond._waiters) for flight in flights)

    gate = threading.Thread(target=open_gate)
    gate.start()
    results = run_threads(8, attempt)
    gate.join(15)
    assert results == [expected] * 8
    assert verifier.checks == 1


def test_verify_concurrent_wrong_passwords_share_one_failed_check(database: Database) -> None:
    create(database)
    verifier = make_verifier(database, cache_ttl=0, hold=0.5)

    def attempt(_i: int) -> AuthenticatedAccount | None:
        try:
            return verifier.verify("alice", "wrong horse battery staple")
        finally:
            database.remove_session()

    assert run_threads(4, attempt) == [None] * 4
    assert verifier.checks == 1


def test_verify_bcrypt_pool_of_one_never_overlaps_checks(database: Database) -> None:
    names = [f"user{i}" for i in range(4)]
    for name in names:
        create(database, name)
    verifier = make_verifier(database, bcrypt_slots=1, hold=0.05)

    def attempt(i: int) -> AuthenticatedAccount | None:
        try:
            return verifier.verify(names[i], PASSWORD)
        finally:
            database.remove_session()

    results = run_threads(4, attempt)
    assert all(result is not None for result in results)
    assert verifier.checks == 4
    assert verifier.max_running == 1


def test_verify_bcrypt_pool_of_four_lets_checks_overlap(database: Database) -> None:
    """The control for the test above: the measurement does see overlap when allowed."""
    names = [f"user{i}" for i in range(4)]
    for name in names:
        create(database, name)
    verifier = make_verifier(database, bcrypt_slots=4, hold=0.3)

    def attempt(i: int) -> AuthenticatedAccount | None:
        try:
            return verifier.verify(names[i], PASSWORD)
        finally:
            database.remove_session()

    run_threads(4, attempt)
    assert verifier.max_running > 1


def test_verify_database_down_raises_database_unavailable(make_config) -> None:
    config = make_config("postgresql://u:p@127.0.0.1:1/x", database={"connect_timeout": "1s"})
    db = Database(config.database)
    try:
        verifier = make_verifier(db)
        with pytest.raises(DatabaseUnavailable):
            verifier.verify("alice", PASSWORD)
        assert verifier.checks == 0
    finally:
        db.dispose()


def test_verifier_rejects_zero_bcrypt_slots(database: Database) -> None:
    with pytest.raises(ValueError, match="bcrypt_slots"):
        CredentialVerifier(database, bcrypt_slots=0, dummy_cost=BCRYPT_COST)


def test_verify_reads_the_header_from_exemption(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    assert verifier.verify("alice", PASSWORD).header_from_check is True
    with database.transaction() as session:
        accounts.get_account_by_name(session, "alice").allow_any_header_from = True
    assert verifier.verify("alice", PASSWORD).header_from_check is False  # a cache hit re-reads it too


def test_a_password_change_reaches_every_verifier_at_once(database: Database) -> None:
    """Two listener processes: two verifiers, each with the old password in its cache."""
    create(database)
    first, second = make_verifier(database), make_verifier(database)
    assert first.verify("alice", PASSWORD) and second.verify("alice", PASSWORD)
    with database.transaction() as session:
        accounts.set_password(
            session,
            accounts.get_account_by_name(session, "alice"),
            BCRYPT_COST,
            "a brand new password",
            actor=CLI,
        )
    assert first.verify("alice", PASSWORD) is None
    assert second.verify("alice", PASSWORD) is None
    assert first.verify("alice", "a brand new password") and second.verify("alice", "a brand new password")


def test_authenticate_counts_then_judges_and_a_success_clears_the_user(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    throttle = AuthThrottle(MemoryStorage(), per_ip=3, per_user=2)
    attempt = functools.partial(authenticate, verifier, throttle, client_ip="192.0.2.1")
    assert attempt(username="alice", password="wrong").failure == "invalid_credentials"
    ok = attempt(username="alice", password=PASSWORD)
    assert ok.failure is None and ok.account is not None and ok.account.name == "alice"
    assert attempt(username="alice", password="wrong").failure == "invalid_credentials"
    assert attempt(username="alice", password="wrong").failure == "invalid_credentials"
    checks = verifier.checks
    assert attempt(username="alice", password=PASSWORD).failure == "throttled_ip"
    assert verifier.checks == checks  # refused without bcrypt
    elsewhere = authenticate(verifier, throttle, client_ip="192.0.2.2", username="alice", password=PASSWORD)
    assert elsewhere.failure == "throttled_user"


def test_authenticate_applies_the_config_header_from_switch(database: Database) -> None:
    create(database)
    verifier = make_verifier(database)
    result = authenticate(
        verifier,
        AuthThrottle(),
        client_ip="192.0.2.1",
        username="alice",
        password=PASSWORD,
        header_from_check=False,
    )
    assert result.account is not None and result.account.header_from_check is False


def test_authenticate_with_the_database_down_counts_nothing(make_config) -> None:
    config = make_config("postgresql://u:p@127.0.0.1:1/x", database={"connect_timeout": "1s"})
    db = Database(config.database)
    throttle = AuthThrottle(MemoryStorage(), per_ip=1, per_user=1)
    try:
        verifier = make_verifier(db)
        for _ in range(3):
            result = authenticate(verifier, throttle, client_ip="192.0.2.1", username="alice", password="x")
            assert result.failure == "database_unavailable"
    finally:
        db.dispose()


def test_parallel_logins_with_the_same_credentials_count_as_one_guess(database: Database) -> None:
    """A mailer opening many connections at once with a cold cache is one guess, not a flood."""
    create(database)
    verifier = make_verifier(database, hold=0.2)  # every connection arrives while the check runs
    throttle = AuthThrottle(LocalCounters(), per_ip=2, per_user=2)
    results = run_threads(
        30,
        lambda _i: authenticate(
            verifier, throttle, client_ip="192.0.2.1", username="alice", password=PASSWORD
        ),
    )
    assert [r.failure for r in results] == [None] * 30
    assert verifier.checks == 1
    # The address's count holds only failures: two more wrong guesses still get their verdict.
    wrong = [
        authenticate(verifier, throttle, client_ip="192.0.2.1", username="bob", password="x") for _ in "ab"
    ]
    assert [r.failure for r in wrong] == ["invalid_credentials"] * 2


def test_a_cached_credential_is_refused_while_the_address_is_over_its_limit(database: Database) -> None:
    """Else a locked-out guesser could go on testing passwords against the cache, at no cost."""
    create(database)
    verifier = make_verifier(database)
    throttle = AuthThrottle(LocalCounters(), per_ip=2, per_user=100)
    attempt = functools.partial(authenticate, verifier, throttle, client_ip="192.0.2.1", username="alice")
    assert attempt(password=PASSWORD).failure is None  # now in the cache
    assert [attempt(password=f"guess{i}").failure for i in range(3)] == [
        "invalid_credentials",
        "invalid_credentials",
        "throttled_ip",
    ]
    checks = verifier.checks
    assert attempt(password=PASSWORD).failure == "throttled_ip"
    assert verifier.checks == checks
    other = authenticate(verifier, throttle, client_ip="192.0.2.9", username="alice", password=PASSWORD)
    assert other.failure is None


def test_on_a_shared_storage_a_guess_here_ends_the_shortcut_for_cached_logins(
    database: Database, redis_url: str
) -> None:
    """A cached login skips the shared read for a second, but never after a miss in this process."""
    create(database)
    verifier = make_verifier(database)
    here = AuthThrottle(open_storage(redis_url), per_ip=2, per_user=100)
    elsewhere = AuthThrottle(open_storage(redis_url), per_ip=2, per_user=100)
    attempt = functools.partial(authenticate, verifier, here, client_ip="192.0.2.1", username="alice")
    assert attempt(password=PASSWORD).failure is None
    assert attempt(password=PASSWORD).failure is None  # cached, and the address read as clear
    # Another process sees the address reach its limit ...
    for _ in range(2):
        assert elsewhere.begin("192.0.2.1", "alice").refused is None
    # ... and the first guess here is refused, which ends the shortcut at once.
    assert attempt(password="g3").failure == "throttled_ip"
    assert attempt(password=PASSWORD).failure == "throttled_ip"
