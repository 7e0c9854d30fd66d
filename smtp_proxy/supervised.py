"""``serve`` as several processes: the sockets bound in the parent, the children's setup, one metrics view.

Used when ``smtp.processes`` or ``api.processes`` is above 1 (``supervisor.py``
runs the processes). The parent checks what would stop every child alike (the
encryption key, the certificate, the ports) before it forks, so that a mistake
is one line and exit code 2 or 1 as with one process, not children dying in a loop.

Metrics: prometheus_client's multiprocess mode. Every process writes its samples to
files in one directory (made empty at start; ``PROMETHEUS_MULTIPROC_DIR`` when the
operator names one, else a new temporary directory removed at exit), and whichever
process answers a scrape sums them all. The mode is chosen when prometheus_client
is first imported, so ``serve_supervised`` sets it up before importing anything
that defines a metric.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from smtp_proxy.config import Config

if TYPE_CHECKING:
    from smtp_proxy.reload import ConfigWatcher
    from smtp_proxy.smtp.tls import TlsContextHolder

log = logging.getLogger("smtp_proxy.supervised")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The kernel's accept queue of each listening socket, which every process shares.
BACKLOG = 1024


@dataclass
class Listening:
    """Sockets a supervising parent bound, which each child serves instead of binding its own."""

    smtp: dict[int, socket.socket] = field(default_factory=dict)
    api: socket.socket | None = None
    metrics: socket.socket | None = None
    tls: TlsContextHolder | None = None

    def close(self) -> None:
        for sock in [*self.smtp.values(), self.api, self.metrics]:
            if sock is not None:
                sock.close()

    def keep_only(self, role: str) -> None:
        """In a child: close the other roles' sockets, so that a port closes when its own
        processes stop serving it (an API process must not keep the SMTP port open)."""
        if role != "smtp":
            for sock in [*self.smtp.values(), self.metrics]:
                if sock is not None:
                    sock.close()
        if role != "api" and self.api is not None:
            self.api.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound and listening; OSError names the address (``lifecycle.binding``)."""
    from smtp_proxy.lifecycle import binding

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with binding(host, port):
        return socket.create_server((host, port), family=family, backlog=BACKLOG)


