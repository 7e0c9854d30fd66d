"""The webhook signature: Stripe's documented scheme, checked against a hand-computed HMAC."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from smtp_proxy.webhooks.signature import sign, verify

BODY = b'{"id":"evt_1","type":"message.delivered"}'
NOW = 1_800_000_000


def test_the_header_is_t_and_the_hex_hmac_sha256_of_t_dot_body() -> None:
    expected = hmac.new(b"whsec_one", f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(["whsec_one"], NOW, BODY) == f"t={NOW},v1={expected}"


def test_a_rotated_secret_signs_with_both_newest_first() -> None:
    header = sign(["new", "old"], NOW, BODY)
    t, first, second = header.split(",")
    assert t == f"t={NOW}"
    assert first == "v1=" + hmac.new(b"new", f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert second == "v1=" + hmac.new(b"old", f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert verify(header, BODY, ["old"], now=NOW)  # a receiver not yet updated
    assert verify(header, BODY, ["new"], now=NOW)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda h, b: (h, b + b" "), "a body changed by one byte"),
        (lambda h, b: (h.replace(f"t={NOW}", f"t={NOW + 1}"), b), "a timestamp moved"),
        (lambda h, b: (h.replace(f"t={NOW},", ""), b), "no timestamp"),
        (lambda h, b: (f"t={NOW}", b), "no signature"),
        (lambda h, b: ("", b), "no header"),
        (lambda h, b: (h[:-1] + ("0" if h[-1] != "0" else "1"), b), "a signature changed by one digit"),
    ],
)
def test_verification_fails_for_anything_altered(change, why: str) -> None:
    header, body = change(sign(["secret"], NOW, BODY), BODY)
    assert not verify(header, body, ["secret"], now=NOW), why


def test_verification_fails_with_another_secret_or_outside_the_tolerance() -> None:
    header = sign(["secret"], NOW, BODY)
    assert not verify(header, BODY, ["another"], now=NOW)
    assert verify(header, BODY, ["secret"], now=NOW + 300)
    assert not verify(header, BODY, ["secret"], now=NOW + 301)
    assert not verify(header, BODY, ["secret"], now=NOW - 301)


def test_signing_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="at least one secret"):
        sign([], NOW, BODY)
