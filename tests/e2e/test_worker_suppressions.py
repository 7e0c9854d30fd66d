"""The suppression list in the worker: real PostgreSQL, a real SMTP sink, real worker threads.

Hard bounces (5xx about the recipient, at RCPT or at DATA for one recipient) join the list;
policy refusals and 4xx do not. Listed recipients are left out of the attempt, and a message
with none left fails without a connection to any provider.
"""

from __future__ import annotations

import logging
import smtplib

import pytest
from sqlalchemy import select, update

from smtp_proxy.contract import SuppressionReason
from smtp_proxy.db.models import Account, DeliveryStatus, MessageStatus, Suppression
from smtp_proxy.delivery.worker import SUPPRESSED_TEXT
from smtp_proxy.storage import suppressions
from smtp_proxy.storage.audit import CLI
from tests.e2e.conftest import Listener
from tests.e2e.test_worker import Queue, delivery_config, sink, start_worker, tenant  # noqa: F401
from tests.smtp_sink import SmtpSink
from tests.waiting import wait_for


def listed(queue: Queue) -> dict[str, Suppression]:
    with queue.database.read() as session:
        rows = session.scalars(select(Suppression).where(Suppression.account_id == queue.account_id)).all()
        session.expunge_all()
    queue.database.remove_session()
    return {row.address: row for row in rows}


def suppress(queue: Queue, address: str) -> None:
    with queue.database.transaction() as session:
        suppressions.add_manual(session, queue.account_id, address, actor=CLI)
    queue.database.remove_session()


def finished(queue: Queue, message_id, status: MessageStatus = MessageStatus.FAILED) -> None:
    wait_for(lambda: queue.message(message_id).status is status, what=str(status), timeout=20)


def test_a_permanent_rcpt_refusal_suppresses_that_recipient_with_the_reply(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    sink.refuse("Never@Example.NET", 550, "5.1.1 no such user")
    provider_id = tenant.smtp_provider(sink, "main")
    tenant.rule(provider_id, 0)
    (message_id,) = tenant.enqueue(recipients=("ok@example.net", "Never@Example.NET"))
    start_worker()
    finished(tenant, message_id, MessageStatus.DELIVERED)
    (entry,) = listed(tenant).values()
    assert entry.address == "never@example.net" and entry.reason is SuppressionReason.HARD_BOUNCE
    assert (entry.message_id, entry.provider_id, entry.response_code) == (message_id, provider_id, 550)
    assert entry.response_text == "5.1.1 no such user"


def test_a_permanent_data_refusal_of_the_only_recipient_suppresses_it(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    sink.reply_to_data(550, "5.1.1 mailbox unavailable")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    (message_id,) = tenant.enqueue(recipients=("gone@example.net",))
    start_worker()
    finished(tenant, message_id)
    # The notice to the sender is refused the same way; its recipient must not join the list.
    wait_for(lambda: tenant.finished(2), what="the failed message and its notice", timeout=20)
    assert list(listed(tenant)) == ["gone@example.net"]
    assert listed(tenant)["gone@example.net"].response_code == 550


def test_policy_refusals_and_temporary_refusals_suppress_nobody(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    """5.7.x at RCPT (relaying) and at DATA (content), a 4xx, and a 554 at DATA: nobody is listed."""
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    sink.refuse("relay@example.net", 550, "5.7.1 relaying denied")
    sink.refuse("busy@example.net", 450, "4.2.1 mailbox busy")
    (first,) = tenant.enqueue(recipients=("relay@example.net", "busy@example.net"))
    start_worker(max_attempts=1)
    finished(tenant, first)
    sink.reply_to_data(554, "5.7.1 message content rejected as spam")
    (content,) = tenant.enqueue(recipients=("reader@example.net",))
    finished(tenant, content)
    sink.reply_to_data(554, "transaction failed")  # no enhanced code: 554 at DATA is not about the mailbox
    (plain,) = tenant.enqueue(recipients=("other@example.net",))
    finished(tenant, plain)
    assert "content rejected" in tenant.logs(content)[-1].response_text
    assert listed(tenant) == {}


def test_suppressed_recipients_are_left_out_and_the_log_says_so(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    suppress(tenant, "Gone@Example.net")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    (message_id,) = tenant.enqueue(recipients=("GONE@example.NET", "ok@example.net"))
    with caplog.at_level(logging.INFO, logger="smtp_proxy.delivery"):
        start_worker()
        (received,) = sink.wait_for(1, timeout=20)
        finished(tenant, message_id, MessageStatus.DELIVERED)
        # The line is written just after the outcome is committed, by the worker's thread.
        (event,) = wait_for(
            lambda: [r for r in caplog.records if getattr(r, "event", None) == "message.suppressed"],
            what="the message.suppressed log line",
            timeout=20,
        )
    assert list(received.rcpt_tos) == ["ok@example.net"]
    left_out, sent = tenant.logs(message_id)
    assert left_out.status is DeliveryStatus.FAILED and left_out.provider_id is None
    assert left_out.response_text == "1 recipient(s) left out, on the suppression list: GONE@example.NET"
    assert sent.status is DeliveryStatus.DELIVERED
    assert event.recipients == ["GONE@example.NET"] and event.message_id == str(message_id)


def test_a_message_whose_recipients_are_all_suppressed_fails_without_contacting_a_provider(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    suppress(tenant, "a@example.net")
    suppress(tenant, "b@example.net")
    with tenant.database.transaction() as session:  # no notice to the sender either (test_worker_bounces)
        session.execute(update(Account).where(Account.id == tenant.account_id).values(bounces=False))
    tenant.database.remove_session()
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    (message_id,) = tenant.enqueue(recipients=("a@example.net", "B@example.net"))
    start_worker()
    finished(tenant, message_id)
    message = tenant.message(message_id)
    assert message.attempts == 1 and message.provider_id is None
    assert [log.response_text for log in tenant.logs(message_id)] == [
        "2 recipient(s) left out, on the suppression list: a@example.net, B@example.net",
        SUPPRESSED_TEXT,
    ]
    assert sink.connections == 0


def test_the_mailer_still_gets_250_for_a_suppressed_recipient(
    start_listener,
    sink: SmtpSink,  # noqa: F811
    delivery_config,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    """Suppression is checked at delivery, never at RCPT: the submitting mailer sees no change."""
    listener: Listener = start_listener()
    queue = Queue(delivery_config(), account_name=listener.tenant)
    suppress(queue, "gone@example.net")
    queue.rule(queue.smtp_provider(sink, "sink"), 0)
    with smtplib.SMTP(listener.host, listener.port, timeout=10) as client:
        client.starttls()
        client.login(listener.tenant, listener.password)
        client.ehlo()
        client.mail("app@example.com")
        assert client.rcpt("gone@example.net")[0] == 250
        assert client.rcpt("ok@example.net")[0] == 250
        code, _ = client.data(b"Subject: hi\r\n\r\nbody\r\n")
        assert code == 250
    start_worker()
    (received,) = sink.wait_for(1, timeout=20)
    assert list(received.rcpt_tos) == ["ok@example.net"]
    queue.database.dispose()
