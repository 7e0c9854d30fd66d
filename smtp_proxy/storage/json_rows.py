"""Lists rendered as JSON by PostgreSQL, for the API's busiest GETs.

A page of 20 providers or 50 messages costs the API far more in Python than in
the database: every row's UUIDs, timestamps and JSON documents are decoded
into objects, then turned back into JSON text. PostgreSQL builds the same
array in one pass (``json_agg`` of ``json_build_object``, keys in the
documented order), and the API passes the text through. Other databases
(SQLite, the embedded default) get ``None`` from the callers here and render
rows in Python; tests hold the two renderings equal.

Timestamps are written in UTC with microseconds, exactly like
``db.types.iso_timestamp``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import DateTime, Text, cast, func, literal_column
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

EMPTY_ARRAY = literal_column("'[]'::jsonb")  # for a JSONB column that may be NULL
_NO_ROWS = literal_column("'[]'::json")
TIMESTAMP_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'  # to_char, of the UTC time
# Constants of the statement itself, not bound parameters converted on every execution.
_UTC = literal_column("'UTC'")
_TIMESTAMP_FORMAT = literal_column(f"'{TIMESTAMP_FORMAT}'")


def renders_json(connection: Connection) -> bool:
    """Whether this connection's database builds the lists itself (PostgreSQL)."""
    return connection.dialect.name == "postgresql"


def json_object(fields: Mapping[str, ColumnElement[Any]]) -> ColumnElement[Any]:
    """``json_build_object`` of ``{key: expression}``, keys in order."""
    arguments: list[Any] = []
    for key, expression in fields.items():
        assert key.isidentifier(), key  # keys are our own constants, never input
        if isinstance(getattr(expression.type, "impl", expression.type), DateTime):  # or a decorator
            expression = func.to_char(func.timezone(_UTC, expression), _TIMESTAMP_FORMAT)
        arguments += [literal_column(f"'{key}'"), expression]
    return func.json_build_object(*arguments)


def json_array(
    fields: Mapping[str, ColumnElement[Any]],
    *order_by: ColumnElement[Any],
    where: ColumnElement[bool] | None = None,
) -> ColumnElement[str]:
    """The JSON text of an array of ``json_object(fields)``, one per row, in ``order_by``.

    ``where`` keeps only some rows of the group (``FILTER``); an empty group is ``[]``.
    """
    aggregate = func.json_agg(aggregate_order_by(json_object(fields), *order_by))
    if where is not None:
        aggregate = aggregate.filter(where)
    return cast(func.coalesce(aggregate, _NO_ROWS), Text)
