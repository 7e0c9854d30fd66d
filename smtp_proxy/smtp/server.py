"""The socket adapter around the protocol core: one thread per connection.

This is the only module of the listener that touches sockets. It moves bytes
between the client and the core, runs the TLS handshake the core asks for, and
hands the core's other events to their owners: AUTH to ``authenticator``, MAIL
FROM and the end of DATA to ``intake`` (whose commit happens before the 250).
It reads with raw ``recv`` (``BaseRequestHandler``, not the buffered
``StreamRequestHandler``), so no hidden buffer can carry plaintext across
STARTTLS. A session's outcome (metrics, the close line) is the core's
``close_reason`` when the core closed it, else what ended it here.

Limits follow the live config (hot reload): every check reads
``server.config``. Over ``smtp.max_connections`` (or
``smtp.max_connections_per_ip`` from one address) a connection is answered
421 in ``verify_request`` on the accept thread and closed, so it never costs
a session thread. A connection from a trusted load balancer
(``smtp.proxy_protocol_from``) must open with a PROXY protocol header: its
session thread reads exactly that header, within ``smtp.proxy_protocol_timeout``,
before the greeting, and the client it names becomes ``client_ip`` (and only then
is counted against ``max_connections_per_ip``), so the AUTH throttle, the logs
and the Received: field all see the real client. Anyone else who sends such a
header is refused: it could name any address. The session's clocks live here too: a session not
authenticated within ``smtp.auth_timeout`` is closed whatever it sends, and
any session is closed once idle after ``smtp.max_session_time``.
"""

from __future__ import annotations

import _thread
import logging
import os
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from smtp_proxy import gil, proxy_protocol
from smtp_proxy.config import Config
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.logs import new_correlation_id, set_correlation_id
from smtp_proxy.smtp import metrics
from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.account_sessions import AccountSessions
from smtp_proxy.smtp.account_state import MailPolicy
from smtp_proxy.smtp.authenticator import Authenticator
from smtp_proxy.smtp.budget import InFlightBudget
from smtp_proxy.smtp.credentials import AuthenticatedAccount, AuthThrottle, CredentialVerifier
from smtp_proxy.smtp.intake import Intake
from smtp_proxy.smtp.protocol import (
    CredentialsOffered,
    MailFromOffered,
    MessageReceived,
    MessageRejected,
    Output,
    RelayGrant,
    SessionPolicy,
    SmtpSession,
    TlsRequested,
)
from smtp_proxy.smtp.relay import RelayNetworks
from smtp_proxy.smtp.replies import Reply
from smtp_proxy.smtp.tls import TlsContextHolder

log = logging.getLogger("smtp_proxy.smtp")

# Session threads do little but wait in recv(); a small stack lets thousands fit.
SESSION_THREAD_STACK = 512 * 1024
RECV_SIZE = 65536
DRAIN_SECONDS = 30.0
# Past max_session_time a transaction may still finish, for at most this long: a client
# keeping one open with NOOPs, or trickling its DATA, cannot hold the session forever.
SESSION_GRACE = 300.0
UNCAPPED = 2**31 - 1  # a session slot limit that always lets a session take its slot back