def prepare_metrics_directory() -> tuple[Path, bool]:
    """The multiprocess directory (set in the environment for every process), emptied, and
    whether it is ours to remove at exit."""
    named = os.environ.get(MULTIPROC_ENV)
    if named:
        path = Path(named)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # a previous run's samples would be summed in
            stale.unlink()
        return path, False
    path = Path(tempfile.mkdtemp(prefix="smtp-proxy-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    return path, True


def multiprocess_registry() -> Any:
    """A registry that reads every process's samples (counters summed; gauges per their mode)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Scrapes are not logged (one line every few seconds, per scraper)."""


def serve_metrics_socket(sock: socket.socket, registry: Any) -> Any:
    """Serve ``/metrics`` on an inherited socket in a thread; ``shutdown()`` stops it."""
    from prometheus_client import make_wsgi_app

    server = _MetricsServer(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
    server.socket.close()
    sock.setblocking(False)  # another process may take the scrape that woke this one
    server.socket = sock
    server.server_name, server.server_port = "metrics", sock.getsockname()[1]
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _current(config: Config) -> Config:
    """The config file as it is now, but for the keys that take a restart, which stay as the
    other processes have them; the given config if the file cannot be read (logged)."""
    from smtp_proxy.config import load_config
    from smtp_proxy.errors import ConfigError
    from smtp_proxy.reload import keeping_restart_keys

    if config.source is None:
        return config
    try:
        return keeping_restart_keys(load_config(config.source), config)
    except ConfigError as error:
        log.error(
            "config file unreadable; starting with the one read at start",
            extra={"event": "config.reload_failed", "config_key": error.key, "problem": error.problem},
        )
        return config


def _child(
    initial: Config,
    role: str,
    listening: Listening,
    serve: Callable[[Config, Any, ConfigWatcher | None], None],
) -> Callable[[bool], int]:
    """A child's life: its own logging thread, config watcher and database, then ``serve``.

    A replacement for a child that died reads the config file and the certificate
    again: they may have changed (and been reloaded by the others) since the parent
    read them at start.
    """

    def run(replacement: bool) -> int:
        from smtp_proxy.db.session import Database
        from smtp_proxy.logs import configure_logging
        from smtp_proxy.reload import start_watcher

        listening.keep_only(role)
        config = _current(initial) if replacement else initial
        if replacement and listening.tls is not None:
            listening.tls.reload(config.tls)
        configure_logging(config.logging, background=True)
        watcher = start_watcher(config)
        database = Database(config.database)
        try:
            serve(config, database, watcher)
        finally:
            if watcher is not None:
                watcher.stop()
            database.dispose()
        return 0

    return run


def serve_supervised(command: str, config: Config, create_app: Callable[[Config, Any], Any]) -> int:
    """``serve smtp|api|all`` in several processes until SIGTERM; the exit code.

    Raises ConfigError (a missing key, an unusable certificate) and OSError (a port
    that cannot be bound) before any child starts.
    """
    metrics_dir, ours = prepare_metrics_directory()
    try:
        return _supervise(command, config, create_app)
    finally:
        if ours:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(command: str, config: Config, create_app: Callable[[Config, Any], Any]) -> int:
    # Imported only now: the multiprocess mode is fixed when prometheus_client is first imported.
    from prometheus_client import multiprocess

    from smtp_proxy import lifecycle
    from smtp_proxy.crypto import Cipher
    from smtp_proxy.memory import freeze_startup_objects
    from smtp_proxy.smtp.tls import TlsContextHolder
    from smtp_proxy.supervisor import Role, Supervisor

    Cipher.from_config(config.security)  # no key: one line and exit 2, here rather than in each child
    smtp, api = config.smtp, config.api
    listening = Listening()
    roles: list[Role] = []
    try:
        if command in ("smtp", "all"):
            listening.tls = TlsContextHolder(config.tls)
            ports = [smtp.port] + ([smtp.implicit_tls_port] if smtp.implicit_tls_port else [])
            listening.smtp = {port: listening_socket(smtp.host, port) for port in ports}
            if smtp.metrics_port:
                listening.metrics = listening_socket(smtp.host, smtp.metrics_port)
            roles.append(
                Role(
                    "smtp",
                    smtp.processes,
                    _child(
                        config, "smtp", listening, lambda c, d, w: lifecycle.serve_smtp(c, d, w, listening)
                    ),
                )
            )
        if command in ("api", "all"):
            listening.api = listening_socket(api.host, api.port)
            roles.append(
                Role(
                    "api",
                    api.processes,
                    _child(
                        config,
                        "api",
                        listening,
                        lambda c, d, w: lifecycle.serve_api(c, create_app(c, d), d, listening),
                    ),
                )
            )
        if command == "all":
            roles.append(
                Role(
                    "worker",
                    1,
                    _child(
                        config,
                        "worker",
                        listening,
                        lambda c, d, w: lifecycle.serve_worker(c, d, w, own_metrics=False),
                    ),
                )
            )
    except BaseException:
        listening.close()
        raise
    counts = ", ".join(f"{role.name} {role.count}" for role in roles)
    status = f"{command}: processes {counts}"
    log.info(
        "starting processes",
        extra={"event": "supervisor.starting", "processes": {r.name: r.count for r in roles}},
    )
    if command in ("smtp", "all") and config.limits.storage.startswith("memory://"):
        log.warning(
            "limits.storage is memory://: each process counts sending limits, AUTH failures and "
            "sessions per account on its own; use redis:// to count them across processes",
            extra={"event": "supervisor.counters_per_process"},
        )
    freeze_startup_objects()  # what the parent built is shared with every child, copy on write
    # On SIGTERM the parent lets go of the ports at once: once the children have closed
    # theirs too, a new client is refused instead of waiting in a queue nobody accepts from.
    supervisor = Supervisor(
        roles, status, on_child_exit=multiprocess.mark_process_dead, on_stop=listening.close
    )
    try:
        return supervisor.run()
    finally:
        listening.close()
