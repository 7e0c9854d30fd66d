"""Relay networks in storage (``storage.relay_networks`` through ``storage.accounts``), on PostgreSQL
and SQLite: how wide a grant may be, that no two accounts' networks overlap, what a new list keeps,
and what the listener reads back (``all_grants``).

Every result is read back through a fresh session, so what is checked is what reached the database.
"""

from __future__ import annotations

import ipaddress
import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from smtp_proxy.db.models import Account, RelayNetwork
from smtp_proxy.db.session import Database
from smtp_proxy.errors import Conflict, ValidationError
from smtp_proxy.storage import accounts, audit
from smtp_proxy.storage import relay_networks as relay
from tests.integration.test_storage import _wait_for_lock_waiter, fresh

BCRYPT_COST = 4


def new_account(db: Database, name: str, networks: list[Any] | None = None) -> uuid.UUID:
    """An account with a sender domain of its own and, when given, relay networks."""
    with db.transaction() as session:
        created = accounts.create_account(
            session,
            name=name,
            email=f"{name}@example.com",
            allowed_domains=[f"{name}.example.com"],
            relay_networks=networks if networks is not None else (),
            bcrypt_cost=BCRYPT_COST,
            actor=audit.CLI,
        )
        account_id = created.account.id
    db.remove_session()
    return account_id


def change_account(db: Database, account_id: uuid.UUID, **changes: Any) -> None:
    """An admin's update of the account (``storage.accounts.update_account``), committed."""
    try:
        with db.transaction() as session:
            accounts.update_account(
                session,
                accounts.get_account(session, account_id),
                changes,
                actor=audit.CLI,
                bcrypt_cost=BCRYPT_COST,
                unique_domains=True,
            )
    finally:
        db.remove_session()


def set_networks(db: Database, account_id: uuid.UUID, networks: Any) -> None:
    """The account's relay networks become ``networks``, as the API's admin update sets them."""
    change_account(db, account_id, relay_networks=networks)


def stored(db: Database) -> dict[str, tuple[str, bool, uuid.UUID]]:
    """Every stored network: its canonical text -> (the account's name, require_tls, row id)."""
    with fresh(db) as session:
        rows = session.execute(
            select(RelayNetwork.network, Account.name, RelayNetwork.require_tls, RelayNetwork.id).join(
                Account, Account.id == RelayNetwork.account_id
            )
        )
        return {row.network: (row.name, row.require_tls, row.id) for row in rows}


def networks_of(db: Database, name: str) -> list[dict[str, Any]]:
    with fresh(db) as session:
        return relay.render(accounts.get_account_by_name(session, name))


def grant(network: str, require_tls: bool = True) -> dict[str, Any]:
    return {"network": network, "require_tls": require_tls}


def refused(networks: Any) -> ValidationError:
    """The validation error ``entries`` raises for ``networks``."""
    with pytest.raises(ValidationError) as caught:
        relay.entries(networks)
    return caught.value


# --- how wide a grant may be ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "given,canonical",
    [
        ("10.1.0.0/16", "10.1.0.0/16"),
        ("10.1.2.0/24", "10.1.2.0/24"),
        ("10.1.2.3/32", "10.1.2.3/32"),
        ("10.1.2.3", "10.1.2.3/32"),  # a bare address is one host
        ("2001:db8:1::/48", "2001:db8:1::/48"),
        ("2001:0DB8:0001:0002::/64", "2001:db8:1:2::/64"),
        ("2001:db8::1", "2001:db8::1/128"),
    ],
)
def test_a_network_up_to_the_widest_is_stored_canonical(
    database: Database, given: str, canonical: str
) -> None:
    new_account(database, "office", [grant(given)])
    assert networks_of(database, "office") == [grant(canonical)]


@pytest.mark.parametrize(
    "network,problem",
    [
        ("10.0.0.0/15", "wider than /16"),
        ("0.0.0.0/0", "wider than /16"),
        ("0.0.0.0/1", "wider than /16"),
        ("::/0", "wider than /48"),
        ("2001:db8::/47", "wider than /48"),
        ("10.1.2.3/24", "host bits set"),
        ("2001:db8::1/64", "host bits set"),
        ("::ffff:10.1.2.0/120", "IPv4 notation"),
        ("::ffff:10.1.2.3", "IPv4 notation"),
        ("10.1.2.0/33", "not a network"),
        ("printers", "not a network"),
    ],
)
def test_a_network_too_wide_or_malformed_is_refused_naming_it(
    database: Database, network: str, problem: str
) -> None:
    """The error names the entry, so the API's 422 says which one; no account is created."""
    error = refused([grant("10.9.9.0/24"), grant(network)])
    assert error.field == "relay_networks[1].network"
    assert problem in error.problem
    with pytest.raises(ValidationError):
        new_account(database, "office", [grant(network)])
    with fresh(database) as session:
        assert accounts.list_accounts(session) == []
    assert stored(database) == {}


