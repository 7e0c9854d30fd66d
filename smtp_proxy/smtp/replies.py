"""Every reply the submission server sends, as named constants; standard library only.

A constant's name carries its code (``R530_STARTTLS_FIRST``), and every reply
after the greeting and EHLO carries an RFC 3463 enhanced status code
(RFC 2034). Replies whose text depends on the session are built by the small
functions at the end. A test checks that names, codes and enhanced codes agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtp_proxy.units import size_limit


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; ``close`` asks the adapter to close the connection after sending it."""

    code: int
    status: str | None
    lines: tuple[str, ...]
    close: bool = False

    def to_bytes(self) -> bytes:
        """The wire form: one ``code-text`` line per line, the last with a space (RFC 5321 4.2.1)."""
        prefix = f"{self.status} " if self.status else ""
        out = []
        for index, line in enumerate(self.lines):
            separator = " " if index == len(self.lines) - 1 else "-"
            out.append(f"{self.code}{separator}{prefix}{line}\r\n")
        return "".join(out).encode("ascii")


def _r(code: int, status: str | None, text: str, close: bool = False) -> Reply:
    return Reply(code, status, (text,), close)


# 2xx
R214_HELP = _r(214, "2.0.0", "See RFC 5321; commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT")
R220_TLS_READY = _r(220, "2.0.0", "Ready to start TLS")
R221_BYE = _r(221, "2.0.0", "Bye", close=True)
R235_AUTH_OK = _r(235, "2.7.0", "Authentication successful")
R250_OK = _r(250, "2.0.0", "OK")
R250_SENDER_OK = _r(250, "2.1.0", "Sender OK")
R250_RECIPIENT_OK = _r(250, "2.1.5", "Recipient OK")
R252_VRFY = _r(252, "2.5.0", "Cannot VRFY user, but will accept the message and attempt delivery")

# 3xx
R354_START_DATA = _r(354, None, "End data with <CR><LF>.<CR><LF>")

# 4xx: the client should try again later
R421_TOO_MANY_CONNECTIONS = _r(421, "4.7.0", "Too many connections, try again later", close=True)
R421_ACCOUNT_SESSIONS = _r(421, "4.7.0", "Too many concurrent sessions for this account", close=True)
R421_IDLE_TIMEOUT = _r(421, "4.4.2", "Idle timeout, closing connection", close=True)
R421_SHUTTING_DOWN = _r(421, "4.3.2", "Service shutting down, try again later", close=True)
R421_TOO_MANY_ERRORS = _r(421, "4.7.0", "Too many errors, closing connection", close=True)
R421_INTERNAL_ERROR = _r(421, "4.3.0", "Internal error, closing connection", close=True)
R421_AUTH_TIMEOUT = _r(421, "4.7.0", "Authentication time limit reached, closing connection", close=True)
R421_SESSION_TIME = _r(421, "4.7.0", "Session time limit reached, closing connection", close=True)
R421_ACCOUNT_DISABLED = _r(421, "4.7.0", "Account disabled, closing connection", close=True)
R421_RELAY_WITHDRAWN = _r(
    421, "4.7.0", "This network may no longer send without authentication, closing connection", close=True
)
R421_TOO_MANY_FROM_IP = _r(
    421, "4.7.0", "Too many connections from your address, try again later", close=True
)
R451_STORAGE_DOWN = _r(451, "4.3.0", "Temporary storage failure, try again later")
R452_TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Too many recipients")
# RFC 3463 3.4: 4.3.1 "mail system full"; here the listener's memory for messages in flight.
R452_DATA_IN_FLIGHT = _r(452, "4.3.1", "Insufficient system storage, try again later")
R454_TLS_UNAVAILABLE = _r(454, "4.7.0", "TLS not available")
R454_AUTH_TEMPORARY = _r(454, "4.7.0", "Temporary authentication failure, try again later")
R454_AUTH_THROTTLED = _r(454, "4.7.0", "Too many failed authentication attempts, try again later")

