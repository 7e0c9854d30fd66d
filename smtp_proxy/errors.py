"""Exceptions shared by every layer; standard library only."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration value is missing or wrong; ``key`` is its dotted path."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class DatabaseUnavailable(Exception):
    """The database did not answer; the caller should retry later (SMTP 451, HTTP 503)."""


class SchemaNotMigrated(DatabaseUnavailable):
    """The database answers, but its schema is older than this code's (or the SQLite file does
    not exist yet): ``smtp-proxy db upgrade`` fixes it. Serving code treats it as unavailable
    (451, 503, retry); the CLI and the listeners' start refuse with this one-line message."""


class NotFound(Exception):
    """The entity does not exist, or belongs to another tenant."""


class Conflict(Exception):
    """A unique constraint was violated, e.g. a duplicate account name."""


class ValidationError(Exception):
    """Input rejected before it reached the database; ``field`` names the culprit."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class DecryptionError(Exception):
    """A ciphertext cannot be opened: unknown key id, or tampered data."""
