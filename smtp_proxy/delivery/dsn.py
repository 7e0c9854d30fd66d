"""Delivery status notifications (RFC 3464): who is told what, and the report itself.

Pure: no database, no clock (the caller passes the times). The worker asks ``notices`` what
an outcome owes the envelope sender and enqueues each ``build`` result as a message of the
account's own, from ``<>``, so it is routed, stored and listed like any other.

What is owed follows RFC 3461:
- nothing for a message with a null sender (``MAIL FROM:<>``) or for a notice itself (RFC
  3461 6.2, RFC 5321 4.5.5: a bounce never causes another), nor when the account turned
  bounces off;
- per recipient, its ``NOTIFY``: ``NEVER`` gets nothing; without NOTIFY, ``FAILURE`` and
  ``DELAY`` (the choice RFC 3461 4.1 leaves to the MTA; sendmail's too);
- ``failed`` recipients of one outcome share one notice, and so do ``delayed`` ones; a
  ``SUCCESS`` recipient handed to a provider gets ``relayed`` (RFC 3464 2.3.3: the provider
  does not report onwards to us).

The report is ``multipart/report; report-type=delivery-status``: a human-readable part, the
``message/delivery-status`` part (RFC 3464 2.2, 2.3) and the original's header section
(``text/rfc822-headers``), or the whole message for ``RET=FULL``.
"""

from __future__ import annotations

import email.policy
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime
from enum import StrEnum

from smtp_proxy.contract import MessageStatus
from smtp_proxy.delivery.outcome import Outcome, one_line

FAILURE, DELAY, SUCCESS = "FAILURE", "DELAY", "SUCCESS"  # NEVER is in none of the actions' WANTS
DEFAULT_NOTIFY = frozenset({FAILURE, DELAY})  # no NOTIFY given (RFC 3461 4.1)
# A notice carries the whole original only below this size; above, its header section.
FULL_RETURN_LIMIT = 1024 * 1024
MAX_FIELD_LINE = 998  # octets of a header line before the email package folds it (RFC 5322 2.1.1)
# What the worker puts before a provider's reply in an outcome's text ("end of DATA refused: ...").
_STEP = re.compile(r"^(?:MAIL FROM|RCPT TO|DATA|end of DATA) refused: ")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_HEADER_END = re.compile(rb"\r?\n\r?\n")


class Action(StrEnum):
    """RFC 3464 2.3.3's actions this relay reports."""

    FAILED = "failed"
    DELAYED = "delayed"
    RELAYED = "relayed"


WANTS = {Action.FAILED: FAILURE, Action.DELAYED: DELAY, Action.RELAYED: SUCCESS}
SUBJECTS = {
    Action.FAILED: "Undelivered Mail Returned to Sender",
    Action.DELAYED: "Delayed Mail (still being retried)",
    Action.RELAYED: "Successful Mail Relay Report",
}


@dataclass(frozen=True)
class Recipient:
    """What became of one recipient: its address, the status (``5.1.1``), the reply that says why."""

    address: str
    status: str
    diagnostic: str | None = None  # the remote reply, e.g. "550 5.1.1 no such user"
    remote_mta: str | None = None  # the host that gave it, where known
    original: str | None = None  # ORCPT, as given: "rfc822;user@example.org"
    note: str | None = None  # why, in words, when no remote reply says it


@dataclass(frozen=True)
class Original:
    """The message a notice reports on, as the worker holds it."""

    message_id: uuid.UUID
    sender: str
    is_bounce: bool
    arrived: datetime
    ret: str | None  # "FULL", "HDRS" or None (RET not given: headers)
    envid: str | None
    notify: Mapping[str, frozenset[str] | None]  # by recipient; missing or None: not given


@dataclass(frozen=True)
class Notice:
    """One notice owed to the original's sender."""

    action: Action
    recipients: tuple[Recipient, ...]


def may_notify(sender: str, *, is_bounce: bool, bounces: bool) -> bool:
    """Whether a message may cause any notice: not from ``<>``, not a notice, bounces on."""
    return bounces and not is_bounce and bool(sender)


