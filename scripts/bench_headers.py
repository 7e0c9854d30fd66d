#!/usr/bin/env python3
"""Benchmark of the header parsing behind every 250: the hand-written parser against the email package.

Run from the repository root after ./scripts/test has made the venv:

    .venv/bin/python scripts/bench_headers.py [--seconds 1.0]

``storage.messages.parse_headers`` runs once per accepted message, between the end of DATA and the
250 reply. It is measured against the same function built on ``email.parser.BytesHeaderParser``
(with ``email.policy.compat32`` and with ``email.policy.default``) on three realistic messages: a
small one (a few fields), one with many fields (a Received chain, DKIM and ARC signatures, list
headers, 40 fields in all, 20 KiB of body) and one whose fields are folded (long recipient lists,
an encoded Subject over three lines, signatures). Both read the header block only, unfold the
fields, keep the raw bytes as UTF-8 and decode the Subject the same way; the script first checks
that they give the same result on each message, so that like is compared with like.

It prints, for each message, microseconds per message (the best of five runs) and each library
variant's time relative to the hand-written parser.
"""

from __future__ import annotations

import argparse
import email.errors
import email.header
import email.policy
import sys
import timeit
from collections.abc import Callable
from email.parser import BytesHeaderParser
from email.policy import Policy
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smtp_proxy.storage.messages import (  # noqa: E402
    _BLANK_LINE,
    MAX_HEADER_FIELDS,
    MAX_HEADER_VALUE,
    _text,
    parse_headers,
    subject_of,
)

Parsed = tuple[list[list[str]], str | None]

SMALL = (
    b"From: Shop <orders@shop.example>\r\n"
    b"To: customer@example.net\r\n"
    b"Subject: Your order 48213 has shipped\r\n"
    b"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <48213.1764072000@shop.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello,\r\n\r\nyour parcel is on its way.\r\n"
)

_SIGNATURE = b"b=" + b"dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZSBidXQgaXQgaXMgYXMgbG9uZyBhcyBvbmU" * 4
_MANY = [
    *(
        b"Received: from mx%d.relay.example (mx%d.relay.example [192.0.2.%d]) by mx.example.net "
        b"with ESMTPS id %d; Wed, 25 Nov 2026 12:00:%02d +0000" % (n, n, n, 1000 + n, n)
        for n in range(8)
    ),
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=shop.example; s=s1; h=from:to:subject:date; "
    + _SIGNATURE,
    b"ARC-Seal: i=1; a=rsa-sha256; t=1764072000; cv=none; d=relay.example; s=arc; " + _SIGNATURE,
    b"ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=relay.example; s=arc; " + _SIGNATURE,
    b"ARC-Authentication-Results: i=1; mx.example.net; dkim=pass header.d=shop.example; spf=pass",
    b"Authentication-Results: mx.example.net; dkim=pass header.d=shop.example; spf=pass; dmarc=pass",
    b"Return-Path: <bounces+48213@shop.example>",
    b"From: Shop <news@shop.example>",
    b"To: customer@example.net",
    b"Subject: =?utf-8?q?Nouveaut=C3=A9s_de_la_semaine?=",
    b"Date: Wed, 25 Nov 2026 12:00:00 +0000",
    b"Message-ID: <news.48213.1764072000@shop.example>",
    b"MIME-Version: 1.0",
    b'Content-Type: multipart/alternative; boundary="b1_0a1b2c3d4e5f"',
    b"List-Id: Shop news <news.shop.example>",
    b"List-Unsubscribe: <https://shop.example/unsubscribe/48213>, <mailto:unsubscribe@shop.example>",
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
    b"Precedence: bulk",
    b"Feedback-ID: 48213:news:shop",
    *(b"X-Campaign-%d: weekly-news-%d" % (n, n) for n in range(10)),
    b"X-Mailer: shop-mailer 4.2",
    b"X-Entity-Ref-ID: 0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9",
    b"X-Priority: 3",
]
MANY = b"\r\n".join(_MANY) + b"\r\n\r\n" + b"<p>This week in the shop.</p>\r\n" * 640

