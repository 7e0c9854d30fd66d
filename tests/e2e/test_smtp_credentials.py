"""Several SMTP credentials per account and relay networks, end to end: a real listener on 127.0.0.1,
smtplib and swaks as clients, connecting from chosen loopback addresses (127.0.0.x).

Credentials are made with ``storage.credentials``; relay networks are granted with
``storage.accounts`` as the API's admin update does, and through the API where its answers matter.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from limits.storage import MemoryStorage

from smtp_proxy.api import create_app
from smtp_proxy.db.models import Message
from smtp_proxy.db.session import Database
from smtp_proxy.sending_limits import SendingLimits
from smtp_proxy.smtp.account_state import AccountStates, MailPolicy
from smtp_proxy.storage import accounts, credentials
from smtp_proxy.storage.audit import CLI
from smtp_proxy.storage.credentials import NewCredential
from tests.api.conftest import AppClient, close_counters, make_admin, own_domain
from tests.e2e.conftest import Listener, closed_after_test
from tests.e2e.test_smtp_limits import mail_until_refused, metric
from tests.e2e.test_smtp_tools import _swaks
from tests.waiting import wait_for

SENDER = "app@example.com"
RECIPIENT = "someone@example.net"
PRINTER_PASSWORD = "printer-password-16+"
SCANNER_PASSWORD = "scanner-password-16+"
QUEUED = re.compile(rb"Ok: queued as ([0-9a-f-]{36})")
INVALID = (535, b"5.7.8 Authentication credentials invalid")
# Relay networks of the listener's tenant: one needs TLS, one lets its devices send in the clear.
TLS_NETWORK, TLS_CLIENT = "127.0.0.3/32", "127.0.0.3"
CLEAR_NETWORK, CLEAR_CLIENT = "127.0.0.4/32", "127.0.0.4"


# --- helpers -------------------------------------------------------------------------------------


def add_credential(listener: Listener, label: str, password: str, **fields: Any) -> NewCredential:
    """A credential of the listener's tenant, committed."""
    try:
        with listener.database.transaction() as session:
            account = accounts.get_account_by_name(session, listener.tenant)
            return credentials.create_credential(
                session, account, label=label, password=password, bcrypt_cost=4, actor=CLI, **fields
            )
    finally:
        listener.database.remove_session()


def change_credential(listener: Listener, made: NewCredential, **changes: Any) -> None:
    try:
        with listener.database.transaction() as session:
            account = accounts.get_account_by_name(session, listener.tenant)
            credential = credentials.get_credential(session, account.id, made.credential.id)
            credentials.update_credential(session, credential, account, changes, bcrypt_cost=4, actor=CLI)
    finally:
        listener.database.remove_session()


def delete_credential(listener: Listener, made: NewCredential) -> None:
    try:
        with listener.database.transaction() as session:
            account = accounts.get_account_by_name(session, listener.tenant)
            credential = credentials.get_credential(session, account.id, made.credential.id)
            credentials.delete_credential(session, credential, actor=CLI)
    finally:
        listener.database.remove_session()


def grant_networks(listener: Listener, networks: list[dict[str, Any]]) -> None:
    """The tenant's relay networks, set as the API's admin update sets them."""
    try:
        with listener.database.transaction() as session:
            accounts.update_account(
                session,
                accounts.get_account_by_name(session, listener.tenant),
                {"relay_networks": networks},
                actor=CLI,
                bcrypt_cost=4,
                unique_domains=True,
            )
    finally:
        listener.database.remove_session()


def connect(listener: Listener, source: str = "127.0.0.1") -> smtplib.SMTP:
    """An smtplib client from ``source``, greeted and closed after the test."""
    client = smtplib.SMTP(
        listener.host, listener.port, local_hostname="client.test", timeout=10, source_address=(source, 0)
    )
    return closed_after_test(client)


