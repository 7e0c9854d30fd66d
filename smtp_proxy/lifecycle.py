"""Running listeners: start-up, signals, readiness, hot reload hooks and the graceful drain.

Each part (the SMTP listeners, the API server, the worker) starts bound and
serving in background threads and stops with its own drain, so that ``serve
all`` runs them together in one process exactly as ``serve smtp``, ``serve
api`` and ``serve worker`` run them alone. SIGTERM (and SIGINT) stop
accepting; SMTP sessions and deliveries in progress get up to 30 seconds to
finish; the process exits 0. SIGHUP and edits of the config file re-read it
(``reload.ConfigWatcher``). Under systemd, READY=1 goes out once every socket
is bound, STOPPING=1 when the drain begins.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from limits.storage import RedisStorage, Storage
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from smtp_proxy import systemd
from smtp_proxy.config import Config
from smtp_proxy.counters import open_storage
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.memory import FreeMemoryReleaser, freeze_startup_objects, limit_arenas
from smtp_proxy.reload import ConfigWatcher
from smtp_proxy.sending_limits import SendingLimits
from smtp_proxy.smtp.account_sessions import AccountSessions, SharedAccountSessions
from smtp_proxy.smtp.account_state import AccountStates, MailPolicy
from smtp_proxy.smtp.budget import InFlightBudget
from smtp_proxy.smtp.credentials import AuthThrottle, CredentialVerifier
from smtp_proxy.smtp.relay import RelayNetworks
from smtp_proxy.smtp.server import DRAIN_SECONDS, SESSION_THREAD_STACK, SmtpServer
from smtp_proxy.smtp.tls import TlsContextHolder
from smtp_proxy.supervised import Listening, multiprocess_registry, serve_metrics_socket

log = logging.getLogger("smtp_proxy.lifecycle")


def stop_signal() -> threading.Event:
    """An event that SIGTERM or SIGINT sets, from now on.

    Installed before READY=1 goes out: a stop that follows readiness at once
    must still drain, not meet Python's default action.
    """
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _sig, _frame: stop.set())
    return stop


def wait_for(stop: threading.Event) -> None:
    """Block the main thread until ``stop`` is set (short waits, so signal handlers run)."""
    while not stop.wait(0.5):
        pass


def _current(config: Config, watcher: ConfigWatcher | None) -> Callable[[], Config]:
    return (lambda: watcher.config) if watcher else (lambda: config)


@contextlib.contextmanager
def binding(host: str, port: int) -> Iterator[None]:
    """Name the address in a bind error (``OSError.filename``), so the operator reads which port failed."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), f"{host}:{port}") from exc


# Session threads spend their time in poll(); malloc traffic is light and mostly
# under the GIL, so two arenas cost no contention and keep bursts from spreading.
SESSION_MALLOC_ARENAS = 2


