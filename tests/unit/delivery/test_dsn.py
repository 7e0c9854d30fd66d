"""Delivery status notifications, as plain data and bytes: who is told, and what the report says."""

from __future__ import annotations

import email
import email.policy
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from smtp_proxy.contract import DeliveryStatus, MessageStatus
from smtp_proxy.delivery import dsn
from smtp_proxy.delivery.dsn import Action, Original, Recipient
from smtp_proxy.delivery.outcome import Outcome, Refusal, short_text

NOW = datetime(2026, 12, 2, 18, 0, tzinfo=UTC)
DATA = b"From: app@example.com\r\nTo: gone@example.org\r\nSubject: Invoice\r\n\r\nHello,\r\nthe invoice.\r\n"
GONE = Recipient("gone@example.org", "5.1.1", "550 5.1.1 no such user", "mx.example.org")


def original(**changes) -> Original:
    values = dict(
        message_id=uuid.uuid4(),
        sender="app@example.com",
        is_bounce=False,
        arrived=NOW - timedelta(minutes=5),
        ret=None,
        envid=None,
        notify={},
    )
    return Original(**{**values, **changes})


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def returned_part(raw: bytes) -> email.message.EmailMessage:
    return list(parsed(raw).iter_parts())[2]


def test_a_failure_is_reported_to_the_sender_once_for_all_failed_recipients() -> None:
    other = Recipient("old@example.org", "5.2.1", "550 5.2.1 mailbox disabled")
    [notice] = dsn.notices(original(), [(Action.FAILED, GONE), (Action.FAILED, other)], bounces=True)
    assert notice.action is Action.FAILED and notice.recipients == (GONE, other)


@pytest.mark.parametrize(
    "changes, bounces",
    [
        ({"sender": ""}, True),  # MAIL FROM:<>
        ({"is_bounce": True}, True),  # a notice never causes another
        ({}, False),  # the account turned bounces off
        ({"notify": {"gone@example.org": frozenset({"NEVER"})}}, True),
        ({"notify": {"gone@example.org": frozenset({"SUCCESS", "DELAY"})}}, True),
    ],
    ids=["null-sender", "bounce", "bounces-off", "notify-never", "notify-without-failure"],
)
def test_no_notice_where_none_is_owed(changes, bounces) -> None:
    assert dsn.notices(original(**changes), [(Action.FAILED, GONE)], bounces=bounces) == []


def test_notify_is_obeyed_per_recipient() -> None:
    told = Recipient("told@example.org", "5.1.1")
    quiet = Recipient("quiet@example.org", "5.1.1")
    notify = {"quiet@example.org": frozenset({"NEVER"}), "told@example.org": frozenset({"FAILURE"})}
    [notice] = dsn.notices(
        original(notify=notify), [(Action.FAILED, told), (Action.FAILED, quiet)], bounces=True
    )
    assert notice.recipients == (told,)


def test_without_notify_failures_and_delays_are_reported_and_relays_are_not() -> None:
    outcomes = [
        (Action.FAILED, GONE),
        (Action.DELAYED, Recipient("slow@example.org", "4.2.2")),
        (Action.RELAYED, Recipient("ok@example.org", "2.0.0")),
    ]
    assert [n.action for n in dsn.notices(original(), outcomes, bounces=True)] == [
        Action.FAILED,
        Action.DELAYED,
    ]
    asked = original(notify={"ok@example.org": frozenset({"SUCCESS"})})
    [relayed] = dsn.notices(asked, outcomes[2:], bounces=True)
    assert relayed.action is Action.RELAYED


@pytest.mark.parametrize(
    "code, text, expected",
    [
        (550, "5.1.1 no such user", "5.1.1"),
        (550, "no such user", "5.0.0"),
        (550, "4.2.2 mailbox full", "5.0.0"),  # an enhanced code of another class is not taken
        (452, "4.2.2 mailbox full", "4.2.2"),
        (None, "no rule", "5.4.4"),
    ],
)
def test_the_status_is_the_replys_enhanced_code_when_it_fits(code, text, expected) -> None:
    assert dsn.status_of(code, text, fallback="5.4.4") == expected


def test_the_report_parses_as_a_delivery_status_report() -> None:
    gone = Recipient(GONE.address, GONE.status, GONE.diagnostic, GONE.remote_mta, "rfc822;Gone@example.org")
    message = original(envid="QQ314159")
    [notice] = dsn.notices(message, [(Action.FAILED, gone)], bounces=True)
    raw = dsn.build(notice, message, DATA, reporting_mta="relay.example.net", now=NOW)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only, as it goes on the wire
    report = parsed(raw)
    assert report["To"] == "app@example.com"
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.net>"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, returned = report.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert "gone@example.org" in human.get_content() and "550 5.1.1 no such user" in human.get_content()
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.example.net"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_recipient["Final-Recipient"] == "rfc822; gone@example.org"
    assert per_recipient["Original-Recipient"] == "rfc822;Gone@example.org"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.org"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: Invoice" in returned.get_content() and "the invoice" not in returned.get_content()


