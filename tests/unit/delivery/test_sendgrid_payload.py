"""The MIME -> SendGrid Mail Send JSON mapping (smtp_proxy.delivery.sendgrid.payload): bytes in, dict out."""

from __future__ import annotations

import base64
import json
import uuid
from email.message import EmailMessage
from email.policy import SMTP

import pytest

from smtp_proxy.delivery.outcome import Outgoing
from smtp_proxy.delivery.sendgrid import MAX_RECIPIENTS, PayloadError, payload

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PDF = b"%PDF-1.4\r\n" + bytes(range(255, -1, -1))


def outgoing(
    data: bytes | EmailMessage, recipients: tuple[str, ...], sender: str = "alice@example.com"
) -> Outgoing:
    if isinstance(data, EmailMessage):
        data = data.as_bytes(policy=SMTP)
    return Outgoing(uuid.uuid4(), sender, recipients, data)


def simple(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@example.com>"
    msg["To"] = "Bob <bob@example.org>"
    msg["Subject"] = "Quarterly report"
    msg["Date"] = "Tue, 02 Jan 2024 10:00:00 +0000"
    msg["Message-ID"] = "<report-1@example.com>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello Bob,\nthe report is attached.\n")
    return msg


def test_plain_message_maps_from_subject_content_and_recipient() -> None:
    body = payload(outgoing(simple(), ("bob@example.org",)))
    assert body["from"] == {"email": "alice@example.com", "name": "Alice Example"}
    assert body["subject"] == "Quarterly report"
    assert body["personalizations"] == [{"to": [{"email": "bob@example.org", "name": "Bob"}]}]
    assert body["content"] == [{"type": "text/plain", "value": "Hello Bob,\nthe report is attached.\n"}]
    assert "attachments" not in body
    assert body["headers"] == {"Message-ID": "<report-1@example.com>"}
    # Only documented top-level fields, and it is JSON as it stands.
    assert set(body) == {"personalizations", "from", "subject", "content", "headers"}
    json.dumps(body, allow_nan=False)


def test_alternative_puts_text_plain_first_even_when_html_comes_first_in_the_mime() -> None:
    raw = (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/html\r\n\r\n<p>Hello <b>Bob</b></p>\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nHello Bob\r\nsecond line\r\n"
        b"--b--\r\n"
    )
    body = payload(outgoing(raw, ("bob@example.org",)))
    assert body["content"] == [
        {"type": "text/plain", "value": "Hello Bob\nsecond line"},  # LF: SendGrid writes the CRLFs
        {"type": "text/html", "value": "<p>Hello <b>Bob</b></p>"},
    ]


def test_attachments_and_inline_images() -> None:
    msg = simple()
    msg.set_content("See the chart.")
    msg.add_alternative('<p>See <img src="cid:chart.1@example.com"></p>', subtype="html")
    html = msg.get_payload()[1]
    html.add_related(PNG, "image", "png", cid="<chart.1@example.com>")
    msg.add_attachment(PDF, "application", "pdf", filename="report.pdf")
    body = payload(outgoing(msg, ("bob@example.org",)))

    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    image, pdf = body["attachments"]
    assert image["type"] == "image/png"
    assert image["disposition"] == "inline"
    assert image["content_id"] == "chart.1@example.com"
    assert image["filename"]  # SendGrid requires one; a name is made up when the part has none
    assert base64.b64decode(image["content"], validate=True) == PNG
    assert pdf == {
        "content": base64.b64encode(PDF).decode(),
        "filename": "report.pdf",
        "type": "application/pdf",
        "disposition": "attachment",
    }


def test_attachment_without_name_or_content_id_gets_a_generated_name_and_attachment_disposition() -> None:
    raw = (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
        b"--b\r\nContent-Type: image/jpeg\r\nContent-Disposition: inline\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"JPEGDATA")
        + b"--b\r\nContent-Type: text/plain\r\n\r\nsecond text part\r\n"
        b"--b--\r\n"
    )
    body = payload(outgoing(raw, ("bob@example.org",)))
    assert body["content"] == [{"type": "text/plain", "value": "body"}]
    jpeg, text = body["attachments"]
    assert (jpeg["filename"], jpeg["disposition"], jpeg["type"]) == ("part-1.jpg", "attachment", "image/jpeg")
    assert "content_id" not in jpeg
    assert base64.b64decode(jpeg["content"]) == b"JPEGDATA"
    # Only the first text/plain is the body; a later one travels as an attachment, not lost.
    assert text["filename"] == "part-2.txt"
    assert base64.b64decode(text["content"]) == b"second text part"


def test_forwarded_message_is_one_eml_attachment() -> None:
    inner = simple()
    inner.replace_header("Subject", "the original")
    msg = simple()
    msg.add_attachment(inner)
    body = payload(outgoing(msg, ("bob@example.org",)))
    assert len(body["content"]) == 1
    (forwarded,) = body["attachments"]
    assert forwarded["type"] == "message/rfc822"
    assert forwarded["filename"].endswith(".eml")
    assert b"Subject: the original" in base64.b64decode(forwarded["content"])


def test_envelope_recipients_split_into_to_cc_and_bcc_by_the_headers() -> None:
    msg = simple(Cc="Carol C. <Carol@Example.org>, not-a-recipient@example.org")
    msg.replace_header("To", "Bob <BOB@example.org>, Erin <erin@example.org>")
    recipients = ("bob@example.org", "carol@example.org", "dave@example.net", "Bob@Example.org")
    body = payload(outgoing(msg, recipients))
    # The envelope decides who gets it (Erin is only named in To); the headers decide how they show.
    assert body["personalizations"] == [
        {
            "to": [{"email": "bob@example.org", "name": "Bob"}],
            "cc": [{"email": "carol@example.org", "name": "Carol C."}],
            "bcc": [{"email": "dave@example.net"}],
        }
    ]


