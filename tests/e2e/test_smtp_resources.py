"""What an idle or finished session costs the listener: threads, objects, memory."""

from __future__ import annotations

import logging
import sys
import threading

import pytest

from smtp_proxy import gil
from smtp_proxy.config import LoggingConfig
from smtp_proxy.logs import configure_logging
from tests.e2e.conftest import Listener, RawClient
from tests.waiting import wait_for


def no_timer_threads() -> bool:
    """The ``limits`` memory storage runs its expiry in short-lived threading.Timer threads."""
    return not any(isinstance(thread, threading.Timer) for thread in threading.enumerate())


def test_idle_connections_cost_no_thread_object_and_no_protocol_core(start_listener) -> None:
    listener: Listener = start_listener()
    wait_for(no_timer_threads, "the limits expiry timers to end")
    threads_before = threading.active_count()
    clients = [RawClient(listener.host, listener.port) for _ in range(20)]
    try:
        for client in clients:
            assert client.reply().startswith(b"220 mx.test ESMTP")
        wait_for(lambda: listener.server.active_count == 20, "20 sessions open")
        # Session threads run without threading.Thread objects (2.5 KB each).
        assert threading.active_count() == threads_before
        handlers = list(listener.server._active)
        assert all(handler.session is None for handler in handlers)

        clients[0].send(b"EHLO client.test\r\n")
        assert clients[0].reply().startswith(b"250-mx.test")
        assert sum(handler.session is not None for handler in listener.server._active) == 1
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: listener.server.active_count == 0, "every session ended")


def test_an_idle_connection_that_never_spoke_still_times_out_with_421(start_listener) -> None:
    listener: Listener = start_listener(read_timeout=0.3)
    client = RawClient(listener.host, listener.port)
    try:
        assert client.reply().startswith(b"220 ")
        assert client.reply().startswith(b"421 4.4.2")
        assert client.closed()
    finally:
        client.close()


def test_logging_in_a_session_registers_no_dummy_thread(start_listener, restore_logging, capsys) -> None:
    configure_logging(LoggingConfig(level="debug", format="json"))
    listener: Listener = start_listener()
    wait_for(no_timer_threads, "the limits expiry timers to end")
    registered = len(threading._active)  # type: ignore[attr-defined]
    for _ in range(5):
        client = RawClient(listener.host, listener.port)
        client.reply()
        client.send(b"EHLO client.test\r\nQUIT\r\n")
        client.reply()
        assert client.reply().startswith(b"221")
        client.close()
    wait_for(lambda: listener.server.active_count == 0, "every session ended")
    assert "smtp.disconnect" in capsys.readouterr().out  # the sessions did log
    assert logging.logThreads is False
    assert len(threading._active) == registered  # type: ignore[attr-defined]


def test_the_listener_calls_on_quiet_when_its_last_session_ends(start_listener) -> None:
    calls: list[int] = []
    listener: Listener = start_listener(on_quiet=lambda: calls.append(listener.server.active_count))
    first, second = (RawClient(listener.host, listener.port) for _ in range(2))
    try:
        first.reply()
        second.reply()
        wait_for(lambda: listener.server.active_count == 2, "two sessions open")
        first.send(b"QUIT\r\n")
        assert first.reply().startswith(b"221")
        # The count dropped under the same lock that decided "not quiet": no call can follow.
        wait_for(lambda: listener.server.active_count == 1, "one session left")
        assert calls == []  # one session still open: not quiet
        second.send(b"QUIT\r\n")
        assert second.reply().startswith(b"221")
        wait_for(lambda: calls == [0], "on_quiet called once")
    finally:
        first.close()
        second.close()


def test_sessions_share_one_policy_until_the_config_changes(start_listener, make_config, pg_url) -> None:
    listener: Listener = start_listener()
    server = listener.server
    assert server.policy(False) is server.policy(False)
    assert server.policy(True).tls_active and not server.policy(False).tls_active
    changed = make_config(pg_url, smtp={"hostname": "other.test", "max_recipients": 7})
    server._config = lambda: changed
    assert server.policy(False).hostname == "other.test"
    assert server.policy(False).max_recipients == 7


def test_the_gil_switch_interval_grows_with_open_sessions_and_returns_after(start_listener) -> None:
    """Hundreds of session threads waking at once must not thrash the GIL (see smtp_proxy/gil.py)."""
    listener: Listener = start_listener(max_connections_per_ip=0)
    assert sys.getswitchinterval() == pytest.approx(gil.DEFAULT_INTERVAL)
    clients = [RawClient(listener.host, listener.port) for _ in range(300)]
    try:
        for client in clients:
            assert client.reply().startswith(b"220 ")
        wait_for(lambda: listener.server.active_count == 300, "300 sessions open")
        assert gil.PACING.threads >= 300
        assert gil.interval_for(300) > gil.DEFAULT_INTERVAL
        assert sys.getswitchinterval() == pytest.approx(gil.interval_for(300))
    finally:
        for client in clients:  # all at once: the herd this pacing is for
            client.close()
    wait_for(lambda: listener.server.active_count == 0, "every session ended")
    # A new client is served at once afterwards, and the interval is back to normal.
    client = RawClient(listener.host, listener.port)
    try:
        assert client.reply().startswith(b"220 ")
    finally:
        client.close()
    wait_for(lambda: listener.server.active_count == 0, "every session ended")
    assert sys.getswitchinterval() == pytest.approx(gil.DEFAULT_INTERVAL)