def notices(
    original: Original, outcomes: Iterable[tuple[Action, Recipient]], *, bounces: bool
) -> list[Notice]:
    """The notices an outcome owes: one per action, naming the recipients that asked for it."""
    if not may_notify(original.sender, is_bounce=original.is_bounce, bounces=bounces):
        return []
    grouped: dict[Action, list[Recipient]] = {}
    for action, recipient in outcomes:
        wanted = original.notify.get(recipient.address) or DEFAULT_NOTIFY
        if WANTS[action] in wanted:
            grouped.setdefault(action, []).append(recipient)
    return [Notice(action, tuple(recipients)) for action, recipients in grouped.items()]


SUPPRESSED_NOTE = "not sent: the address is on the sending account's suppression list"
GIVEN_UP_NOTE = "refused for now at each attempt until the relay's retry limits ran out"


def recipient_outcomes(
    status: MessageStatus,
    final: Outcome,
    tried: Sequence[str],
    suppressed: Sequence[str],
    *,
    following_up: Sequence[str],
    delay_due: bool,
    remote_mta: str | None = None,
    orcpt: Mapping[str, str | None] | None = None,
) -> list[tuple[Action, Recipient]]:
    """What became of each recipient once the worker wrote ``status`` after ``final``.

    ``tried`` went to the provider, ``suppressed`` did not; ``following_up`` are queued again
    as a follow-up message (they are reported by it). ``delay_due``: the message has waited
    ``delivery.delay_notice_after`` without a notice yet.
    """
    orcpt = orcpt or {}
    own = {refusal.recipient: refusal for refusal in final.refused}
    text = _STEP.sub("", final.text)  # the provider's reply, without the step the worker names
    reply = f"{final.code} {text}" if final.code is not None else None

    def recipient(address: str, fallback: str, note: str | None = None) -> Recipient:
        refusal = own.get(address)
        if refusal is not None:  # refused at RCPT: its own reply says why
            status = status_of(refusal.code, refusal.text, fallback=fallback)
            diagnostic = f"{refusal.code} {refusal.text}"
            return Recipient(address, status, diagnostic, remote_mta, orcpt.get(address))
        status = status_of(final.code, text, fallback=fallback)
        if reply is None:
            return Recipient(address, status, None, None, orcpt.get(address), note or final.text)
        return Recipient(address, status, reply, remote_mta, orcpt.get(address))

    found = [
        (Action.FAILED, Recipient(a, "5.7.1", original=orcpt.get(a), note=SUPPRESSED_NOTE))
        for a in suppressed
    ]
    if status is MessageStatus.FAILED:
        fallback = "4.4.7" if final.temporary else "5.0.0"  # retries ran out: delivery time expired
        found += [(Action.FAILED, recipient(a, fallback)) for a in tried]
    elif status is MessageStatus.DELIVERED:
        later = set(following_up)
        for address in tried:
            refusal = own.get(address)
            if refusal is not None and 500 <= refusal.code < 600:
                found.append((Action.FAILED, recipient(address, "5.0.0")))
            elif address in final.retry_recipients and address not in later:  # its retries ran out
                given_up = Recipient(address, "4.4.7", original=orcpt.get(address), note=GIVEN_UP_NOTE)
                found.append((Action.FAILED, recipient(address, "4.4.7") if refusal else given_up))
            elif address not in final.retry_recipients:
                found.append((Action.RELAYED, recipient(address, "2.0.0")))
    elif status is MessageStatus.QUEUED and delay_due:
        found += [(Action.DELAYED, recipient(a, "4.0.0")) for a in tried]
    return found


def status_of(code: int | None, text: str | None, *, fallback: str) -> str:
    """The enhanced status (RFC 3463) of a reply: its own when it gives one of the same class."""
    found = _ENHANCED.match(text or "")
    if found and code is not None and found.group(1) == str(code)[0]:
        return found.group(0)
    if code is not None and 400 <= code < 600:
        return f"{str(code)[0]}.0.0"
    return fallback


