"""Prometheus collectors of the submission listener (prefix ``smtp_proxy_smtp_``).

Defined once at import on the default registry, so that ``serve all`` can
expose every listener's metrics on one endpoint.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from smtp_proxy import proxy_protocol

# With several processes (smtp.processes), the open sessions of the live ones are summed.
ACTIVE_CONNECTIONS = Gauge(
    "smtp_proxy_smtp_active_connections",
    "Open SMTP sessions (summed over live processes)",
    multiprocess_mode="livesum",
)
SESSIONS = Counter("smtp_proxy_smtp_sessions_total", "Ended SMTP sessions by outcome", ["outcome"])
MESSAGES = Counter(
    "smtp_proxy_smtp_messages_total", "Messages at the end of DATA by result and reason", ["result", "reason"]
)
AUTHENTICATED = Counter(
    "smtp_proxy_smtp_authenticated_sessions_total",
    "Sessions that became an account's, by how: password (SMTP AUTH) or network (a relay network)",
    ["auth"],
)
RECEIVED_BYTES = Counter("smtp_proxy_smtp_received_bytes_total", "Bytes read from SMTP clients")
AUTH_FAILURES = Counter(
    "smtp_proxy_smtp_auth_failures_total", "Failed SMTP AUTH attempts by reason", ["reason"]
)
TLS_FAILURES = Counter("smtp_proxy_smtp_tls_handshake_failures_total", "Failed TLS handshakes")
COMMIT_SECONDS = Histogram(
    "smtp_proxy_smtp_commit_seconds",
    "From the end of DATA to the committed message",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
LIMIT_REJECTIONS = Counter(
    "smtp_proxy_smtp_limit_rejections_total",
    "Connections, sessions, transactions, recipients and messages refused by a fair-use limit or a"
    " tenant policy, by reason",
    ["reason"],
)
# Every reason the listener uses, so each series exists (at 0) from the start.
LIMIT_REASONS = (
    "per_ip",
    "auth_timeout",
    "session_time",
    "account_disabled",
    "sender_domain",
    "messages_per_minute",
    "messages_per_hour",
    "messages_per_day",
    "recipients_per_day",
    "data_in_flight",
    "header_from",
)
for _reason in LIMIT_REASONS:
    LIMIT_REJECTIONS.labels(_reason)
PROXY_HEADER_FAILURES = Counter(
    "smtp_proxy_smtp_proxy_header_failures_total",
    "Connections closed over a PROXY protocol header: a trusted balancer's bad, late or missing"
    " one (the parser's reason, timeout, closed), or one sent by an untrusted peer or sent twice",
    ["reason"],
)
for _reason in (*proxy_protocol.REASONS, "timeout", "closed", "untrusted", "repeated"):
    PROXY_HEADER_FAILURES.labels(_reason)
