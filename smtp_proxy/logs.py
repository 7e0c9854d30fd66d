"""Logging: one JSON object per line on stdout, a correlation id, and redaction.

The correlation id lives in a contextvar, set per SMTP connection, per API
request and per worker delivery, so every line written while serving one of
them carries it without being passed around. The redaction filter is a last
line of defence: code must not log secrets in the first place, but an event
field whose name says it holds one (password, api_key, body, ...) is replaced
before it is written.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import itertools
import logging
import logging.handlers
import os
import queue
import secrets
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from smtp_proxy.config import LoggingConfig

_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)

# Event fields that must never reach a log line, matched on the lowercased name:
# exactly one of these, or containing one of the fragments (``new_password``).
SECRET_FIELDS = frozenset(
    {"body", "data", "content", "attachment", "attachments", "authorization", "auth_payload", "credentials"}
)
SECRET_FRAGMENTS = ("password", "passwd", "secret", "api_key", "apikey", "token", "encryption_key")
# Fields that may keep a short prefix so an operator can tell keys apart.
PREFIX_FIELDS = frozenset({"api_key", "apikey", "token"})
PREFIX_LENGTH = 6
REDACTED = "[redacted]"

# Attributes every LogRecord has; anything else was passed as an event field.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def get_correlation_id() -> str | None:
    return _correlation_id.get()


def set_correlation_id(correlation_id: str | None) -> None:
    """For a thread that serves one request after another (waitress, SMTP sessions)."""
    _correlation_id.set(correlation_id)


class _Ids:
    """32 hex digits: a random per-process prefix and a counter.

    Unique across processes (80 random bits) without a system call per id, as
    uuid4() would make for every request and SMTP session. Ids are labels for
    log lines, not secrets. A forked child draws a new prefix.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(10)
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFF:012x}"


new_correlation_id = _Ids()
os.register_at_fork(after_in_child=new_correlation_id.reseed)


@contextlib.contextmanager
def correlation(correlation_id: str | None = None) -> Iterator[str]:
    """Run a block under a correlation id (a new one unless given)."""
    cid = correlation_id or new_correlation_id()
    token = _correlation_id.set(cid)
    try:
        yield cid
    finally:
        _correlation_id.reset(token)


@functools.lru_cache(maxsize=1024)
def _is_secret(name: str) -> bool:
    """Field names are few and repeat on every line: decide each one once."""
    lowered = name.lower()
    return lowered in SECRET_FIELDS or any(fragment in lowered for fragment in SECRET_FRAGMENTS)


def redact_value(name: str, value: Any) -> Any:
    """The loggable form of an event field; nested mappings are redacted too."""
    if _is_secret(name) and value is not None and not isinstance(value, bool):
        # A prefix only of a long key: a short one would be given away whole.
        if name.lower() in PREFIX_FIELDS and isinstance(value, str) and len(value) >= 4 * PREFIX_LENGTH:
            return value[:PREFIX_LENGTH] + "…"
        return REDACTED
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    return value


class ContextFilter(logging.Filter):
    """Adds ``correlation_id`` and redacts secret-named event fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "correlation_id"):
            record.correlation_id = _correlation_id.get()
        for name in list(vars(record)):
            if name not in _RECORD_ATTRS:
                setattr(record, name, redact_value(name, getattr(record, name)))
        return True


class _Formatter(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "%(timestamp)s %(level)s %(name)s %(message)s %(correlation_id)s",
            rename_fields={"name": "logger"},
            timestamp=False,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["timestamp"] = (
            datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        log_data["level"] = record.levelname.lower()
        # With smtp.processes or api.processes above 1, several processes share one stream.
        log_data["pid"] = record.process


class _TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal: time, level, logger, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k != "correlation_id"}
        if record.__dict__.get("correlation_id"):
            extras = {"cid": record.correlation_id, **extras}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


_writer: logging.handlers.QueueListener | None = None


def stop_background_writer() -> None:
    """Write out every queued record and end the writer thread (at exit, or before reconfiguring)."""
    global _writer
    writer, _writer = _writer, None
    if writer is not None:
        writer.stop()


atexit.register(stop_background_writer)


class _RecordQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread unformatted: formatting happens there, once."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()  # fix %-arguments now; they may change later
        record.args = None
        return record


def configure_logging(
    config: LoggingConfig, stream: TextIO | None = None, *, background: bool = False
) -> logging.Handler:
    """Send every logger to one stdout handler in the configured format and level.

    ``background`` (the listeners): a record is filtered in the thread that
    logs it (correlation id, redaction) and queued; one writer thread formats
    and writes, so hundreds of session threads never queue on the handler's
    lock around a write. The queue is drained at exit.
    """
    handler = logging.StreamHandler(stream or sys.stdout)
    if config.format == "json":
        handler.setFormatter(_Formatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    stop_background_writer()
    front: logging.Handler = handler
    if background:
        global _writer
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        front = _RecordQueueHandler(records)
        _writer = logging.handlers.QueueListener(records, handler)
        _writer.start()
    front.addFilter(ContextFilter())
    # No line carries a thread name; looking one up would make ``threading``
    # register a dummy Thread object for each SMTP session thread (server.py).
    logging.logThreads = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(front)
    apply_level(config)
    # SQLAlchemy must not echo SQL.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    # Alembic logs its plugins and "Context impl" at info each time the schema's revision is read
    # (at a listener's start, and by /readyz until the schema is current).
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # waitress warns "Task queue depth is N" for every request queued behind busy
    # threads: one line per request under load, and nothing an operator can act on
    # that the latency metrics do not already show.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return handler


def apply_level(config: LoggingConfig) -> None:
    """Hot-reload hook: change the level of the running process."""
    logging.getLogger().setLevel(config.level.upper())
