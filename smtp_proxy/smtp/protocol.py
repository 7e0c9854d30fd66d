"""The SMTP submission protocol as a pure state machine: bytes in, replies and events out.

Rules of this module (after h11's ``_state.py``):

1. No I/O. It never touches a socket, ``ssl``, the database, the config loader
   or a clock; it imports only the standard library, its sibling modules
   ``replies``, ``addresses``, ``sasl`` and ``alignment``, and the pure
   ``smtp_proxy.long_lines``. Every RFC corner can therefore be tested with
   plain strings.
2. The caller feeds bytes with ``receive()`` and gets back a list of outputs:
   ``Reply`` objects to send in order, events that need an outside answer
   (``TlsRequested``, ``CredentialsOffered``, ``MailFromOffered``,
   ``MessageReceived``), and ``MessageRejected`` notices that need none. While
   an event is unanswered the session is paused: further input is only
   buffered, so pipelined commands wait their turn (RFC 2920). The caller
   answers with ``tls_started()``, ``credentials_checked()``,
   ``mail_checked()`` (the account's state and sending rate, which the core
   cannot know), ``message_queued()`` or ``message_deferred()``, each of which
   returns the next outputs. Clocks are the caller's too: it calls
   ``timed_out()``, ``auth_timed_out()`` or ``session_expired()`` when its
   timers fire, at a moment it picks with ``idle`` and ``authenticated``.
   Once closed, ``close_reason`` says why, in the words the caller reports
   (the session's outcome in metrics and logs), so no caller reads it from
   reply codes.
3. Connection state (``Connection``) and transaction state (``Envelope``) are
   separate objects. RSET, EHLO, STARTTLS and the end of DATA replace the
   envelope, so nothing leaks from one message into the next.

Security properties that live here:

- AUTH is refused before TLS and never advertised before it (RFC 4954 4,
  RFC 8314); MAIL needs TLS and AUTH. The one exception is a client the caller
  found in an account's relay network (``RelayGrant``): it is that account
  without AUTH, and needs TLS unless the network's grant says otherwise.
- At STARTTLS all buffered input is dropped (CVE-2011-0411, RFC 3207 4.2),
  and the session starts over after the handshake.
- The end of DATA is CRLF "." CRLF and nothing else: no ``<LF>.<LF>``,
  ``<CR>.<CR>`` or mixed form ends a message (SMTP smuggling). Lines ending in
  a bare LF are normalised to CRLF; a bare CR rejects the message, since it
  could end a message at a less careful next hop.
- Command lines are capped at 512 octets (RFC 5321 4.5.3.1.4), AUTH lines at
  ``MAX_AUTH_LINE``; an overlong line costs bounded memory, and the verdict
  on an oversize or malformed message waits until the real terminator
  (RFC 5321 4.2.5), so the session stays in step with the client. An overlong
  SASL response ends the AUTH exchange (RFC 4954 4).
- DATA held in memory costs about its size, and every byte of it is taken
  from the caller's ``DataBudget`` (``max_data_in_flight``) before it is kept;
  when the budget runs out the message is read to its end and refused with a
  452, and the session goes on.
- A line over 998 octets (RFC 5322 2.1.1) that the worker could not shorten
  without changing the message (``long_lines``: a header line with no
  whitespace to fold at, a long line under a signature or an unknown transfer
  encoding) gets 550 and nothing is stored: a provider that enforces the limit
  would lose it after our 250.
- When the account asks for it, the From:/Sender: header addresses must be in
  the account's domains too (``alignment``); otherwise 550 and nothing is
  stored.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from smtp_proxy.long_lines import refusal as long_line_refusal
from smtp_proxy.smtp import alignment
from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.addresses import Path, PathError, domain_allowed, parse_mail_from, parse_rcpt_to
from smtp_proxy.smtp.replies import Reply
from smtp_proxy.smtp.sasl import (
    PASSWORD_CHALLENGE,
    USERNAME_CHALLENGE,
    SaslError,
    decode_response,
    decode_text,
    parse_plain,
)

MAX_COMMAND_LINE = 512  # octets including CRLF, RFC 5321 4.5.3.1.4
MAX_AUTH_LINE = 4096  # AUTH with an initial response, and SASL responses (RFC 4954 4)
# Data lines are not limited (RFC 5321 allows 1000, real mail breaks it); a
# line longer than this is passed on in pieces so memory stays bounded.
MAX_PENDING_DATA = 65536
_HTTP_REQUEST = re.compile(rb"^(GET|POST|HEAD|PUT|DELETE|OPTIONS|CONNECT|PATCH|TRACE) \S+ HTTP/\d")
_EHLO_ARG = re.compile(r"^[\x21-\x7e]{1,255}$")
# A dot stuffed at the start of a line, unless the line is "." alone: that one is kept (it
# ends nothing after a bare LF, and the terminator is found before this applies).
_STUFFED = re.compile(rb"\n\.(?!\r?\n)")


class State(enum.Enum):
    GREETED = enum.auto()  # before EHLO/HELO
    READY = enum.auto()  # after EHLO/HELO, no transaction
    AUTH_PLAIN = enum.auto()  # waiting for the PLAIN response
    AUTH_LOGIN_USER = enum.auto()
    AUTH_LOGIN_SECRET = enum.auto()
    MAIL = enum.auto()  # MAIL FROM accepted
    RCPT = enum.auto()  # at least one RCPT TO accepted
    DATA = enum.auto()  # reading message data
    CLOSED = enum.auto()


_SASL_STATES = frozenset({State.AUTH_PLAIN, State.AUTH_LOGIN_USER, State.AUTH_LOGIN_SECRET})


class AuthOutcome(enum.Enum):
    OK = "ok"
    INVALID = "invalid"  # 535 5.7.8
    TEMPORARY = "temporary"  # 454 4.7.0, e.g. the database is down
    THROTTLED = "throttled"  # 454 4.7.0, too many failures from this client
    TOO_MANY_SESSIONS = "too_many_sessions"  # 421 4.7.0 and close


class Account(Protocol):
    """What the core needs to know of an authenticated account."""

    @property
    def name(self) -> str: ...

    @property
    def allowed_domains(self) -> tuple[str, ...]: ...

    @property
    def header_from_check(self) -> bool:
        """True: the From:/Sender: header addresses must be in ``allowed_domains`` too."""
        ...


class DataBudget(Protocol):
    """The listener's bound on message bytes held in memory (``max_data_in_flight``).

    One object is shared by every session of a listener, so it must be thread-safe
    (``smtp_proxy.smtp.budget.InFlightBudget``). ``take`` is all or nothing.
    """

    def take(self, size: int) -> bool: ...

    def give(self, size: int) -> None: ...


@dataclass(frozen=True)
class SessionPolicy:
    """The limits a session runs under, built by the adapter from the config."""

    hostname: str
    max_message_size: int
    max_recipients: int
    tls_available: bool = True
    tls_active: bool = False  # implicit TLS (RFC 8314): TLS from the first byte
    max_errors: int = 10


@dataclass(frozen=True)
class RelayGrant:
    """The client's address is in an account's relay network: it sends as ``account`` without
    AUTH (a printer, an old appliance). ``require_tls`` False lets it send in the clear."""

    account: Account
    require_tls: bool = True


@dataclass(frozen=True)
class TlsRequested:
    """STARTTLS accepted: send the 220, then run the handshake and call ``tls_started()``."""


@dataclass(frozen=True)
class CredentialsOffered:
    """Check these and answer with ``credentials_checked()``."""

    mechanism: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class MailFromOffered:
    """MAIL FROM passed the core's checks: may this account start a transaction now?

    Answer with ``mail_checked()``; ``sender`` is the parsed address, "" for the null sender.
    """

    sender: str


@dataclass(frozen=True)
class MessageReceived:
    """A complete message: store it, then answer ``message_queued()`` or ``message_deferred()``.

    ``held`` bytes of the session's ``DataBudget`` are still taken for ``data``: the caller
    gives them back (``budget.give(held)``) once the message is stored or dropped.
    ``dsn_*`` are the RFC 3461 parameters given: RET and ENVID of MAIL FROM, and per recipient
    that gave NOTIFY or ORCPT, ``{"notify": ["FAILURE", ...] or None, "orcpt": "rfc822;..." or
    None}`` (None when no recipient did).
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes = field(repr=False)
    held: int = 0
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    dsn_recipients: dict[str, dict[str, Any]] | None = None


