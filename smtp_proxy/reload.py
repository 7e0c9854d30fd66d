"""Hot reload: a watchdog observer on the config file, and SIGHUP, feed subscribers.

The directory is watched rather than the file, because editors and config
management replace a file by renaming a new one over it. Events are debounced
so that a write in several chunks is read once. A file that no longer
validates is logged and ignored: the running config stays in force.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from smtp_proxy.config import Config, load_config
from smtp_proxy.errors import ConfigError
from smtp_proxy.logs import apply_level

log = logging.getLogger("smtp_proxy.config")

Subscriber = Callable[[Config, Config], None]

_WRITE_EVENTS = frozenset({"modified", "created", "moved", "closed", "deleted"})

# Keys that a running process cannot take over without a restart.
RESTART_KEYS = (
    "smtp.host",
    "smtp.port",
    "smtp.implicit_tls_port",
    "smtp.metrics_port",
    "smtp.processes",
    "api.host",
    "api.port",
    "api.threads",
    "api.read_timeout",
    "api.rate_limit",
    "api.rate_limit_storage",
    "api.unauthenticated_rate_limit",
    "api.processes",
    "api.proxy_protocol_from",
    "api.trusted_proxies",
    "limits.storage",
    "database.url",
    "database.pool_min",
    "database.pool_max",
    "security.encryption_key",
    "security.encryption_key_file",
    "security.previous_encryption_keys",
    "delivery.workers",
    "delivery.metrics_host",
    "delivery.metrics_port",
)


def keeping_restart_keys(new: Config, running: Config) -> Config:
    """``new``, with every key of ``RESTART_KEYS`` as ``running`` has it.

    For a process that must behave like the ones already running (a supervised child
    started in place of one that died): it takes what they would take on a reload,
    and keeps what they cannot change without a restart, such as the database.
    """
    sections: dict[str, Any] = {}
    for dotted in RESTART_KEYS:
        section, key = dotted.split(".", 1)
        kept = getattr(running, section)
        current = sections.get(section, getattr(new, section))
        sections[section] = dataclasses.replace(current, **{key: getattr(kept, key)})
    return dataclasses.replace(new, **sections)


class ConfigWatcher:
    """Holds the current config and tells subscribers when the file changes."""

    def __init__(self, config: Config, debounce: float = 0.2) -> None:
        if config.source is None:
            raise ValueError("a config without a file cannot be watched")
        self._config = config
        self._path = Path(config.source).resolve()
        self._debounce = debounce
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._observer: Observer | None = None
        self._stopped = False
        self._previous_sighup: Any = None

    @property
    def config(self) -> Config:
        return self._config

    def subscribe(self, callback: Subscriber) -> None:
        """``callback(new, old)`` runs after every accepted change."""
        self._subscribers.append(callback)

    def reload(self, force: bool = False) -> bool:
        """Re-read the file now; True when subscribers were called.

        ``force`` (SIGHUP) calls them even when the file is unchanged, so that
        files the config points at, such as a renewed TLS certificate, are re-read.
        """
        with self._lock:
            if self._stopped:
                return False
            try:
                if self._path.exists() and self._path.stat().st_size == 0:
                    # Editors truncate, then write: an empty file here is a write in
                    # progress, not a wish for the defaults (the next event brings the rest).
                    raise ConfigError("--config", f"{self._path} is empty; waiting for its contents")
                new = load_config(self._config.source)
            except ConfigError as exc:
                log.error(
                    "config reload rejected; keeping the running config",
                    extra={"event": "config.reload_rejected", "key": exc.key, "problem": exc.problem},
                )
                return False
            old = self._config
            changed = new.changed_keys(old)
            if not changed and not force:
                return False
            self._config = new
            pending = [key for key in changed if key in RESTART_KEYS]
            log.info(
                "config reloaded",
                extra={"event": "config.reloaded", "changed": changed, "restart_required": pending},
            )
            for callback in self._subscribers:
                try:
                    callback(new, old)
                except Exception:
                    log.exception("config subscriber failed", extra={"event": "config.subscriber_failed"})
            return True

    def _schedule(self) -> None:
        with self._lock:
            if self._stopped:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self._debounce, self.reload)
            self._timer.daemon = True
            self._timer.start()

    def start(self) -> None:
        """Start watching; also installs a SIGHUP handler when called from the main thread."""
        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                # Our own reads raise opened/closed_no_write events: reacting to
                # those would re-read the file forever.
                if event.event_type not in _WRITE_EVENTS:
                    return
                paths = [event.src_path, getattr(event, "dest_path", "")]
                if any(p and Path(str(p)).resolve() == watcher._path for p in paths):
                    watcher._schedule()

        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(_Handler(), str(self._path.parent), recursive=False)
        self._observer.start()
        # Where edits are seen: a symlink swapped elsewhere is not (SIGHUP reloads it).
        log.info(
            "watching the config file",
            extra={"event": "config.watching", "file": str(self._path), "directory": str(self._path.parent)},
        )
        if threading.current_thread() is threading.main_thread():
            self._previous_sighup = signal.getsignal(signal.SIGHUP)
            # A signal handler must not take a lock the interrupted code may hold.
            signal.signal(
                signal.SIGHUP,
                lambda _sig, _frame: threading.Thread(target=self.reload, args=(True,), daemon=True).start(),
            )

    def stop(self) -> None:
        """Stop watching; once this returns, no reload runs and no subscriber is called."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        with self._lock:  # waits for a reload in progress
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
        if self._previous_sighup is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None


def start_watcher(config: Config) -> ConfigWatcher | None:
    """Watch the config file, if there is one; the log level follows it."""
    if config.source is None:
        return None
    watcher = ConfigWatcher(config)
    watcher.subscribe(lambda new, _old: apply_level(new.logging))
    watcher.start()
    return watcher