class SmtpListeners:
    """The submission listener (and the implicit-TLS one, if configured), accepting in threads."""

    def __init__(
        self,
        config: Config,
        database: Database,
        watcher: ConfigWatcher | None,
        counters: Storage | None = None,
        *,
        listening: Mapping[int, socket.socket] | None = None,
        tls: TlsContextHolder | None = None,
    ) -> None:
        """Bind every port. Raises ConfigError for a missing key or an unusable certificate, OSError.

        ``counters``: the process's counter storage when another part of it (``serve all``'s
        API) already opened one, so that memory:// counts are the same for both.
        ``listening``: sockets by port, bound by a supervising parent, served instead of
        binding; ``tls``: the parent's certificate holder (its session ticket keys are then
        the same in every child, so a client resumes whichever child it reaches).
        """
        cipher = Cipher.from_config(config.security)
        tls = tls or TlsContextHolder(config.tls)
        if watcher is not None:
            # Also on SIGHUP with an unchanged file: the certificate files may have been renewed.
            watcher.subscribe(lambda new, _old: tls.reload(new.tls))
        threading.stack_size(SESSION_THREAD_STACK)
        limit_arenas(SESSION_MALLOC_ARENAS)
        release_memory = FreeMemoryReleaser()
        verifier = CredentialVerifier(database, dummy_cost=config.security.bcrypt_cost)
        # One storage for the process: the sending limits and the AUTH counters, shared with
        # every other instance when it is Redis (limits.storage needs a restart to change).
        if counters is None:
            counters = open_storage(config.limits.storage)
        _log_counters(config.limits.storage)
        smtp = config.smtp
        throttle = AuthThrottle(
            counters,
            per_ip=smtp.auth_failures_per_ip,
            per_user=smtp.auth_failures_per_user,
            window=smtp.auth_failure_window,
        )
        if watcher is not None:
            watcher.subscribe(
                lambda new, _old: throttle.configure(
                    per_ip=new.smtp.auth_failures_per_ip,
                    per_user=new.smtp.auth_failures_per_user,
                    window=new.smtp.auth_failure_window,
                )
            )
        self.sending_limits = SendingLimits(counters)
        mail_policy = MailPolicy(AccountStates(database), self.sending_limits)
        # Both ports draw on one budget: it bounds the process's memory, not a port's;
        # and an account's sessions are counted over both.
        data_budget = InFlightBudget(smtp.max_data_in_flight)
        self.sessions = (
            SharedAccountSessions(counters.storage)
            if isinstance(counters, RedisStorage)
            else AccountSessions()
        )
        if watcher is not None:
            watcher.subscribe(self._resize_budget)
        relay = RelayNetworks(database)
        ports = [(smtp.port, False)] + ([(smtp.implicit_tls_port, True)] if smtp.implicit_tls_port else [])
        self.servers: list[SmtpServer] = []
        try:
            for port, implicit in ports:
                with binding(smtp.host, port):
                    server = SmtpServer(
                        (smtp.host, port),
                        config=_current(config, watcher),
                        database=database,
                        cipher=cipher,
                        verifier=verifier,
                        throttle=throttle,
                        tls=tls,
                        implicit_tls=implicit,
                        on_quiet=release_memory,
                        mail_policy=mail_policy,
                        data_budget=data_budget,
                        sessions=self.sessions,
                        listening=(listening or {}).get(port),
                        relay=relay,
                    )
                self.servers.append(server)
        except OSError:
            for server in self.servers:
                server.server_close()
            self.sessions.close()
            raise
        self.threads: list[threading.Thread] = []

    def _resize_budget(self, new: Config, old: Config) -> None:
        """A new max_data_in_flight applies to the one budget every session shares, bytes held included."""
        if new.smtp.max_data_in_flight != old.smtp.max_data_in_flight:
            for server in self.servers:
                server.data_budget.limit = new.smtp.max_data_in_flight

    def start(self) -> None:
        self.threads = [threading.Thread(target=s.serve_forever, name="smtp-accept") for s in self.servers]
        for thread in self.threads:
            thread.start()
        for server in self.servers:
            log.info(
                "smtp listening",
                extra={
                    "event": "smtp.listening",
                    "host": server.server_address[0],
                    "port": server.server_address[1],
                    "implicit_tls": server.implicit_tls,
                },
            )

    def drain(self) -> None:
        """Stop accepting; sessions in progress get up to ``DRAIN_SECONDS``."""
        log.info("smtp draining", extra={"event": "smtp.draining", "seconds": DRAIN_SECONDS})
        drains = [threading.Thread(target=s.drain) for s in self.servers]
        for thread in drains:
            thread.start()
        for thread in drains + self.threads:
            thread.join()
        self.sending_limits.flush()  # the last messages' counts, not yet sent to a shared storage
        self.sessions.close()
        log.info("smtp stopped", extra={"event": "smtp.stopped"})


def _log_counters(uri: str) -> None:
    """One line at start-up: where the sending-limit and AUTH counters live (no password)."""
    parts = urllib.parse.urlsplit(uri)
    where = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl() if "@" in parts.netloc else uri
    shared = parts.scheme != "memory"
    message = (
        "smtp counters shared: sending limits and AUTH failures are counted in limits.storage"
        if shared
        else "smtp counters in memory://: sending limits and AUTH failures are counted per process"
    )
    log.info(message, extra={"event": "smtp.counters", "storage": where, "shared": shared})


def start_metrics(
    port: int | None,
    host: str,
    registry: CollectorRegistry = REGISTRY,
    listening: socket.socket | None = None,
) -> Any:
    """The Prometheus endpoint on its own port, or None when the port is not configured.

    ``listening``: the endpoint's socket, bound by a supervising parent; every process
    serves it, and each answers with the sum over all (``multiprocess_registry``).
    """
    if listening is not None:
        return serve_metrics_socket(listening, multiprocess_registry())
    if not port:
        return None
    with binding(host, port):
        server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def serve_smtp(
    config: Config,
    database: Database,
    watcher: ConfigWatcher | None,
    listening: Listening | None = None,
) -> None:
    """Run the submission listener(s) until SIGTERM, then drain.

    Raises ConfigError for a missing encryption key or an unusable certificate,
    and OSError when a port cannot be bound. ``listening``: the sockets (and the
    certificate holder) of a supervising parent, in a child process.
    """
    stop = stop_signal()
    listening = listening or Listening()
    listeners = SmtpListeners(config, database, watcher, listening=listening.smtp, tls=listening.tls)
    try:
        metrics = start_metrics(config.smtp.metrics_port, config.smtp.host, listening=listening.metrics)
    except OSError:
        for server in listeners.servers:
            server.server_close()
        raise
    freeze_startup_objects()
    listeners.start()
    try:
        systemd.ready(f"smtp on port {config.smtp.port}")
        wait_for(stop)
    finally:
        systemd.stopping()
        listeners.drain()
        if metrics is not None:
            metrics.shutdown()


def _worker(config: Config, database: Database, watcher: ConfigWatcher | None) -> Any:
    from smtp_proxy.delivery.worker import Worker

    return Worker(_current(config, watcher), database, Cipher.from_config(config.security))


