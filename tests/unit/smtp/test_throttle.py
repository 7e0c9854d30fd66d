"""AuthThrottle on the limits storage (memory and a real Redis), and the AUTH failure log line."""

from __future__ import annotations

import io
import json
import logging
import re
import threading

import pytest
from limits.storage import MemoryStorage, Storage

from smtp_proxy.config import LoggingConfig
from smtp_proxy.counters import counting_address, open_storage
from smtp_proxy.logs import configure_logging
from smtp_proxy.smtp import credentials
from smtp_proxy.smtp.credentials import AuthAttempt, AuthThrottle, log_auth_failure
from tests.conftest import free_port

IP = "192.0.2.7"
OTHER = "198.51.100.9"


class FakeClock:
    def __init__(self) -> None:
        self.now = 9000.0  # the start of a 900 s window, so each test knows where it stands

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, storage: Storage | None = None, **kwargs) -> AuthThrottle:
    kwargs.setdefault("per_ip", 3)
    kwargs.setdefault("per_user", 5)
    kwargs.setdefault("window", 900.0)
    return AuthThrottle(storage or MemoryStorage(), clock=clock, **kwargs)


def fail(throttle: AuthThrottle, ip: str = IP, user: str = "alice") -> AuthAttempt:
    attempt = throttle.begin(ip, user)
    if attempt.refused is None:
        throttle.failed(attempt)
    return attempt


@pytest.mark.parametrize(
    ("ip", "counted_as"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not an address", "not an address"),
    ],
)
def test_addresses_are_counted_by_ipv4_address_or_ipv6_64(ip: str, counted_as: str) -> None:
    assert counting_address(ip) == counted_as


def test_the_attempt_past_the_address_limit_is_refused(clock: FakeClock) -> None:
    throttle = make(clock)
    assert [fail(throttle).refused for _ in range(5)] == [None, None, None, "ip", "ip"]
    assert throttle.begin(OTHER, "bob").refused is None


def test_an_ipv6_host_cannot_escape_the_limit_by_changing_addresses_in_its_64(clock: FakeClock) -> None:
    throttle = make(clock)
    verdicts = [fail(throttle, f"2001:db8:0:1::{i}", f"user{i}").refused for i in range(1, 6)]
    assert verdicts == [None, None, None, "ip", "ip"]
    assert throttle.begin("2001:db8:0:2::1", "user9").refused is None  # another /64


def test_the_user_name_limit_refuses_guesses_from_many_addresses(clock: FakeClock) -> None:
    throttle = make(clock, per_ip=100, per_user=5)
    verdicts = [fail(throttle, f"10.0.0.{i}", "alice").refused for i in range(8)]
    assert verdicts == [None] * 5 + ["user"] * 3
    assert throttle.begin("10.0.0.99", "bob").refused is None


def test_refused_attempts_are_not_counted_as_guesses(clock: FakeClock) -> None:
    throttle = make(clock, per_ip=3)
    for _ in range(3):
        fail(throttle)
    for _ in range(50):
        assert fail(throttle).refused == "ip"
    # One window later the three failures weigh 3 * (1 - 0.4) = 1.8 -> 1, so two more are judged;
    # had the 50 refusals counted, nothing would be for a long time.
    clock.now += 900 * 1.4
    assert [fail(throttle).refused for _ in range(3)] == [None, None, "ip"]


def test_failures_slide_out_of_the_window(clock: FakeClock) -> None:
    throttle = make(clock, per_ip=4)
    for _ in range(4):
        fail(throttle)
    assert throttle.begin(IP, "alice").refused == "ip"
    clock.now += 900 * 1.5  # half of the previous window's four still count
    assert [fail(throttle).refused for _ in range(3)] == [None, None, "ip"]
    clock.now += 900  # two windows on: nothing of the first four is left
    assert throttle.begin(IP, "alice").refused is None


def test_a_success_clears_its_user_name_but_not_the_address(clock: FakeClock) -> None:
    throttle = make(clock, per_ip=4, per_user=3)
    fail(throttle, IP, "alice")
    fail(throttle, IP, "alice")
    fail(throttle, IP, "bob")
    fail(throttle, OTHER, "bob")
    good = throttle.begin(IP, "alice")
    assert good.refused is None
    throttle.succeeded(good)
    # The address keeps its three failures (the success gave back only its own attempt) ...
    assert fail(throttle, IP, "carol").refused is None
    assert throttle.begin(IP, "carol").refused == "ip"
    # ... alice's count is gone, bob's is not.
    assert [fail(throttle, f"10.9.0.{i}", "alice").refused for i in range(4)] == [None, None, None, "user"]
    assert [fail(throttle, f"10.8.0.{i}", "bob").refused for i in range(2)] == [None, "user"]


