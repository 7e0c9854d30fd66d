"""Behaviour of smtp_proxy.reload.ConfigWatcher with a real file and the real watchdog observer.

Asynchronous effects are awaited by polling with a bounded deadline. To show that something does
NOT happen, a test waits until the watcher has handled every file event so far (``settled``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from smtp_proxy.config import Config, config_from_dict, load_config
from smtp_proxy.logs import apply_level
from smtp_proxy.reload import RESTART_KEYS, ConfigWatcher, keeping_restart_keys
from tests.waiting import wait_for

DEADLINE = 5.0
DEBOUNCE = 0.05
# For the SIGHUP test: slow enough that the file observer cannot be the one that reloads.
SIGHUP_DEBOUNCE = 2.0

BASE = "smtp:\n  hostname: mx1.example.com\nlogging:\n  level: warning\n  format: json\n"
DEBUG = "smtp:\n  hostname: mx1.example.com\nlogging:\n  level: debug\n  format: json\n"
ERROR = "smtp:\n  hostname: mx1.example.com\nlogging:\n  level: error\n  format: json\n"


def write_in_place(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def write_and_replace(path: Path, text: str) -> None:
    """What editors and config management do: a new file renamed over the old one."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


class Recorder:
    """A subscriber that remembers its calls and signals each one."""

    def __init__(self) -> None:
        self.calls: list[tuple[Config, Config]] = []
        self.called = threading.Event()

    def __call__(self, new: Config, old: Config) -> None:
        self.calls.append((new, old))
        self.called.set()


def settled(watcher: ConfigWatcher, config_file: Path) -> None:
    """Every file event so far has reached the watcher, and any reload it scheduled has run.

    A marker written now reaches a handler of ours on the watcher's own observer (one emitter per
    directory, its handlers called in order) only after every earlier event of the directory has
    reached the watcher's handler; then its debounce timer, if one was armed, runs out.
    """
    marker = config_file.with_name("settled.marker")
    seen = threading.Event()

    class Marker(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if Path(str(event.src_path)) == marker:
                seen.set()

    handler = Marker()
    observer = watcher._observer
    assert observer is not None
    watch = observer.schedule(handler, str(config_file.parent), recursive=False)
    try:
        marker.write_text(str(time.monotonic()))
        wait_for(seen.is_set, "the marker's event, after every earlier one", timeout=DEADLINE)
    finally:
        observer.remove_handler_for_watch(handler, watch)
    timer = watcher._timer
    wait_for(lambda: timer is None or not timer.is_alive(), "the scheduled reload to run", timeout=DEADLINE)


def rejections(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "config.reload_rejected"]


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The watcher reads the file with os.environ; keep the test run's overrides out.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("SMTP_PROXY_ENCRYPTION_KEY", raising=False)
    path = tmp_path / "smtp-proxy.yaml"
    path.write_text(BASE, encoding="utf-8")
    return path


@pytest.fixture
def make_watcher(config_file: Path) -> Iterator[Callable[..., ConfigWatcher]]:
    """Build watchers on ``config_file``; every one is stopped, and SIGHUP restored, afterwards."""
    watchers: list[ConfigWatcher] = []
    previous_sighup = signal.getsignal(signal.SIGHUP)

    def make(debounce: float = DEBOUNCE) -> ConfigWatcher:
        watcher = ConfigWatcher(load_config(config_file), debounce=debounce)
        watchers.append(watcher)
        return watcher

    try:
        yield make
    finally:
        for watcher in watchers:
            watcher.stop()
        # stop() does not wait for a debounce timer that is already running (or that
        # the observer armed while stopping); let it finish so that its reload cannot
        # log into, or call subscribers during, the next test.
        wait_for(
            lambda: not any(isinstance(t, threading.Timer) and t.is_alive() for t in threading.enumerate()),
            "the debounce timers to finish",
        )
        signal.signal(signal.SIGHUP, previous_sighup)


@pytest.fixture
def root_level() -> Iterator[None]:
    """Restore the root logger's level after a test that lets the watcher change it."""
    root = logging.getLogger()
    saved = root.level
    try:
        yield
    finally:
        root.setLevel(saved)


# --- file changes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("write", [write_in_place, write_and_replace], ids=["in_place", "replace"])
def test_subscriber_receives_new_and_old_when_file_changes(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher], write: Callable[[Path, str], None]
) -> None:
    watcher = make_watcher()
    old = watcher.config
    recorder = Recorder()
    watcher.subscribe(recorder)
    watcher.start()

    write(config_file, DEBUG)

    assert recorder.called.wait(DEADLINE), "subscriber not called after the file changed"
    new, passed_old = recorder.calls[0]
    assert passed_old is old
    assert new.logging.level == "debug"
    assert new.changed_keys(old) == ["logging.level"]
    assert new.source == old.source
    wait_for(lambda: watcher.config is new, "the new config in force")


