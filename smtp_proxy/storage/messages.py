"""Messages: the durable enqueue behind the SMTP 250 reply, and reading them back.

``enqueue_message`` only adds rows; the caller commits inside
``Database.transaction()`` and replies 250 after the commit returns. The
whole message is sealed with AES-GCM, bound to its own id; the header fields
are kept in the clear for search and display, the body never is.
"""

from __future__ import annotations

import email.errors
import email.header
import functools
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, insert, select, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.models import DeliveryLog, Message, MessageStatus
from smtp_proxy.db.types import utcnow
from smtp_proxy.errors import NotFound
from smtp_proxy.storage import json_rows

MAX_HEADER_FIELDS = 200
MAX_HEADER_VALUE = 2000
MAX_SUBJECT = 1000


def body_aad(message_id: uuid.UUID) -> bytes:
    return b"messages.body_encrypted:" + message_id.bytes


def _text(raw: bytes, limit: int) -> str:
    """Text a JSON column accepts: valid UTF-8 (other bytes replaced), no NUL."""
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")[:limit]


# A header field name: printable ASCII but for the colon (RFC 5322 2.2).
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+):")
_BLANK_LINE = re.compile(rb"\n\r?\n")


def parse_headers(data: bytes) -> tuple[list[list[str]], str | None]:
    """The header fields as [name, value] pairs (unfolded) and the decoded Subject, if any.

    Runs once per accepted message, between the end of DATA and the 250, so it
    reads only the header block, by hand: ``email.parser.BytesHeaderParser`` on
    the same block, with either the compat32 or the default policy, is several
    times slower on realistic messages (``scripts/bench_headers.py``). Raw
    values are kept so that UTF-8 header text (RFC 6532) survives; only bytes
    that are not UTF-8 are replaced. The first line that is not a field ends the
    header block.
    """
    fields: list[tuple[bytes, bytes]] = []
    if data.startswith((b"\r\n", b"\n")):
        return [], None
    blank = _BLANK_LINE.search(data)
    head = data[: blank.start() + 1] if blank else data
    for number, line in enumerate(head.split(b"\n")):
        line = line[:-1] if line.endswith(b"\r") else line
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if not fields:
                break
            name, value = fields[-1]
            fields[-1] = (name, value + line)  # unfolding keeps the leading white space
            continue
        match = _FIELD.match(line)
        if match is None:
            if number == 0 and line.startswith(b"From "):
                continue  # an mbox "From " line, not a field
            break
        fields.append((match.group(1), line[match.end() :]))
    headers = [
        [_text(name, 200), _text(value.strip(), MAX_HEADER_VALUE)]
        for name, value in fields[:MAX_HEADER_FIELDS]
    ]
    return headers, subject_of(headers)


def subject_of(headers: list[list[str]]) -> str | None:
    """The first Subject: field decoded (RFC 2047), on one line, cut to MAX_SUBJECT; None without one."""
    raw_subject = next((value for name, value in headers if name.lower() == "subject"), None)
    if raw_subject is None:
        return None
    try:
        subject = str(email.header.make_header(email.header.decode_header(raw_subject)))
    except (email.errors.HeaderParseError, UnicodeError, LookupError, ValueError):
        subject = raw_subject
    return " ".join(subject.split())[:MAX_SUBJECT]


# A plain Core statement, compiled once and cached; the values travel as parameters.
_INSERT = insert(Message.__table__)


class EnqueuedMessage(NamedTuple):
    id: uuid.UUID
    size: int


