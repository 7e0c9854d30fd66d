"""SendGrid's v3 Mail Send API: the message is re-expressed as JSON, since the API takes no raw MIME.

``payload`` is the pure mapping from the received bytes to the request body; ``send`` posts it.
SendGrid builds the MIME structure itself, so what survives is: From, Reply-To, Subject, the first
text/plain and text/html bodies, every other leaf part as an attachment (inline when it has a
Content-ID), and the non-reserved top-level headers. The envelope decides who receives the message;
the To and Cc headers only decide how each envelope recipient is shown. SendGrid chooses the
envelope sender (its own bounce domain), so ``Outgoing.sender`` is only a fallback for a missing From.
"""

from __future__ import annotations

import base64
import mimetypes
from email import policy
from email.header import Header
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Any, cast

from smtp_proxy.config import DeliveryConfig
from smtp_proxy.delivery import http
from smtp_proxy.delivery.outcome import Outcome, Outgoing, Target, delivered, failed

PATH = "/v3/mail/send"
# Mail Send limits: to + cc + bcc across all personalizations, and personalizations per request.
MAX_RECIPIENTS = 1000
# Headers that SendGrid refuses in ``headers`` (its reserved list), plus those it writes itself.
RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
        "mime-version",
        "date",
        "return-path",
    }
)
# Real mail nests multiparts a few levels deep; a hostile message could nest thousands.
MAX_NESTING = 50
# SendGrid wants a non-empty subject and non-empty content values; a single space stands in for none.
EMPTY = " "

_types = mimetypes.MimeTypes()  # the built-in table only, so generated names do not vary by host


class PayloadError(ValueError):
    """The message cannot be expressed in SendGrid's format; sending it again would not help."""


def send(target: Target, message: Outgoing, settings: DeliveryConfig) -> Outcome:
    """POST the message to Mail Send; 202 is delivered."""
    if not target.api_key:
        return failed(None, "the SendGrid provider has no API key")
    try:
        body = payload(message)
    except PayloadError as error:
        return failed(None, str(error))
    url = settings.endpoints["sendgrid"] + PATH
    secrets = (target.api_key,)
    response = http.post(url, settings, json=body, auth=http.BearerAuth(target.api_key), secrets=secrets)
    if isinstance(response, Outcome):
        return response
    if response.status_code in (200, 202):
        # The body is empty on success; the message id is the one handle for SendGrid's event logs.
        message_id = response.headers.get("X-Message-Id", "")
        text = f"{response.status_code} accepted" + (f", X-Message-Id {message_id}" if message_id else "")
        return delivered(response.status_code, http.scrub(text, secrets))
    return http.outcome(response, secrets=secrets)


def payload(message: Outgoing) -> dict[str, Any]:
    """The Mail Send request body for one received message (pure: no I/O, no configuration).

    Raises ``PayloadError`` when SendGrid could not take the message at all.
    """
    try:
        return _payload(message)
    except RecursionError:  # the email package parses nested multiparts recursively
        raise PayloadError(f"the message's MIME parts are nested more than {MAX_NESTING} deep") from None


def _payload(message: Outgoing) -> dict[str, Any]:
    msg = cast(EmailMessage, BytesParser(policy=policy.default).parsebytes(message.data))
    body: dict[str, Any] = {"personalizations": _personalizations(msg, message.recipients)}
    senders = _addresses(msg, "From")
    if senders:
        body["from"] = senders[0]
    elif message.sender:
        body["from"] = {"email": message.sender}
    else:
        raise PayloadError("SendGrid needs a sender: the message has no From header and a null reverse-path")
    reply_to = _addresses(msg, "Reply-To")
    if len(reply_to) == 1:
        body["reply_to"] = reply_to[0]
    elif reply_to:
        body["reply_to_list"] = reply_to
    subject = str(msg.get("Subject") or "").strip()
    body["subject"] = subject or EMPTY
    content, attachments = _parts(msg)
    body["content"] = content
    if attachments:
        body["attachments"] = attachments
    headers = _headers(msg)
    if headers:
        body["headers"] = headers
    return body