def build(
    notice: Notice,
    original: Original,
    data: bytes,
    *,
    reporting_mta: str,
    now: datetime,
    retry_until: datetime | None = None,
) -> bytes:
    """The notice as a message (CRLF line ends), addressed to the original's sender.

    ``data`` is the original message; ``retry_until`` is when a delayed message is given up.
    """
    # An internationalised sender (SMTPUTF8) is written as it is, not RFC 2047-encoded (RFC 6532).
    # Fields are folded only past RFC 5322's 998 octets: at 78, the email package would turn a long
    # word (an ENVID, an ORCPT, a reply) into an encoded-word, and programs match those literally.
    policy = (email.policy.SMTP if original.sender.isascii() else email.policy.SMTPUTF8).clone(
        max_line_length=MAX_FIELD_LINE
    )
    report = EmailMessage(policy=policy)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    # As the envelope gave it, unparsed: the email package would decode an encoded-word inside a
    # quoted local part (and refuse one that decodes to a line break, losing the notice).
    report.set_raw("To", original.sender)
    report["Subject"] = SUBJECTS[notice.action]
    report["Date"] = format_datetime(now)
    report["Message-ID"] = f"<{uuid.uuid4()}@{reporting_mta}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 5: no automatic answer to this
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"
    human = MIMEPart(policy=policy)
    human.set_content(_explanation(notice, reporting_mta, retry_until))
    report.set_payload(
        [human, _status_part(notice, original, reporting_mta, now, retry_until), _returned(original, data)]
    )
    return report.as_bytes()


def _explanation(notice: Notice, reporting_mta: str, retry_until: datetime | None) -> str:
    names = "\n".join(
        f"  <{r.address}>: {one_line(r.diagnostic or r.note or 'no reply')}" for r in notice.recipients
    )
    if notice.action is Action.FAILED:
        lead = "Your message could not be delivered to the following recipients:"
        tail = "The relay will not try again."
    elif notice.action is Action.DELAYED:
        lead = "Your message has not been delivered yet to the following recipients:"
        until = format_datetime(retry_until) if retry_until else "its retry limit"
        tail = f"The relay keeps trying until {until}; you need not send it again."
    else:
        lead = "Your message was handed to the next mail system for the following recipients:"
        tail = "That system does not report delivery further."
    return f"This is the mail system at {reporting_mta}.\n\n{lead}\n\n{names}\n\n{tail}\n"


def _status_part(
    notice: Notice, original: Original, reporting_mta: str, now: datetime, retry_until: datetime | None
) -> Message:
    """``message/delivery-status``: the per-message fields, then one block per recipient."""
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    if original.envid:
        per_message["Original-Envelope-Id"] = original.envid
    per_message["Arrival-Date"] = format_datetime(original.arrived)
    blocks = [per_message]
    for recipient in notice.recipients:
        block = Message()
        if recipient.original:
            block["Original-Recipient"] = recipient.original
        block["Final-Recipient"] = _address_field(recipient.address)
        block["Action"] = str(notice.action)
        block["Status"] = recipient.status
        if recipient.remote_mta:
            block["Remote-MTA"] = f"dns; {_host(recipient.remote_mta)}"
        if recipient.diagnostic:
            block["Diagnostic-Code"] = f"smtp; {_ascii(one_line(recipient.diagnostic))}"
        block["Last-Attempt-Date"] = format_datetime(now)
        if notice.action is Action.DELAYED and retry_until is not None:
            block["Will-Retry-Until"] = format_datetime(retry_until)
        blocks.append(block)
    part = Message()
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


def _returned(original: Original, data: bytes) -> Message:
    """The original's header section, or all of it for ``RET=FULL`` (up to FULL_RETURN_LIMIT)."""
    part = Message()
    if original.ret == "FULL" and len(data) <= FULL_RETURN_LIMIT:
        part["Content-Type"] = "message/rfc822"
        returned = data
    else:
        found = _HEADER_END.search(data)
        part["Content-Type"] = "text/rfc822-headers"
        returned = (data[: found.start()] if found else data) + b"\r\n"
    part["Content-Transfer-Encoding"] = "7bit" if returned.isascii() else "8bit"
    part.set_payload(returned.decode("ascii", "surrogateescape"))  # 8-bit octets kept as they were
    return part


def _address_field(address: str) -> str:
    """``rfc822; addr``, or for an internationalised address RFC 6533 3's ``utf-8`` type with each
    non-ASCII character as ``\\x{HEX}``, as a message/delivery-status part (ASCII) must carry it."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(ch if ch.isascii() else f"\\x{{{ord(ch):X}}}" for ch in address)


def _host(name: str) -> str:
    """A host name as DNS carries it: an internationalised one in its A-label (IDNA) form."""
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return _ascii(name)


def _ascii(text: str) -> str:
    """A status field's text: the part is printable ASCII (RFC 3464 2.1.2), so anything else
    (a control character too) becomes "?"."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)