# 5xx: permanent
R500_UNRECOGNIZED = _r(500, "5.5.2", "Syntax error, command unrecognized")
R500_LINE_TOO_LONG = _r(500, "5.5.2", "Line too long")
R500_AUTH_LINE_TOO_LONG = _r(500, "5.5.6", "Authentication Exchange line is too long")  # RFC 4954 6
R500_HTTP = _r(500, "5.5.2", "This is an SMTP service, not HTTP", close=True)
R501_SYNTAX = _r(501, "5.5.4", "Syntax error in parameters or arguments")
R501_EHLO_SYNTAX = _r(501, "5.5.4", "Syntax: EHLO hostname")
R501_BAD_SENDER = _r(501, "5.1.7", "Bad sender address syntax")
R501_BAD_RECIPIENT = _r(501, "5.1.3", "Bad recipient address syntax")
R501_BAD_BASE64 = _r(501, "5.5.2", "Cannot decode base64 response")
R501_AUTH_CANCELLED = _r(501, "5.7.0", "Authentication cancelled")
R502_NOT_IMPLEMENTED = _r(502, "5.5.1", "Command not implemented")
R503_EHLO_FIRST = _r(503, "5.5.1", "Send EHLO first")
R503_NEED_MAIL = _r(503, "5.5.1", "Need MAIL command first")
R503_NEED_RCPT = _r(503, "5.5.1", "Need RCPT command first")
R503_NESTED_MAIL = _r(503, "5.5.1", "Sender already specified")
R503_ALREADY_AUTHENTICATED = _r(503, "5.5.1", "Already authenticated")
R503_AUTH_IN_TRANSACTION = _r(503, "5.5.1", "AUTH not allowed during a mail transaction")
R503_TLS_ACTIVE = _r(503, "5.5.1", "TLS already active")
R504_UNKNOWN_MECHANISM = _r(504, "5.5.4", "Unrecognized authentication mechanism")
R530_STARTTLS_FIRST = _r(530, "5.7.0", "Must issue a STARTTLS command first")
R530_AUTH_REQUIRED = _r(530, "5.7.0", "Authentication required")
R535_AUTH_INVALID = _r(535, "5.7.8", "Authentication credentials invalid")
R550_HEADER_FROM = _r(550, "5.7.1", "From: header address not allowed for this account")


# RFC 5321 4.5.3.1.6 / RFC 5322 2.1.1: a line the worker cannot shorten (long_lines) would be lost at a
# provider that enforces the limit, after our 250.
R550_LINE_TOO_LONG = _r(550, "5.6.0", "Line too long (RFC 5322 2.1.1)")


def r552_too_big(max_message_size: int) -> Reply:
    """552 5.3.4 naming the limit (RFC 1870 6.1's text, then the size), so the sender knows what fits."""
    return _r(
        552, "5.3.4", f"Message size exceeds fixed maximum message size of {size_limit(max_message_size)}"
    )


R553_SENDER_NOT_ALLOWED = _r(553, "5.7.1", "Sender address not allowed for this account")
R554_BARE_CR = _r(554, "5.6.0", "Bare CR in message data; lines must end with CRLF")
R554_EARLY_TALKER = _r(554, "5.5.1", "Protocol error: data sent before the greeting", close=True)
# A PROXY protocol header from an address not configured as a load balancer (it could forge any address).
R554_PROXY_HEADER = _r(554, "5.7.1", "PROXY protocol header not accepted from this address", close=True)
R555_PARAMETERS = _r(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not implemented")


def greeting(hostname: str) -> Reply:
    """220 with no enhanced code: RFC 2034 leaves the greeting alone."""
    return _r(220, None, f"{hostname} ESMTP smtp-proxy")


def helo(hostname: str) -> Reply:
    return _r(250, None, hostname)


def ehlo(hostname: str, extensions: list[str]) -> Reply:
    return Reply(250, None, (hostname, *extensions))


def queued(message_id: str) -> Reply:
    return _r(250, "2.0.0", f"Ok: queued as {message_id}")


def bad_parameter(problem: str) -> Reply:
    """501 5.5.4 (RFC 3463 3.6: invalid command arguments) naming what is wrong with a value."""
    return _r(501, "5.5.4", problem)


def rate_exceeded(seconds: int) -> Reply:
    """451 4.7.1 (RFC 3463 3.8: delivery not authorized, a policy that may lift) with the wait."""
    return _r(451, "4.7.1", f"Sending rate exceeded for this account, try again in {seconds} seconds")


def challenge(text: str) -> Reply:
    """334 with a base64 challenge (empty for PLAIN without an initial response)."""
    return Reply(334, None, (text,))