def enqueue_message(
    session: Session | Connection,
    cipher: Cipher,
    *,
    account_id: uuid.UUID,
    sender: str,
    recipients: list[str],
    data: bytes,
    correlation_id: str,
    attempts: int = 0,
    created_at: datetime | None = None,
    next_attempt_at: datetime | None = None,
    message_id: uuid.UUID | None = None,
    credential_id: uuid.UUID | None = None,
    dsn_ret: str | None = None,
    dsn_envid: str | None = None,
    dsn_recipients: Mapping[str, Any] | None = None,
    is_bounce: bool = False,
    delay_notified: bool = False,
) -> EnqueuedMessage:
    """Insert a queued message (body encrypted); committed by the caller.

    A single Core INSERT rather than the ORM's unit of work: this runs once per
    accepted message, between the end of DATA and the 250. The worker's
    follow-up messages (recipients a provider refused for now) carry their
    original's attempts and acceptance time, so the same retry limits apply.
    The listener picks the id itself, to name it in the message's Received field.
    ``credential_id`` is the SMTP credential that submitted it (None: a relay network's client).
    ``dsn_*`` are the RFC 3461 parameters the client gave (``dsn_recipients`` keyed by
    recipient, only those that gave NOTIFY or ORCPT, None when none did); ``delay_notified``: a
    follow-up whose original already told the sender of the delay; ``is_bounce`` marks a
    delivery status notification the worker enqueues.
    """
    headers, subject = parse_headers(data)
    message_id = message_id or uuid.uuid4()
    now = utcnow()
    session.execute(
        _INSERT,
        dict(
            id=message_id,
            account_id=account_id,
            credential_id=credential_id,
            sender=sender,
            recipients=list(recipients),
            subject=subject,
            headers=headers,
            body_encrypted=cipher.encrypt(data, body_aad(message_id)),
            size=len(data),
            status=MessageStatus.QUEUED,
            correlation_id=correlation_id,
            attempts=attempts,
            next_attempt_at=next_attempt_at or now,
            created_at=created_at or now,
            updated_at=now,
            dsn_ret=dsn_ret,
            dsn_envid=dsn_envid,
            dsn_recipients=dict(dsn_recipients) if dsn_recipients else None,
            is_bounce=is_bounce,
            delay_notified=delay_notified,
        ),
    )
    return EnqueuedMessage(message_id, len(data))


def get_message(session: Session, message_id: uuid.UUID, account_id: uuid.UUID | None = None) -> Message:
    """One message; another tenant's message is NotFound when ``account_id`` is given."""
    query = select(Message).where(Message.id == message_id)
    if account_id is not None:
        query = query.where(Message.account_id == account_id)
    message = session.scalar(query)
    if message is None:
        raise NotFound("no such message")
    return message


# Every column but the body: pages and details never need (or show) it. Pages
# leave out the header fields too (a JSON document per row to decode).
_METADATA = [column for column in Message.__table__.c if column.name != "body_encrypted"]
_PAGE_COLUMNS = [column for column in _METADATA if column.name != "headers"]


class Page(NamedTuple):
    rows: list[Any]
    more: bool


@functools.cache
def _page_select(
    status: bool,
    credential: bool,
    since: bool,
    until: bool,
    before: bool,
    is_bounce: bool = False,
    *,
    ranked: bool = False,
) -> Any:
    """One page's SELECT for one combination of filters, built once with bound parameters.

    Building it per request cost more than running it. ``ranked`` adds each
    row's place on the page (1, 2, ...), for ``list_messages_json``.
    """
    c = Message.__table__.c
    newest_first = (c.created_at.desc(), c.id.desc())
    columns: list[Any] = list(_PAGE_COLUMNS)
    if ranked:
        columns.append(func.row_number().over(order_by=newest_first).label("rank"))
    query = select(*columns).where(c.account_id == bindparam("account_id"))
    if status:
        query = query.where(c.status == bindparam("status", type_=c.status.type))
    if credential:
        query = query.where(c.credential_id == bindparam("credential_id", type_=c.credential_id.type))
    if since:
        query = query.where(c.created_at >= bindparam("since", type_=c.created_at.type))
    if until:
        query = query.where(c.created_at < bindparam("until", type_=c.created_at.type))
    if is_bounce:
        query = query.where(c.is_bounce == bindparam("is_bounce", type_=c.is_bounce.type))
    if before:
        after = tuple_(
            bindparam("before_created", type_=c.created_at.type), bindparam("before_id", type_=c.id.type)
        )
        query = query.where(tuple_(c.created_at, c.id) < after)
    return query.order_by(*newest_first).limit(bindparam("fetch"))


class Filters(NamedTuple):
    """What a page of messages is narrowed to; None leaves a filter out."""

    status: MessageStatus | None = None
    credential_id: uuid.UUID | None = None
    since: datetime | None = None
    until: datetime | None = None
    before: tuple[datetime, uuid.UUID] | None = None  # the last (created_at, id) of the page before
    is_bounce: bool | None = None  # only delivery status notifications (True), or only the others


EVERY_MESSAGE = Filters()


def _page(account_id: uuid.UUID, filters: Filters, limit: int) -> tuple[tuple[bool, ...], dict[str, Any]]:
    """Which filters a page uses, and the parameters of its statement.

    A page fetches ``limit`` rows plus one, to tell whether more follow.
    """
    status, credential_id, since, until, before, is_bounce = filters
    used = tuple(value is not None for value in filters)
    parameters = {
        "account_id": account_id,
        "status": status,
        "credential_id": credential_id,
        "since": since,
        "until": until,
        "before_created": before[0] if before else None,
        "before_id": before[1] if before else None,
        "is_bounce": is_bounce,
        "fetch": limit + 1,
    }
    return used, parameters


