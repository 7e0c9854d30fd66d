"""SMTP credentials in storage (``storage.credentials``, ``storage.auth``), on PostgreSQL and SQLite:
user name and label rules, passwords, a credential's domain subset and what is left of it when the
account's domains shrink, ``last_used_at`` at most once a minute, and migration 0005 that moved each
account's own login into its first credential.

Results are read back through fresh sessions; time is moved by setting ``last_used_at`` back in the
database, not by waiting.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import create_engine, inspect, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from smtp_proxy import crypto
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.migrate import alembic_config, head_revision, upgrade
from smtp_proxy.db.models import Account, AuditLog, Message, SmtpCredential
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.errors import Conflict, NotFound, ValidationError
from smtp_proxy.smtp.account_state import AccountStates
from smtp_proxy.smtp.credentials import AuthenticatedAccount, CredentialVerifier
from smtp_proxy.storage import accounts, audit, credentials, messages
from smtp_proxy.storage.auth import effective_domains, find_login
from tests.integration.test_relay_networks import change_account
from tests.integration.test_storage import fresh
from tests.logins import logged_in

BCRYPT_COST = 4
DOMAINS = ["example.com", "*.example.org"]
CHOSEN = "sixteen-chars-ok"  # exactly credentials.MIN_CHOSEN_PASSWORD


def new_account(db: Database, name: str = "office", domains: list[str] | None = None) -> uuid.UUID:
    with fresh(db) as session:
        created = accounts.create_account(
            session,
            name=name,
            email=f"ops@{name}.example.net",
            allowed_domains=domains if domains is not None else [f"{name}.example.net"],
            bcrypt_cost=BCRYPT_COST,
            actor=audit.CLI,
        )
        return created.account.id


def new_credential(db: Database, account_id: uuid.UUID, label: str = "printer", **fields: Any) -> Any:
    """A credential of the account (``credentials.NewCredential``), committed."""
    with fresh(db) as session:
        account = accounts.get_account(session, account_id)
        return credentials.create_credential(
            session, account, label=label, bcrypt_cost=BCRYPT_COST, actor=audit.CLI, **fields
        )


def change(db: Database, account_id: uuid.UUID, credential_id: uuid.UUID, **changes: Any) -> list[str]:
    with fresh(db) as session:
        account = accounts.get_account(session, account_id)
        credential = credentials.get_credential(session, account_id, credential_id)
        return credentials.update_credential(
            session, credential, account, changes, bcrypt_cost=BCRYPT_COST, actor=audit.CLI
        )


def set_account_domains(db: Database, account_id: uuid.UUID, domains: list[str]) -> None:
    change_account(db, account_id, allowed_domains=domains)


def enqueue(connection: Any, cipher: Cipher, account_id: uuid.UUID, credential_id: uuid.UUID) -> uuid.UUID:
    """A queued message the credential sent; its id."""
    return messages.enqueue_message(
        connection,
        cipher,
        account_id=account_id,
        sender="scan@office.example.net",
        recipients=["a@example.com"],
        data=b"Subject: scan\r\n\r\nhi\r\n",
        correlation_id="c-1",
        credential_id=credential_id,
    ).id


def row(db: Database, credential_id: uuid.UUID) -> SmtpCredential | None:
    with fresh(db) as session:
        return session.get(SmtpCredential, credential_id)


def usernames(db: Database) -> list[str]:
    with fresh(db) as session:
        return sorted(session.scalars(select(SmtpCredential.username)))


def login_domains(db: Database, username: str) -> list[str]:
    with fresh(db) as session:
        found = find_login(session, username)
    assert found is not None, username
    return found.allowed_domains


# --- user names and labels -----------------------------------------------------------------------


def test_a_credential_is_named_after_its_account_and_label(database: Database) -> None:
    office = new_account(database)
    made = new_credential(database, office, "printer")
    assert made.credential.username == "office.printer"
    assert usernames(database) == ["office", "office.printer"]
    stored = row(database, made.credential.id)
    assert stored is not None
    assert (stored.label, stored.enabled, stored.allowed_ips, stored.allowed_domains) == (
        "printer",
        True,
        [],
        None,
    )
    assert crypto.verify_password(made.password, stored.password_hash)


@pytest.mark.parametrize("username", ["office.scanner-2", "office.a.b", "office.x@y"])
def test_a_chosen_user_name_under_the_accounts_name_is_taken(database: Database, username: str) -> None:
    office = new_account(database)
    assert new_credential(database, office, username=username).credential.username == username


@pytest.mark.parametrize(
    "username",
    [
        "other.printer",  # another account's space
        "officeprinter",  # the name without the dot
        "Office.printer",  # names are case-sensitive
        "printer",
        "office.a b",  # not the alphabet
        "office." + "x" * 123,  # 130 characters
        ".office.x",
    ],
)
def test_a_user_name_outside_the_accounts_space_is_refused(database: Database, username: str) -> None:
    office = new_account(database)
    with pytest.raises(ValidationError) as caught:
        new_credential(database, office, username=username)
    assert caught.value.field == "username"
    assert usernames(database) == ["office"]


@pytest.mark.parametrize("label", ["", "-x", "a/b", "a b", "é", "x" * 65])
def test_a_malformed_label_is_refused(database: Database, label: str) -> None:
    office = new_account(database)
    with pytest.raises(ValidationError) as caught:
        new_credential(database, office, label)
    assert caught.value.field == "label"


def test_a_label_is_unique_within_an_account_only(database: Database) -> None:
    office = new_account(database)
    shop = new_account(database, "shop")
    new_credential(database, office, "printer")
    with pytest.raises(Conflict, match="labelled 'printer'"):
        new_credential(database, office, "printer", username="office.printer-2")
    assert new_credential(database, shop, "printer").credential.username == "shop.printer"


def test_a_user_name_is_unique_across_the_relay(database: Database) -> None:
    office = new_account(database)
    new_credential(database, office, "printer")
    with pytest.raises(Conflict, match="user name 'office.printer' is taken"):
        new_credential(database, office, "scanner", username="office.printer")


def test_the_accounts_own_name_is_its_primary_logins(database: Database) -> None:
    """The name is held by the primary credential; once that is deleted it may be chosen again."""
    office = new_account(database)
    with pytest.raises(Conflict):
        new_credential(database, office, "device", username="office")
    with fresh(database) as session:
        primary = credentials.primary_credential(session, accounts.get_account(session, office))
        assert primary is not None and primary.label == "account"
        credentials.delete_credential(session, primary, actor=audit.CLI)
    assert new_credential(database, office, "device", username="office").credential.username == "office"


def test_an_account_cannot_be_named_after_another_accounts_credential(database: Database) -> None:
    """Account names and credential user names share one space: the account's own login would clash."""
    office = new_account(database)
    new_credential(database, office, "printer")
    with pytest.raises(Conflict, match="taken as another account's SMTP user name"):
        new_account(database, "office.printer")
    with fresh(database) as session:
        assert [a.name for a in accounts.list_accounts(session)] == ["office"]


