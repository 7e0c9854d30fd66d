"""AuthThrottle with a fake clock, and the shape of the AUTH failure log line."""

from __future__ import annotations

import io
import json
import logging
import re
import threading

import pytest

from smtp_proxy.config import LoggingConfig
from smtp_proxy.logs import configure_logging
from smtp_proxy.smtp import credentials
from smtp_proxy.smtp.credentials import AuthThrottle, log_auth_failure

IP = "192.0.2.7"
OTHER = "198.51.100.9"


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **kwargs) -> AuthThrottle:
    return AuthThrottle(clock=clock, **kwargs)


def test_delay_grows_from_zero_and_is_capped(clock: FakeClock) -> None:
    throttle = make(clock, refuse_after=100)
    delays = []
    for _ in range(7):
        delays.append(throttle.delay_for(IP))
        throttle.failure(IP)
    assert delays == [0, 0.5, 1, 2, 4, 5, 5]


def test_delay_is_per_ip(clock: FakeClock) -> None:
    throttle = make(clock)
    throttle.failure(IP)
    throttle.failure(IP)
    assert throttle.delay_for(IP) == 1
    assert throttle.delay_for(OTHER) == 0


def test_delay_stays_finite_after_many_failures(clock: FakeClock) -> None:
    throttle = make(clock, refuse_after=5000)
    for _ in range(3000):
        throttle.failure(IP)
    assert throttle.delay_for(IP) == 5


def test_refused_after_refuse_after_failures_within_window(clock: FakeClock) -> None:
    throttle = make(clock, refuse_after=3, window=900, refuse_for=300)
    throttle.failure(IP)
    clock.now += 100
    throttle.failure(IP)
    assert not throttle.refused(IP)
    clock.now += 100
    throttle.failure(IP)
    assert throttle.refused(IP)
    assert not throttle.refused(OTHER)


def test_refusal_is_released_after_refuse_for(clock: FakeClock) -> None:
    throttle = make(clock, refuse_after=3, refuse_for=300)
    for _ in range(3):
        throttle.failure(IP)
    clock.now += 299
    assert throttle.refused(IP)
    clock.now += 1
    assert not throttle.refused(IP)


def test_failures_spread_wider_than_window_never_refuse(clock: FakeClock) -> None:
    throttle = make(clock, refuse_after=3, window=900)
    for _ in range(10):
        throttle.failure(IP)
        clock.now += 450
    assert not throttle.refused(IP)


def test_failures_older_than_window_are_forgotten(clock: FakeClock) -> None:
    throttle = make(clock, window=900)
    throttle.failure(IP)
    throttle.failure(IP)
    clock.now += 899
    assert throttle.delay_for(IP) == 1
    clock.now += 1
    assert throttle.delay_for(IP) == 0
    assert throttle.tracked() == 0


def test_window_forgets_only_the_old_failures(clock: FakeClock) -> None:
    throttle = make(clock, window=900)
    throttle.failure(IP)
    clock.now += 600
    throttle.failure(IP)
    throttle.failure(IP)
    clock.now += 300
    assert throttle.delay_for(IP) == 1


def test_success_clears_failures(clock: FakeClock) -> None:
    throttle = make(clock)
    for _ in range(4):
        throttle.failure(IP)
    throttle.success(IP)
    assert throttle.delay_for(IP) == 0
    assert not throttle.refused(IP)
    throttle.failure(IP)
    assert throttle.delay_for(IP) == 0.5


def test_memory_is_bounded_by_max_tracked_dropping_the_oldest(clock: FakeClock) -> None:
    throttle = make(clock, max_tracked=100)
    for i in range(1000):
        throttle.failure(f"10.0.{i // 256}.{i % 256}")
        clock.now += 0.01
    assert throttle.tracked() == 100
    assert throttle.delay_for("10.0.0.0") == 0
    assert throttle.delay_for("10.0.3.231") == 0.5  # the 1000th


def test_memory_of_forgotten_ips_is_released(clock: FakeClock) -> None:
    throttle = make(clock, window=900)
    for i in range(50):
        throttle.failure(f"10.1.0.{i}")
    clock.now += 1000
    throttle.failure(IP)
    assert throttle.tracked() == 1


def test_a_refused_ip_is_kept_past_the_window_until_released(clock: FakeClock) -> None:
    throttle = make(clock, refuse_after=2, window=10, refuse_for=300)
    throttle.failure(IP)
    throttle.failure(IP)
    clock.now += 100
    throttle.failure(OTHER)
    assert throttle.refused(IP)
    clock.now += 200
    assert not throttle.refused(IP)


def test_concurrent_failures_from_many_threads_are_all_counted() -> None:
    # One more than the failures the threads make from IP: counting one short would never refuse.
    throttle = AuthThrottle(refuse_after=3201, window=1e9, max_tracked=1000)
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(200):
                throttle.failure(IP)
                throttle.failure(f"10.2.{n}.{i}")
                throttle.delay_for(IP)
                throttle.refused(IP)
                if i % 50 == 0:
                    throttle.success(f"10.2.{n}.{i}")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert throttle.tracked() == 1000
    assert throttle.delay_for(IP) == 5
    assert not throttle.refused(IP)
    throttle.failure(IP)
    assert throttle.refused(IP)


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
