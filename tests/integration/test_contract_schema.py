"""The migrated PostgreSQL schema holds the contract's enums and lengths.

The migrations are history and spell their values out; the contract is what
the API, the validators and the models state today. A value added to one
without a migration for the other fails here.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from smtp_proxy import contract
from smtp_proxy.contract import DeliveryStatus, MessageStatus, ProviderType


@pytest.fixture
def connection(pg_url: str):
    engine = create_engine(pg_url)
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("type_name", "kind"),
    [("provider_type", ProviderType), ("message_status", MessageStatus), ("delivery_status", DeliveryStatus)],
)
def test_native_enum_types_hold_the_contracts_values_in_order(connection, type_name: str, kind) -> None:
    labels = connection.execute(
        text(
            "SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
            "WHERE t.typname = :name ORDER BY e.enumsortorder"
        ),
        {"name": type_name},
    ).scalars()
    assert list(labels) == contract.values(kind)


@pytest.mark.parametrize(
    ("table", "column", "type_name"),
    [
        ("esp_providers", "provider_type", "provider_type"),
        ("messages", "status", "message_status"),
        ("delivery_logs", "status", "delivery_status"),
    ],
)
def test_enum_columns_use_the_enum_types(connection, table: str, column: str, type_name: str) -> None:
    found = connection.execute(
        text("SELECT udt_name FROM information_schema.columns WHERE table_name = :t AND column_name = :c"),
        {"t": table, "c": column},
    ).scalar_one()
    assert found == type_name


@pytest.mark.parametrize(
    ("table", "column", "length"),
    [
        ("accounts", "name", contract.ACCOUNT_NAME_MAX),
        ("accounts", "email", contract.EMAIL_MAX),
        ("esp_providers", "name", contract.NAME_MAX),
        ("routing_rules", "name", contract.NAME_MAX),
    ],
)
def test_text_columns_hold_the_contracts_longest_values(
    connection, table: str, column: str, length: int
) -> None:
    found = connection.execute(
        text(
            "SELECT character_maximum_length FROM information_schema.columns "
            "WHERE table_name = :t AND column_name = :c"
        ),
        {"t": table, "c": column},
    ).scalar_one()
    assert found == length


def test_priority_check_matches_the_contracts_range(connection) -> None:
    """The schema refuses a negative priority; the contract's upper bound is the column's own."""
    definition = connection.execute(
        text(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conname = 'ck_routing_rules_priority_not_negative'"
        )
    ).scalar_one()
    assert definition == "CHECK ((priority >= 0))"
    assert contract.PRIORITY_MAX == 2**31 - 1  # PostgreSQL's integer
    assert (
        connection.execute(
            text(
                "SELECT data_type FROM information_schema.columns WHERE table_name = 'routing_rules' "
                "AND column_name = 'priority'"
            )
        ).scalar_one()
        == "integer"
    )