@pytest.mark.parametrize(
    "entry,field",
    [
        ({"network": "10.1.2.0/24", "require_tls": "yes"}, "relay_networks[0].require_tls"),
        ({"network": "10.1.2.0/24", "tls": True}, "relay_networks[0]"),
        ({"require_tls": True}, "relay_networks[0]"),
        ("10.1.2.0/24", "relay_networks[0]"),
        ({"network": 167838208}, "relay_networks[0].network"),
    ],
)
def test_a_malformed_entry_is_refused(entry: Any, field: str) -> None:
    assert refused([entry]).field == field


def test_the_list_itself_must_be_a_list_of_at_most_a_hundred() -> None:
    assert refused("10.1.2.0/24").field == "relay_networks"
    many = [grant(f"10.{i // 256}.{i % 256}.0/24") for i in range(relay.MAX_NETWORKS + 1)]
    assert refused(many).field == "relay_networks"
    assert len(relay.entries(many[:-1])) == relay.MAX_NETWORKS


def test_require_tls_defaults_to_true() -> None:
    assert relay.entries([{"network": "10.1.2.0/24"}]) == [relay.Entry("10.1.2.0/24", True)]


@pytest.mark.parametrize(
    "networks",
    [
        ["10.1.2.0/24", "10.1.2.0/24"],
        ["10.1.0.0/16", "10.1.2.0/24"],
        ["10.1.2.0/24", "10.1.0.0/16"],
        ["10.1.2.0/24", "10.1.2.7"],
        ["2001:db8:1::/48", "2001:db8:1:2::/64"],
    ],
)
def test_networks_of_one_list_must_not_overlap(networks: list[str]) -> None:
    error = refused([grant(network) for network in networks])
    assert error.field == "relay_networks[1].network"
    assert "listed before it" in error.problem


def test_an_ipv4_and_an_ipv6_network_never_overlap(database: Database) -> None:
    new_account(database, "office", [grant("10.1.0.0/16"), grant("2001:db8:1::/48", False)])
    assert set(stored(database)) == {"10.1.0.0/16", "2001:db8:1::/48"}


# --- one network, one account --------------------------------------------------------------------