def auth_plain(client: smtplib.SMTP, username: str, password: str) -> tuple[int, bytes]:
    """AUTH PLAIN alone (``login()`` would try LOGIN after a refusal); the reply."""
    client.ehlo_or_helo_if_needed()
    client.user, client.password = username, password
    try:
        return client.auth("PLAIN", client.auth_plain)
    except smtplib.SMTPAuthenticationError as error:
        return error.smtp_code, error.smtp_error


def logged_in(
    listener: Listener, context: ssl.SSLContext, username: str, password: str, source: str = "127.0.0.1"
) -> smtplib.SMTP:
    client = connect(listener, source)
    client.starttls(context=context)
    assert auth_plain(client, username, password)[0] == 235
    return client


def send(client: smtplib.SMTP, sender: str = SENDER) -> uuid.UUID:
    """One message from ``sender`` (in the envelope and the From: field); the id the listener gave."""
    assert client.mail(sender)[0] == 250
    assert client.rcpt(RECIPIENT)[0] == 250
    code, reply = client.data(f"From: <{sender}>\r\nSubject: credentials\r\n\r\nbody\r\n".encode())
    assert code == 250, reply
    match = QUEUED.search(reply)
    assert match, reply
    return uuid.UUID(match.group(1).decode())


def stored(listener: Listener) -> dict[uuid.UUID, Message]:
    return {message.id: message for message in listener.stored()}


def received(listener: Listener, message_id: uuid.UUID) -> str:
    """The unfolded Received field the listener put on the stored message."""
    return listener.received_and_content(stored(listener)[message_id])[0]


def swaks_as(
    listener: Listener, username: str, password: str, *extra: str, mechanism: str = "PLAIN"
) -> subprocess.CompletedProcess[str]:
    """swaks with STARTTLS and AUTH as ``username``; ``extra`` options after those."""
    return _swaks(
        listener, "--tls", "--auth", mechanism, "--auth-user", username, "--auth-password", password, *extra
    )


def swaks_id(result: Any) -> uuid.UUID:
    assert result.returncode == 0, result.stdout + result.stderr
    match = QUEUED.search(result.stdout.encode())
    assert match, result.stdout
    return uuid.UUID(match.group(1).decode())


@pytest.fixture
def smtp_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The listener's log records, INFO and up (the close line is INFO)."""
    caplog.set_level(logging.INFO, logger="smtp_proxy.smtp")
    return caplog


def events(log: pytest.LogCaptureFixture, name: str, **fields: Any) -> list[logging.LogRecord]:
    return [
        record
        for record in log.records
        if getattr(record, "event", None) == name
        and all(getattr(record, key, None) == value for key, value in fields.items())
    ]


# --- several credentials -------------------------------------------------------------------------


def test_two_credentials_of_one_account_both_send_and_each_message_names_its_own(
    listener: Listener, client_tls: ssl.SSLContext
) -> None:
    printer = add_credential(listener, "printer", PRINTER_PASSWORD)
    scanner = add_credential(listener, "scanner", SCANNER_PASSWORD)
    by_printer = send(logged_in(listener, client_tls, "tenant.printer", PRINTER_PASSWORD))
    by_scanner = send(logged_in(listener, client_tls, "tenant.scanner", SCANNER_PASSWORD))
    by_swaks = swaks_id(swaks_as(listener, "tenant.scanner", SCANNER_PASSWORD, mechanism="LOGIN"))
    by_account = send(logged_in(listener, client_tls, listener.tenant, listener.password))
    messages = stored(listener)
    assert messages[by_printer].credential_id == printer.credential.id
    assert messages[by_scanner].credential_id == scanner.credential.id
    assert messages[by_swaks].credential_id == scanner.credential.id
    with listener.database.transaction() as session:
        tenant = accounts.get_account_by_name(session, listener.tenant)
        primary = credentials.primary_credential(session, tenant)
        assert primary is not None
        assert messages[by_account].credential_id == primary.id
        assert {message.account_id for message in messages.values()} == {tenant.id}
    listener.database.remove_session()
    assert " with ESMTPSA id " in received(listener, by_printer)


