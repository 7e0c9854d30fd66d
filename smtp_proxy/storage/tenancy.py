"""Rows that belong to one account: how a tenant's id reaches them, and only theirs."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from smtp_proxy.errors import NotFound

Row = TypeVar("Row")


def owned(session: Session, model: type[Row], account_id: uuid.UUID, row_id: uuid.UUID, what: str) -> Row:
    """The account's row of ``model`` with ``row_id``.

    Another account's row is NotFound exactly as a missing one is, so no tenant learns from an
    answer which ids exist elsewhere (no oracle across tenants).
    """
    table: Any = model
    row = session.scalar(select(model).where(table.id == row_id, table.account_id == account_id))
    if row is None:
        raise NotFound(f"no such {what}")
    return row