@dataclass(frozen=True)
class MessageRejected:
    """A notice, needing no answer: a message was refused at the end of DATA (logs, metrics)."""

    sender: str
    recipients: int
    size: int
    # "too_big", "bare_cr", "server_busy" (the DataBudget ran out), "line_too_long" or "header_from"
    reason: str
    reply: Reply
    # for "header_from": the header address that is not allowed; for "line_too_long": where the line is
    detail: str = ""


Event = TlsRequested | CredentialsOffered | MailFromOffered | MessageReceived
Output = Reply | Event | MessageRejected


@dataclass(slots=True)
class Envelope:
    """One mail transaction, from MAIL FROM to the end of DATA."""

    sender: Path | None = None
    recipients: list[str] = field(default_factory=list)
    # RFC 3461 NOTIFY and ORCPT of the recipients that gave any (most give none).
    recipients_dsn: dict[str, dict[str, Any]] | None = None
    # The caller's per-transaction recipient budget (mail_checked), and its refusal.
    recipients_left: int | None = None
    recipients_refusal: Reply | None = None


class _DataReader:
    """Framing of DATA: finds CRLF.CRLF, unstuffs dots, defers the verdict to the end.

    The content is kept in one bytearray, so a message costs about its size whatever its line
    endings (a list of lines costs many times that for short lines). Each piece kept is first taken from
    the listener's ``DataBudget``. Once the verdict is certain (too big, bare CR, budget
    exhausted) the content is dropped and given back; the rest is only framed and counted.
    """

    __slots__ = (
        "limit",
        "budget",
        "content",
        "held",
        "size",
        "too_big",
        "bare_cr",
        "over_budget",
        "after_crlf",
        "mid_line",
    )

    def __init__(self, limit: int, budget: DataBudget | None) -> None:
        self.limit = limit
        self.budget = budget
        self.content = bytearray()
        self.held = 0  # bytes taken from the budget, not yet given back
        self.size = 0  # content octets received, kept or not
        self.too_big = False
        self.bare_cr = False
        self.over_budget = False
        # True when the last line given ended with a real CRLF (so a "." line may end the data).
        self.after_crlf = True
        # True when the bytes so far end in the middle of a line (a long line passed on in pieces).
        self.mid_line = False

    @property
    def refused(self) -> bool:
        return self.too_big or self.bare_cr or self.over_budget

    def release(self) -> None:
        """Drop the content and give its bytes back to the budget; idempotent."""
        if self.held and self.budget is not None:
            self.budget.give(self.held)
        self.held = 0
        self.content = bytearray()

    def _keep(self, content: bytes | bytearray | memoryview) -> None:
        size = len(content)
        self.size += size
        if self.size > self.limit:
            # The size verdict wins over the others (552 is permanent and says why).
            if not self.too_big:
                self.too_big = True
                self.release()  # RFC 5321 4.2.5: the verdict waits for the terminator, the memory need not
        elif self.refused:
            return
        elif self.budget is not None and not self.budget.take(size):
            self.over_budget = True
            self.release()
        else:
            if self.budget is not None:
                self.held += size
            self.content += content

    def _saw_bare_cr(self) -> None:
        if not self.bare_cr:
            self.bare_cr = True
            self.release()

    def feed(self, buffer: bytearray) -> bool:
        """Consume complete lines from ``buffer``; True once the terminator was read."""
        end = buffer.rfind(b"\n") + 1
        if end == 0:
            if len(buffer) > MAX_PENDING_DATA:
                # A very long line: pass it on without its last byte, which may be a CR of a CRLF.
                piece = bytes(buffer[: len(buffer) - 1])
                del buffer[: len(piece)]
                self._content_piece(piece)
            return False
        region = bytes(buffer[:end])
        if not self.mid_line:
            carriage_returns = region.count(b"\r")
            if carriage_returns == region.count(b"\r\n"):
                return self._bulk(region, buffer, bare_lf=region.count(b"\n") != carriage_returns)
        return self._lines(region, buffer)

    def _content_piece(self, piece: bytes) -> None:
        if b"\r" in piece:
            self._saw_bare_cr()
        if not self.mid_line and piece.startswith(b"."):
            piece = piece[1:]
        self.mid_line = True
        self.after_crlf = False
        self._keep(piece)

    def _bulk(self, region: bytes, buffer: bytearray, bare_lf: bool) -> bool:
        """At a line start and no bare CR in sight: let C do the scanning, line endings mixed or not."""
        # The prefix stands for the end of the line before, so that the first line of the region
        # is framed like the others: "\r\n.\r\n" is the terminator only after a real CRLF.
        prefix = b"\r\n" if self.after_crlf else b"\n"
        text = prefix + region
        stop = text.find(b"\r\n.\r\n")
        if stop >= 0:
            text = text[: stop + 2]  # the content keeps the CRLF of its last line
        if b"\n." in text:  # RFC 5321 4.5.2 transparency
            if b"\n.\n" in text or b"\n.\r\n" in text:
                text = _STUFFED.sub(b"\n", text)  # a "." line alone is kept
            else:
                text = text.replace(b"\n.", b"\n")
        if bare_lf:
            text = text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # bare LF endings become CRLF
        self._keep(memoryview(text)[text.index(b"\n") + 1 :])  # without the prefix
        if stop < 0:
            self.after_crlf = region.endswith(b"\r\n")
            del buffer[: len(region)]
            return False
        del buffer[: stop - len(prefix) + 5]  # the content, then ".\r\n"
        return True

    def _lines(self, region: bytes, buffer: bytearray) -> bool:
        """The careful path: one line at a time, after a bare CR or a long line's pieces."""
        kept = bytearray()
        position, done = 0, False
        while position < len(region):
            newline = region.index(b"\n", position)
            crlf = newline > position and region[newline - 1] == 0x0D
            body = region[position : newline - 1 if crlf else newline]
            position = newline + 1
            if b"\r" in body:
                self._saw_bare_cr()
            at_line_start = not self.mid_line
            if crlf and at_line_start and self.after_crlf and body == b".":
                done = True
                break
            if at_line_start and body.startswith(b".") and body != b".":
                body = body[1:]  # RFC 5321 4.5.2 transparency
            kept += body
            kept += b"\r\n"  # a bare LF line ending is normalised to CRLF
            self.mid_line = False
            self.after_crlf = crlf
        self._keep(kept)
        del buffer[:position]
        return done

    def message(self) -> bytes:
        """The content, once; the bytes stay counted in ``held`` for the caller to give back."""
        data = bytes(self.content)
        self.content = bytearray()
        return data