def test_each_credential_disabled_in_turn_gets_535_while_the_other_sends(
    listener: Listener, client_tls: ssl.SSLContext
) -> None:
    printer = add_credential(listener, "printer", PRINTER_PASSWORD)
    scanner = add_credential(listener, "scanner", SCANNER_PASSWORD)
    logins = {"tenant.printer": PRINTER_PASSWORD, "tenant.scanner": SCANNER_PASSWORD}
    for disabled, working in ((printer, "tenant.scanner"), (scanner, "tenant.printer")):
        change_credential(listener, printer, enabled=disabled is not printer)
        change_credential(listener, scanner, enabled=disabled is not scanner)
        refused = connect(listener)
        refused.starttls(context=client_tls)
        assert (
            auth_plain(refused, disabled.credential.username, logins[disabled.credential.username]) == INVALID
        )
        message_id = send(logged_in(listener, client_tls, working, logins[working]))
        assert stored(listener)[message_id].credential_id != disabled.credential.id


def test_swaks_with_a_disabled_credential_is_refused(listener: Listener) -> None:
    printer = add_credential(listener, "printer", PRINTER_PASSWORD)
    change_credential(listener, printer, enabled=False)
    result = swaks_as(listener, "tenant.printer", PRINTER_PASSWORD)
    assert result.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in result.stdout
    assert listener.stored() == []


def test_a_credential_limited_to_one_address_fails_elsewhere_like_a_wrong_password(
    listener: Listener, client_tls: ssl.SSLContext, smtp_log: pytest.LogCaptureFixture
) -> None:
    """From 127.0.0.2 it sends; from 127.0.0.1 the right password gets the wrong password's 535,
    counted and logged with the real reason."""
    add_credential(listener, "printer", PRINTER_PASSWORD, allowed_ips=["127.0.0.2/32"])
    before = metric("smtp_proxy_smtp_auth_failures_total", reason="ip_not_allowed")
    send(logged_in(listener, client_tls, "tenant.printer", PRINTER_PASSWORD, source="127.0.0.2"))

    elsewhere = connect(listener, "127.0.0.1")
    elsewhere.starttls(context=client_tls)
    assert auth_plain(elsewhere, "tenant.printer", PRINTER_PASSWORD) == INVALID
    # The same answer for a wrong password; from here the password is never compared at all.
    assert auth_plain(elsewhere, "tenant.printer", "not-the-password!") == INVALID
    assert elsewhere.mail(SENDER)[0] == 530  # still nobody's
    refusals = events(smtp_log, "smtp.auth_failed", reason="ip_not_allowed")
    assert [(r.client_ip, r.username, r.levelname) for r in refusals] == 2 * [
        ("127.0.0.1", "tenant.printer", "WARNING")
    ]
    assert PRINTER_PASSWORD not in smtp_log.text
    assert metric("smtp_proxy_smtp_auth_failures_total", reason="ip_not_allowed") == before + 2
    assert len(listener.stored()) == 1


def test_a_credentials_domain_subset_refuses_other_senders_at_mail_from(
    listener: Listener, client_tls: ssl.SSLContext
) -> None:
    """The tenant holds example.com and *.example.org; this credential only example.com."""
    add_credential(listener, "printer", PRINTER_PASSWORD, allowed_domains=["example.com"])
    client = logged_in(listener, client_tls, "tenant.printer", PRINTER_PASSWORD)
    assert client.mail("news@news.example.org") == (553, b"5.7.1 Sender address not allowed for this account")
    client.rset()
    send(client, "app@example.com")
    account = logged_in(listener, client_tls, listener.tenant, listener.password)
    send(account, "news@news.example.org")  # the account's own login is not narrowed
    assert sorted(m.sender for m in listener.stored()) == ["app@example.com", "news@news.example.org"]