def test_a_credential_cannot_take_the_name_of_an_account_made_before(database: Database) -> None:
    office = new_account(database)
    new_account(database, "office.printer")
    with pytest.raises(Conflict, match="user name 'office.printer' is taken"):
        new_credential(database, office, "printer")


def test_a_primary_login_made_again_gets_a_free_label(database: Database) -> None:
    """A new account password with the primary deleted and its label reused: the login comes back."""
    office = new_account(database)
    with fresh(database) as session:
        account = accounts.get_account(session, office)
        primary = credentials.primary_credential(session, account)
        assert primary is not None
        credentials.delete_credential(session, primary, actor=audit.CLI)
    new_credential(database, office, "account")  # office.account
    with fresh(database) as session:
        password = accounts.set_password(
            session, accounts.get_account(session, office), BCRYPT_COST, actor=audit.CLI
        )
    with fresh(database) as session:
        primary = credentials.primary_credential(session, accounts.get_account(session, office))
        assert primary is not None
        assert primary.label.startswith("account-") and primary.username == "office"
        assert crypto.verify_password(password, primary.password_hash)


# --- passwords -----------------------------------------------------------------------------------


@pytest.mark.parametrize("password", ["fifteen-chars-x", "short", "x" * 11, 1234567890123456789])
def test_a_chosen_password_under_sixteen_characters_is_refused(database: Database, password: Any) -> None:
    office = new_account(database)
    with pytest.raises(ValidationError) as caught:
        new_credential(database, office, password=password)
    assert caught.value.field == "password"
    assert usernames(database) == ["office"]


