"""Prometheus collectors of the queue worker (prefix ``smtp_proxy_delivery_`` and ``smtp_proxy_queue_``).

Defined once at import on the default registry, like the listener's, so that
``serve all`` exposes them beside the others. Providers are labelled by type,
never by id: the label set stays bounded whatever the tenants configure.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# The queue is the database's: with several processes, the latest reading is the answer.
QUEUE_DEPTH = Gauge(
    "smtp_proxy_queue_messages",
    "Messages waiting (queued) or in delivery (processing), as last read",
    ["status"],
    multiprocess_mode="mostrecent",
)
ATTEMPTS = Counter(
    "smtp_proxy_delivery_attempts_total",
    "Hand-overs to a provider by provider type and outcome (delivered, deferred, failed)",
    ["provider_type", "outcome"],
)
ATTEMPT_SECONDS = Histogram(
    "smtp_proxy_delivery_attempt_seconds",
    "Time one provider took to answer one message",
    ["provider_type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
LATENCY = Histogram(
    "smtp_proxy_delivery_latency_seconds",
    "From the SMTP 250 to the provider's acceptance, for delivered messages",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0),
)
FINISHED = Counter(
    "smtp_proxy_delivery_messages_total", "Messages that reached an end (delivered, failed)", ["status"]
)
RETRIES = Counter("smtp_proxy_delivery_retries_total", "Messages deferred to a later try")
LEASES_LOST = Counter(
    "smtp_proxy_delivery_leases_lost_total", "Messages whose claim ran out before their outcome was written"
)
PURGED = Counter("smtp_proxy_retention_purged_bodies_total", "Message bodies dropped by the retention purge")
FAILOVER_STOPPED = Counter(
    "smtp_proxy_delivery_failover_stopped_total",
    "Attempts that left providers untried, by why (max_failover, attempt_budget)",
    ["reason"],
)
HELD = Counter(
    "smtp_proxy_delivery_held_total", "Messages found waiting for a deactivated account (logged once each)"
)
DKIM_SIGNATURES = Counter(
    "smtp_proxy_delivery_dkim_signatures_total",
    "DKIM signing per hand-over to a raw-message provider: signed, unsigned (no key), failed (sent unsigned)",
    ["outcome"],
)
NOTICES = Counter(
    "smtp_proxy_delivery_notices_total",
    "Delivery status notifications queued for senders, by action (failed, delayed, relayed)",
    ["action"],
)
LONG_LINES = Counter(
    "smtp_proxy_delivery_long_lines_total",
    "Messages with a line over 998 octets, by what the worker did: fitted (folded or re-encoded), or"
    " unfixable (sent as stored; only mail queued before the listener refused such lines)",
    ["outcome"],
)
for _outcome in ("fitted", "unfixable"):
    LONG_LINES.labels(_outcome)