def _personalizations(msg: EmailMessage, recipients: tuple[str, ...]) -> list[dict[str, Any]]:
    """Envelope recipients split by the headers: To -> to, Cc -> cc, the rest (Bcc) -> bcc.

    SendGrid requires a ``to`` in every personalization and rejects an address listed twice. With
    no envelope recipient in To (all Bcc, or a list address), each recipient gets a personalization
    of its own with itself as ``to``, so that no recipient sees another.
    """
    shown_to = {a["email"].lower(): a for a in _addresses(msg, "To")}
    shown_cc = {a["email"].lower(): a for a in _addresses(msg, "Cc")}
    to: list[dict[str, str]] = []
    cc: list[dict[str, str]] = []
    bcc: list[dict[str, str]] = []
    seen: set[str] = set()
    for recipient in recipients:
        key = recipient.lower()
        if key in seen:
            continue
        seen.add(key)
        if key in shown_to:
            to.append(_email(recipient, shown_to[key].get("name")))
        elif key in shown_cc:
            cc.append(_email(recipient, shown_cc[key].get("name")))
        else:
            bcc.append(_email(recipient, None))
    if not seen:
        raise PayloadError("the message has no recipients")
    if len(seen) > MAX_RECIPIENTS:
        raise PayloadError(f"SendGrid takes at most {MAX_RECIPIENTS} recipients per message, not {len(seen)}")
    if not to:
        return [{"to": [each]} for each in cc + bcc]
    personalization: dict[str, Any] = {"to": to}
    if cc:
        personalization["cc"] = cc
    if bcc:
        personalization["bcc"] = bcc
    return [personalization]


def _email(address: str, name: str | None) -> dict[str, str]:
    return {"email": address, "name": name} if name else {"email": address}


def _addresses(msg: EmailMessage, header: str) -> list[dict[str, str]]:
    """The parseable addresses of one header (all occurrences), decoded, as SendGrid email objects."""
    found = []
    for value in msg.get_all(header) or ():
        for address in getattr(value, "addresses", ()):
            if address.username and address.domain:
                found.append(_email(address.addr_spec, address.display_name))
    return found


def _parts(msg: EmailMessage) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``content`` (text/plain first, then text/html, as SendGrid requires) and ``attachments``."""
    text: str | None = None
    html: str | None = None
    attachments: list[dict[str, str]] = []
    for part in _leaves(msg):
        kind = part.get_content_type()
        is_body = part.get_content_disposition() != "attachment" and part.get_filename() is None
        if is_body and kind == "text/plain" and text is None:
            text = _text(part)
        elif is_body and kind == "text/html" and html is None:
            html = _text(part)
        else:
            attachments.append(_attachment(part, len(attachments) + 1))
    content = [
        {"type": kind, "value": value} for kind, value in (("text/plain", text), ("text/html", html)) if value
    ]
    return content or [{"type": "text/plain", "value": EMPTY}], attachments


def _leaves(part: Message, depth: int = 0) -> list[Message]:
    """Leaf parts in order; a message/rfc822 part is a leaf (a forwarded message stays one attachment)."""
    if part.get_content_maintype() == "multipart" and isinstance(part.get_payload(), list):
        if depth >= MAX_NESTING:
            raise PayloadError(f"the message's MIME parts are nested more than {MAX_NESTING} deep")
        children = cast(list[Message], part.get_payload())
        return [leaf for child in children for leaf in _leaves(child, depth + 1)]
    return [part]


def _text(part: Message) -> str:
    """A body part as text, with LF line ends (SendGrid writes the CRLFs)."""
    try:
        value = cast(EmailMessage, part).get_content()
    except (LookupError, UnicodeError):  # an unknown or lying charset
        value = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
    if not isinstance(value, str):
        value = str(value)
    return value.replace("\r\n", "\n")


def _attachment(part: Message, number: int) -> dict[str, str]:
    kind = part.get_content_type()
    if part.get_content_maintype() == "message" and isinstance(part.get_payload(), list):
        data = cast(list[Message], part.get_payload())[0].as_bytes(policy=policy.SMTP)
    else:
        data = cast(bytes | None, part.get_payload(decode=True)) or b""
    filename = part.get_filename() or f"part-{number}{_types.guess_extension(kind) or '.bin'}"
    entry = {"content": base64.b64encode(data).decode("ascii"), "filename": filename, "type": kind}
    content_id = str(part.get("Content-ID") or "").strip().strip("<>").strip()
    # SendGrid needs a content_id for an inline attachment; without one it can only be an attachment.
    if content_id and part.get_content_disposition() != "attachment":
        entry.update(disposition="inline", content_id=content_id)
    else:
        entry["disposition"] = "attachment"
    return entry


def _headers(msg: EmailMessage) -> dict[str, str]:
    """The top-level headers SendGrid accepts, first occurrence only (a JSON object has unique keys).

    Content-* headers are dropped with the reserved ones: they describe the MIME structure that
    SendGrid rebuilds. Values stay in their encoded wire form; raw 8-bit ones become RFC 2047 words.
    """
    headers: dict[str, str] = {}
    taken: set[str] = set()
    for name, raw in msg.raw_items():
        key = name.lower()
        if key in RESERVED_HEADERS or key.startswith("content-") or key in taken:
            continue
        value = "".join(str(raw).splitlines()).strip()  # unfold
        if not value:
            continue
        if not value.isascii():
            decoded = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            value = Header(decoded, "utf-8").encode().replace("\n", "")
        taken.add(key)
        headers[name] = value
    return headers
