"""Running listeners: start-up, signals, readiness, hot reload hooks and the graceful drain.

Each part (the SMTP listeners, the API server, the worker) starts bound and
serving in background threads and stops with its own drain, so that ``serve
all`` runs them together in one process exactly as ``serve smtp``, ``serve
api`` and ``serve worker`` run them alone. SIGTERM (and SIGINT) stop
accepting; SMTP sessions and deliveries in progress get up to 30 seconds to
finish; the process exits 0. A second SIGTERM or SIGINT during that drain
stops at once (``StopSignals``) and the process exits 128 + the signal's
number (130 after Ctrl-C, 143 after SIGTERM). SIGHUP and edits of the config file re-read it
(``reload.ConfigWatcher``). Under systemd, READY=1 goes out once every socket
is bound, STOPPING=1 when the drain begins.
"""

from __future__ import annotations

import contextlib
import logging
import os
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop_signals() -> list[int]:
    """SIGTERM and SIGINT, but not one the process was started with ignored.

    A supervised child (``supervisor.py``) ignores SIGINT: Ctrl-C reaches the whole process
    group, and the child must count only what its parent forwards, or one Ctrl-C would be two.
    """
    return [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]


class StopSignals:
    """SIGTERM and SIGINT from now on: the first sets ``stop``, a second one hurries the drain.

    The handlers only write the signal's number to a pipe; a thread of this object's reads it
    and does the rest, so no lock is ever taken inside a signal handler. A second signal runs
    the ``on_hurry`` callbacks (SMTP sessions still in a transaction get 421 now, the worker
    gives its claims back) and sets ``exit_code`` to 128 + its number, the shell's convention
    for a process ended by a signal. Safe: every message answered 250 is already committed.

    Installed before READY=1 goes out: a stop that follows readiness at once
    must still drain, not meet Python's default action. ``stopped``: the first
    signal was already handled elsewhere (``run_api_server``); the next one hurries.
    """

    def __init__(self, *, stopped: bool = False) -> None:
        self.stop = threading.Event()
        if stopped:
            self.stop.set()
        self.exit_code = 0
        self._on_hurry: list[Callable[[], None]] = []
        self._read, self._write = os.pipe2(os.O_CLOEXEC)
        threading.Thread(target=self._watch, name="stop-signals", daemon=True).start()
        for signum in _stop_signals():
            signal.signal(signum, self._received)

    def on_hurry(self, callback: Callable[[], None]) -> None:
        self._on_hurry.append(callback)

    def _received(self, signum: int, _frame: Any) -> None:
        os.write(self._write, bytes([signum]))

    def _watch(self) -> None:
        while True:
            for signum in os.read(self._read, 64):
                if not self.stop.is_set():
                    self.stop.set()
                elif not self.exit_code:
                    self.exit_code = 128 + signum
                    log.warning(
                        f"second {signal.Signals(signum).name}: stopping now, without waiting for the drain",
                        extra={"event": "process.stopping_now", "signal": signal.Signals(signum).name},
                    )
                    for callback in self._on_hurry:
                        callback()

    def exit_if_hurried(self) -> None:
        """Raise SystemExit(128 + signal) once the drain is over, if a second signal cut it short."""
        if self.exit_code:
            raise SystemExit(self.exit_code)


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
        """Stop accepting; sessions in a transaction get up to ``DRAIN_SECONDS``, idle ones 421 now."""
        busy = sum(server.sessions_in_transaction() for server in self.servers)
        idle = sum(server.active_count for server in self.servers) - busy
        log.info(
            f"smtp draining: waiting up to {DRAIN_SECONDS:g} s for {_sessions(busy)} in a transaction to "
            f"finish; {_sessions(idle)} idle get 421 now (a second SIGINT or SIGTERM stops at once)",
            extra={
                "event": "smtp.draining",
                "seconds": DRAIN_SECONDS,
                "open_sessions": busy,
                "idle_sessions": max(idle, 0),
            },
        )
        drains = [threading.Thread(target=s.drain) for s in self.servers]
        for thread in drains:
            thread.start()
        for thread in drains + self.threads:
            thread.join()
        self.sending_limits.flush()  # the last messages' counts, not yet sent to a shared storage
        self.sessions.close()
        log.info("smtp stopped", extra={"event": "smtp.stopped"})

    def hurry(self) -> None:
        """End the drain now: the sessions still in a transaction get 421 (their clients retry)."""
        busy = sum(server.sessions_in_transaction() for server in self.servers)
        log.warning(
            f"smtp stopping now: {_sessions(busy)} still in a transaction get 421 4.3.2 and may retry; "
            "every message answered 250 is already committed",
            extra={"event": "smtp.stopping_now", "open_sessions": busy},
        )
        for server in self.servers:
            server.hurry()


def _sessions(count: int) -> str:
    return f"{count} open session{'' if count == 1 else 's'}"


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
    signals = StopSignals()
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
    signals.on_hurry(listeners.hurry)
    try:
        systemd.ready(f"smtp on port {config.smtp.port}")
        wait_for(signals.stop)
    finally:
        systemd.stopping()
        listeners.drain()
        if metrics is not None:
            metrics.shutdown()
    signals.exit_if_hurried()


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
    signals = StopSignals()
    worker = _worker(config, database, watcher)
    metrics = (
        start_metrics(config.delivery.metrics_port, config.delivery.metrics_host) if own_metrics else None
    )
    freeze_startup_objects()
    worker.start()
    signals.on_hurry(worker.hurry)
    try:
        systemd.ready(f"worker with {worker.delivery_thread_count} delivery threads")
        wait_for(signals.stop)
    finally:
        systemd.stopping()
        worker.stop()
        if metrics is not None:
            metrics.shutdown()
    signals.exit_if_hurried()


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


def run_api_server(
    server: Any,
    status: str,
    on_stop: Callable[[], None] = lambda: None,
    on_hurry: Callable[[], None] = lambda: None,
) -> None:
    """Announce readiness and serve in this (the main) thread until SIGTERM or SIGINT.

    ``on_stop`` runs as the drain begins, ``on_hurry`` if a second signal comes during it
    (the process then exits 128 + that signal's number). The first signal's handlers raise
    SystemExit, which waitress re-raises from any callback before it closes itself cleanly
    (another exception raised by a signal handler could be swallowed by the
    dispatcher that happened to be running); they are in place, and the
    ``try`` open, before READY=1 goes out.
    """
    for signum in _stop_signals():
        signal.signal(signum, _exit_cleanly)
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
        signals = StopSignals(stopped=True)
        signals.on_hurry(on_hurry)
        systemd.stopping()
        server.close()
        on_stop()
        signals.exit_if_hurried()


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

    def hurry() -> None:
        listeners.hurry()
        worker.hurry()

    run_api_server(
        server, f"smtp on port {config.smtp.port}, api on port {config.api.port}, worker", drain, hurry
    )