def test_ret_full_returns_the_whole_message_up_to_the_limit() -> None:
    message = original(ret="FULL")
    [notice] = dsn.notices(message, [(Action.FAILED, GONE)], bounces=True)
    returned = list(
        parsed(dsn.build(notice, message, DATA, reporting_mta="r.example", now=NOW)).iter_parts()
    )[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_content()["Subject"] == "Invoice"
    assert b"the invoice." in returned.as_bytes()
    huge = DATA + b"x" * (dsn.FULL_RETURN_LIMIT + 1)
    returned = list(
        parsed(dsn.build(notice, message, huge, reporting_mta="r.example", now=NOW)).iter_parts()
    )[2]
    assert returned.get_content_type() == "text/rfc822-headers"


def test_a_delay_notice_says_until_when_the_relay_keeps_trying() -> None:
    slow = Recipient("slow@example.org", "4.2.2", "452 4.2.2 mailbox full")
    message = original()
    [notice] = dsn.notices(message, [(Action.DELAYED, slow)], bounces=True)
    until = NOW + timedelta(days=3)
    report = parsed(dsn.build(notice, message, DATA, reporting_mta="r.example", now=NOW, retry_until=until))
    assert report["Subject"] == "Delayed Mail (still being retried)"
    _per_message, per_recipient = list(report.iter_parts())[1].get_payload()
    assert per_recipient["Action"] == "delayed" and per_recipient["Status"] == "4.2.2"
    assert per_recipient["Will-Retry-Until"] == email.utils.format_datetime(until)


def test_eight_bit_headers_are_returned_as_they_were() -> None:
    data = "From: app@example.com\r\nSubject: Café\r\n\r\nbody\r\n".encode()
    message = original()
    [notice] = dsn.notices(message, [(Action.FAILED, GONE)], bounces=True)
    raw = dsn.build(notice, message, data, reporting_mta="r.example", now=NOW)
    assert "Subject: Café".encode() in raw
    assert b"Content-Transfer-Encoding: 8bit" in raw


# --- what became of each recipient, from the worker's outcome ------------------------------------

RELAYED_OK = Outcome(DeliveryStatus.DELIVERED, 250, "2.0.0 queued as 42")


def test_a_permanent_refusal_fails_every_recipient_tried_with_the_reply() -> None:
    final = Outcome(DeliveryStatus.FAILED, 554, "5.7.1 message refused")
    found = dsn.recipient_outcomes(
        MessageStatus.FAILED,
        final,
        ["a@x.org", "b@x.org"],
        [],
        following_up=[],
        delay_due=False,
        remote_mta="mx.x.org",
        orcpt={"a@x.org": "rfc822;A@x.org"},
    )
    assert found == [
        (
            Action.FAILED,
            Recipient("a@x.org", "5.7.1", "554 5.7.1 message refused", "mx.x.org", "rfc822;A@x.org"),
        ),
        (Action.FAILED, Recipient("b@x.org", "5.7.1", "554 5.7.1 message refused", "mx.x.org")),
    ]


def test_each_recipient_refused_at_rcpt_is_named_with_its_own_reply() -> None:
    final = Outcome(
        DeliveryStatus.DELIVERED,
        250,
        "ok; 1 of 3 refused",
        retry_recipients=("later@x.org",),
        refused=(Refusal("gone@x.org", 550, "5.1.1 no such user"),),
    )
    found = dsn.recipient_outcomes(
        MessageStatus.DELIVERED,
        final,
        ["ok@x.org", "gone@x.org", "later@x.org"],
        ["listed@x.org"],
        following_up=["later@x.org"],
        delay_due=False,
    )
    assert [(action, r.address, r.status, r.diagnostic) for action, r in found] == [
        (Action.FAILED, "listed@x.org", "5.7.1", None),
        (Action.RELAYED, "ok@x.org", "2.0.0", "250 ok; 1 of 3 refused"),
        (Action.FAILED, "gone@x.org", "5.1.1", "550 5.1.1 no such user"),
    ]  # later@x.org is its follow-up's to report
    assert found[0][1].note == dsn.SUPPRESSED_NOTE


def test_recipients_refused_for_now_until_the_limits_ran_out_fail() -> None:
    final = Outcome(DeliveryStatus.DELIVERED, 250, "ok", retry_recipients=("later@x.org",))
    found = dsn.recipient_outcomes(
        MessageStatus.DELIVERED, final, ["ok@x.org", "later@x.org"], [], following_up=[], delay_due=False
    )
    assert [(action, r.address, r.status) for action, r in found] == [
        (Action.RELAYED, "ok@x.org", "2.0.0"),
        (Action.FAILED, "later@x.org", "4.4.7"),
    ]


def test_a_message_whose_retries_ran_out_fails_with_the_last_reply() -> None:
    final = Outcome(DeliveryStatus.DEFERRED, 451, "4.3.0 try later")
    [(action, recipient)] = dsn.recipient_outcomes(
        MessageStatus.FAILED, final, ["a@x.org"], [], following_up=[], delay_due=False
    )
    assert (
        action is Action.FAILED
        and recipient.status == "4.3.0"
        and recipient.diagnostic == "451 4.3.0 try later"
    )
    no_answer = Outcome(DeliveryStatus.DEFERRED, None, "connection timed out")
    [(_action, recipient)] = dsn.recipient_outcomes(
        MessageStatus.FAILED, no_answer, ["a@x.org"], [], following_up=[], delay_due=False
    )
    assert recipient.status == "4.4.7" and recipient.diagnostic is None
    assert recipient.note == "connection timed out"


def test_a_deferred_message_is_reported_delayed_only_when_the_notice_is_due() -> None:
    final = Outcome(DeliveryStatus.DEFERRED, 452, "4.2.2 mailbox full")
    args = (MessageStatus.QUEUED, final, ["a@x.org"], [])
    assert dsn.recipient_outcomes(*args, following_up=[], delay_due=False) == []
    [(action, recipient)] = dsn.recipient_outcomes(*args, following_up=[], delay_due=True)
    assert action is Action.DELAYED and recipient.status == "4.2.2"


def test_internationalised_addresses_and_replies_make_a_report_that_parses() -> None:
    """SMTPUTF8: the sender is written as it is, a recipient in RFC 6533's utf-8 form, replies in ASCII."""
    message = original(sender="用户@例子.测试")
    recipient = Recipient("josé@example.org", "5.1.1", "550 5.1.1 unbekannter Empfänger", "mx.bücher.example")
    [notice] = dsn.notices(message, [(Action.FAILED, recipient)], bounces=True)
    report = parsed(dsn.build(notice, message, DATA, reporting_mta="r.example", now=NOW))
    assert report["To"] == "用户@例子.测试"
    assert "josé@example.org" in next(report.iter_parts()).get_content()
    _per_message, block = list(report.iter_parts())[1].get_payload()
    assert block["Final-Recipient"] == "utf-8; jos\\x{E9}@example.org"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 unbekannter Empf?nger"
    assert block["Remote-MTA"] == "dns; mx.xn--bcher-kva.example"


def test_long_values_are_written_as_given_never_as_encoded_words() -> None:
    """Programs match ENVID and ORCPT literally; at 78 octets the email package would have
    written these as RFC 2047 encoded-words."""
    envid = "E" * 100  # RFC 3461 4.4's longest
    orcpt = "rfc822;" + "o" * 60 + "@" + "d" * 60 + ".example" + "+" * 40
    diagnostic = "550 5.1.1 " + "X" * 400 + " \x1b[31m red"
    gone = Recipient(GONE.address, "5.1.1", diagnostic, None, orcpt)
    message = original(envid=envid)
    [notice] = dsn.notices(message, [(Action.FAILED, gone)], bounces=True)
    raw = dsn.build(notice, message, DATA, reporting_mta="relay.example.net", now=NOW)
    assert b"=?" not in raw
    assert f"\r\nOriginal-Envelope-Id: {envid}\r\n".encode() in raw
    assert f"\r\nOriginal-Recipient: {orcpt}\r\n".encode() in raw
    assert b"\r\nDiagnostic-Code: smtp; 550 5.1.1 " + b"X" * 400 + b" ?[31m red\r\n" in raw
    assert b"\x1b" not in raw
    assert max(map(len, raw.split(b"\r\n"))) <= 998


@pytest.mark.parametrize(
    "sender",
    ['"=?utf-8?q?Bcc=3A_victim@evil.example?="@example.com', '"=?utf-8?q?x=0D=0AX-Evil:_1?="@example.com'],
    ids=["encoded-word", "encoded-line-break"],
)
def test_the_to_field_is_the_envelope_sender_as_given(sender: str) -> None:
    """Not decoded as an encoded-word (which could name another address, or break the line and
    lose the notice): the quoted local part is written as the envelope carried it."""
    message = original(sender=sender)
    [notice] = dsn.notices(message, [(Action.FAILED, GONE)], bounces=True)
    raw = dsn.build(notice, message, DATA, reporting_mta="relay.example.net", now=NOW)
    assert f"\r\nTo: {sender}\r\n".encode() in raw
    assert b"X-Evil" not in raw.replace(sender.encode(), b"")


def test_a_providers_reply_keeps_no_control_character() -> None:
    """Shown in the delivery log, the API, webhooks and notices: an ESC sequence from a provider
    must not reach whoever reads them; NUL goes, the rest becomes "?"."""
    assert short_text(b"550 5.1.1 caf\xc3\xa9 \xff\x00 \x1b[31m bare\rCR \x7f\xc2\x9b end") == (
        "550 5.1.1 café \ufffd ?[31m bare CR ?? end"
    )