@pytest.mark.parametrize(
    "held,wanted",
    [
        ("10.1.2.0/24", "10.1.2.0/24"),  # the same
        ("10.1.0.0/16", "10.1.2.0/24"),  # inside the one held
        ("10.1.2.0/24", "10.1.0.0/16"),  # around the one held
        ("10.1.2.7/32", "10.1.2.0/24"),
        ("2001:db8:1::/48", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::/64", "2001:db8:1::/48"),
    ],
)
def test_a_network_overlapping_another_accounts_is_conflict_and_changes_nothing(
    database: Database, held: str, wanted: str
) -> None:
    new_account(database, "first", [grant(held)])
    second = new_account(database, "second", [grant("10.200.0.0/24")])
    before = stored(database)
    with pytest.raises(relay.NetworkTaken) as caught:
        set_networks(database, second, [grant("10.200.0.0/24"), grant(wanted)])
    assert isinstance(caught.value, Conflict)  # the API's 409
    assert str(ipaddress.ip_network(wanted)) in str(caught.value)
    if held != wanted:
        assert f"overlaps {held}" in str(caught.value)
    assert stored(database) == before


def test_an_account_created_with_a_taken_network_is_not_created(database: Database) -> None:
    new_account(database, "first", [grant("10.1.0.0/16")])
    with pytest.raises(relay.NetworkTaken):
        new_account(database, "second", [grant("10.1.2.0/24")])
    with fresh(database) as session:
        assert [a.name for a in accounts.list_accounts(session)] == ["first"]
    assert list(stored(database)) == ["10.1.0.0/16"]


def test_neighbouring_networks_go_to_two_accounts(database: Database) -> None:
    new_account(database, "first", [grant("10.1.2.0/24")])
    new_account(database, "second", [grant("10.1.3.0/24"), grant("10.1.4.0/32")])
    assert {net: owner for net, (owner, _, _) in stored(database).items()} == {
        "10.1.2.0/24": "first",
        "10.1.3.0/24": "second",
        "10.1.4.0/32": "second",
    }


def test_a_deactivated_account_keeps_its_networks_until_they_are_withdrawn(database: Database) -> None:
    """Deactivation stops its clients (no grant for an inactive account) but frees no network."""
    first = new_account(database, "first", [grant("10.1.2.0/24")])
    second = new_account(database, "second")
    with database.transaction() as session:
        accounts.deactivate_account(session, accounts.get_account(session, first), actor=audit.CLI)
    database.remove_session()
    with pytest.raises(relay.NetworkTaken):
        set_networks(database, second, [grant("10.1.2.0/24")])
    set_networks(database, first, [])
    set_networks(database, second, [grant("10.1.2.0/24")])
    assert stored(database)["10.1.2.0/24"][0] == "second"


# --- replacing an account's list -----------------------------------------------------------------


def test_relisting_a_network_keeps_its_row_and_takes_the_new_tls_rule(database: Database) -> None:
    office = new_account(database, "office", [grant("10.1.2.0/24"), grant("2001:db8:1::/48")])
    before = stored(database)
    set_networks(database, office, [grant("10.1.2.0/24", require_tls=False), grant("10.9.0.0/24")])
    after = stored(database)
    assert set(after) == {"10.1.2.0/24", "10.9.0.0/24"}
    assert after["10.1.2.0/24"] == ("office", False, before["10.1.2.0/24"][2])
    assert after["10.9.0.0/24"][1] is True


def test_relisting_the_same_list_changes_no_row(database: Database) -> None:
    networks = [grant("10.1.2.0/24"), grant("10.1.3.0/24", False)]
    office = new_account(database, "office", networks)
    before = stored(database)
    set_networks(database, office, networks)
    assert stored(database) == before


def test_an_account_may_widen_or_narrow_its_own_network(database: Database) -> None:
    """Its own networks are not another account's: /24 -> /16 -> /24 is no conflict."""
    office = new_account(database, "office", [grant("10.1.2.0/24")])
    set_networks(database, office, [grant("10.1.0.0/16")])
    assert list(stored(database)) == ["10.1.0.0/16"]
    set_networks(database, office, [grant("10.1.5.0/24")])
    assert list(stored(database)) == ["10.1.5.0/24"]


def test_an_empty_list_withdraws_every_network(database: Database) -> None:
    office = new_account(database, "office", [grant("10.1.2.0/24"), grant("2001:db8:1::/48")])
    set_networks(database, office, [])
    assert stored(database) == {}
    assert networks_of(database, "office") == []


def test_a_refused_list_leaves_the_old_one(database: Database) -> None:
    office = new_account(database, "office", [grant("10.1.2.0/24")])
    before = stored(database)
    with pytest.raises(ValidationError):
        set_networks(database, office, [grant("10.1.2.0/24"), grant("10.0.0.0/8")])
    assert stored(database) == before


def test_a_change_of_networks_is_audited_as_the_accounts(database: Database) -> None:
    office = new_account(database, "office")
    set_networks(database, office, [grant("10.1.2.0/24")])
    with fresh(database) as session:
        entries = audit.list_entries(session, office)
        latest = entries[0]  # newest first
        assert (latest.entity, latest.action) == ("account", "update")
        assert "relay_networks" in latest.changes["fields"]


# --- what the listener reads ---------------------------------------------------------------------


def test_all_grants_names_each_network_with_its_accounts_policy(database: Database) -> None:
    office = new_account(database, "office", [grant("10.1.2.0/24"), grant("2001:db8:1::/48", False)])
    new_account(database, "plain")
    with fresh(database) as session:
        grants = sorted(relay.all_grants(session), key=lambda g: str(g.network))
    assert [(str(g.network), g.require_tls, g.account_id, g.account_name) for g in grants] == [
        ("10.1.2.0/24", True, office, "office"),
        ("2001:db8:1::/48", False, office, "office"),
    ]
    assert all(g.allowed_domains == ("office.example.com",) and g.active for g in grants)


# --- two grants at once (PostgreSQL) -------------------------------------------------------------


def test_a_grant_waits_for_a_concurrent_overlapping_grant_and_then_sees_it(pg_url: str, make_config) -> None:
    """The overlap check holds an advisory lock to the end of its transaction: a second grant of
    an overlapping network waits for the first to commit, then finds it taken."""
    db = Database(make_config(pg_url).database)
    first_id = new_account(db, "first")
    second_id = new_account(db, "second")
    outcome: list[BaseException | None] = []

    def second() -> None:
        try:
            set_networks(db, second_id, [grant("10.1.2.0/24")])
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=second)
    try:
        with db.transaction() as session:
            account = accounts.get_account(session, first_id)
            relay.replace_networks(session, account, relay.entries([grant("10.1.0.0/16")]))
            thread.start()
            # Commit only once the second grant waits on the lock this transaction holds.
            _wait_for_lock_waiter(pg_url, pg_url.rsplit("/", 1)[1])
            assert outcome == []
        db.remove_session()
        thread.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], relay.NetworkTaken), outcome
        assert {net: owner for net, (owner, _, _) in stored(db).items()} == {"10.1.0.0/16": "first"}
    finally:
        thread.join(30)
        db.dispose()