class SmtpServer(socketserver.ThreadingTCPServer):
    """``socketserver`` with a connection cap, live config and a graceful drain."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        *,
        config: Callable[[], Config],
        database: Database,
        cipher: Cipher,
        verifier: CredentialVerifier,
        throttle: AuthThrottle,
        tls: TlsContextHolder | None,
        implicit_tls: bool = False,
        on_quiet: Callable[[], object] | None = None,
        mail_policy: MailPolicy | None = None,
        data_budget: InFlightBudget | None = None,
        sessions: AccountSessions | None = None,
        listening: socket.socket | None = None,
        relay: RelayNetworks | None = None,
    ) -> None:
        """``mail_policy``, ``data_budget`` and ``sessions`` are shared by every listener of a
        process (``lifecycle.SmtpListeners``); without them, the intake makes its own policy and
        this server its own budget and session counts. ``verifier`` and ``throttle`` go to the
        ``Authenticator``. ``listening``: a socket already bound and listening (inherited from
        a supervising parent, ``supervisor.py``) to serve instead of binding ``address``.
        ``relay``: the relay networks, shared by every listener of a process (else its own)."""
        self._config = config
        self._on_quiet = on_quiet
        self.database = database
        self.authenticator = Authenticator(verifier, throttle, config, sessions)
        self.intake = Intake(database, cipher, config, mail_policy)
        self.relay = relay if relay is not None else RelayNetworks(database)
        if data_budget is None:
            data_budget = InFlightBudget(config().smtp.max_data_in_flight)
        self.data_budget = data_budget
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.draining = threading.Event()
        self._lock = threading.Lock()
        self._active: set[SessionHandler] = set()
        self._pending = 0  # accepted, thread not yet registered
        self._per_ip: dict[str, int] = {}  # open connections (pending or active) per client address
        # Descriptors of connections from trusted balancers, accepted and not yet taken by their
        # session: their client's address is only known once the session has read the header.
        self._awaiting_header: set[int] = set()
        self._policies: tuple[Config, dict[bool, SessionPolicy]] | None = None
        # Session threads wait in poll() on their socket and these pipes, so a drain can
        # wake them without touching a TLS connection from another thread.
        self.drain_fd, self._drain_w = os.pipe()
        self.force_fd, self._force_w = os.pipe()
        self._drain_once = threading.Lock()
        self._hurried = threading.Event()
        super().__init__(address, SessionHandler, bind_and_activate=listening is None)
        if listening is not None:
            self.socket.close()
            # Non-blocking: another process may accept the connection that woke this one.
            listening.setblocking(False)
            self.socket = listening
            self.server_address = listening.getsockname()

    @property
    def config(self) -> Config:
        return self._config()

    @property
    def active_count(self) -> int:
        with self._lock:
            return len(self._active) + self._pending

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """On the accept thread: over a limit, 421 at once and no session thread."""
        smtp = self.config.smtp
        ip = str(client_address[0])
        # A balancer's connections are counted per client once the session has read its header.
        proxied = proxy_protocol.is_trusted(ip, smtp.proxy_protocol_from)
        with self._lock:
            over = len(self._active) + self._pending >= smtp.max_connections
            from_ip = self._per_ip.get(ip, 0)
            cap = smtp.max_connections_per_ip
            over_ip = not proxied and bool(cap) and from_ip >= cap
            draining = self.draining.is_set()
            if not over and not over_ip and not draining:
                self._pending += 1
                if proxied:
                    self._awaiting_header.add(request.fileno())
                else:
                    self._per_ip[ip] = from_ip + 1
                return True
        if draining:
            reply, outcome = R.R421_SHUTTING_DOWN, "refused_draining"
        elif over:
            reply, outcome = R.R421_TOO_MANY_CONNECTIONS, "refused_limit"
        else:
            reply, outcome = R.R421_TOO_MANY_FROM_IP, "refused_per_ip"
            metrics.LIMIT_REJECTIONS.labels("per_ip").inc()
        if not self.implicit_tls:  # a TLS client would not understand plaintext
            try:
                request.setblocking(False)
                request.send(reply.to_bytes())
            except OSError:
                pass
        metrics.SESSIONS.labels(outcome).inc()
        _log_refused(ip, reply, outcome)
        return False

    def admit(self, handler: SessionHandler, ip: str) -> bool:
        """Count a balancer's client under ``max_connections_per_ip``, once its header named it."""
        cap = self.config.smtp.max_connections_per_ip
        with self._lock:
            count = self._per_ip.get(ip, 0)
            if cap and count >= cap:
                return False
            self._per_ip[ip] = count + 1
            handler.counted_ip = ip
        return True

    def _release_ip(self, ip: str) -> None:
        """The caller holds the lock."""
        count = self._per_ip.get(ip, 0) - 1
        if count > 0:
            self._per_ip[ip] = count
        else:
            self._per_ip.pop(ip, None)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the session thread with ``_thread``, not ``threading.Thread``.

        A ``Thread`` object (its Event, Condition and excepthook closure) adds
        to what every idle connection costs, and ``Thread.start()`` blocks the
        accept loop until the new thread runs. Session threads are daemonic
        either way and are counted in ``_active``, never joined.
        """
        try:
            _thread.start_new_thread(self.process_request_thread, (request, client_address))
        except RuntimeError:  # no thread could be started: give the slot back
            with self._lock:
                self._pending -= 1
                if request.fileno() in self._awaiting_header:
                    self._awaiting_header.discard(request.fileno())
                else:
                    self._release_ip(str(client_address[0]))
            raise

    def register(self, handler: SessionHandler) -> bool:
        """Count the session as active; True when it comes from a trusted balancer."""
        fd = handler.request.fileno()
        with self._lock:
            self._pending -= 1
            self._active.add(handler)
            proxied = fd in self._awaiting_header
            self._awaiting_header.discard(fd)
        gil.PACING.started()
        return proxied

    def unregister(self, handler: SessionHandler) -> None:
        with self._lock:
            self._active.discard(handler)
            if handler.counted_ip is not None:
                self._release_ip(handler.counted_ip)
            quiet = not self._active and not self._pending
        gil.PACING.ended()
        if quiet and self._on_quiet is not None:
            self._on_quiet()  # e.g. hand the memory a burst freed back to the kernel

    def policy(self, tls_active: bool) -> SessionPolicy:
        """The session policy under the live config, shared by all sessions until it changes."""
        config = self.config
        cached = self._policies
        if cached is None or cached[0] is not config:
            smtp = config.smtp
            cached = self._policies = (
                config,
                {
                    active: SessionPolicy(
                        hostname=smtp.hostname,
                        max_message_size=smtp.max_message_size,
                        max_recipients=smtp.max_recipients,
                        tls_available=self.tls is not None,
                        tls_active=active,
                    )
                    for active in (False, True)
                },
            )
        return cached[1][tls_active]

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unhandled error in SMTP session", extra={"event": "smtp.session_error"})

    def sessions_in_transaction(self) -> int:
        """The sessions a drain waits for: those not idle (``SessionHandler.idle``)."""
        with self._lock:
            return sum(1 for handler in self._active if not handler.idle)

    def hurry(self) -> None:
        """Cut a drain short: the sessions still open get 421 now instead of at its timeout."""
        self._hurried.set()

    def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Stop accepting; idle sessions get 421 now, busy ones up to ``timeout`` seconds.

        Once only: the pipes are closed by number at the end, and a second close could hit a
        descriptor number that the process has handed out again since.
        """
        if not self._drain_once.acquire(blocking=False):
            return
        self.draining.set()
        self.shutdown()
        self.server_close()
        os.write(self._drain_w, b"x")
        deadline = time.monotonic() + timeout
        while self.active_count and time.monotonic() < deadline and not self._hurried.is_set():
            time.sleep(0.05)
        if self.active_count:
            os.write(self._force_w, b"x")
            end = time.monotonic() + 2.0
            while self.active_count and time.monotonic() < end:
                time.sleep(0.05)
        for fd in (self.drain_fd, self._drain_w, self.force_fd, self._force_w):
            os.close(fd)