def test_a_chosen_password_of_sixteen_characters_is_kept_hashed(database: Database) -> None:
    office = new_account(database)
    made = new_credential(database, office, password=CHOSEN)
    assert made.password == CHOSEN
    stored = row(database, made.credential.id)
    assert stored is not None and CHOSEN not in stored.password_hash
    assert crypto.verify_password(CHOSEN, stored.password_hash)


def test_a_generated_password_is_long_and_differs_per_credential(database: Database) -> None:
    office = new_account(database)
    first = new_credential(database, office, "one").password
    second = new_credential(database, office, "two").password
    assert len(first) >= 2 * credentials.MIN_CHOSEN_PASSWORD and first != second


def test_a_password_change_needs_sixteen_characters_too(database: Database) -> None:
    office = new_account(database)
    made = new_credential(database, office)
    with pytest.raises(ValidationError):
        change(database, office, made.credential.id, password="fifteen-chars-x")
    assert change(database, office, made.credential.id, password="another-16-chars") == ["password"]
    stored = row(database, made.credential.id)
    assert stored is not None and crypto.verify_password("another-16-chars", stored.password_hash)
    assert not crypto.verify_password(made.password, stored.password_hash)


# --- allowed_domains and allowed_ips -------------------------------------------------------------


@pytest.mark.parametrize(
    "subset", [["example.com"], ["*.example.org"], ["a.example.org"], ["*.a.example.org", "example.com"]]
)
def test_a_domain_subset_of_the_accounts_is_kept(database: Database, subset: list[str]) -> None:
    office = new_account(database, domains=DOMAINS)
    made = new_credential(database, office, allowed_domains=subset)
    stored = row(database, made.credential.id)
    assert stored is not None and stored.allowed_domains == subset
    assert login_domains(database, made.credential.username) == subset


@pytest.mark.parametrize(
    "domains",
    [
        ["example.org"],  # *.example.org covers its subdomains only
        ["*.example.com"],  # example.com is held exactly, not its subdomains
        ["other.net"],
        ["example.com", "other.net"],
        ["notexample.org"],
    ],
)
def test_a_domain_outside_the_accounts_is_refused(database: Database, domains: list[str]) -> None:
    office = new_account(database, domains=DOMAINS)
    with pytest.raises(ValidationError) as caught:
        new_credential(database, office, allowed_domains=domains)
    assert caught.value.field == "allowed_domains"
    made = new_credential(database, office)
    with pytest.raises(ValidationError):
        change(database, office, made.credential.id, allowed_domains=domains)
    stored = row(database, made.credential.id)
    assert stored is not None and stored.allowed_domains is None


def test_an_empty_domain_subset_is_refused(database: Database) -> None:
    office = new_account(database, domains=DOMAINS)
    with pytest.raises(ValidationError):
        new_credential(database, office, allowed_domains=[])


def test_effective_domains_follow_the_account_when_it_shrinks_and_grows(database: Database) -> None:
    office = new_account(database, domains=DOMAINS)
    narrow = new_credential(database, office, "narrow", allowed_domains=["example.com", "a.example.org"])
    wide = new_credential(database, office, "wide")
    set_account_domains(database, office, ["example.com"])
    assert login_domains(database, "office.narrow") == ["example.com"]
    assert login_domains(database, "office.wide") == ["example.com"]
    set_account_domains(database, office, ["*.example.org"])
    assert login_domains(database, "office.narrow") == ["a.example.org"]
    set_account_domains(database, office, ["other.example.net"])
    assert login_domains(database, "office.narrow") == []  # nothing left: every MAIL FROM is refused
    assert login_domains(database, "office.wide") == ["other.example.net"]
    set_account_domains(database, office, DOMAINS)
    assert login_domains(database, "office.narrow") == ["example.com", "a.example.org"]
    # The stored subset itself never changed.
    stored = row(database, narrow.credential.id)
    assert stored is not None and stored.allowed_domains == ["example.com", "a.example.org"]
    assert row(database, wide.credential.id).allowed_domains is None


def test_effective_domains_keep_the_credentials_patterns_still_inside() -> None:
    assert effective_domains(["*.example.org"], ["a.example.org", "*.b.example.org"]) == [
        "a.example.org",
        "*.b.example.org",
    ]
    assert effective_domains(["example.org"], ["*.example.org"]) == []
    assert effective_domains(["example.org"], None) == ["example.org"]