def test_swaks_outside_a_credentials_domains_gets_553(listener: Listener) -> None:
    add_credential(listener, "printer", PRINTER_PASSWORD, allowed_domains=["example.com"])
    result = swaks_as(listener, "tenant.printer", PRINTER_PASSWORD, "--from", "news@news.example.org")
    assert result.returncode != 0
    assert "553 5.7.1 Sender address not allowed for this account" in result.stdout
    assert listener.stored() == []


# --- a credential changed under a live session ---------------------------------------------------


@pytest.mark.parametrize("action", ["disable", "delete"])
def test_a_live_session_ends_at_its_next_mail_from_once_its_credential_goes(
    listener: Listener, client_tls: ssl.SSLContext, action: str
) -> None:
    """421 within the state's few seconds; a session of the account's other credential goes on."""
    printer = add_credential(listener, "printer", PRINTER_PASSWORD)
    add_credential(listener, "scanner", SCANNER_PASSWORD)
    scanner_session = logged_in(listener, client_tls, "tenant.scanner", SCANNER_PASSWORD)
    send(scanner_session)
    printer_session = logged_in(listener, client_tls, "tenant.printer", PRINTER_PASSWORD)
    sent = send(printer_session)
    assert stored(listener)[sent].credential_id == printer.credential.id
    if action == "disable":
        change_credential(listener, printer, enabled=False)
    else:
        delete_credential(listener, printer)
    code, text, elapsed = mail_until_refused(printer_session)
    assert (code, text) == (421, b"4.7.0 Account disabled, closing connection")
    assert elapsed < 5.0
    with pytest.raises(smtplib.SMTPServerDisconnected):
        printer_session.noop()
    # The account's state is read once for all its sessions: the read that gave the printer its 421
    # (or a newer one) judges this MAIL FROM, and the scanner is still enabled in it.
    send(scanner_session)
    expected = printer.credential.id if action == "disable" else None  # deleted: the link is gone
    assert stored(listener)[sent].credential_id == expected


@pytest.mark.parametrize("how", ["created", "enabled"])
def test_a_credential_made_or_enabled_while_the_accounts_state_is_held_sends_at_once(
    listener: Listener, client_tls: ssl.SSLContext, how: str
) -> None:
    """The account's state is held for a minute here, read while the credential was not usable:
    its first MAIL FROM must not be judged by that state (421 would close the new session)."""
    listener.server.intake.mail_policy = MailPolicy(
        AccountStates(listener.database, ttl=60.0), SendingLimits(MemoryStorage())
    )
    if how == "enabled":
        printer = add_credential(listener, "printer", PRINTER_PASSWORD, enabled=False)
    send(logged_in(listener, client_tls, listener.tenant, listener.password))  # the state is read now
    if how == "created":
        printer = add_credential(listener, "printer", PRINTER_PASSWORD)
    else:
        change_credential(listener, printer, enabled=True)
    message_id = send(logged_in(listener, client_tls, "tenant.printer", PRINTER_PASSWORD))
    assert stored(listener)[message_id].credential_id == printer.credential.id


# --- relay networks ------------------------------------------------------------------------------


@pytest.fixture
def relay_listener(listener: Listener) -> Listener:
    """The listener, its tenant holding TLS_NETWORK (TLS required) and CLEAR_NETWORK (clear allowed)."""
    grant_networks(
        listener,
        [{"network": TLS_NETWORK, "require_tls": True}, {"network": CLEAR_NETWORK, "require_tls": False}],
    )
    return listener