class SessionHandler(socketserver.BaseRequestHandler):
    """Runs one SMTP session: recv, feed the core, send its replies, resolve its events."""

    server: SmtpServer
    # Until setup() sets them: a drain may count the session (``idle``) as soon as it is registered.
    session: SmtpSession | None = None
    busy = False

    def setup(self) -> None:
        # Nothing here may fail before register(): finish() only runs once setup() returned.
        self.proxied = self.server.register(self)
        metrics.ACTIVE_CONNECTIONS.inc()
        self.sock: socket.socket = self.request
        # The peer, until a trusted balancer's header names the client (_take_proxy_header).
        self.client_ip = str(self.client_address[0])
        # The address this session is counted under in max_connections_per_ip, if any.
        self.counted_ip: str | None = None if self.proxied else self.client_ip
        self.session: SmtpSession | None = None
        self.account: AuthenticatedAccount | None = None  # AUTH's, or the relay network's
        self.relay: RelayGrant | None = None
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.outcome = "closed_by_client"
        self.busy = False
        self.started = time.monotonic()
        self._poller = select.poll()
        # The reply a RCPT past the day's recipient budget gets (to count it when it goes out).
        self._recipients_refusal: Reply | None = None

    @property
    def idle(self) -> bool:
        """Waiting for a command outside a transaction: safe to close while draining."""
        session = self.session
        return not self.busy and (session is None or session.idle)

    @property
    def authenticated(self) -> bool:
        return self.session is not None and self.session.authenticated

    def handle(self) -> None:
        self.correlation_id: str | None = None
        try:
            if self.proxied and not self._take_proxy_header():
                return
            if log.isEnabledFor(logging.DEBUG):
                # The close line carries the whole story; this one only helps to debug a hang.
                self._correlate()
                log.debug("connection opened", extra={"event": "smtp.connect", "client_ip": self.client_ip})
            self._run()
        except Exception:
            self.outcome = "error"
            self._correlate()
            log.exception("SMTP session failed", extra={"event": "smtp.session_error"})
            self._send_quietly(R.R421_INTERNAL_ERROR)
        finally:
            self._log_close()

    def _correlate(self) -> str:
        """The session's correlation id, made when first needed.

        Set directly rather than through the correlation() context manager (its
        generator frame would cost a page of stack), and only once the client
        has sent something: a connection that never does costs no context.
        The thread ends with the session, so nothing needs resetting.
        """
        if self.correlation_id is None:
            self.correlation_id = new_correlation_id()
            set_correlation_id(self.correlation_id)
        return self.correlation_id

    def finish(self) -> None:
        if self.sock is not self.request:  # the TLS socket took over the descriptor
            _close_tls(self.sock)
        if self.account is not None:
            self.server.authenticator.release(self.account)
        if self.session is not None:
            self.session.abandon()  # the DATA a transfer cut short still held
        self.server.database.remove_session()
        self.server.unregister(self)
        metrics.ACTIVE_CONNECTIONS.dec()
        metrics.SESSIONS.labels(self.outcome).inc()

    # --- the loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        # Replies are written whole; Nagle would only hold them back for the client's ACK.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Set once: reads wait in poll() with read_timeout, so the socket timeout
        # bounds writes (and the tail of a TLS record), not idle clients.
        self.sock.settimeout(self.server.config.smtp.write_timeout)
        self._poller.register(self.sock.fileno(), select.POLLIN)
        self._poller.register(self.server.drain_fd, select.POLLIN)
        self._poller.register(self.server.force_fd, select.POLLIN)
        if self.server.implicit_tls:
            if self._talked_first() and self._sent_proxy_header():
                self._refuse_proxy_header(reply=False)  # its client expects TLS, not a reply
                return
            if not self._handshake():
                return
        elif self._talked_first():
            if self._sent_proxy_header():
                self._refuse_proxy_header()
                return
            self.outcome = "early_talker"
            self._send_quietly(R.R554_EARLY_TALKER)
            return
        if not self._relay_network():
            return
        # The core is made when the client first sends: until then an idle
        # connection needs nothing but its greeting (see _core).
        if not self._write(R.greeting(self.server.policy(self.server.implicit_tls).hostname).to_bytes()):
            return
        while self.session is None or not self.session.closed:
            if self.server.draining.is_set() and self.idle:
                self._send(self._core().shutting_down())
                return
            if self._expired():
                return
            data = self._recv()
            if data is None or self._expired():
                return
            if self.session is None and proxy_protocol.looks_like_header(data):
                self._refuse_proxy_header()  # sent right after our greeting: the same forgery
                return
            self.busy = True
            try:
                if not self._send(self._core().receive(data)):
                    return
            finally:
                self.busy = False

    def _core(self) -> SmtpSession:
        """The protocol core of this session, made on first need, after the greeting.

        A listener holds thousands of connections that have sent nothing yet;
        each is spared the core's objects until it does (or must be closed).
        """
        if self.session is None:
            # Kept: a config reload may give the server a new budget while this session holds bytes.
            self.data_budget = self.server.data_budget
            self.session = SmtpSession(
                self.server.policy(self.server.implicit_tls), data_budget=self.data_budget, relay=self.relay
            )
        return self.session

    def _relay_network(self) -> bool:
        """A client in an account's relay network is that account from the start (False: refused).

        It takes one of the account's sessions (``smtp.max_connections_per_account``) as AUTH
        would; with none left, 421 before the greeting.
        """
        smtp = self.server.config.smtp
        grant = self.server.relay.grant_for(self.client_ip, header_from_check=smtp.header_from_check)
        if grant is None:
            return True
        account = grant.account
        assert isinstance(account, AuthenticatedAccount)
        if not self.server.authenticator.sessions.acquire(account.id, smtp.max_connections_per_account):
            self.outcome = "account_limit"
            log.warning(
                "too many sessions for account",
                extra={"event": "smtp.account_limit", "client_ip": self.client_ip, "account": account.name},
            )
            self._send_quietly(R.R421_ACCOUNT_SESSIONS)
            return False
        self.relay, self.account = grant, account
        metrics.AUTHENTICATED.labels("network").inc()
        return True

    # --- the session's clocks -----------------------------------------------------------------------

    def _deadline(self) -> tuple[float, str] | None:
        """The next moment a session clock may close this session, and which clock, or None.

        The AUTH clock runs whatever the session does; the session clock closes an idle
        session, so a transaction in progress runs to its end and is checked after it,
        within ``SESSION_GRACE``.
        """
        smtp = self.server.config.smtp
        clocks = []
        if not self.authenticated:
            clocks.append((self.started + smtp.auth_timeout, "auth_timeout"))
        grace = 0.0 if self.idle else SESSION_GRACE
        clocks.append((self.started + smtp.max_session_time + grace, "session_time"))
        return min(clocks) if clocks else None

    def _expired(self) -> bool:
        """Close the session with 421 when a clock has run out (False: it goes on)."""
        deadline = self._deadline()
        if deadline is None or time.monotonic() < deadline[0]:
            return False
        reason = deadline[1]
        metrics.LIMIT_REJECTIONS.labels(reason).inc()
        core = self._core()
        self._send(core.auth_timed_out() if reason == "auth_timeout" else core.session_expired())
        return True

    def _talked_first(self) -> bool:
        """A client that sends before our greeting is broken or a bot (RFC 5321 3.1)."""
        probe = select.poll()  # not select(): descriptors beyond 1024 are normal here
        probe.register(self.sock.fileno(), select.POLLIN)
        return bool(probe.poll(0))

    # --- the PROXY protocol -------------------------------------------------------------------------

    def _take_proxy_header(self) -> bool:
        """Read a trusted balancer's header, and not one byte more; False: the connection is closed.

        Peeks, then takes exactly the bytes the header spans (all of them while it is still
        incomplete), so the client's first command stays in the socket for the session. LOCAL
        (a balancer's health check) and v1 UNKNOWN keep the balancer as the client.
        """
        smtp = self.server.config.smtp
        deadline = time.monotonic() + smtp.proxy_protocol_timeout
        self.sock.settimeout(smtp.proxy_protocol_timeout)  # bounds each recv; the loop bounds the whole
        probe = select.poll()
        probe.register(self.sock.fileno(), select.POLLIN)
        taken = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not probe.poll(left * 1000):
                    raise proxy_protocol.ProxyHeaderError("timeout", "no complete header in time")
                peeked = self.sock.recv(proxy_protocol.MAX_HEADER_LENGTH - len(taken), socket.MSG_PEEK)
                if not peeked:
                    raise proxy_protocol.ProxyHeaderError("closed", "closed before its header ended")
                header = proxy_protocol.parse(taken + peeked)
                if isinstance(header, proxy_protocol.ProxyHeader):
                    self._recv_exactly(header.length - len(taken))
                    break
                taken += self._recv_exactly(len(peeked))
        except proxy_protocol.ProxyHeaderError as error:
            self._refuse_proxy_header(error.reason, str(error), reply=False)
            return False
        except OSError:
            self._refuse_proxy_header("closed", "the connection failed before its header ended", reply=False)
            return False
        if header.source is not None:
            self.client_ip = header.source[0]
        if not self.server.admit(self, self.client_ip):
            self.outcome = "refused_per_ip"
            metrics.LIMIT_REJECTIONS.labels("per_ip").inc()
            _log_refused(self.client_ip, R.R421_TOO_MANY_FROM_IP, self.outcome)
            if not self.server.implicit_tls:
                self._send_quietly(R.R421_TOO_MANY_FROM_IP)
            return False
        return True

    def _recv_exactly(self, size: int) -> bytes:
        """``size`` bytes the kernel already holds (they were peeked)."""
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _sent_proxy_header(self) -> bool:
        """Whether the bytes waiting start a PROXY header (peeked: the caller refuses either way)."""
        try:
            return proxy_protocol.looks_like_header(
                self.sock.recv(len(proxy_protocol.V2_SIGNATURE), socket.MSG_PEEK | socket.MSG_DONTWAIT)
            )
        except OSError:
            return False

    def _refuse_proxy_header(self, reason: str | None = None, detail: str = "", reply: bool = True) -> None:
        """Close over a PROXY header: a balancer's that failed (``reason``), or one nobody may send."""
        if reason is None:  # from an untrusted peer it could name any address
            reason, detail = (
                ("repeated", "a second PROXY protocol header")
                if self.proxied
                else ("untrusted", "a PROXY protocol header from an address not in smtp.proxy_protocol_from")
            )
        self.outcome = "proxy_header_refused"
        metrics.PROXY_HEADER_FAILURES.labels(reason).inc()
        self._correlate()
        log.warning(
            "PROXY protocol header refused",
            extra={
                "event": "smtp.proxy_header_refused",
                "client_ip": self.client_ip,
                "reason": reason,
                "detail": detail,
            },
        )
        if reply:
            self._send_quietly(R.R554_PROXY_HEADER)

    def _recv(self) -> bytes | None:
        """The next bytes, or None when the session is over (EOF, timeout, a session clock, drain)."""
        timeout = self.server.config.smtp.read_timeout
        deadline = self._deadline()
        clock_first = deadline is not None and deadline[0] - time.monotonic() < timeout
        if clock_first:
            assert deadline is not None
            timeout = max(0.0, deadline[0] - time.monotonic())
        while not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            # poll() on a line of its own: inside a comprehension, the comprehension's
            # function object would live on in every idle session while it waits.
            events = self._poller.poll(timeout * 1000)
            ready = [fd for fd, _mask in events]
            if not ready:
                if clock_first:
                    if self._expired():
                        return None
                    timeout = max(0.001, deadline[0] - time.monotonic())  # poll woke a hair early
                    continue
                self._send(self._core().timed_out())
                return None
            if self.server.force_fd in ready or (self.server.drain_fd in ready and self.idle):
                self._send(self._core().shutting_down())
                return None
            if self.server.drain_fd in ready:
                # Busy: finish this transaction; the loop in _run closes it afterwards.
                self._poller.unregister(self.server.drain_fd)
            if self.sock.fileno() in ready:
                break
        try:  # readable now; the socket's own timeout only bounds the rest of a TLS record
            data = self.sock.recv(RECV_SIZE)
        except TimeoutError:
            self._send(self._core().timed_out())
            return None
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            return None
        self._correlate()
        metrics.RECEIVED_BYTES.inc(len(data))
        return data

    def _send(self, outputs: list[Output]) -> bool:
        """Send replies in order and resolve events as they come; False once the session ends."""
        session = self.session
        assert session is not None
        pending = list(outputs)
        batch: list[bytes] = []
        while pending:
            item = pending.pop(0)
            if isinstance(item, Reply):
                if item is self._recipients_refusal:
                    self.server.intake.recipient_refused()
                batch.append(item.to_bytes())
                if item.close:
                    if session.close_reason is not None:  # the core closed it and says why
                        self.outcome = session.close_reason
                    self._write(b"".join(batch))
                    return False
                continue
            if isinstance(item, MessageRejected):
                self.server.intake.rejected(item)
                continue
            # Everything before an event goes out first (the 220 before the handshake).
            if batch and not self._write(b"".join(batch)):
                return False
            batch = []
            more = self._resolve(item)
            if more is None:
                return False
            pending[:0] = more
        return self._write(b"".join(batch)) if batch else True

    def _write(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except (OSError, ssl.SSLError):
            self.outcome = "write_failed"
            return False

    def _send_quietly(self, reply: Reply) -> None:
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(reply.to_bytes())
        except (OSError, ssl.SSLError):
            pass

    # --- events -------------------------------------------------------------------------------------

    def _resolve(self, event: Output) -> list[Output] | None:
        assert self.session is not None
        if isinstance(event, TlsRequested):
            return self.session.tls_started() if self._handshake() else None
        if isinstance(event, CredentialsOffered):
            # A relay network's session gives its slot back first, so AUTH as the same account
            # at its session limit still succeeds; a failed AUTH takes it back.
            if self.account is not None:
                self.server.authenticator.release(self.account)
            outcome, account = self.server.authenticator.authenticate(event, self.client_ip)
            if account is not None:
                self.account = account
                metrics.AUTHENTICATED.labels("password").inc()
            elif self.account is not None:
                self.server.authenticator.sessions.acquire(self.account.id, UNCAPPED)
            return self.session.credentials_checked(outcome, account)
        if isinstance(event, MailFromOffered):
            assert self.account is not None
            if self._relay_withdrawn():
                metrics.LIMIT_REJECTIONS.labels("relay_withdrawn").inc()
                return self.session.mail_checked(R.R421_RELAY_WITHDRAWN, reason="relay_withdrawn")
            outputs, self._recipients_refusal = self.server.intake.mail_from(
                self.session, self.account, event.sender
            )
            return outputs
        if isinstance(event, MessageReceived):
            try:
                assert self.account is not None
                return self.server.intake.message(
                    self.session,
                    event,
                    account=self.account,
                    client_ip=self.client_ip,
                    tls=(self.tls_version, self.tls_cipher) if self.tls_version and self.tls_cipher else None,
                    correlation_id=self._correlate(),
                )
            finally:
                self.data_budget.give(event.held)  # stored or refused: no longer held
        raise TypeError(f"unknown event {event!r}")

    def _relay_withdrawn(self) -> bool:
        """A session sending as its network's account, whose grant was withdrawn (or now needs
        TLS it does not have) since it connected: checked at each MAIL FROM, as a deactivation is."""
        assert self.session is not None
        if self.relay is None or self.session.connection.account is not None:
            return False
        current = self.server.relay.grant_for(self.client_ip)
        return (
            current is None
            or current.account.id != self.relay.account.id
            or (current.require_tls and not self.session.connection.tls_active)
        )

    def _handshake(self) -> bool:
        self._correlate()
        holder = self.server.tls
        assert holder is not None
        try:
            tls_sock = holder.context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            # The TLS socket owns the descriptor from here: finish() closes it, handshake or not.
            self.sock = tls_sock  # same descriptor, so the poller needs no change
            tls_sock.settimeout(self.server.config.smtp.read_timeout)
            tls_sock.do_handshake()
            tls_sock.settimeout(self.server.config.smtp.write_timeout)
        except (ssl.SSLError, OSError) as error:
            self.outcome = "tls_failed"
            metrics.TLS_FAILURES.inc()
            log.info(
                "TLS handshake failed",
                extra={
                    "event": "smtp.tls_failed",
                    "client_ip": self.client_ip,
                    "error": type(error).__name__,
                },
            )
            return False
        self.tls_version = tls_sock.version()
        cipher = tls_sock.cipher()
        self.tls_cipher = cipher[0] if cipher else None
        return True

    def _log_close(self) -> None:
        self._correlate()
        session = self.session
        log.info(
            "connection closed",
            extra={
                "event": "smtp.disconnect",
                "client_ip": self.client_ip,
                # The balancer it came through, when it came through one.
                "proxy_ip": str(self.client_address[0]) if self.proxied else None,
                "tls_version": self.tls_version,
                "tls_cipher": self.tls_cipher,
                "account": self.account.name if self.account else None,
                "auth": self.account.auth if self.account else None,
                "commands": session.connection.commands if session else 0,
                "messages_accepted": session.connection.messages_accepted if session else 0,
                "messages_rejected": session.connection.messages_rejected if session else 0,
                "outcome": self.outcome,
                "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
            },
        )


def _log_refused(ip: str, reply: Reply, outcome: str) -> None:
    log.warning(
        "connection refused",
        extra={"event": "smtp.connection_refused", "client_ip": ip, "code": reply.code, "reason": outcome},
    )


def _close_tls(sock: socket.socket) -> None:
    """Send close_notify, then close (RFC 8446 6.1), without waiting for the client's own.

    Without it, a client's TLS library reads our close as a truncation: OpenSSL 3
    reports "unexpected eof while reading" after the 221, and a strict client may
    throw away what it just read. Non-blocking: a client that does not read costs nothing.
    """
    try:
        sock.setblocking(False)
        if isinstance(sock, ssl.SSLSocket):
            sock.unwrap()
    except (ssl.SSLError, OSError, ValueError):
        # Ours is sent and theirs not in yet (SSLWantReadError), the client is gone, or the
        # handshake never finished: closing is all that is left either way.
        pass
    try:
        sock.close()
    except OSError:
        pass