def test_allowed_ips_are_stored_canonical_and_once(database: Database) -> None:
    office = new_account(database)
    made = new_credential(
        database, office, allowed_ips=["192.0.2.0/24", "2001:DB8::/32", "192.0.2.0/24", "198.51.100.7"]
    )
    with fresh(database) as session:
        found = find_login(session, made.credential.username)
    assert found is not None
    assert found.allowed_ips == ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32"]


@pytest.mark.parametrize("ips", [["192.0.2.1/24"], ["nowhere"], "192.0.2.0/24", [None]])
def test_malformed_allowed_ips_are_refused(database: Database, ips: Any) -> None:
    office = new_account(database)
    with pytest.raises(ValidationError) as caught:
        new_credential(database, office, allowed_ips=ips)
    assert caught.value.field.startswith("allowed_ips")


# --- updates, disabling, deleting ----------------------------------------------------------------


def test_disabling_a_credential_leaves_the_others_working(database: Database) -> None:
    office = new_account(database)
    printer = new_credential(database, office, "printer")
    new_credential(database, office, "scanner")
    assert change(database, office, printer.credential.id, enabled=False) == ["enabled"]
    with fresh(database) as session:
        assert find_login(session, "office.printer").active is False
        assert find_login(session, "office.scanner").active is True
        assert find_login(session, "office").active is True
        actions = [(e.action, e.entity) for e in audit.list_entries(session, office)]
    assert actions[0] == ("disable", credentials.ENTITY)


def test_a_deactivated_account_disables_every_credential(database: Database) -> None:
    office = new_account(database)
    new_credential(database, office, "printer")
    with fresh(database) as session:
        accounts.deactivate_account(session, accounts.get_account(session, office), actor=audit.CLI)
    with fresh(database) as session:
        assert [find_login(session, name).active for name in ("office", "office.printer")] == [False, False]


def test_an_update_refuses_an_unknown_field_a_user_name_or_a_taken_label(database: Database) -> None:
    office = new_account(database)
    printer = new_credential(database, office, "printer")
    new_credential(database, office, "scanner")
    for changes, error in (
        ({"username": "office.other"}, ValidationError),
        ({"colour": "red"}, ValidationError),
        ({"label": "scanner"}, Conflict),
        ({"enabled": "no"}, ValidationError),
        ({"label": "fine", "allowed_ips": ["bad"]}, ValidationError),
    ):
        with pytest.raises(error):
            change(database, office, printer.credential.id, **changes)
    stored = row(database, printer.credential.id)
    assert stored is not None and (stored.username, stored.label, stored.enabled) == (
        "office.printer",
        "printer",
        True,
    )
    assert change(database, office, printer.credential.id, label="printer") == ["label"]  # its own label


def test_another_accounts_credential_is_not_found(database: Database) -> None:
    office = new_account(database)
    shop = new_account(database, "shop")
    printer = new_credential(database, office, "printer")
    with fresh(database) as session:
        with pytest.raises(NotFound):
            credentials.get_credential(session, shop, printer.credential.id)
        with pytest.raises(NotFound):
            credentials.get_credential(session, office, uuid.uuid4())


def test_a_deleted_credential_is_gone_and_its_messages_keep_no_link(
    database: Database, cipher: Cipher
) -> None:
    office = new_account(database)
    printer = new_credential(database, office, "printer")
    with database.autocommit() as connection:
        queued = enqueue(connection, cipher, office, printer.credential.id)
    with fresh(database) as session:
        assert session.get(Message, queued).credential_id == printer.credential.id
        credentials.delete_credential(
            session, credentials.get_credential(session, office, printer.credential.id), actor=audit.CLI
        )
    with fresh(database) as session:
        assert find_login(session, "office.printer") is None
        assert session.get(Message, queued).credential_id is None
        [entry] = session.scalars(
            select(AuditLog).where(AuditLog.entity_id == printer.credential.id, AuditLog.action == "delete")
        )
        assert entry.changes == {"fields": []}


# --- last_used_at --------------------------------------------------------------------------------


def set_last_used_back(db: Database, credential_id: uuid.UUID, seconds: float) -> None:
    """Pretend the credential was last used ``seconds`` ago."""
    with fresh(db) as session:
        session.execute(
            update(SmtpCredential)
            .where(SmtpCredential.id == credential_id)
            .values(last_used_at=utcnow() - timedelta(seconds=seconds))
        )


