"""Fair-use limits and tenant policy at the real listener, with real clients.

Connections per client address, the AUTH and session clocks, sending limits at
MAIL FROM and RCPT TO, a deactivation or password change reaching live sessions
and other listeners, the header From: check, and the DATA-in-flight budget.
"""

from __future__ import annotations

import select
import smtplib
import ssl
import time
from collections.abc import Iterator

import pytest
from limits.storage import MemoryStorage
from prometheus_client import REGISTRY

from smtp_proxy.sending_limits import SendingLimits
from smtp_proxy.smtp import server as server_module
from smtp_proxy.smtp.account_state import AccountStates, MailPolicy
from smtp_proxy.storage import accounts
from smtp_proxy.storage.audit import CLI
from tests.e2e.conftest import Listener, RawClient, closed_after_test
from tests.waiting import wait_for

MESSAGE = b"From: App <app@example.com>\r\nSubject: limits\r\n\r\nbody\r\n"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rejections(reason: str) -> float:
    return metric("smtp_proxy_smtp_limit_rejections_total", reason=reason)


def change_tenant(listener: Listener, **values: object) -> None:
    """Change the tenant's row the way the API or the CLI does (another connection, committed)."""
    with listener.database.transaction() as session:
        account = accounts.get_account_by_name(session, listener.tenant)
        for key, value in values.items():
            setattr(account, key, value)
    listener.database.remove_session()


def login(listener: Listener, client_tls: ssl.SSLContext) -> smtplib.SMTP:
    client = smtplib.SMTP(listener.host, listener.port, local_hostname="client.test", timeout=10)
    closed_after_test(client)
    client.starttls(context=client_tls)
    client.login(listener.tenant, listener.password)
    return client


@pytest.fixture
def clients() -> Iterator[list[RawClient]]:
    opened: list[RawClient] = []
    yield opened
    for client in opened:
        client.close()


# --- connections per address ----------------------------------------------------------------------


def test_the_21st_connection_from_one_address_gets_421_and_other_addresses_still_get_in(
    start_listener, clients: list[RawClient]
) -> None:
    listener: Listener = start_listener()
    assert listener.config.smtp.max_connections_per_ip == 20
    refused_before = metric("smtp_proxy_smtp_sessions_total", outcome="refused_per_ip")
    for _ in range(20):
        clients.append(RawClient(listener.host, listener.port))
        assert clients[-1].reply().startswith(b"220 mx.test")
    extra = RawClient(listener.host, listener.port)
    clients.append(extra)
    assert extra.reply() == b"421 4.7.0 Too many connections from your address, try again later\r\n"
    assert extra.closed()
    assert metric("smtp_proxy_smtp_sessions_total", outcome="refused_per_ip") == refused_before + 1
    # Another address is not affected ...
    other = RawClient(listener.host, listener.port, source="127.0.0.2")
    clients.append(other)
    assert other.reply().startswith(b"220 mx.test")
    # ... and a slot the first address gives up is its own again.
    clients[0].send(b"QUIT\r\n")
    assert clients[0].reply().startswith(b"221")
    wait_for(lambda: listener.server.active_count == 20, "20 sessions open")
    again = RawClient(listener.host, listener.port)
    clients.append(again)
    assert again.reply().startswith(b"220 mx.test")


def test_max_connections_per_ip_zero_turns_the_cap_off(start_listener, clients: list[RawClient]) -> None:
    listener: Listener = start_listener(max_connections_per_ip=0)
    for _ in range(25):
        clients.append(RawClient(listener.host, listener.port))
        assert clients[-1].reply().startswith(b"220 mx.test")


# --- the session's clocks -------------------------------------------------------------------------


def readable(client: RawClient, timeout: float) -> bool:
    return bool(client._buffer) or bool(select.select([client.sock], [], [], timeout)[0])