@pytest.mark.parametrize("write", [write_in_place, write_and_replace], ids=["in_place", "replace"])
def test_log_level_applied_when_logging_level_changes(
    root_level: None,
    config_file: Path,
    make_watcher: Callable[..., ConfigWatcher],
    write: Callable[[Path, str], None],
) -> None:
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    watcher = make_watcher()
    watcher.subscribe(lambda new, old: apply_level(new.logging))
    watcher.start()

    write(config_file, DEBUG)
    wait_for(lambda: root.level == logging.DEBUG, "the root logger at DEBUG")

    write(config_file, ERROR)
    wait_for(lambda: root.level == logging.ERROR, "the root logger at ERROR")


def test_every_change_reaches_subscribers_when_file_changes_repeatedly(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    watcher = make_watcher()
    levels: list[str] = []
    watcher.subscribe(lambda new, old: levels.append(new.logging.level))
    watcher.start()

    for text, level in ((DEBUG, "debug"), (ERROR, "error"), (BASE, "warning")):
        write_and_replace(config_file, text)
        wait_for(lambda level=level: watcher.config.logging.level == level, f"logging.level {level}")

    assert levels == ["debug", "error", "warning"]


def test_reloaded_logged_with_changed_and_restart_keys(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtp_proxy.config")
    watcher = make_watcher()
    watcher.start()

    write_and_replace(config_file, DEBUG.replace("smtp:\n", "smtp:\n  port: 2525\n"))

    def reloaded() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", None) == "config.reloaded"]

    wait_for(lambda: bool(reloaded()), "a config.reloaded record")
    record = reloaded()[0]
    assert record.levelno == logging.INFO
    assert record.changed == ["smtp.port", "logging.level"]
    assert record.restart_required == ["smtp.port"]


# --- rejected files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("logging:\n  level: [debug\n", "--config"),
        ("logging:\n  levle: debug\n", "logging.levle"),
        ("logging:\n  level: loud\n", "logging.level"),
        ("smtp:\n  port: 0\n", "smtp.port"),
        ("", "--config"),
    ],
    ids=["bad_yaml", "unknown_key", "bad_choice", "bad_port", "empty_mid_write"],
)
def test_invalid_file_logged_and_ignored(
    config_file: Path,
    make_watcher: Callable[..., ConfigWatcher],
    caplog: pytest.LogCaptureFixture,
    text: str,
    key: str,
) -> None:
    watcher = make_watcher()
    old = watcher.config
    recorder = Recorder()
    watcher.subscribe(recorder)
    watcher.start()

    write_and_replace(config_file, text)

    def matching() -> list[logging.LogRecord]:
        return [r for r in rejections(caplog) if r.key == key]

    wait_for(lambda: bool(matching()), f"a config.reload_rejected record for {key}")
    record = matching()[0]
    assert record.levelno == logging.ERROR
    assert record.name == "smtp_proxy.config"
    assert record.problem
    assert watcher.config is old
    assert recorder.calls == []