FOLDED = (
    b"Received: from mx1.relay.example (mx1.relay.example [192.0.2.1])\r\n"
    b"\tby mx.example.net with ESMTPS id 1001\r\n"
    b"\tfor <team@example.net>; Wed, 25 Nov 2026 12:00:00 +0000\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=corp.example; s=s1;\r\n"
    b"\th=from:to:cc:subject:date:message-id;\r\n"
    b"\tbh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
    b"\t" + _SIGNATURE[:76] + b"\r\n\t " + _SIGNATURE[76:152] + b"\r\n\t " + _SIGNATURE[152:] + b"\r\n"
    b"From: =?utf-8?q?Se=C3=B1ora_Garc=C3=ADa?= <garcia@corp.example>\r\n"
    b"To: alice@example.net, bob@example.net, carol@example.net,\r\n"
    b" dave@example.net, erin@example.net, frank@example.net,\r\n"
    b" grace@example.net, heidi@example.net, ivan@example.net\r\n"
    b"Cc: judy@example.net,\r\n mallory@example.net,\r\n niaj@example.net\r\n"
    b"Subject: =?utf-8?q?R=C3=A9union_trimestrielle_=E2=80=94_ordre_du_jour?=\r\n"
    b" =?utf-8?q?_et_documents_=C3=A0_lire_avant_jeudi?=\r\n"
    b" =?utf-8?q?_(salle_B)?=\r\n"
    b"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <quarterly.1764072000@corp.example>\r\n"
    b"References: <a.1@corp.example>\r\n <b.2@corp.example>\r\n <c.3@corp.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed;\r\n boundary="b1_9f8e7d6c5b4a"\r\n'
    b"\r\n"
    b"--b1_9f8e7d6c5b4a\r\nContent-Type: text/plain\r\n\r\nSee you on Thursday.\r\n--b1_9f8e7d6c5b4a--\r\n"
)

MESSAGES = {"small": SMALL, "many fields": MANY, "folded": FOLDED}


def _raw(text: str) -> bytes:
    """The parser's str back to the bytes it was read from (it decodes ASCII with surrogateescape)."""
    return text.encode("ascii", "surrogateescape")


def library_parser(policy: Policy) -> Callable[[bytes], Parsed]:
    """``parse_headers`` on ``BytesHeaderParser``: the same header block, the same output."""
    parser = BytesHeaderParser(policy=policy)

    def parse(data: bytes) -> Parsed:
        if data.startswith((b"\r\n", b"\n")):
            return [], None
        blank = _BLANK_LINE.search(data)
        head = data[: blank.start() + 1] if blank else data
        fields = parser.parsebytes(head).raw_items()  # stored values: folded, not decoded
        headers = [
            [
                _text(_raw(name), 200),
                _text(_raw(value.replace("\r\n", "").replace("\n", "")).strip(), MAX_HEADER_VALUE),
            ]
            for name, value in list(fields)[:MAX_HEADER_FIELDS]
        ]
        return headers, subject_of(headers)

    return parse


PARSERS: dict[str, Callable[[bytes], Parsed]] = {
    "hand-written": parse_headers,
    "BytesHeaderParser compat32": library_parser(email.policy.compat32),
    "BytesHeaderParser default": library_parser(email.policy.default),
}


def per_message(parse: Callable[[bytes], Parsed], data: bytes, seconds: float) -> float:
    """Microseconds per call, the best of five runs of about ``seconds`` each."""
    timer = timeit.Timer(lambda: parse(data))
    number, _ = timer.autorange()
    number = max(1, int(number * seconds / 0.2))
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each timed run")
    args = parser.parse_args()
    for name, data in MESSAGES.items():
        expected = parse_headers(data)
        for variant, parse in PARSERS.items():
            if parse(data) != expected:
                raise SystemExit(f"{variant} parses the {name} message differently: not comparable")
    print(f"Python {sys.version.split()[0]}; microseconds per message, best of 5")
    print(f"{'message':<14}{'fields':>7}{'bytes':>8}" + "".join(f"{v:>30}" for v in PARSERS))
    for name, data in MESSAGES.items():
        times = {variant: per_message(parse, data, args.seconds) for variant, parse in PARSERS.items()}
        base = times["hand-written"]
        cells = [f"{t:9.1f} µs ({t / base:4.1f}x)" for t in times.values()]
        print(
            f"{name:<14}{len(parse_headers(data)[0]):>7}{len(data):>8}" + "".join(f"{c:>30}" for c in cells)
        )


if __name__ == "__main__":
    main()