def list_messages(
    session: Session | Connection, account_id: uuid.UUID, filters: Filters = EVERY_MESSAGE, *, limit: int = 50
) -> Page:
    """One page of a tenant's messages, newest first, without bodies.

    ``filters.before`` is a keyset cursor: pages stay stable while new messages arrive.
    """
    used, parameters = _page(account_id, filters, limit)
    rows = session.execute(_page_select(*used), parameters).all()
    return Page(rows[:limit], len(rows) > limit)


class JsonPage(NamedTuple):
    items: str  # a JSON array
    more: bool
    last: tuple[datetime, uuid.UUID] | None  # the page's last row, for the next cursor


def list_messages_json(
    connection: Connection, account_id: uuid.UUID, filters: Filters = EVERY_MESSAGE, *, limit: int = 50
) -> JsonPage | None:
    """``list_messages`` with its rows as the API renders them, built by PostgreSQL; None elsewhere."""
    if not json_rows.renders_json(connection):
        return None
    used, parameters = _page(account_id, filters, limit)
    items, rows, last_created, last_id = connection.execute(
        _json_page(*used), {**parameters, "limit": limit}
    ).one()
    more = rows > limit
    return JsonPage(items, more, (last_created, last_id) if more else None)


@functools.cache
def _json_page(*used: bool) -> Any:
    """The page as one JSON array, its row count and its last row's keys (built once per filter set)."""
    page = _page_select(*used, ranked=True).subquery()
    fields = {
        "id": page.c.id,
        "sender": page.c.sender,
        "recipients": func.coalesce(page.c.recipients, json_rows.EMPTY_ARRAY),
        "subject": page.c.subject,
        "size": page.c.size,
        "status": page.c.status,
        "attempts": page.c.attempts,
        "provider_id": page.c.provider_id,
        "credential_id": page.c.credential_id,
        "correlation_id": page.c.correlation_id,
        "is_bounce": page.c.is_bounce,
        "next_attempt_at": page.c.next_attempt_at,
        "processed_at": page.c.processed_at,
        "created_at": page.c.created_at,
        "updated_at": page.c.updated_at,
    }
    last = page.c.rank == bindparam("limit")
    return select(
        json_rows.json_array(fields, page.c.rank, where=page.c.rank <= bindparam("limit")),
        func.count(),
        func.max(page.c.created_at).filter(last),
        func.array_agg(page.c.id).filter(last)[1],
    )


def message_metadata(session: Session, account_id: uuid.UUID, message_id: uuid.UUID) -> Any:
    """One message's columns but the body; another tenant's is NotFound."""
    table = Message.__table__
    row = session.execute(
        select(*_METADATA).where(table.c.id == message_id, table.c.account_id == account_id)
    ).one_or_none()
    if row is None:
        raise NotFound("no such message")
    return row


def deliveries(session: Session, message_id: uuid.UUID) -> list[DeliveryLog]:
    """The delivery attempts of one message, oldest first."""
    query = select(DeliveryLog).where(DeliveryLog.message_id == message_id)
    return list(session.scalars(query.order_by(DeliveryLog.created_at, DeliveryLog.id)))


def message_body(cipher: Cipher, message: Message) -> bytes:
    """The message as received. Raises NotFound once retention dropped it."""
    if message.body_encrypted is None:
        raise NotFound("the message body was purged")
    return cipher.decrypt(message.body_encrypted, body_aad(message.id))


def reseal_bodies(
    session: Session, cipher: Cipher, after: uuid.UUID | None, batch_size: int = 500
) -> tuple[int, uuid.UUID | None]:
    """Re-encrypt, under the current key, one batch of bodies sealed with an older key.

    Walks the table by id; returns (rows re-sealed, last id seen), or a None id at the end.
    """
    query = select(Message).where(Message.body_encrypted.is_not(None)).order_by(Message.id).limit(batch_size)
    if after is not None:
        query = query.where(Message.id > after)
    rows = list(session.scalars(query))
    resealed = 0
    for message in rows:
        assert message.body_encrypted is not None
        if cipher.needs_rotation(message.body_encrypted):
            plain = cipher.decrypt(message.body_encrypted, body_aad(message.id))
            message.body_encrypted = cipher.encrypt(plain, body_aad(message.id))
            resealed += 1
    session.flush()
    return resealed, (rows[-1].id if len(rows) == batch_size else None)
