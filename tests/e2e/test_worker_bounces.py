"""Delivery status notifications end to end: real PostgreSQL, a real SMTP sink, real worker threads.

A message that fails is reported to its envelope sender by a notice (RFC 3464) that goes out through
the account's own route, from ``<>``, and is stored as a message of its own marked as a bounce; one
that could cause another (a null sender, a notice) never does.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from smtp_proxy.db.models import Account, Message, MessageStatus
from smtp_proxy.db.types import utcnow
from smtp_proxy.storage import suppressions
from smtp_proxy.storage.audit import CLI
from smtp_proxy.storage.messages import enqueue_message
from tests.e2e.conftest import Listener
from tests.e2e.test_worker import Queue, delivery_config, sink, start_worker, tenant  # noqa: F401
from tests.smtp_sink import Received, SmtpSink
from tests.waiting import wait_for

ORIGINAL = b"From: app@example.com\r\nTo: gone@example.net\r\nSubject: Invoice 7\r\n\r\nThe invoice.\r\n"


def submit(
    queue: Queue, recipients: tuple[str, ...], sender: str = "app@example.com", **dsn: Any
) -> uuid.UUID:
    with queue.database.transaction() as session:
        message_id = enqueue_message(
            session,
            queue.cipher,
            account_id=queue.account_id,
            sender=sender,
            recipients=list(recipients),
            data=ORIGINAL,
            correlation_id=f"bounce-test-{uuid.uuid4().hex[:8]}",
            **dsn,
        ).id
    queue.database.remove_session()
    return message_id


def bounces(queue: Queue) -> list[Message]:
    with queue.database.read() as session:
        rows = list(session.scalars(select(Message).where(Message.is_bounce.is_(True))))
        session.expunge_all()
    queue.database.remove_session()
    return rows


def finished(queue: Queue, message_id: uuid.UUID, status: MessageStatus = MessageStatus.FAILED) -> None:
    wait_for(lambda: queue.message(message_id).status is status, what=f"message {status}", timeout=20)


def report(received: Received) -> tuple[email.message.EmailMessage, list[email.message.Message]]:
    """The notice as the email package reads it, and its per-recipient status blocks."""
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    _human, status, _returned = parsed.iter_parts()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"].startswith("dns; ")
    return parsed, per_recipient


def notices_in(running: SmtpSink) -> list[Received]:
    return [m for m in running.messages if m.mail_from == ""]


def test_a_permanent_refusal_is_reported_to_the_sender_through_the_accounts_route(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    sink.refuse("gone@example.net", 550, "5.1.1 no such user")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    message_id = submit(tenant, ("gone@example.net",), dsn_envid="ENV-42")
    start_worker()
    (notice,) = sink.wait_for(1, timeout=20)
    assert notice.mail_from == "" and notice.rcpt_tos == ("app@example.com",)
    parsed, (recipient,) = report(notice)
    assert parsed["To"] == "app@example.com" and parsed["Auto-Submitted"] == "auto-replied"
    assert recipient["Final-Recipient"] == "rfc822; gone@example.net"
    assert recipient["Action"] == "failed" and recipient["Status"] == "5.1.1"
    assert "550 5.1.1 no such user" in recipient["Diagnostic-Code"]
    assert recipient["Remote-MTA"] == "dns; 127.0.0.1"
    returned = list(parsed.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: Invoice 7" in returned.get_content()
    (stored,) = bounces(tenant)
    assert stored.sender == "" and stored.recipients == ["app@example.com"]
    wait_for(lambda: tenant.message(stored.id).status is MessageStatus.DELIVERED, "the notice delivered")
    assert tenant.message(message_id).status is MessageStatus.FAILED


def test_a_partial_failure_names_only_the_failed_recipient(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    sink.refuse("gone@example.net", 550, "5.1.1 no such user")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    message_id = submit(tenant, ("ok@example.net", "gone@example.net"))
    start_worker()
    sink.wait_for(2, timeout=20)  # the message to ok@, and the notice
    finished(tenant, message_id, MessageStatus.DELIVERED)
    (notice,) = notices_in(sink)
    _parsed, (recipient,) = report(notice)
    assert recipient["Final-Recipient"] == "rfc822; gone@example.net"


def test_ret_full_returns_the_whole_message(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    sink.refuse("gone@example.net", 550, "5.1.1 no such user")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    submit(tenant, ("gone@example.net",), dsn_ret="FULL")
    start_worker()
    (notice,) = sink.wait_for(1, timeout=20)
    returned = list(report(notice)[0].iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert b"The invoice." in returned.as_bytes()


def test_no_notice_for_a_null_sender_for_notify_never_or_when_the_account_turned_bounces_off(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    sink.refuse("gone@example.net", 550, "5.1.1 no such user")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    null_sender = submit(tenant, ("gone@example.net",), sender="")
    never = submit(
        tenant,
        ("gone@example.net",),
        dsn_recipients={"gone@example.net": {"notify": ["NEVER"], "orcpt": None}},
    )
    start_worker()
    # Each notice would be committed with the failure it reports: once they failed, none can come.
    finished(tenant, null_sender)
    finished(tenant, never)
    assert bounces(tenant) == []
    with tenant.database.transaction() as session:
        session.execute(update(Account).where(Account.id == tenant.account_id).values(bounces=False))
    tenant.database.remove_session()
    turned_off = submit(tenant, ("gone@example.net",))
    finished(tenant, turned_off)
    assert bounces(tenant) == []
    assert sink.messages == []


def test_a_notice_that_fails_causes_nothing(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    sink.refuse("gone@example.net", 550, "5.1.1 no such user")
    sink.refuse("app@example.com", 550, "5.1.1 the sender has no mailbox either")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    message_id = submit(tenant, ("gone@example.net",))
    start_worker()
    finished(tenant, message_id)
    (notice,) = bounces(tenant)
    finished(tenant, notice.id)  # its own failure would have queued another with it
    assert [m.id for m in bounces(tenant)] == [notice.id]
    # The sender's refusal of the notice does not put the tenant's own address on its list.
    with tenant.database.read() as session:
        listed = suppressions.suppressed(session, tenant.account_id, ["app@example.com", "gone@example.net"])
    tenant.database.remove_session()
    assert listed == {"gone@example.net"}


def test_a_delay_notice_is_sent_once_when_the_message_has_waited_long_enough(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    sink.refuse("slow@example.net", 452, "4.2.2 mailbox full")
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    message_id = submit(tenant, ("slow@example.net",))
    with tenant.database.transaction() as session:  # accepted five hours ago: past the 4 h default
        session.execute(
            update(Message).where(Message.id == message_id).values(created_at=utcnow() - timedelta(hours=5))
        )
    tenant.database.remove_session()
    start_worker(retry_base="0.1s", retry_max="0.2s")
    (notice,) = sink.wait_for(1, timeout=20)
    parsed, (recipient,) = report(notice)
    assert parsed["Subject"] == "Delayed Mail (still being retried)"
    assert recipient["Action"] == "delayed" and recipient["Status"] == "4.2.2"
    assert recipient["Will-Retry-Until"]
    # Two more deferrals would each have queued another notice with them.
    wait_for(lambda: tenant.message(message_id).attempts >= 3, "two more attempts", timeout=20)
    assert len(bounces(tenant)) == 1


def test_a_message_whose_recipients_are_all_suppressed_is_reported_with_the_reason(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    with tenant.database.transaction() as session:
        suppressions.add_manual(session, tenant.account_id, "gone@example.net", actor=CLI)
    tenant.database.remove_session()
    tenant.rule(tenant.smtp_provider(sink, "main"), 0)
    message_id = submit(tenant, ("gone@example.net",))
    start_worker()
    (notice,) = sink.wait_for(1, timeout=20)  # the only message the provider sees
    finished(tenant, message_id)
    parsed, (recipient,) = report(notice)
    assert recipient["Final-Recipient"] == "rfc822; gone@example.net"
    assert recipient["Action"] == "failed" and recipient["Status"] == "5.7.1"
    assert "Diagnostic-Code" not in recipient  # no provider was asked
    human = next(parsed.iter_parts()).get_content()
    assert "suppression list" in human


def test_a_message_without_a_routing_rule_is_reported_once_a_rule_carries_the_notice(
    tenant: Queue,  # noqa: F811
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    """The notice is routed like any message: only a rule matching <> sends it."""
    provider_id = tenant.smtp_provider(sink, "main")
    tenant.rule(provider_id, 0, recipient_domains=["example.com"])  # senders' mailboxes, not example.net
    message_id = submit(tenant, ("someone@example.net",))
    start_worker()
    (notice,) = sink.wait_for(1, timeout=20)
    finished(tenant, message_id)
    _parsed, (recipient,) = report(notice)
    assert recipient["Status"] == "5.0.0" and "no routing rule" in notice.data.decode()


def test_from_submission_to_notice_with_the_clients_dsn_parameters(
    start_listener,
    client_tls,
    sink: SmtpSink,  # noqa: F811
    delivery_config,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    """smtplib submits with RET, ENVID, NOTIFY and ORCPT; the provider refuses one recipient for good."""
    listener: Listener = start_listener()
    queue = Queue(delivery_config(), account_name=listener.tenant)
    queue.rule(queue.smtp_provider(sink, "sink"), 0)
    sink.refuse("gone@example.net", 550, "5.1.1 no such user")
    data = b"From: app@example.com\r\nTo: gone@example.net\r\nSubject: hello\r\n\r\nHello.\r\n"
    with smtplib.SMTP(listener.host, listener.port, timeout=10) as client:
        client.starttls(context=client_tls)
        client.login(listener.tenant, listener.password)
        client.ehlo()
        assert client.has_extn("dsn")
        client.sendmail(
            "app@example.com",
            ["gone@example.net", "ok@example.net"],
            data,
            mail_options=["RET=HDRS", "ENVID=QQ314159"],
            rcpt_options=["NOTIFY=FAILURE ORCPT=rfc822;Gone@example.net"],
        )
    start_worker()
    received = sink.wait_for(2, timeout=20)  # the message to ok@, and the notice of gone@
    (notice,) = [m for m in received if m.mail_from == ""]
    assert notice.rcpt_tos == ("app@example.com",)
    parsed = email.message_from_bytes(notice.data, policy=email.policy.default)
    per_message, recipient = list(parsed.iter_parts())[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert recipient["Original-Recipient"] == "rfc822;Gone@example.net"
    assert recipient["Final-Recipient"] == "rfc822; gone@example.net" and recipient["Status"] == "5.1.1"
    queue.database.dispose()
