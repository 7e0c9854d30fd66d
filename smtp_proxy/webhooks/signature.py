"""The ``Webhook-Signature`` header: ``t=<unix time>,v1=<hex HMAC-SHA256 of "t.body">``.

The scheme Stripe documents, so receivers can reuse what they know: the timestamp is
signed with the body, so a captured request cannot be replayed later with a fresh time,
and the receiver compares in constant time. While a rotated secret's predecessor is still
valid, the header carries one ``v1=`` per secret, the newest first, and a receiver holding
either one verifies the request.

Pure: no clock, no I/O; the caller passes the time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

HEADER = "Webhook-Signature"
# What a receiver should accept as the age of a signature (the README's example uses it).
TOLERANCE_SECONDS = 300


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def sign(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """The header's value for ``body`` sent at ``timestamp``: one ``v1`` per secret, in order."""
    if not secrets:
        raise ValueError("at least one secret is needed")
    return ",".join([f"t={timestamp}", *(f"v1={_mac(secret, timestamp, body)}" for secret in secrets)])


def verify(
    header: str, body: bytes, secrets: Iterable[str], *, now: int, tolerance: int = TOLERANCE_SECONDS
) -> bool:
    """Whether ``header`` signs ``body`` with one of ``secrets`` within ``tolerance`` of ``now``.

    What a receiver does; here so the tests and the README's example agree with ``sign``.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit() and timestamp is None:
            timestamp = int(value)
        elif key == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures or abs(now - timestamp) > tolerance:
        return False
    expected = [_mac(secret, timestamp, body) for secret in secrets]
    return any(hmac.compare_digest(mine, theirs) for mine in expected for theirs in signatures)