def serve_worker(
    config: Config, database: Database, watcher: ConfigWatcher | None, *, own_metrics: bool = True
) -> None:
    """Run the queue worker until SIGTERM, then drain (``delivery.worker.DRAIN_SECONDS``).

    Raises ConfigError for a missing encryption key, OSError when the metrics
    port cannot be bound. ``own_metrics=False``: the worker of a supervised
    ``serve all``, whose samples the SMTP processes' endpoint shows.
    """
    stop = stop_signal()
    worker = _worker(config, database, watcher)
    metrics = (
        start_metrics(config.delivery.metrics_port, config.delivery.metrics_host) if own_metrics else None
    )
    freeze_startup_objects()
    worker.start()
    try:
        systemd.ready(f"worker with {worker.delivery_thread_count} delivery threads")
        wait_for(stop)
    finally:
        systemd.stopping()
        log.info("worker draining", extra={"event": "worker.draining"})
        worker.stop()
        if metrics is not None:
            metrics.shutdown()


def create_api_server(config: Config, app: Any, listening: socket.socket | None = None) -> Any:
    """The API's waitress server, bound (its worker threads started); ``run()`` serves it.

    ``listening``: a socket bound by a supervising parent, served instead of binding.
    """
    import waitress

    from smtp_proxy.api import client_address

    where: dict[str, Any] = (
        {"sockets": [listening]}
        if listening is not None
        else {"host": config.api.host, "port": config.api.port}
    )
    socket_map: dict[int, Any] = {}
    with binding(config.api.host, config.api.port):
        server = waitress.create_server(
            app,
            map=socket_map,
            **where,
            threads=config.api.threads,
            channel_timeout=int(max(config.api.read_timeout, 1)),
            ident="smtp-proxy",
            # waitress drops X-Forwarded-* unless its own trusted_proxy (one address) is set;
            # api.trusted_proxies (networks) is judged by the app's ForwardedFor instead.
            clear_untrusted_proxy_headers=not config.api.trusted_proxies,
        )
    # Each connection's client: a trusted balancer's PROXY header names it (api.proxy_protocol_from).
    client_address.install(socket_map, config.api.proxy_protocol_from, config.api.read_timeout)
    return server


def serve_api(config: Config, app: Any, database: Database, listening: Listening | None = None) -> None:
    """Run the API until SIGTERM or SIGINT, then finish the requests in progress."""
    from smtp_proxy import gil

    server = create_api_server(config, app, listening.api if listening else None)
    database.warm(autocommit=True)  # API keys and every GET read there
    freeze_startup_objects()
    gil.PACING.set_base(gil.API_INTERVAL)  # waitress's I/O thread gets the GIL back sooner
    run_api_server(server, f"api on port {config.api.port}")


def _exit_cleanly(_sig: int, _frame: Any) -> None:
    raise SystemExit(0)


def run_api_server(server: Any, status: str, on_stop: Callable[[], None] = lambda: None) -> None:
    """Announce readiness and serve in this (the main) thread until SIGTERM or SIGINT.

    ``on_stop`` runs as the drain begins. The handlers raise SystemExit, which
    waitress re-raises from any callback before it closes itself cleanly
    (another exception raised by a signal handler could be swallowed by the
    dispatcher that happened to be running); they are in place, and the
    ``try`` open, before READY=1 goes out.
    """
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    try:
        log.info(
            "api listening",
            extra={
                "event": "api.listening",
                "host": server.effective_host,
                "port": int(server.effective_port),
            },
        )
        systemd.ready(status)
        server.run()
    finally:
        systemd.stopping()
        server.close()
        on_stop()


def serve_all(config: Config, database: Database, watcher: ConfigWatcher | None, app: Any) -> None:
    """SMTP, API and worker in this one process, with one metrics endpoint, until SIGTERM.

    The metrics endpoint (``smtp.metrics_port``) carries the listener's, the
    worker's and the API's collectors; ``delivery.metrics_port`` is not used.
    Raises ConfigError or OSError like the parts do.
    """
    # The API's and the worker's threads start before the SMTP listener shrinks
    # the stack of every thread started after it (its sessions').
    server = create_api_server(config, app)
    worker = _worker(config, database, watcher)
    try:
        # One counter storage for the process: the usage endpoint sees the listener's counts.
        counters = app.extensions["smtp_proxy.sending_limits"].storage
        listeners = SmtpListeners(config, database, watcher, counters)
    except BaseException:
        server.close()
        raise
    try:
        REGISTRY.register(app.extensions["smtp_proxy.metrics_registry"])
        metrics = start_metrics(config.smtp.metrics_port, config.smtp.host)
    except BaseException:
        server.close()
        for smtp_server in listeners.servers:
            smtp_server.server_close()
        raise
    freeze_startup_objects()
    # The default switch interval, not `serve api`'s shorter one: with SMTP sessions and deliveries in
    # the same process, the shorter interval cuts SMTP throughput (bench_smtp.py --listener all) far
    # more than it would gain the API.
    worker.start()
    listeners.start()

    def drain() -> None:
        parts = [threading.Thread(target=listeners.drain), threading.Thread(target=worker.stop)]
        for part in parts:
            part.start()
        for part in parts:
            part.join()
        if metrics is not None:
            metrics.shutdown()

    run_api_server(server, f"smtp on port {config.smtp.port}, api on port {config.api.port}, worker", drain)
