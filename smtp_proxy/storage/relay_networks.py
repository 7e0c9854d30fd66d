"""Relay networks: the networks whose clients send as an account without AUTH.

This is how hosted relays let an office printer or an old appliance send. The risk is
the network's, so only an admin grants one, and the rules keep a grant narrow and
unambiguous: nothing wider than a /16 (IPv4) or a /48 (IPv6); one network belongs to
one account, and no two accounts' networks overlap, so an address names at most one
account. The check runs under a transaction-scoped advisory lock on PostgreSQL (two
grants at once are checked one after the other); SQLite's single writer does the same.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any, NamedTuple

from sqlalchemy import select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from smtp_proxy import validation
from smtp_proxy.db.models import Account, RelayNetwork
from smtp_proxy.errors import Conflict, ValidationError

# The widest network a grant may name, per IP version.
WIDEST_PREFIX = {4: 16, 6: 48}
MAX_NETWORKS = 100  # per account
_LOCK_ID = 0x736D74705F6E6574  # "smtp_net": the grant of relay networks, in pg_advisory_xact_lock

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Entry(NamedTuple):
    """One network of a grant, validated: canonical CIDR text and whether it needs TLS."""

    network: str
    require_tls: bool


class Grant(NamedTuple):
    """A network and the account its clients send as, for the listener's lookups."""

    network: Network
    require_tls: bool
    account_id: uuid.UUID
    account_name: str
    allowed_domains: tuple[str, ...]
    active: bool
    allow_any_header_from: bool


class NetworkTaken(Conflict):
    """A network overlaps one that another account holds."""


def entries(value: object, field: str = "relay_networks") -> list[Entry]:
    """Validate a list of ``{"network": CIDR, "require_tls": bool}`` (require_tls defaults to true)."""
    if not isinstance(value, (list, tuple)):
        raise ValidationError(field, "must be a list of {network, require_tls} objects")
    if len(value) > MAX_NETWORKS:
        raise ValidationError(field, f"must hold at most {MAX_NETWORKS} networks")
    found: list[tuple[Network, bool]] = []
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(item, dict) or "network" not in item or set(item) - {"network", "require_tls"}:
            raise ValidationError(where, "must be an object with network and, optionally, require_tls")
        network = validation.network(item["network"], f"{where}.network")
        widest = WIDEST_PREFIX[network.version]
        if network.prefixlen < widest:
            raise ValidationError(
                f"{where}.network",
                f"{network} is wider than /{widest}: a relay network names the devices' own network",
            )
        require_tls = item.get("require_tls", True)
        if not isinstance(require_tls, bool):
            raise ValidationError(f"{where}.require_tls", "must be true or false")
        for other, _ in found:
            if network.overlaps(other):
                raise ValidationError(f"{where}.network", f"{network} overlaps {other}, listed before it")
        found.append((network, require_tls))
    return [Entry(str(network), require_tls) for network, require_tls in found]


def render(account: Account) -> list[dict[str, Any]]:
    return [{"network": n.network, "require_tls": bool(n.require_tls)} for n in account.relay_networks]


def replace_networks(session: Session, account: Account, wanted: list[Entry]) -> None:
    """Make ``wanted`` the account's networks (the caller audits the change as the account's).

    Raises NetworkTaken when one overlaps another account's network; nothing is changed then.
    A network kept from before keeps its row, so a re-listed network never meets its own
    unique key on the way.
    """
    if wanted:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        held = session.execute(
            select(RelayNetwork.network).where(RelayNetwork.account_id != account.id)
        ).scalars()
        others = [ipaddress.ip_network(network) for network in held]
        for entry in wanted:
            network = ipaddress.ip_network(entry.network)
            for other in others:
                if network.version == other.version and network.overlaps(other):
                    overlap = "" if network == other else f" (it overlaps {other})"
                    raise NetworkTaken(f"{network} is already another account's relay network{overlap}")
    kept = {n.network: n for n in account.relay_networks}
    rows = []
    for entry in wanted:
        row = kept.get(entry.network) or RelayNetwork(
            id=uuid.uuid4(), account_id=account.id, network=entry.network
        )
        row.require_tls = entry.require_tls
        rows.append(row)
    account.relay_networks = rows
    session.flush()


def all_grants(connection: Session | Connection) -> list[Grant]:
    """Every relay network with its account's sending policy: what the listener matches against."""
    rows = connection.execute(
        select(
            RelayNetwork.network,
            RelayNetwork.require_tls,
            Account.id,
            Account.name,
            Account.allowed_domains,
            Account.active,
            Account.allow_any_header_from,
        ).join(Account, RelayNetwork.account_id == Account.id)
    )
    return [
        Grant(
            ipaddress.ip_network(row.network),
            bool(row.require_tls),
            row.id,
            row.name,
            tuple(row.allowed_domains or ()),
            bool(row.active),
            bool(row.allow_any_header_from),
        )
        for row in rows
    ]
