"""Portable column types: JSONB on PostgreSQL and JSON on SQLite, UTC timestamps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

JsonDocument = JSON().with_variant(JSONB(), "postgresql")
# For a column that is mostly absent: Python None is SQL NULL, not the JSON document ``null``.
OptionalJsonDocument = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime everywhere.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones and hands back
    naive values, which are UTC by construction because naive input is refused.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso_timestamp(moment: datetime) -> str:
    """A timestamp as the API writes it: UTC, always with microseconds.

    ``2026-01-02T03:04:05.000000+00:00``: one fixed width, which PostgreSQL
    renders identically (``storage/json_rows.TIMESTAMP_FORMAT``).
    """
    return moment.astimezone(UTC).isoformat(timespec="microseconds")