def test_without_a_to_recipient_each_recipient_gets_its_own_personalization() -> None:
    msg = simple(Cc="carol@example.org")
    msg.replace_header("To", "Undisclosed recipients:;")
    body = payload(outgoing(msg, ("carol@example.org", "dave@example.net")))
    assert body["personalizations"] == [
        {"to": [{"email": "carol@example.org"}]},
        {"to": [{"email": "dave@example.net"}]},
    ]


def test_non_ascii_subject_names_and_bodies_are_decoded() -> None:
    raw = (
        b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@example.com>\r\n"
        b"To: =?iso-8859-1?q?Ren=E9?= <rene@example.org>\r\n"
        b"Subject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?= \xe2\x9c\x93\r\n"
        b"X-Tenant: caf\xc3\xa9\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Gr=C3=BC=C3=9Fe, na=C3=AFve caf=C3=A9\r\n"
        b"--b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"<p>\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e</p>\r\n"
        b"--b--\r\n"
    )
    body = payload(outgoing(raw, ("rene@example.org",)))
    assert body["from"] == {"email": "joerg@example.com", "name": "Jörg Müller"}
    assert body["personalizations"][0]["to"] == [{"email": "rene@example.org", "name": "René"}]
    assert body["subject"] == "Grüße aus Köln ✓"
    assert body["content"] == [
        {"type": "text/plain", "value": "Grüße, naïve café"},
        {"type": "text/html", "value": "<p>日本語</p>"},
    ]
    # SendGrid wants custom header values encoded; a raw 8-bit one becomes an RFC 2047 word.
    assert body["headers"]["X-Tenant"].isascii()
    assert body["headers"]["X-Tenant"].startswith("=?utf-8?")
    assert json.loads(json.dumps(body)) == body


def test_reserved_and_structural_headers_are_dropped_others_pass_through_unfolded() -> None:
    raw = (
        b"Received: from mx.example.com by relay; Tue, 2 Jan 2024 10:00:00 +0000\r\n"
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; b=abc\r\n"
        b"X-SG-ID: abc\r\nX-SG-EID: def\r\nReturn-Path: <bounce@example.com>\r\n"
        b"From: alice@example.com\r\nTo: bob@example.org\r\nCc: carol@example.org\r\n"
        b"Bcc: dave@example.net\r\nReply-To: help@example.com\r\nSubject: s\r\n"
        b"Date: Tue, 02 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
        b"Content-Language: en\r\n"
        b"Message-ID: <m1@example.com>\r\nIn-Reply-To: <m0@example.com>\r\n"
        b"References: <a@example.com>\r\n <m0@example.com>\r\n"
        b"X-Campaign: spring\r\nX-Campaign: second occurrence\r\nList-Unsubscribe: <mailto:u@example.com>\r\n"
        b"\r\nbody\r\n"
    )
    body = payload(outgoing(raw, ("bob@example.org",)))
    assert body["headers"] == {
        "Message-ID": "<m1@example.com>",
        "In-Reply-To": "<m0@example.com>",
        "References": "<a@example.com> <m0@example.com>",
        "X-Campaign": "spring",
        "List-Unsubscribe": "<mailto:u@example.com>",
    }
    assert body["reply_to"] == {"email": "help@example.com"}


def test_several_reply_to_addresses_use_reply_to_list() -> None:
    body = payload(outgoing(simple(Reply_To="a@example.com, B <b@example.com>"), ("bob@example.org",)))
    assert "reply_to" not in body
    assert body["reply_to_list"] == [{"email": "a@example.com"}, {"email": "b@example.com", "name": "B"}]


def test_missing_subject_and_empty_body_become_a_single_space() -> None:
    raw = b"From: alice@example.com\r\nTo: bob@example.org\r\n\r\n"
    body = payload(outgoing(raw, ("bob@example.org",)))
    assert body["subject"] == " "  # SendGrid rejects a missing or empty subject
    assert body["content"] == [{"type": "text/plain", "value": " "}]  # and empty content values


def test_missing_from_falls_back_on_the_envelope_sender() -> None:
    raw = b"To: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    assert payload(outgoing(raw, ("bob@example.org",), sender="bounce@example.com"))["from"] == {
        "email": "bounce@example.com"
    }
    with pytest.raises(PayloadError, match="sender"):
        payload(outgoing(raw, ("bob@example.org",), sender=""))


def test_too_many_recipients_is_a_payload_error() -> None:
    recipients = tuple(f"user{i}@example.org" for i in range(MAX_RECIPIENTS + 1))
    with pytest.raises(PayloadError, match="at most 1000"):
        payload(outgoing(simple(), recipients))
    assert len(payload(outgoing(simple(), recipients[:-1]))["personalizations"]) == MAX_RECIPIENTS


def nested(depth: int) -> bytes:
    head = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
    part = b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n'
    opening = b"".join(part % (level, level) for level in range(depth))
    closing = b"".join(b"--b%d--\r\n" % level for level in reversed(range(depth)))
    return head + opening + b"Content-Type: text/plain\r\n\r\ninnermost\r\n" + closing


def test_multiparts_nested_fifty_deep_are_read() -> None:
    body = payload(outgoing(nested(50), ("b@example.net",)))
    assert body["content"] == [{"type": "text/plain", "value": "innermost"}]


@pytest.mark.parametrize("depth", [51, 3000])  # 3000 is past the email package's own recursion limit
def test_deeper_nesting_is_a_payload_error(depth: int) -> None:
    """A permanent failure with a reason, not a crash of the transport retried for days."""
    with pytest.raises(PayloadError, match="nested more than 50 deep"):
        payload(outgoing(nested(depth), ("b@example.net",)))
