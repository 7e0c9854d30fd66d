"""SmtpSession: DATA held in memory against the listener's DataBudget (max_data_in_flight)."""

from __future__ import annotations

import pytest

from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.budget import InFlightBudget
from smtp_proxy.smtp.protocol import MessageReceived, MessageRejected, State

SENDER = "alice@example.com"
RECIPIENT = "bob@dest.test"
BUSY = b"452 4.3.1 Insufficient system storage, try again later\r\n"


class CountingBudget(InFlightBudget):
    """The real budget, counting its takes (to check that the core takes per piece)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.takes = 0

    def take(self, size: int) -> bool:
        self.takes += 1
        return super().take(size)


def driver_with(make_driver, budget: InFlightBudget, **policy):
    driver = make_driver(data_budget=budget, **policy).authenticated()
    driver.open_data(SENDER, [RECIPIENT])
    return driver


def test_a_received_message_holds_its_bytes_for_the_caller(make_driver) -> None:
    budget = InFlightBudget(1_000_000)
    driver = driver_with(make_driver, budget)
    (message,) = driver.received(driver.send(b"Subject: x\r\n\r\nhello\r\n.\r\n"))
    assert message.held == len(message.data) == budget.held == 21
    driver.message_queued("Q1")
    assert budget.held == 21  # the caller gives them back once stored
    budget.give(message.held)
    assert budget.held == 0


def test_without_a_budget_nothing_is_held(authed_driver) -> None:
    authed_driver.open_data(SENDER, [RECIPIENT])
    (message,) = authed_driver.received(authed_driver.send(b"hello\r\n.\r\n"))
    assert message.held == 0


def test_over_budget_gives_back_at_once_and_refuses_at_the_end(make_driver) -> None:
    budget = InFlightBudget(100)
    driver = driver_with(make_driver, budget)
    assert driver.send(b"x" * 58 + b"\r\n") == []
    assert budget.held == 60
    assert driver.send(b"y" * 58 + b"\r\n") == []  # does not fit: everything goes back
    assert budget.held == 0
    assert driver.send(b"z\r\n") == []  # the rest is read, not kept
    assert budget.held == 0
    out = driver.send(b".\r\n")
    assert out == [
        MessageRejected(SENDER, 1, 123, "server_busy", R.R452_DATA_IN_FLIGHT),
        R.R452_DATA_IN_FLIGHT,
    ]
    assert driver.wire(out) == BUSY
    assert driver.session.state is State.READY
    assert not driver.session.paused
    assert driver.session.connection.errors == 0
    assert driver.session.connection.messages_rejected == 1


def test_over_budget_data_still_ends_only_at_the_real_terminator(make_driver) -> None:
    driver = driver_with(make_driver, InFlightBudget(10))
    out = driver.send(b"x" * 20 + b"\r\n..\r\n.x\r\nbare\n.\n\r\n.\r")
    assert out == []
    out = driver.send(b"\nMAIL FROM:<alice@example.com>\r\n")
    assert driver.codes(out) == [452, 250]


def test_the_session_goes_on_after_a_busy_refusal(make_driver) -> None:
    budget = InFlightBudget(100)
    driver = driver_with(make_driver, budget)
    assert driver.codes(driver.send(b"x" * 200 + b"\r\n.\r\n")) == [452]
    driver.open_data(SENDER, [RECIPIENT])
    (message,) = driver.received(driver.send(b"small\r\n.\r\n"))
    assert message.data == b"small\r\n"
    assert budget.held == message.held == 7


def test_the_budget_is_taken_per_piece_not_per_line(make_driver) -> None:
    budget = CountingBudget(10_000_000)
    driver = driver_with(make_driver, budget)
    driver.send(b"line\r\n" * 10_000)  # one receive, CRLF lines
    driver.send(b"ab\n" * 10_000)  # bare LF lines
    driver.send(b"cd\r\nef\n" * 5_000)  # mixed line endings
    assert budget.takes == 3
    (message,) = driver.received(driver.send(b"end\r\n.\r\n"))
    assert budget.takes == 4
    assert budget.held == message.held == len(message.data) == 60_000 + 40_000 + 40_000 + 5


def test_a_too_big_message_gives_its_bytes_back_at_once(make_driver) -> None:
    budget = InFlightBudget(10_000_000)
    driver = driver_with(make_driver, budget, max_message_size=1000)
    driver.send(b"x" * 598 + b"\r\n")
    assert budget.held == 600
    driver.send(b"x" * 598 + b"\r\n")
    assert budget.held == 0
    out = driver.send(b".\r\n")
    assert driver.rejected(out)[0].reason == "too_big"


def test_a_bare_cr_gives_the_bytes_back_at_once(make_driver) -> None:
    budget = InFlightBudget(10_000_000)
    driver = driver_with(make_driver, budget)
    driver.send(b"ok\r\n" * 10)
    assert budget.held == 40
    driver.send(b"a\rb\r\n")
    assert budget.held == 0
    driver.send(b"more\r\n")
    assert budget.held == 0
    assert driver.rejected(driver.send(b".\r\n"))[0].reason == "bare_cr"


def test_abandon_mid_data_gives_everything_back_once(make_driver) -> None:
    budget = InFlightBudget(1_000)
    driver = driver_with(make_driver, budget)
    driver.send(b"x" * 98 + b"\r\n")
    budget.take(500)  # what other sessions hold is not touched
    assert budget.held == 600
    driver.session.abandon()
    assert budget.held == 500
    driver.session.abandon()
    assert budget.held == 500


def test_data_fed_after_abandon_is_never_handed_over_with_a_part_missing(make_driver) -> None:
    budget = InFlightBudget(1_000)
    driver = driver_with(make_driver, budget)
    driver.send(b"first half\r\n")
    driver.session.abandon()
    out = driver.send(b"second half\r\n.\r\n")
    assert driver.received(out) == []
    assert driver.codes(out) == [452]
    assert budget.held == 0


def test_abandon_leaves_the_bytes_handed_over_to_the_caller(make_driver) -> None:
    budget = InFlightBudget(1_000)
    driver = driver_with(make_driver, budget)
    (message,) = driver.received(driver.send(b"hello\r\n.\r\n"))
    driver.session.abandon()
    assert budget.held == message.held == 7


@pytest.mark.parametrize("close", ["timed_out", "session_expired", "shutting_down", "auth_timed_out"])
def test_closing_mid_data_gives_the_bytes_back(make_driver, close: str) -> None:
    budget = InFlightBudget(1_000)
    driver = driver_with(make_driver, budget)
    driver.send(b"x" * 98 + b"\r\n")
    assert budget.held == 100
    getattr(driver.session, close)()
    assert budget.held == 0
    assert driver.session.closed


def test_sessions_share_one_budget(make_driver) -> None:
    budget = InFlightBudget(100)
    first = driver_with(make_driver, budget)
    second = driver_with(make_driver, budget)
    (message,) = first.received(first.send(b"a" * 78 + b"\r\n.\r\n"))
    assert budget.held == 80  # stored by the caller, not yet given back
    assert second.wire(second.send(b"b" * 38 + b"\r\n.\r\n")) == BUSY
    budget.give(message.held)
    second.open_data(SENDER, [RECIPIENT])
    (retry,) = second.received(second.send(b"b" * 38 + b"\r\n.\r\n"))
    assert isinstance(retry, MessageReceived)
    assert budget.held == 40