class Connection:
    """State that lives as long as the connection."""

    # Slots: a listener holds thousands of idle sessions.
    __slots__ = (
        "tls_active",
        "helo_name",
        "esmtp",
        "account",
        "relay",
        "errors",
        "commands",
        "messages_accepted",
        "messages_rejected",
    )

    def __init__(self, policy: SessionPolicy) -> None:
        self.tls_active = policy.tls_active
        self.helo_name: str | None = None
        self.esmtp = False
        self.account: Account | None = None  # the account AUTH gave
        self.relay: RelayGrant | None = None  # the account the client's network gives, without AUTH
        self.errors = 0
        self.commands = 0
        self.messages_accepted = 0
        self.messages_rejected = 0


class SmtpSession:
    """One SMTP session. See the module docstring for the contract."""

    __slots__ = (
        "policy",
        "state",
        "connection",
        "envelope",
        "_buffer",
        "_waiting_for",
        "_discarding",
        "_login_username",
        "_data",
        "_budget",
        "close_reason",
    )

    def __init__(
        self, policy: SessionPolicy, data_budget: DataBudget | None = None, relay: RelayGrant | None = None
    ) -> None:
        self.policy = policy
        self._budget = data_budget
        self.state = State.GREETED
        self.connection = Connection(policy)
        self.connection.relay = relay
        self.envelope = Envelope()
        self._buffer = bytearray()
        self._waiting_for: type | None = None  # the event whose answer is awaited
        self._discarding = False  # inside an overlong command line
        self._login_username = ""
        self._data: _DataReader | None = None
        self.close_reason: str | None = None  # set by _close

    # --- the caller's side -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def paused(self) -> bool:
        return self._waiting_for is not None

    @property
    def idle(self) -> bool:
        """No transaction open and no answer awaited: a timer may close the session cleanly now."""
        return self.state in (State.GREETED, State.READY) and self._waiting_for is None

    @property
    def authenticated(self) -> bool:
        """The session is an account's: through AUTH, or through a relay network."""
        return self.connection.account is not None or self.connection.relay is not None

    @property
    def account(self) -> Account | None:
        """The account the session sends as: AUTH's, else the relay network's."""
        connection = self.connection
        if connection.account is not None:
            return connection.account
        return connection.relay.account if connection.relay is not None else None

    def account_changed(self, account: Account) -> None:
        """The caller read the account's current state (its domains may have changed since)."""
        if self.connection.account is not None:
            self.connection.account = account
        elif self.connection.relay is not None:
            self.connection.relay = RelayGrant(account, self.connection.relay.require_tls)

    def greeting(self) -> list[Output]:
        return [R.greeting(self.policy.hostname)]

    def receive(self, data: bytes) -> list[Output]:
        """Feed bytes from the client; returns what to send and what to resolve, in order."""
        if self.closed:
            return []
        self._buffer += data
        return self._process()

    def tls_started(self) -> list[Output]:
        """The handshake succeeded: RFC 3207 4.2, the client must start over with EHLO."""
        self._resume(TlsRequested)
        self._buffer.clear()  # nothing received before the handshake may run inside TLS
        self.connection.tls_active = True
        self.connection.helo_name = None
        self.connection.esmtp = False
        self.envelope = Envelope()
        self.state = State.GREETED
        return self._process()

    def credentials_checked(self, outcome: AuthOutcome, account: Account | None = None) -> list[Output]:
        self._resume(CredentialsOffered)
        self.state = State.READY
        if outcome is AuthOutcome.OK and account is not None:
            self.connection.account = account
            return [R.R235_AUTH_OK, *self._process()]
        if outcome is AuthOutcome.TOO_MANY_SESSIONS:
            return [self._close(R.R421_ACCOUNT_SESSIONS, "account_limit")]
        if outcome in (AuthOutcome.TEMPORARY, AuthOutcome.THROTTLED):
            reply = R.R454_AUTH_TEMPORARY if outcome is AuthOutcome.TEMPORARY else R.R454_AUTH_THROTTLED
            return [reply, *self._process()]
        return [self._error(R.R535_AUTH_INVALID), *self._process()]

    def mail_checked(
        self,
        refusal: Reply | None = None,
        *,
        recipients_left: int | None = None,
        recipients_refusal: Reply | None = None,
        reason: str = "policy",
    ) -> list[Output]:
        """The caller's verdict on ``MailFromOffered``.

        ``refusal`` None starts the transaction; a closing refusal ends the session (``reason``
        becomes its ``close_reason``); any other is sent as is (a policy answer, not a client
        error) and no transaction starts.
        ``recipients_left`` caps the distinct recipients of this transaction; RCPT beyond it
        gets ``recipients_refusal`` (452 4.5.3 when none is given) and the envelope keeps the
        recipients accepted so far, so DATA still works for them.
        """
        self._resume(MailFromOffered)
        if refusal is not None:
            self.envelope = Envelope()
            if refusal.close:
                return [self._close(refusal, reason)]
            return [refusal, *self._process()]
        self.envelope.recipients_left = recipients_left
        self.envelope.recipients_refusal = recipients_refusal
        self.state = State.MAIL
        return [R.R250_SENDER_OK, *self._process()]

    def message_queued(self, message_id: str) -> list[Output]:
        """The message is committed: only now the 250 (RFC 5321 6.1)."""
        self._resume(MessageReceived)
        self.connection.messages_accepted += 1
        return [R.queued(message_id), *self._process()]

    def message_deferred(self) -> list[Output]:
        """Storing failed: 451, nothing was kept; the client may retry."""
        self._resume(MessageReceived)
        self.connection.messages_rejected += 1
        return [R.R451_STORAGE_DOWN, *self._process()]

    def timed_out(self) -> list[Output]:
        return [self._close(R.R421_IDLE_TIMEOUT, "timeout")]

    def auth_timed_out(self) -> list[Output]:
        """The client took too long to authenticate (the caller's clock)."""
        return [self._close(R.R421_AUTH_TIMEOUT, "auth_timeout")]

    def session_expired(self) -> list[Output]:
        """The session reached its maximum lifetime (the caller's clock)."""
        return [self._close(R.R421_SESSION_TIME, "session_time")]

    def shutting_down(self) -> list[Output]:
        return [self._close(R.R421_SHUTTING_DOWN, "shutdown")]

    def abandon(self) -> None:
        """Give back the DATA bytes the session holds (the connection ended mid-DATA); idempotent.

        Bytes already handed over in ``MessageReceived.held`` are the caller's to give back.
        Should the session be fed after this, the message is refused (452), never handed over
        with a part missing.
        """
        if self._data is not None:
            self._data.release()
            self._data.over_budget = True

    # --- input framing -----------------------------------------------------------------------------

    def _resume(self, event: type) -> None:
        if self._waiting_for is not event:
            raise RuntimeError(f"no {event.__name__} is waiting for an answer")
        self._waiting_for = None

    def _pause(self, event: type) -> None:
        self._waiting_for = event

    def _close(self, reply: Reply, reason: str) -> Reply:
        """End the session with ``reply``; ``reason`` is the outcome the caller reports.

        Too many errors ("closed_421") and an HTTP request ("closed_500") keep the outcome
        names the listener's metrics have always had.
        """
        self.abandon()
        self.close_reason = reason
        self._data = None
        self.state = State.CLOSED
        self._buffer.clear()
        return reply

    def _process(self) -> list[Output]:
        out: list[Output] = []
        while self._waiting_for is None and not self.closed:
            if self.state is State.DATA:
                if not self._feed_data(out):
                    break
                continue
            line = self._next_line(out)
            if line is None:
                break
            out.extend(self._dispatch(line))
        return out

    def _next_line(self, out: list[Output]) -> bytes | None:
        """The next complete command line without its line ending, or None for more input."""
        while True:
            newline = self._buffer.find(b"\n")
            if self._discarding:
                if newline < 0:
                    self._buffer.clear()
                    return None
                del self._buffer[: newline + 1]
                self._discarding = False
                out.append(self._line_too_long())
                if self.closed:
                    return None
                continue
            if newline < 0:
                if len(self._buffer) > MAX_AUTH_LINE:
                    self._buffer.clear()
                    self._discarding = True
                return None
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) + 2 > self._line_limit(line):
                out.append(self._line_too_long())
                if self.closed:
                    return None
                continue
            return line

    def _line_too_long(self) -> Reply:
        """The reply to an overlong line, which was dropped unread."""
        if self.state in _SASL_STATES:
            # RFC 4954 4 and 6: the exchange ends with 500 5.5.6. Left open, the client's next
            # command would be read as a SASL response (and counted as a credential).
            self.state = State.READY
            self._login_username = ""
            return self._error(R.R500_AUTH_LINE_TOO_LONG)
        return self._error(R.R500_LINE_TOO_LONG)

    def _line_limit(self, line: bytes) -> int:
        if self.state in _SASL_STATES:
            return MAX_AUTH_LINE
        if line[:5].upper() == b"AUTH ":
            return MAX_AUTH_LINE
        return MAX_COMMAND_LINE

    def _feed_data(self, out: list[Output]) -> bool:
        assert self._data is not None
        if not self._data.feed(self._buffer):
            return False
        reader, self._data = self._data, None
        envelope, self.envelope = self.envelope, Envelope()
        self.state = State.READY
        assert envelope.sender is not None
        sender, detail = envelope.sender.address, ""
        if reader.too_big:
            reason, reply = "too_big", R.r552_too_big(self.policy.max_message_size)
        elif reader.bare_cr:
            reason, reply = "bare_cr", R.R554_BARE_CR
        elif reader.over_budget:
            reason, reply = "server_busy", R.R452_DATA_IN_FLIGHT  # the listener's memory, not the client
        else:
            data = reader.message()
            too_long = long_line_refusal(data)
            misaligned = self._misaligned_header(data, sender) if too_long is None else None
            if too_long is None and misaligned is None:
                params = envelope.sender.params
                out.append(
                    MessageReceived(
                        sender,
                        tuple(envelope.recipients),
                        data,
                        held=reader.held,
                        dsn_ret=params.get("RET"),
                        dsn_envid=params.get("ENVID"),
                        dsn_recipients=envelope.recipients_dsn,
                    )
                )
                self._pause(MessageReceived)
                return True
            reader.release()
            if too_long is not None:
                reason, reply, detail = "line_too_long", R.R550_LINE_TOO_LONG, too_long
            else:
                reason, reply, detail = "header_from", R.R550_HEADER_FROM, misaligned or ""
        self.connection.messages_rejected += 1
        out.append(MessageRejected(sender, len(envelope.recipients), reader.size, reason, reply, detail))
        out.append(reply)
        return True

    def _misaligned_header(self, data: bytes, sender: str) -> str | None:
        """A From:/Sender: address outside the account's domains, when the account is checked."""
        account = self.account
        if account is None or not account.header_from_check:
            return None
        return alignment.misaligned_header_address(data, account.allowed_domains, sender)

    # --- commands ----------------------------------------------------------------------------------

    def _dispatch(self, raw: bytes) -> list[Output]:
        self.connection.commands += 1
        if self.state in _SASL_STATES:
            return self._on_sasl_response(raw)
        if self.connection.commands == 1 and _HTTP_REQUEST.match(raw):
            return [self._close(R.R500_HTTP, "closed_500")]
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            return [self._error(R.R500_UNRECOGNIZED)]
        verb, _, argument = line.partition(" ")
        handler = _VERBS.get(verb.upper())
        if handler is None:
            return [self._error(R.R500_UNRECOGNIZED)]
        return handler(self, argument.strip())

    def _error(self, reply: Reply) -> Reply:
        """A client error; too many of them end the session (a confused or hostile client)."""
        self.connection.errors += 1
        if self.connection.errors >= self.policy.max_errors:
            return self._close(R.R421_TOO_MANY_ERRORS, "closed_421")
        return reply

    def _extensions(self) -> list[str]:
        extensions = [
            f"SIZE {self.policy.max_message_size}",
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if self.connection.tls_active:
            extensions.append("AUTH PLAIN LOGIN")  # RFC 4954: only once the channel is encrypted
        elif self.policy.tls_available:
            extensions.append("STARTTLS")
        return extensions

    def _on_ehlo(self, argument: str) -> list[Output]:
        if not _EHLO_ARG.match(argument):
            return [self._error(R.R501_EHLO_SYNTAX)]
        self._greeted(argument, esmtp=True)
        return [R.ehlo(self.policy.hostname, self._extensions())]

    def _on_helo(self, argument: str) -> list[Output]:
        if not _EHLO_ARG.match(argument):
            return [self._error(R.R501_EHLO_SYNTAX)]
        self._greeted(argument, esmtp=False)
        return [R.helo(self.policy.hostname)]

    def _greeted(self, name: str, esmtp: bool) -> None:
        # RFC 5321 4.1.4: EHLO/HELO in the middle of a transaction resets it.
        self.connection.helo_name = name
        self.connection.esmtp = esmtp
        self.envelope = Envelope()
        self.state = State.READY

    def _on_starttls(self, argument: str) -> list[Output]:
        if argument:
            return [self._error(R.R501_SYNTAX)]
        if self.connection.tls_active:
            return [self._error(R.R503_TLS_ACTIVE)]
        if not self.policy.tls_available:
            return [R.R454_TLS_UNAVAILABLE]
        if not self.connection.esmtp:
            return [self._error(R.R503_EHLO_FIRST)]
        # CVE-2011-0411: whatever the client pipelined behind STARTTLS is discarded.
        self._buffer.clear()
        self._pause(TlsRequested)
        return [R.R220_TLS_READY, TlsRequested()]

    def _on_auth(self, argument: str) -> list[Output]:
        if not self.connection.esmtp:
            return [self._error(R.R503_EHLO_FIRST)]
        if not self.connection.tls_active:
            return [self._error(R.R530_STARTTLS_FIRST)]
        if self.connection.account is not None:
            return [self._error(R.R503_ALREADY_AUTHENTICATED)]
        if self.state is not State.READY:
            return [self._error(R.R503_AUTH_IN_TRANSACTION)]
        mechanism, _, initial = argument.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism == "PLAIN":
            if not initial:
                self.state = State.AUTH_PLAIN
                return [R.challenge("")]
            return self._auth_plain(initial)
        if mechanism == "LOGIN":
            if not initial:
                self.state = State.AUTH_LOGIN_USER
                return [R.challenge(USERNAME_CHALLENGE)]
            return self._auth_login_user(initial)
        if not mechanism:
            return [self._error(R.R501_SYNTAX)]
        return [self._error(R.R504_UNKNOWN_MECHANISM)]

    def _on_sasl_response(self, raw: bytes) -> list[Output]:
        state, self.state = self.state, State.READY
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return [self._error(R.R501_BAD_BASE64)]
        if text == "*":
            return [self._error(R.R501_AUTH_CANCELLED)]  # RFC 4954 4
        if state is State.AUTH_PLAIN:
            return self._auth_plain(text)
        if state is State.AUTH_LOGIN_USER:
            return self._auth_login_user(text)
        return self._auth_login_password(text)

    def _sasl_failure(self, error: SaslError) -> list[Output]:
        self.state = State.READY
        return [self._error(R.R501_BAD_BASE64 if error.kind == "base64" else R.R535_AUTH_INVALID)]

    def _auth_plain(self, response: str) -> list[Output]:
        try:
            username, password = parse_plain(decode_response(response))
        except SaslError as error:
            return self._sasl_failure(error)
        return self._offer("PLAIN", username, password)

    def _auth_login_user(self, response: str) -> list[Output]:
        try:
            self._login_username = decode_text(decode_response(response))
        except SaslError as error:
            return self._sasl_failure(error)
        self.state = State.AUTH_LOGIN_SECRET
        return [R.challenge(PASSWORD_CHALLENGE)]

    def _auth_login_password(self, response: str) -> list[Output]:
        try:
            password = decode_text(decode_response(response))
        except SaslError as error:
            return self._sasl_failure(error)
        username, self._login_username = self._login_username, ""
        if not username or not password:
            return [self._error(R.R535_AUTH_INVALID)]
        return self._offer("LOGIN", username, password)

    def _offer(self, mechanism: str, username: str, password: str) -> list[Output]:
        self.state = State.READY
        self._pause(CredentialsOffered)
        return [CredentialsOffered(mechanism, username, password)]

    def _ready_for_mail(self) -> Reply | None:
        """Why a transaction cannot start now, or None."""
        if self.connection.helo_name is None:
            return self._error(R.R503_EHLO_FIRST)
        relay = self.connection.relay
        if self.connection.account is None and relay is not None:
            if relay.require_tls and not self.connection.tls_active:
                return self._error(R.R530_STARTTLS_FIRST)
            return None
        if not self.connection.tls_active:
            return self._error(R.R530_STARTTLS_FIRST)
        if self.connection.account is None:
            return self._error(R.R530_AUTH_REQUIRED)
        return None

    def _on_mail(self, argument: str) -> list[Output]:
        refusal = self._ready_for_mail()
        if refusal is not None:
            return [refusal]
        if self.state is not State.READY:
            return [self._error(R.R503_NESTED_MAIL)]
        try:
            path = parse_mail_from(argument, _MAIL_PARAMS if self.connection.esmtp else _MAIL_PARAMS_HELO)
        except PathError as error:
            return [self._error(_path_refusal(error, R.R501_BAD_SENDER))]
        declared = path.params.get("SIZE")
        if declared is not None and int(declared) > self.policy.max_message_size:
            return [R.r552_too_big(self.policy.max_message_size)]  # RFC 1870 6.1
        account = self.account
        assert account is not None
        if not domain_allowed(path.domain, account.allowed_domains):
            return [self._error(R.R553_SENDER_NOT_ALLOWED)]
        # The state stays READY until mail_checked() starts the transaction.
        self.envelope = Envelope(sender=path)
        self._pause(MailFromOffered)
        return [MailFromOffered(path.address)]

    def _on_rcpt(self, argument: str) -> list[Output]:
        refusal = self._ready_for_mail()
        if refusal is not None:
            return [refusal]
        if self.state not in (State.MAIL, State.RCPT):
            return [self._error(R.R503_NEED_MAIL)]
        try:
            path = parse_rcpt_to(argument, _RCPT_PARAMS if self.connection.esmtp else frozenset())
        except PathError as error:
            return [self._error(_path_refusal(error, R.R501_BAD_RECIPIENT))]
        if path.address in self.envelope.recipients:
            return [R.R250_RECIPIENT_OK]
        if len(self.envelope.recipients) >= self.policy.max_recipients:
            return [R.R452_TOO_MANY_RECIPIENTS]  # RFC 5321 4.5.3.1.10
        left = self.envelope.recipients_left
        if left is not None and len(self.envelope.recipients) >= left:
            # The account's recipient budget: a policy answer, so not counted as a client error.
            return [self.envelope.recipients_refusal or R.R452_TOO_MANY_RECIPIENTS]
        self.envelope.recipients.append(path.address)
        if path.params:
            notify = path.params.get("NOTIFY")
            given = {"notify": notify.split(",") if notify else None, "orcpt": path.params.get("ORCPT")}
            if self.envelope.recipients_dsn is None:
                self.envelope.recipients_dsn = {}
            self.envelope.recipients_dsn[path.address] = given
        self.state = State.RCPT
        return [R.R250_RECIPIENT_OK]

    def _on_data(self, argument: str) -> list[Output]:
        refusal = self._ready_for_mail()
        if refusal is not None:
            return [refusal]
        if argument:
            return [self._error(R.R501_SYNTAX)]
        if self.state is State.READY:
            return [self._error(R.R503_NEED_MAIL)]
        if self.state is not State.RCPT:
            return [self._error(R.R503_NEED_RCPT)]
        self.state = State.DATA
        self._data = _DataReader(self.policy.max_message_size, self._budget)
        return [R.R354_START_DATA]

    def _on_rset(self, argument: str) -> list[Output]:
        if argument:
            return [self._error(R.R501_SYNTAX)]
        self.envelope = Envelope()
        if self.state is not State.GREETED:
            self.state = State.READY
        return [R.R250_OK]

    def _on_noop(self, argument: str) -> list[Output]:
        return [R.R250_OK]

    def _on_quit(self, argument: str) -> list[Output]:
        return [self._close(R.R221_BYE, "quit")]

    def _on_vrfy(self, argument: str) -> list[Output]:
        if not argument:
            return [self._error(R.R501_SYNTAX)]
        return [R.R252_VRFY]

    def _on_help(self, argument: str) -> list[Output]:
        return [R.R214_HELP]

    def _on_not_implemented(self, argument: str) -> list[Output]:
        return [self._error(R.R502_NOT_IMPLEMENTED)]


# ESMTP parameters, by the extensions EHLO announces: SIZE (RFC 1870), BODY (RFC 6152) and DSN
# (RFC 3461). DSN's are refused after HELO, which announces nothing; SIZE and BODY were always
# taken there, and still are.
_MAIL_PARAMS = frozenset({"SIZE", "BODY", "RET", "ENVID"})
_MAIL_PARAMS_HELO = frozenset({"SIZE", "BODY"})
_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


def _path_refusal(error: PathError, bad_path: Reply) -> Reply:
    """555 for a parameter not offered, 501 5.5.4 naming a bad value, else the bad path's reply."""
    if error.kind == "param":
        return R.R555_PARAMETERS
    if error.kind == "value":
        return R.bad_parameter(str(error))
    return bad_path


# The command set in one place; a class-level table, so a session costs no bound methods.
_VERBS = {
    "EHLO": SmtpSession._on_ehlo,
    "HELO": SmtpSession._on_helo,
    "STARTTLS": SmtpSession._on_starttls,
    "AUTH": SmtpSession._on_auth,
    "MAIL": SmtpSession._on_mail,
    "RCPT": SmtpSession._on_rcpt,
    "DATA": SmtpSession._on_data,
    "RSET": SmtpSession._on_rset,
    "NOOP": SmtpSession._on_noop,
    "QUIT": SmtpSession._on_quit,
    "VRFY": SmtpSession._on_vrfy,
    "HELP": SmtpSession._on_help,
    "EXPN": SmtpSession._on_not_implemented,
    "ETRN": SmtpSession._on_not_implemented,
    "TURN": SmtpSession._on_not_implemented,
}