def test_a_relay_network_that_requires_tls_sends_after_starttls_without_auth(
    relay_listener: Listener, client_tls: ssl.SSLContext, smtp_log: pytest.LogCaptureFixture
) -> None:
    listener = relay_listener
    before = metric("smtp_proxy_smtp_authenticated_sessions_total", auth="network")
    client = connect(listener, TLS_CLIENT)
    client.ehlo()
    assert client.mail(SENDER) == (530, b"5.7.0 Must issue a STARTTLS command first")
    client.starttls(context=client_tls)
    client.ehlo()
    message_id = send(client)
    client.quit()
    message = stored(listener)[message_id]
    assert message.credential_id is None
    trace = received(listener, message_id)
    assert re.match(
        r"Received: from client\.test \(\[127\.0\.0\.3\]\) \(using TLSv1\.[23] with cipher ", trace
    )
    assert f" by mx.test (smtp-proxy) with ESMTPS id {message_id} for <{RECIPIENT}>; " in trace
    [closed] = wait_for(lambda: events(smtp_log, "smtp.disconnect", client_ip=TLS_CLIENT), "the close line")
    assert (closed.auth, closed.account, closed.messages_accepted) == ("network", "tenant", 1)
    assert metric("smtp_proxy_smtp_authenticated_sessions_total", auth="network") == before + 1


def test_swaks_from_a_relay_network_that_requires_tls(relay_listener: Listener) -> None:
    clear = _swaks(relay_listener, "--local-interface", TLS_CLIENT)
    assert clear.returncode != 0
    assert "530 5.7.0 Must issue a STARTTLS command first" in clear.stdout
    message_id = swaks_id(_swaks(relay_listener, "--local-interface", TLS_CLIENT, "--tls"))
    assert " with ESMTPS id " in received(relay_listener, message_id)


def test_a_relay_network_without_tls_sends_in_the_clear(relay_listener: Listener) -> None:
    listener = relay_listener
    client = connect(listener, CLEAR_CLIENT)
    client.ehlo()
    assert not client.has_extn("auth")
    message_id = send(client)
    client.quit()
    message = stored(listener)[message_id]
    assert (message.credential_id, message.sender) == (None, SENDER)
    trace = received(listener, message_id)
    assert trace.startswith("Received: from client.test ([127.0.0.4]) by mx.test (smtp-proxy) with ESMTP id ")
    assert "using" not in trace


def test_swaks_from_a_relay_network_without_tls(relay_listener: Listener) -> None:
    result = _swaks(
        relay_listener, "--local-interface", CLEAR_CLIENT, "--header", "Subject: from the printer"
    )
    message_id = swaks_id(result)
    message = stored(relay_listener)[message_id]
    assert (message.subject, message.credential_id) == ("from the printer", None)
    assert " with ESMTP id " in received(relay_listener, message_id)


def test_a_relay_clients_sender_must_be_in_the_accounts_domains(relay_listener: Listener) -> None:
    client = connect(relay_listener, CLEAR_CLIENT)
    client.ehlo()
    assert client.mail("x@elsewhere.example") == (553, b"5.7.1 Sender address not allowed for this account")
    assert client.mail("x@sub.example.org")[0] == 250
    client.rcpt(RECIPIENT)
    code, _ = client.data(b"From: ceo@bank.example\r\n\r\nforged\r\n")
    assert code == 550  # the header From: is checked for a relay client too
    assert relay_listener.stored() == []


def test_a_client_outside_every_relay_network_still_needs_tls_and_auth(
    relay_listener: Listener, client_tls: ssl.SSLContext
) -> None:
    client = connect(relay_listener, "127.0.0.5")
    client.ehlo()
    assert client.mail(SENDER) == (530, b"5.7.0 Must issue a STARTTLS command first")
    client.starttls(context=client_tls)
    client.ehlo()
    assert client.mail(SENDER) == (530, b"5.7.0 Authentication required")


def test_auth_from_a_relay_network_takes_over_the_session(
    relay_listener: Listener, client_tls: ssl.SSLContext, smtp_log: pytest.LogCaptureFixture
) -> None:
    """The credential's account and restrictions apply, and the message names the credential."""
    listener = relay_listener
    printer = add_credential(listener, "printer", PRINTER_PASSWORD, allowed_domains=["example.com"])
    client = logged_in(listener, client_tls, "tenant.printer", PRINTER_PASSWORD, source=TLS_CLIENT)
    assert client.mail("x@sub.example.org")[0] == 553  # the network's account may; this credential not
    client.rset()
    message_id = send(client)
    client.quit()
    assert stored(listener)[message_id].credential_id == printer.credential.id
    assert " with ESMTPSA id " in received(listener, message_id)
    [closed] = wait_for(lambda: events(smtp_log, "smtp.disconnect", client_ip=TLS_CLIENT), "the close line")
    assert closed.auth == "password"