def test_an_unauthenticated_session_is_closed_after_auth_timeout_even_while_it_sends_noop(
    start_listener, clients: list[RawClient], client_tls: ssl.SSLContext
) -> None:
    listener: Listener = start_listener(auth_timeout=1)
    before = rejections("auth_timeout")
    # Before the connections: the listener's AUTH clock starts at its accept, never earlier.
    started = time.monotonic()
    silent = RawClient(listener.host, listener.port)
    busy = RawClient(listener.host, listener.port)
    authenticated = RawClient(listener.host, listener.port)
    clients += [silent, busy, authenticated]
    authenticated.login(listener, client_tls)
    assert busy.reply().startswith(b"220")
    busy.send(b"EHLO client.test\r\n")
    assert busy.reply().startswith(b"250")
    noops = 0
    while True:
        # A NOOP whenever the server has been quiet for 0.2 s; the 421 is what we wait for.
        if readable(busy, 0.2):
            reply = busy.reply()
            if not reply.startswith(b"250"):
                break
        else:
            busy.send(b"NOOP\r\n")
            noops += 1
    elapsed = time.monotonic() - started
    assert reply == b"421 4.7.0 Authentication time limit reached, closing connection\r\n"
    assert busy.closed()
    assert noops >= 3 and 1.0 <= elapsed < 3.0
    assert silent.reply().startswith(b"220")
    assert silent.reply().startswith(b"421 4.7.0 Authentication time limit")
    assert silent.closed()
    # Both unauthenticated sessions have been closed by now; the authenticated one goes on.
    authenticated.send(b"NOOP\r\n")
    assert authenticated.reply().startswith(b"250")
    assert rejections("auth_timeout") == before + 2