def last_used(db: Database, credential_id: uuid.UUID) -> Any:
    stored = row(db, credential_id)
    assert stored is not None
    return stored.last_used_at


def touch(db: Database, credential_id: uuid.UUID) -> bool:
    with fresh(db) as session:
        return credentials.touch_last_used(session, credential_id)


def test_touch_last_used_writes_at_most_once_a_minute(database: Database) -> None:
    office = new_account(database)
    printer = new_credential(database, office, "printer").credential.id
    scanner = new_credential(database, office, "scanner").credential.id
    assert last_used(database, printer) is None
    assert touch(database, printer) is True
    first = last_used(database, printer)
    assert abs(utcnow() - first) < timedelta(minutes=1)
    assert touch(database, printer) is False
    assert last_used(database, printer) == first
    set_last_used_back(database, printer, 50)
    assert touch(database, printer) is False
    set_last_used_back(database, printer, 70)
    assert touch(database, printer) is True
    assert utcnow() - last_used(database, printer) < timedelta(seconds=30)
    assert last_used(database, scanner) is None  # another credential's is its own


def test_a_successful_login_writes_last_used_at_most_once_a_minute(database: Database) -> None:
    """The verifier's own path: each AUTH reads last_used_at and writes it only when a minute old."""
    office = new_account(database)
    made = new_credential(database, office, "printer", password=CHOSEN)
    verifier = CredentialVerifier(database, dummy_cost=BCRYPT_COST)
    assert verifier.verify("office.printer", CHOSEN) is not None
    first = last_used(database, made.credential.id)
    assert first is not None
    set_last_used_back(database, made.credential.id, 30)
    thirty_ago = last_used(database, made.credential.id)
    assert verifier.verify("office.printer", CHOSEN) is not None  # from the cache, same rule
    assert last_used(database, made.credential.id) == thirty_ago
    set_last_used_back(database, made.credential.id, 90)
    assert verifier.verify("office.printer", CHOSEN) is not None
    assert utcnow() - last_used(database, made.credential.id) < timedelta(seconds=30)
    assert verifier.verify("office.printer", "wrong-password-16") is None
    assert verifier.verify("office", CHOSEN) is None  # another credential of the account


def test_a_login_from_outside_allowed_ips_fails_as_a_wrong_password(database: Database) -> None:
    office = new_account(database)
    made = new_credential(database, office, "printer", password=CHOSEN, allowed_ips=["192.0.2.0/24"])
    verifier = CredentialVerifier(database, dummy_cost=BCRYPT_COST)
    inside = verifier.check("office.printer", CHOSEN, client_ip="192.0.2.9")
    assert inside.account is not None and inside.account.credential_id == made.credential.id
    outside = verifier.check("office.printer", CHOSEN, client_ip="198.51.100.9")
    assert (outside.account, outside.failure) == (None, "ip_not_allowed")
    mapped = verifier.check("office.printer", CHOSEN, client_ip="::ffff:192.0.2.9")
    assert mapped.account is not None
    assert verifier.check("office.printer", "wrong-password-16", client_ip="192.0.2.9").failure == (
        "invalid_credentials"
    )


def test_the_mail_from_state_knows_a_credential_made_or_enabled_since_it_was_read(database: Database) -> None:
    """The account's state is held for its TTL, but not to refuse a session that logged in with a
    credential the held state does not know or holds disabled; a disable waits for the TTL."""
    office = new_account(database)
    now = [1000.0]
    states = AccountStates(database, ttl=2.0, clock=lambda: now[0])
    with fresh(database) as session:
        assert states.get(logged_in(session, accounts.get_account(session, office))).active
    made = new_credential(database, office, "printer")
    printer = AuthenticatedAccount(
        office, "office", ("office.example.net",), credential_id=made.credential.id, username="office.printer"
    )
    assert states.get(printer).active  # made after the state was read
    change(database, office, made.credential.id, enabled=False)
    assert states.get(printer).active  # within the TTL the state read before still holds
    now[0] += 2.0
    assert not states.get(printer).active
    change(database, office, made.credential.id, enabled=True)
    assert states.get(printer).active  # enabled again: read again rather than refused


# --- migration 0005 ------------------------------------------------------------------------------

OLD_HASH = crypto.hash_password("the old account password", BCRYPT_COST)