def test_a_relay_session_ends_at_its_next_mail_from_once_its_account_is_deactivated(
    relay_listener: Listener,
) -> None:
    """The account's state is read again at MAIL FROM for a session without a credential too; new
    connections from the network lose the grant once the listener reads the grants again."""
    listener = relay_listener
    live = connect(listener, CLEAR_CLIENT)
    live.ehlo()
    send(live)
    with listener.database.transaction() as session:
        accounts.deactivate_account(
            session, accounts.get_account_by_name(session, listener.tenant), actor=CLI
        )
    listener.database.remove_session()
    code, text, elapsed = mail_until_refused(live)
    assert (code, text, elapsed < 5.0) == (421, b"4.7.0 Account disabled, closing connection", True)

    def without_grant() -> bool:
        """A new connection's MAIL in the clear: 421 while the listener still holds the old grant
        (the account's state says inactive), 530 once it has read the grants again."""
        client = connect(listener, CLEAR_CLIENT)
        client.ehlo()
        code = client.mail(SENDER)[0]
        client.close()
        assert code in (421, 530), code
        return code == 530

    wait_for(without_grant, "new connections to lose the grant", timeout=15, interval=0.2)
    assert len(listener.stored()) == 1


def test_a_relay_client_takes_one_of_the_accounts_sessions(start_listener) -> None:
    """Over smtp.max_connections_per_account, a relay client gets 421 before any greeting."""
    listener: Listener = start_listener(max_connections_per_account=1)
    grant_networks(listener, [{"network": CLEAR_NETWORK, "require_tls": False}])
    first = connect(listener, CLEAR_CLIENT)
    assert first.noop()[0] == 250
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        connect(listener, CLEAR_CLIENT)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        421,
        b"4.7.0 Too many concurrent sessions for this account",
    )
    first.quit()
    listener.wait_idle()
    assert connect(listener, CLEAR_CLIENT).noop()[0] == 250  # the slot came back


def test_a_relay_session_ends_at_its_next_mail_from_once_its_network_is_withdrawn(
    relay_listener: Listener,
) -> None:
    """Withdrawing the grant reaches live sessions as a deactivation does, once the listener has
    read the grants again (every 5 s)."""
    listener = relay_listener
    clear = connect(listener, CLEAR_CLIENT)
    clear.ehlo()
    send(clear)
    grant_networks(listener, [{"network": TLS_NETWORK, "require_tls": True}])
    code, text, _ = mail_until_refused(clear, timeout=15)
    assert code == 421
    assert text == b"4.7.0 This network may no longer send without authentication, closing connection"
    assert len(listener.stored()) == 1


def test_a_relay_session_that_now_needs_tls_ends_at_its_next_mail_from_in_the_clear(
    relay_listener: Listener,
) -> None:
    listener = relay_listener
    clear = connect(listener, CLEAR_CLIENT)
    clear.ehlo()
    send(clear)
    grant_networks(
        listener,
        [{"network": TLS_NETWORK, "require_tls": True}, {"network": CLEAR_NETWORK, "require_tls": True}],
    )
    assert mail_until_refused(clear, timeout=15)[0] == 421