def test_invalid_file_rejected_once_when_written_once(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    # One bad write is one rejection. The watcher must not keep re-reading (and
    # re-logging) the file on its own: reading it is not a change to it.
    watcher = make_watcher()
    watcher.start()

    write_and_replace(config_file, "logging:\n  level: loud\n")
    wait_for(lambda: bool(rejections(caplog)), "a config.reload_rejected record")
    settled(watcher, config_file)  # the rejection's own read of the file included

    assert len(rejections(caplog)) == 1, f"{len(rejections(caplog))} rejections for one write"


def test_valid_file_applied_when_written_after_invalid_one(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    watcher = make_watcher()
    old = watcher.config
    recorder = Recorder()
    watcher.subscribe(recorder)
    watcher.start()

    write_and_replace(config_file, "logging:\n  level: [debug\n")
    wait_for(lambda: bool(rejections(caplog)), "a config.reload_rejected record")
    assert watcher.config is old

    write_and_replace(config_file, DEBUG)

    assert recorder.called.wait(DEADLINE), "valid file not applied after an invalid one"
    new, passed_old = recorder.calls[0]
    assert passed_old is old
    assert new.logging.level == "debug"
    assert len(recorder.calls) == 1


def test_nobody_called_when_file_rewritten_with_identical_content(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    watcher = make_watcher()
    old = watcher.config
    recorder = Recorder()
    watcher.subscribe(recorder)
    watcher.start()

    write_in_place(config_file, BASE)
    write_and_replace(config_file, BASE)
    settled(watcher, config_file)

    assert recorder.calls == []
    assert watcher.config is old


def test_nobody_called_when_file_rewritten_with_equivalent_content(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    watcher = make_watcher()
    recorder = Recorder()
    watcher.subscribe(recorder)
    watcher.start()

    # Different text, same values: comments, quoting, key order, case of a choice.
    write_and_replace(
        config_file,
        "# edited\nlogging:\n  format: 'json'\n  level: WARNING\nsmtp:\n  hostname: \"mx1.example.com\"\n",
    )
    settled(watcher, config_file)

    assert recorder.calls == []


def test_other_subscribers_called_when_one_raises(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    watcher = make_watcher()
    before, after = Recorder(), Recorder()

    def broken(new: Config, old: Config) -> None:
        raise RuntimeError("subscriber bug")

    watcher.subscribe(before)
    watcher.subscribe(broken)
    watcher.subscribe(after)
    watcher.start()

    write_and_replace(config_file, DEBUG)

    assert after.called.wait(DEADLINE), "subscriber after the failing one not called"
    assert before.called.is_set()
    assert after.calls[0][0].logging.level == "debug"
    assert watcher.config.logging.level == "debug"
    failures = [r for r in caplog.records if getattr(r, "event", None) == "config.subscriber_failed"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], RuntimeError)


# --- reload() called directly ------------------------------------------------------------------------


def test_reload_returns_true_when_file_changed(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    watcher = make_watcher()
    old = watcher.config
    recorder = Recorder()
    watcher.subscribe(recorder)
    write_and_replace(config_file, DEBUG)

    assert watcher.reload() is True

    assert watcher.config.logging.level == "debug"
    assert recorder.calls == [(watcher.config, old)]


def test_reload_returns_false_when_file_unchanged(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    watcher = make_watcher()
    old = watcher.config
    recorder = Recorder()
    watcher.subscribe(recorder)

    assert watcher.reload() is False
    write_in_place(config_file, BASE + "# a comment\n")
    assert watcher.reload() is False

    assert watcher.config is old
    assert recorder.calls == []


@pytest.mark.parametrize(
    "change",
    [
        lambda path: path.write_text("logging:\n  level: loud\n", encoding="utf-8"),
        lambda path: path.write_text("logging: [\n", encoding="utf-8"),
        lambda path: path.unlink(),
    ],
    ids=["invalid_value", "invalid_yaml", "file_deleted"],
)
def test_reload_returns_false_when_file_invalid(
    config_file: Path,
    make_watcher: Callable[..., ConfigWatcher],
    caplog: pytest.LogCaptureFixture,
    change: Callable[[Path], None],
) -> None:
    watcher = make_watcher()
    old = watcher.config
    recorder = Recorder()
    watcher.subscribe(recorder)
    change(config_file)

    assert watcher.reload() is False

    assert watcher.config is old
    assert recorder.calls == []
    assert len(rejections(caplog)) == 1


def test_reload_returns_true_again_after_invalid_file_fixed(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    watcher = make_watcher()
    write_in_place(config_file, "logging:\n  level: loud\n")
    assert watcher.reload() is False

    write_in_place(config_file, ERROR)

    assert watcher.reload() is True
    assert watcher.config.logging.level == "error"
    assert watcher.reload() is False


def test_watcher_rejects_config_without_file() -> None:
    with pytest.raises(ValueError, match="without a file"):
        ConfigWatcher(config_from_dict({}, env={}))


# --- SIGHUP ------------------------------------------------------------------------------------------


def test_sighup_reloads_config_when_signalled(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    assert threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGHUP)
    # Should start() fail to install its handler, SIGHUP must not kill the test run.
    signal.signal(signal.SIGHUP, lambda _sig, _frame: None)
    try:
        # A debounce longer than the wait below: the file observer alone cannot apply
        # the change in time, so only the signal can.
        watcher = make_watcher(debounce=SIGHUP_DEBOUNCE)
        recorder = Recorder()
        watcher.subscribe(recorder)
        watcher.start()
        assert signal.getsignal(signal.SIGHUP) is not previous

        write_and_replace(config_file, DEBUG)
        os.kill(os.getpid(), signal.SIGHUP)

        wait_for(
            lambda: watcher.config.logging.level == "debug",
            "SIGHUP to reload before the debounce",
            timeout=SIGHUP_DEBOUNCE * 0.75,
        )
        assert recorder.called.wait(DEADLINE)
        assert recorder.calls[0][0].logging.level == "debug"
        assert recorder.calls[0][1].logging.level == "warning"
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_sighup_reloads_config_when_watcher_uses_short_debounce(
    config_file: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    previous = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, lambda _sig, _frame: None)
    try:
        watcher = make_watcher()
        watcher.start()

        write_and_replace(config_file, ERROR)
        os.kill(os.getpid(), signal.SIGHUP)

        wait_for(lambda: watcher.config.logging.level == "error", "logging.level error")
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_replacement_process_takes_the_reloadable_keys_and_keeps_those_that_take_a_restart() -> None:
    running = config_from_dict(
        {
            "smtp": {"port": 2587, "max_message_size": 1_000_000, "processes": 2},
            "database": {"url": "postgresql://db-a/relay", "pool_max": 30},
            "logging": {"level": "info"},
        },
        env={},
    )
    edited = config_from_dict(
        {
            "smtp": {"port": 2588, "max_message_size": 2_000_000, "processes": 4},
            "database": {"url": "postgresql://db-b/relay", "pool_max": 50},
            "logging": {"level": "debug"},
        },
        env={},
    )

    merged = keeping_restart_keys(edited, running)

    assert merged.changed_keys(running) == ["smtp.max_message_size", "logging.level"]
    assert set(merged.changed_keys(edited)) == {
        "smtp.port",
        "smtp.processes",
        "database.url",
        "database.pool_max",
    }
    assert not set(merged.changed_keys(running)) & set(RESTART_KEYS)
