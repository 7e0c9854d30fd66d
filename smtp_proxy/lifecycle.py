"""Running listeners: start-up, signals, hot reload hooks and the graceful drain.

SIGTERM (and SIGINT) stop accepting; sessions in progress get up to
``DRAIN_SECONDS`` to finish, then 421 and close; the process exits 0. SIGHUP
and edits of the config file re-read it (``reload.ConfigWatcher``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from prometheus_client import start_http_server

from smtp_proxy.config import Config
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.memory import FreeMemoryReleaser, freeze_startup_objects, limit_arenas
from smtp_proxy.reload import ConfigWatcher
from smtp_proxy.smtp.credentials import AuthThrottle, CredentialVerifier
from smtp_proxy.smtp.server import DRAIN_SECONDS, SESSION_THREAD_STACK, SmtpServer
from smtp_proxy.smtp.tls import TlsContextHolder

log = logging.getLogger("smtp_proxy.lifecycle")


def wait_for_stop_signal() -> None:
    """Block the main thread until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _sig, _frame: stop.set())
    while not stop.wait(0.5):
        pass


# Session threads spend their time in poll(); malloc traffic is light and mostly
# under the GIL, so two arenas cost no contention and keep bursts from spreading.
SESSION_MALLOC_ARENAS = 2


def serve_smtp(config: Config, database: Database, watcher: ConfigWatcher | None) -> None:
    """Run the submission listener (and the implicit-TLS one, if configured) until SIGTERM.

    Raises ConfigError for a missing encryption key or an unusable certificate,
    and OSError when a port cannot be bound.
    """
    cipher = Cipher.from_config(config.security)
    tls = TlsContextHolder(config.tls)
    current: Callable[[], Config] = (lambda: watcher.config) if watcher else (lambda: config)
    if watcher is not None:
        # Also on SIGHUP with an unchanged file: the certificate files may have been renewed.
        watcher.subscribe(lambda new, _old: tls.reload(new.tls))
    threading.stack_size(SESSION_THREAD_STACK)
    limit_arenas(SESSION_MALLOC_ARENAS)
    release_memory = FreeMemoryReleaser()
    verifier = CredentialVerifier(database, dummy_cost=config.security.bcrypt_cost)
    throttle = AuthThrottle()
    smtp = config.smtp
    ports = [(smtp.port, False)] + ([(smtp.implicit_tls_port, True)] if smtp.implicit_tls_port else [])
    servers: list[SmtpServer] = []
    try:
        for port, implicit in ports:
            servers.append(
                SmtpServer(
                    (smtp.host, port),
                    config=current,
                    database=database,
                    cipher=cipher,
                    verifier=verifier,
                    throttle=throttle,
                    tls=tls,
                    implicit_tls=implicit,
                    on_quiet=release_memory,
                )
            )
    except OSError:
        for server in servers:
            server.server_close()
        raise
    metrics_server = None
    if smtp.metrics_port:
        metrics_server, _thread = start_http_server(smtp.metrics_port, addr=smtp.host)
    freeze_startup_objects()
    threads = [threading.Thread(target=s.serve_forever, name="smtp-accept") for s in servers]
    for thread in threads:
        thread.start()
    for server in servers:
        log.info(
            "smtp listening",
            extra={
                "event": "smtp.listening",
                "host": server.server_address[0],
                "port": server.server_address[1],
                "implicit_tls": server.implicit_tls,
            },
        )
    try:
        wait_for_stop_signal()
    finally:
        log.info("smtp draining", extra={"event": "smtp.draining", "seconds": DRAIN_SECONDS})
        drains = [threading.Thread(target=s.drain) for s in servers]
        for thread in drains:
            thread.start()
        for thread in drains + threads:
            thread.join()
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("smtp stopped", extra={"event": "smtp.stopped"})


def serve_worker(config: Config, database: Database, watcher: ConfigWatcher | None) -> None:
    """Run the queue worker until SIGTERM, then drain (``delivery.worker.DRAIN_SECONDS``).

    Raises ConfigError for a missing encryption key, OSError when the metrics
    port cannot be bound.
    """
    from smtp_proxy.delivery.worker import DRAIN_SECONDS as WORKER_DRAIN_SECONDS
    from smtp_proxy.delivery.worker import Worker

    cipher = Cipher.from_config(config.security)
    current: Callable[[], Config] = (lambda: watcher.config) if watcher else (lambda: config)
    delivery = config.delivery
    metrics_server = None
    if delivery.metrics_port:
        metrics_server, _thread = start_http_server(delivery.metrics_port, addr=delivery.metrics_host)
    worker = Worker(current, database, cipher)
    freeze_startup_objects()
    worker.start()
    try:
        wait_for_stop_signal()
    finally:
        log.info("worker draining", extra={"event": "worker.draining", "seconds": WORKER_DRAIN_SECONDS})
        worker.stop(WORKER_DRAIN_SECONDS)
        if metrics_server is not None:
            metrics_server.shutdown()