def test_auth_as_its_own_account_from_a_relay_session_at_the_session_limit_succeeds(
    start_listener, client_tls: ssl.SSLContext
) -> None:
    """The relay session's slot goes back before AUTH takes one; a failed AUTH takes it back."""
    listener: Listener = start_listener(max_connections_per_account=1)
    grant_networks(listener, [{"network": TLS_NETWORK, "require_tls": True}])
    client = connect(listener, TLS_CLIENT)
    client.starttls(context=client_tls)
    assert auth_plain(client, listener.tenant, "a wrong password, surely")[0] == 535
    with pytest.raises(smtplib.SMTPConnectError) as refused:  # the failed AUTH kept the slot
        connect(listener, TLS_CLIENT)
    assert refused.value.smtp_code == 421
    assert auth_plain(client, listener.tenant, listener.password)[0] == 235
    message_id = send(client)
    client.quit()
    assert " with ESMTPSA id " in received(listener, message_id)


# --- relay networks through the API --------------------------------------------------------------


@pytest.fixture
def admin_api(listener: Listener, make_config, pg_url: str) -> Iterator[AppClient]:
    """The API app on the listener's database, behind Flask's test client, as an admin."""
    config = make_config(
        pg_url, api={"rate_limit": "100000/minute", "unauthenticated_rate_limit": "100000/minute"}
    )
    database = Database(config.database)
    admin_key, _ = make_admin(database)
    app = create_app(config, database)
    try:
        yield AppClient(app, admin_key)
    finally:
        close_counters(app)
        database.dispose()


def tenant_id(listener: Listener) -> str:
    try:
        with listener.database.transaction() as session:
            return str(accounts.get_account_by_name(session, listener.tenant).id)
    finally:
        listener.database.remove_session()


@pytest.mark.parametrize(
    "network,field",
    [("127.0.0.0/8", "relay_networks[0].network"), ("0.0.0.0/0", "relay_networks[0].network")],
)
def test_the_api_refuses_a_relay_network_wider_than_a_slash_16_with_422(
    listener: Listener, admin_api: AppClient, network: str, field: str
) -> None:
    reply = admin_api.put(
        f"/api/v1/accounts/{tenant_id(listener)}", json={"relay_networks": [{"network": network}]}
    )
    assert reply.status_code == 422, reply.text
    assert field in reply.json()["error"]["fields"]
    client = connect(listener, "127.0.0.9")
    client.ehlo()
    assert client.mail(SENDER)[0] == 530  # no grant came of it


def test_the_api_refuses_a_network_another_account_holds_with_409(
    listener: Listener, admin_api: AppClient
) -> None:
    """The other account's grant stands: its clients send as it; the tenant gets only a free network."""
    domain = own_domain()
    created = admin_api.post(
        "/api/v1/accounts",
        json={
            "name": "office",
            "email": "ops@example.com",
            "allowed_domains": [domain],
            "relay_networks": [{"network": "127.0.0.16/28", "require_tls": False}],
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["relay_networks"] == [{"network": "127.0.0.16/28", "require_tls": False}]
    for wanted in ("127.0.0.17/32", "127.0.0.16/28", "127.0.0.0/16"):
        reply = admin_api.put(
            f"/api/v1/accounts/{tenant_id(listener)}", json={"relay_networks": [{"network": wanted}]}
        )
        assert reply.status_code == 409, reply.text
        assert reply.json()["error"]["code"] == "conflict"
        assert "another account's relay network" in reply.json()["error"]["message"]
    assert admin_api.get(f"/api/v1/accounts/{tenant_id(listener)}").json()["relay_networks"] == []
    free = [{"network": "127.0.0.32/28", "require_tls": False}]
    updated = admin_api.put(f"/api/v1/accounts/{tenant_id(listener)}", json={"relay_networks": free})
    assert updated.status_code == 200, updated.text
    assert updated.json()["relay_networks"] == free

    tenants_client = connect(listener, "127.0.0.33")
    tenants_client.ehlo()
    message_id = send(tenants_client)
    assert str(stored(listener)[message_id].account_id) == tenant_id(listener)

    client = connect(listener, "127.0.0.17")
    client.ehlo()
    assert client.mail(SENDER)[0] == 553  # the office's client: example.com is the tenant's, not its
    message_id = send(client, f"printer@{domain}")
    assert str(stored(listener)[message_id].account_id) == created.json()["id"]