def migrate(engine: Engine, revision: str, *, down: bool = False) -> None:
    with engine.connect() as connection:
        config = alembic_config(connection)
        (command.downgrade if down else command.upgrade)(config, revision)
        connection.commit()


def insert_0004_account(engine: Engine, name: str, password_hash: str) -> uuid.UUID:
    """An account row as revision 0004 has them: with its own password_hash."""
    account_id = uuid.uuid4()
    now = utcnow()
    values = {
        "id": account_id,
        "name": name,
        "email": f"{name}@example.com",
        "password_hash": password_hash,
        "api_key_digest": crypto.api_key_digest(crypto.generate_api_key()),
        "allowed_domains": [f"{name}.example.com"],
        "is_admin": False,
        "active": True,
        "allow_any_header_from": False,
        "limits": {},
        "created_at": now - timedelta(days=30),
        "updated_at": now,
    }
    # The model has no password_hash any more: the 0004 table is the model's columns and that one.
    model = Account.__table__.c
    columns = [sa.column(key, model[key].type) for key in values if key != "password_hash"]
    old = sa.table("accounts", *columns, sa.column("password_hash", sa.String()))
    with engine.begin() as connection:
        connection.execute(old.insert().values(**values))
    return account_id


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


def test_migration_0005_moves_the_account_password_into_a_credential_and_back(
    engine: Engine, cipher: Cipher
) -> None:
    """Upgrade from 0004 with accounts in it, use the new tables, downgrade, upgrade again."""
    migrate(engine, "0004", down=True)
    assert "password_hash" in {c["name"] for c in inspect(engine).get_columns("accounts")}
    office = insert_0004_account(engine, "office", OLD_HASH)
    shop_hash = crypto.hash_password("the shop's own password", BCRYPT_COST)
    shop = insert_0004_account(engine, "shop", shop_hash)

    assert upgrade(engine) == ("0004", head_revision())
    assert "password_hash" not in {c["name"] for c in inspect(engine).get_columns("accounts")}
    with Session(engine) as session:
        moved = {c.account_id: c for c in session.scalars(select(SmtpCredential))}
        assert set(moved) == {office, shop}
        primary = moved[office]
        assert (primary.username, primary.label, primary.enabled) == ("office", "account", True)
        assert (primary.allowed_ips, primary.allowed_domains, primary.last_used_at) == ([], None, None)
        assert primary.password_hash == OLD_HASH
        assert primary.created_at == session.get(Account, office).created_at
        login = find_login(session, "office")
        assert login is not None and login.active and login.allowed_domains == ["office.example.com"]
        assert crypto.verify_password("the old account password", login.password_hash)
        # After the upgrade: a second credential and a message sent with it; the shop's login deleted.
        account = session.get(Account, office)
        assert account is not None
        extra = credentials.create_credential(
            session, account, label="printer", bcrypt_cost=4, actor=audit.CLI
        )
        session.execute(
            update(SmtpCredential)
            .where(SmtpCredential.id == primary.id)
            .values(password_hash=crypto.hash_password("changed since", BCRYPT_COST))
        )
        session.delete(moved[shop])
        session.flush()
        sent = enqueue(session.connection(), cipher, office, extra.credential.id)
        session.commit()
        changed_hash = session.get(SmtpCredential, primary.id).password_hash

    migrate(engine, "0004", down=True)
    tables = set(inspect(engine).get_table_names())
    assert "smtp_credentials" not in tables and "relay_networks" not in tables
    assert "credential_id" not in {c["name"] for c in inspect(engine).get_columns("messages")}
    with engine.connect() as connection:
        hashes = dict(connection.execute(text("SELECT name, password_hash FROM accounts")).all())
    assert hashes["office"] == changed_hash  # the primary credential's, as it was at the downgrade
    assert hashes["shop"] == "$2b$12$" + "." * 53  # no primary left: a hash no password matches
    assert not crypto.verify_password("the shop's own password", hashes["shop"])
    assert not crypto.verify_password("", hashes["shop"])
    with engine.connect() as connection:
        kept = connection.execute(text("SELECT count(*) FROM messages")).scalar()
    assert kept == 1, sent  # the message stays, without its credential

    assert upgrade(engine) == ("0004", head_revision())  # and forward again, with these rows
    with Session(engine) as session:
        assert sorted(session.scalars(select(SmtpCredential.username))) == ["office", "shop"]