def test_max_session_time_ends_a_session_once_its_transaction_is_over(
    start_listener, clients: list[RawClient], client_tls: ssl.SSLContext
) -> None:
    listener: Listener = start_listener(max_session_time=2)
    before = rejections("session_time")
    sending = RawClient(listener.host, listener.port)
    clients.append(sending)
    sending.login(listener, client_tls)
    sending.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
    assert [sending.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    sending.send(b"Subject: slow\r\n\r\npart one\r\n")
    # A session opened after it, idle, reaches the limit later than the sending one did.
    idle = RawClient(listener.host, listener.port)
    clients.append(idle)
    idle.login(listener, client_tls)
    assert idle.reply() == b"421 4.7.0 Session time limit reached, closing connection\r\n"
    assert idle.closed()
    # The sending session is past its limit too, but its transaction finishes first.
    sending.send(b"part two\r\n.\r\n")
    assert sending.reply().startswith(b"250 2.0.0 Ok: queued as")
    assert sending.reply().startswith(b"421 4.7.0 Session time limit reached")
    assert sending.closed()
    assert len(listener.stored()) == 1
    assert rejections("session_time") == before + 2


def test_a_transaction_held_open_past_max_session_time_ends_after_the_grace(
    start_listener, clients: list[RawClient], client_tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOOPs inside an open transaction reset read_timeout, but cannot hold the session forever."""
    monkeypatch.setattr(server_module, "SESSION_GRACE", 1.0)
    listener: Listener = start_listener(max_session_time=1)
    started = time.monotonic()
    holding = RawClient(listener.host, listener.port)
    clients.append(holding)
    holding.login(listener, client_tls)
    holding.send(b"MAIL FROM:<app@example.com>\r\n")
    assert holding.reply().startswith(b"250")
    replies = []
    while not replies or not replies[-1].startswith(b"421"):
        assert time.monotonic() - started < 10, replies
        # A NOOP each time the server has been quiet for a while: like a client keeping it open.
        if not select.select([holding.sock], [], [], 0.25)[0]:
            holding.send(b"NOOP\r\n")
        replies.append(holding.reply())
    assert len(replies) > 2  # the NOOPs were answered while the transaction was within its time
    assert replies[-1] == b"421 4.7.0 Session time limit reached, closing connection\r\n"
    assert 2.0 <= time.monotonic() - started < 5.0
    assert holding.closed()


# --- sending limits -------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_clock_limits(listener: Listener) -> Clock:
    """The listener's sending limits on a clock the test moves (10:00:00 UTC on some day)."""
    clock = Clock(1_800_000_000 - 1_800_000_000 % 86400 + 36_000)
    listener.server.intake.mail_policy = MailPolicy(
        AccountStates(listener.database), SendingLimits(MemoryStorage(), clock=clock)
    )
    return clock


def test_messages_per_minute_gives_451_with_the_wait_then_lets_mail_through_a_minute_later(
    listener: Listener, smtp_client
) -> None:
    change_tenant(listener, limits={"messages_per_minute": 2})
    clock = fake_clock_limits(listener)
    before = rejections("messages_per_minute")
    client = smtp_client()
    for _ in range(2):
        client.sendmail("app@example.com", ["a@example.net"], MESSAGE)
    assert client.mail("app@example.com") == (
        451,
        b"4.7.1 Sending rate exceeded for this account, try again in 60 seconds",
    )
    clock.now += 45
    assert client.mail("app@example.com")[1].endswith(b"try again in 15 seconds")
    assert len(listener.stored()) == 2
    assert rejections("messages_per_minute") == before + 2
    clock.now += 15
    client.sendmail("app@example.com", ["a@example.net"], MESSAGE)
    assert len(listener.stored()) == 3


def test_the_day_recipient_budget_refuses_rcpt_and_delivers_the_accepted_ones(
    listener: Listener, smtp_client
) -> None:
    change_tenant(listener, limits={"recipients_per_day": 3})
    fake_clock_limits(listener)
    before = rejections("recipients_per_day")
    client = smtp_client()
    client.sendmail("app@example.com", ["a@example.net", "b@example.net"], MESSAGE)
    assert client.mail("app@example.com")[0] == 250
    assert client.rcpt("c@example.net")[0] == 250
    assert client.rcpt("d@example.net") == (
        451,
        b"4.7.1 Sending rate exceeded for this account, try again in 50400 seconds",
    )
    code, reply = client.data(MESSAGE)
    assert code == 250, reply
    assert [m.recipients for m in listener.stored()] == [
        ["a@example.net", "b@example.net"],
        ["c@example.net"],
    ]
    assert client.mail("app@example.com")[0] == 451  # the day's three are spent
    assert rejections("recipients_per_day") == before + 2


def test_a_message_that_was_not_stored_is_not_counted(listener: Listener, smtp_client) -> None:
    change_tenant(listener, limits={"messages_per_minute": 1})
    fake_clock_limits(listener)
    client = smtp_client()
    client.mail("app@example.com")
    client.rcpt("a@example.net")
    client.rset()  # no message
    client.mail("app@example.com")
    client.rcpt("a@example.net")
    assert client.data(b"From: ceo@bank.example\r\n\r\nx\r\n")[0] == 550  # refused at the end of DATA
    client.sendmail("app@example.com", ["a@example.net"], MESSAGE)
    assert client.mail("app@example.com")[0] == 451


# --- account changes reach live sessions ----------------------------------------------------------


def mail_until_refused(client: smtplib.SMTP, timeout: float = 5.0) -> tuple[int, bytes, float]:
    """MAIL FROM (then RSET) until it is refused; the refusal and how long that took."""
    started = time.monotonic()
    answer: list[tuple[int, bytes]] = []

    def refused() -> bool:
        code, text = client.mail("app@example.com")
        if code != 250:
            answer.append((code, text))
            return True
        client.rset()
        return False

    wait_for(refused, "MAIL FROM refused", timeout=timeout)
    return (*answer[0], time.monotonic() - started)


def test_a_deactivation_ends_live_sessions_in_every_listener_at_their_next_mail_from(
    start_listener, client_tls: ssl.SSLContext
) -> None:
    first: Listener = start_listener()
    second: Listener = start_listener()  # another listener on the same database, its own caches
    sessions = [login(first, client_tls), login(second, client_tls)]
    for client in sessions:
        client.sendmail("app@example.com", ["a@example.net"], MESSAGE)
    before = rejections("account_disabled")
    with first.database.transaction() as session:
        accounts.deactivate_account(session, accounts.get_account_by_name(session, "tenant"), actor=CLI)
    first.database.remove_session()
    for client in sessions:
        code, text, elapsed = mail_until_refused(client)
        assert (code, text) == (421, b"4.7.0 Account disabled, closing connection")
        assert elapsed < 5.0
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    assert rejections("account_disabled") == before + 2
    assert len(first.stored()) == 2


def test_a_password_change_stops_the_old_password_in_every_listener(
    start_listener, client_tls: ssl.SSLContext
) -> None:
    first: Listener = start_listener()
    second: Listener = start_listener()
    for listener in (first, second):  # each verifier now holds the old password as verified
        login(listener, client_tls).quit()
    with first.database.transaction() as session:
        accounts.set_password(
            session, accounts.get_account_by_name(session, "tenant"), 4, "a brand new password", actor=CLI
        )
    first.database.remove_session()
    for listener in (first, second):
        with pytest.raises(smtplib.SMTPAuthenticationError) as raised:
            login(listener, client_tls)
        assert raised.value.smtp_code == 535
        listener.password = "a brand new password"
        login(listener, client_tls).quit()


# --- the header From: check -----------------------------------------------------------------------


def test_a_foreign_header_from_gets_550_and_is_not_stored(listener: Listener, smtp_client) -> None:
    before = rejections("header_from")
    client = smtp_client()
    forged = b"From: CEO <ceo@bank.example>\r\nSubject: wire the money\r\n\r\nnow\r\n"
    with pytest.raises(smtplib.SMTPDataError) as raised:
        client.sendmail("app@example.com", ["a@example.net"], forged)
    assert (raised.value.smtp_code, raised.value.smtp_error) == (
        550,
        b"5.7.1 From: header address not allowed for this account",
    )
    assert listener.stored() == []
    assert rejections("header_from") == before + 1
    client.sendmail("app@example.com", ["a@example.net"], MESSAGE)  # the session goes on
    assert len(listener.stored()) == 1


def test_an_account_allowed_any_header_from_may_send_it(listener: Listener, smtp_client) -> None:
    change_tenant(listener, allow_any_header_from=True)
    client = smtp_client()
    client.sendmail("app@example.com", ["a@example.net"], b"From: ceo@bank.example\r\n\r\nok\r\n")
    assert len(listener.stored()) == 1


def test_header_from_check_off_in_the_config_lets_any_from_through(start_listener, client_tls) -> None:
    listener: Listener = start_listener(header_from_check=False)
    client = login(listener, client_tls)
    client.sendmail("app@example.com", ["a@example.net"], b"From: ceo@bank.example\r\n\r\nok\r\n")
    assert len(listener.stored()) == 1


# --- DATA in flight -------------------------------------------------------------------------------


def test_a_message_that_would_pass_the_data_in_flight_budget_gets_452_and_the_session_goes_on(
    start_listener, clients: list[RawClient], client_tls: ssl.SSLContext
) -> None:
    listener: Listener = start_listener(max_data_in_flight=65536)
    before = rejections("data_in_flight")
    holder, late = RawClient(listener.host, listener.port), RawClient(listener.host, listener.port)
    clients += [holder, late]
    for client in (holder, late):
        client.login(listener, client_tls)
        client.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
        assert [client.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    line = b"x" * 998 + b"\r\n"
    holder.send(b"From: app@example.com\r\n\r\n" + line * 40)  # about 40 KB, still in DATA
    budget = listener.server.data_budget
    wait_for(lambda: budget.held >= 40_000, "40 kB held in the budget")
    late.send(b"From: app@example.com\r\n\r\n" + line * 40 + b".\r\n")
    assert late.reply() == b"452 4.3.1 Insufficient system storage, try again later\r\n"
    holder.send(b".\r\n")
    assert holder.reply().startswith(b"250 2.0.0 Ok: queued as")
    wait_for(lambda: budget.held == 0, "the budget empty")
    # The refused session sends again, now that the budget is free.
    late.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
    assert [late.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    late.send(b"From: app@example.com\r\n\r\n" + line * 40 + b".\r\n")
    assert late.reply().startswith(b"250 2.0.0 Ok: queued as")
    assert len(listener.stored()) == 2
    assert rejections("data_in_flight") == before + 1


def test_a_connection_dropped_mid_data_gives_its_bytes_back(
    start_listener, clients: list[RawClient], client_tls: ssl.SSLContext
) -> None:
    listener: Listener = start_listener(max_data_in_flight=65536)
    client = RawClient(listener.host, listener.port)
    clients.append(client)
    client.login(listener, client_tls)
    client.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
    assert [client.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    client.send(b"From: app@example.com\r\n\r\n" + (b"y" * 998 + b"\r\n") * 30)
    budget = listener.server.data_budget
    wait_for(lambda: budget.held >= 30_000, "30 kB held in the budget")
    client.close()
    wait_for(lambda: listener.server.active_count == 0, "every session ended")
    assert budget.held == 0