def test_configure_applies_new_limits_and_rejects_nonsense(clock: FakeClock) -> None:
    throttle = make(clock, per_ip=10)
    for _ in range(3):
        fail(throttle)
    throttle.configure(per_ip=3, per_user=10, window=900)
    assert throttle.begin(IP, "alice").refused == "ip"
    with pytest.raises(ValueError):
        throttle.configure(per_ip=0, per_user=1, window=1)


def _parallel_begins(throttles: list[AuthThrottle], count: int) -> list[str | None]:
    barrier = threading.Barrier(count)
    verdicts: list[str | None] = [None] * count
    errors: list[BaseException] = []

    def attempt(i: int) -> None:
        try:
            barrier.wait()
            verdicts[i] = throttles[i % len(throttles)].begin(IP, f"user{i}").refused
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    return verdicts


def test_parallel_attempts_cannot_all_get_a_verdict() -> None:
    # None of them has finished (no failed()/succeeded() yet): only the count can stop them.
    throttle = AuthThrottle(MemoryStorage(), per_ip=10, per_user=1000)
    verdicts = _parallel_begins([throttle], 64)
    assert verdicts.count(None) == 10
    assert verdicts.count("ip") == 54


def test_two_instances_on_one_redis_share_the_counts(redis_url: str) -> None:
    first = AuthThrottle(open_storage(redis_url), per_ip=10, per_user=1000)
    second = AuthThrottle(open_storage(redis_url), per_ip=10, per_user=1000)
    verdicts = _parallel_begins([first, second], 64)
    assert verdicts.count(None) == 10
    # And a success on one instance clears the user name for the other.
    for i in range(3):
        second.failed(second.begin(f"10.7.0.{i}", "dora"))
    second_throttle = AuthThrottle(open_storage(redis_url), per_ip=10, per_user=3)
    assert second_throttle.begin("10.7.1.1", "dora").refused == "user"
    ok = first.begin("10.7.1.2", "dora")
    first.succeeded(ok)
    assert second_throttle.begin("10.7.1.3", "dora").refused is None


def test_without_its_shared_storage_the_throttle_counts_in_the_process(caplog) -> None:
    port = free_port()  # nothing listens there
    throttle = AuthThrottle(open_storage(f"redis://127.0.0.1:{port}/0"), per_ip=3, per_user=100)
    with caplog.at_level(logging.WARNING, logger="smtp_proxy.smtp"):
        verdicts = [fail(throttle).refused for _ in range(5)]
    assert verdicts == [None, None, None, "ip", "ip"]
    assert [r.event for r in caplog.records] == ["smtp.auth_throttle_degraded"]


def test_log_auth_failure_writes_one_record_with_stable_fields(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("smtp_proxy.smtp.test")
    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp.test"):
        log_auth_failure(logger, client_ip=IP, username="alice", mechanism="PLAIN", reason="bad_credentials")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "SMTP AUTH failed"
    assert record.event == "smtp.auth_failed"
    assert (record.client_ip, record.username, record.mechanism, record.reason) == (
        IP,
        "alice",
        "PLAIN",
        "bad_credentials",
    )
    assert not any("password" in name for name in vars(record))


FAIL2BAN_REGEX = r'^\{.*"message": "SMTP AUTH failed".*"event": "smtp\.auth_failed", "client_ip": "<HOST>"'


def _json_line(**fields: str) -> str:
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream)
    log_auth_failure(logging.getLogger("smtp_proxy.smtp.server"), **fields)
    [line] = stream.getvalue().splitlines()
    return line


def test_log_auth_failure_json_line_matches_the_documented_fail2ban_regex(restore_logging) -> None:
    assert "failregex = " + FAIL2BAN_REGEX in credentials.__doc__
    line = _json_line(client_ip=IP, username="alice", mechanism="LOGIN", reason="bad_credentials")
    data = json.loads(line)
    assert {
        k: data[k] for k in ("message", "level", "event", "client_ip", "username", "mechanism", "reason")
    } == {
        "message": "SMTP AUTH failed",
        "level": "warning",
        "event": "smtp.auth_failed",
        "client_ip": IP,
        "username": "alice",
        "mechanism": "LOGIN",
        "reason": "bad_credentials",
    }
    host = FAIL2BAN_REGEX.replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)")
    match = re.search(host, line)
    assert match and match.group("host") == IP


def test_log_auth_failure_user_name_cannot_inject_another_client_ip(restore_logging) -> None:
    line = _json_line(
        client_ip=IP, username='x", "client_ip": "203.0.113.1', mechanism="PLAIN", reason="bad_credentials"
    )
    host = FAIL2BAN_REGEX.replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)")
    assert [m.group("host") for m in re.finditer(host, line)] == [IP]
    assert re.findall(r'"client_ip": "([^"]*)"', line) == [IP]
