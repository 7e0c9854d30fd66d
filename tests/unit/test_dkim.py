"""smtp_proxy.dkim.sign: dkimpy's verifier accepts what it makes, for RSA and Ed25519, and the
DKIM-Signature field is byte for byte the one dkimpy's own signer makes for the same message,
key and time."""

from __future__ import annotations

import types
from collections.abc import Callable

import dkim as dkimpy
import pytest

from smtp_proxy import dkim
from smtp_proxy.contract import DkimAlgorithm

DOMAIN, SELECTOR = "example.com", "sp202612"
NOW = 1_796_239_213

MESSAGE = (
    b"Received: from client.example.net by relay.example.com; Thu, 10 Dec 2026 10:00:01 +0000\r\n"
    b"From: App <app@example.com>\r\n"
    b"To: <rcpt@example.net>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"Date: Thu, 10 Dec 2026 10:00:00 +0000\r\n"
    b"X-Mailer: app 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b".a line that starts with a dot\r\n"
    b"\r\n"
    b"-- \r\n"
    b"end\r\n"
)
# Folded fields, runs of white space, trailing white space, and empty lines at the end of the body:
# what relaxed canonicalisation (RFC 6376 3.4.2, 3.4.4) smooths over.
RAGGED = (
    b"From: A Display Name Long Enough To Fold\r\n <app@example.com>\r\n"
    b"to: <one@example.net>,\r\n\t<two@example.net>  \r\n"
    b"Subject:   a subject\t \r\n   folded over\r\n  three lines \r\n"
    b"Cc: <three@example.net>\r\n"
    b"Reply-To: <help@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"\r\n"
    b"trailing spaces  \r\n"
    b"\ttabs\tand  runs   of spaces\t\r\n"
    b"\r\n"
    b"\r\n"
)
ALGORITHMS = [DkimAlgorithm.RSA_SHA256, DkimAlgorithm.ED25519_SHA256]


@pytest.fixture(scope="module", params=ALGORITHMS, ids=[a.value for a in ALGORITHMS])
def pair(request: pytest.FixtureRequest) -> dkim.KeyPair:
    return dkim.generate(request.param)


@pytest.fixture
def key(pair: dkim.KeyPair) -> dkim.SigningKey:
    return dkim.SigningKey(DOMAIN, SELECTOR, pair.algorithm, pair.private_key)


def published(pair: dkim.KeyPair) -> Callable[..., bytes | None]:
    """dkimpy's ``dnsfunc``: the record ``record_value`` gives, at the key's name only."""
    name = dkim.record_name(SELECTOR, DOMAIN).encode() + b"."
    value = dkim.record_value(pair.algorithm, pair.public_key).encode()
    return lambda asked, timeout=5: value if asked == name else None


def tags(signed: bytes) -> dict[bytes, bytes]:
    """The tags of the DKIM-Signature field on top, white space taken out of the values."""
    name, value = dkimpy.DKIM(signed).headers[0]
    assert name == b"DKIM-Signature"
    found = (part.partition(b"=") for part in value.split(b";"))
    return {tag.strip(): b"".join(text.split()) for tag, _, text in found if tag.strip()}


def dkimpy_sign(message: bytes, key: dkim.SigningKey, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """What dkimpy's own signer makes with our settings, its clock stopped at NOW."""
    monkeypatch.setattr(dkimpy, "time", types.SimpleNamespace(time=lambda: float(NOW)))
    signer = dkimpy.DKIM(message, linesep=b"\r\n")
    present = [name for name, _ in signer.headers if name.lower() in dkim.SIGNED]
    return (
        signer.sign(
            SELECTOR.encode(),
            DOMAIN.encode(),
            key.private_key,
            signature_algorithm=key.algorithm.value.encode(),
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[*present, *dkim.OVERSIGNED],
        )
        + message
    )


def test_a_signed_message_verifies_with_dkimpy(pair: dkim.KeyPair, key: dkim.SigningKey) -> None:
    signed = dkim.sign(MESSAGE, key, timestamp=NOW)
    assert signed.startswith(b"DKIM-Signature: ") and signed.endswith(b"\r\n" + MESSAGE)
    assert dkimpy.verify(signed, dnsfunc=published(pair)) is True
    found = tags(signed)
    assert found[b"a"] == pair.algorithm.value.encode() and found[b"c"] == b"relaxed/relaxed"
    assert (found[b"d"], found[b"s"], found[b"i"]) == (b"example.com", b"sp202612", b"@example.com")
    assert found[b"t"] == str(NOW).encode()


def test_h_lists_the_present_fields_in_order_then_from_to_subject_once_more(key: dkim.SigningKey) -> None:
    found = tags(dkim.sign(MESSAGE, key)).get(b"h", b"").split(b":")
    present = [b"from", b"to", b"subject", b"message-id", b"date", b"content-type"]
    assert found == [*present, b"from", b"to", b"subject"]  # not Received, not X-Mailer


def test_a_changed_body_fails(pair: dkim.KeyPair, key: dkim.SigningKey) -> None:
    signed = dkim.sign(MESSAGE, key)
    assert dkimpy.verify(signed.replace(b"Line one.", b"Line 1."), dnsfunc=published(pair)) is False
    assert dkimpy.verify(signed + b"appended\r\n", dnsfunc=published(pair)) is False


def test_a_changed_or_added_from_fails(pair: dkim.KeyPair, key: dkim.SigningKey) -> None:
    signed = dkim.sign(MESSAGE, key)
    dns = published(pair)
    assert dkimpy.verify(signed.replace(b"app@example.com", b"ceo@example.com"), dnsfunc=dns) is False
    # Oversigning: a second From (above or below the first) is not in the signature and breaks it.
    for added in (b"From: <ceo@example.com>\r\nFrom: ", b"From: App <app@example.com>\r\nFrom: "):
        assert dkimpy.verify(signed.replace(b"From: ", added, 1), dnsfunc=dns) is False
    added_subject = signed.replace(b"\r\nSubject: ", b"\r\nSubject: urgent\r\nSubject: ", 1)
    assert dkimpy.verify(added_subject, dnsfunc=dns) is False


def test_folded_fields_and_trailing_white_space_verify_also_when_a_relay_refolds(
    pair: dkim.KeyPair, key: dkim.SigningKey
) -> None:
    signed = dkim.sign(RAGGED, key)
    dns = published(pair)
    assert dkimpy.verify(signed, dnsfunc=dns) is True
    refolded = (
        signed.replace(b"To Fold\r\n <app", b"To Fold <app")
        .replace(b"\r\n\t<two@", b"\r\n        <two@")
        .replace(b"spaces  \r\n", b"spaces\r\n")
        .replace(b"\r\n\r\n\r\n", b"\r\n")
    )
    assert refolded != signed
    assert dkimpy.verify(refolded, dnsfunc=dns) is True
    assert tags(signed)[b"h"].split(b":")[:2] == [b"from", b"to"]  # field names signed lower-case


@pytest.mark.parametrize("message", [MESSAGE, RAGGED], ids=["plain", "ragged"])
def test_the_signature_is_the_one_dkimpy_makes(
    message: bytes, key: dkim.SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RSA PKCS#1 v1.5 and Ed25519 are deterministic: same input, same b=.
    ours = dkim.sign(message, key, timestamp=NOW)
    assert ours == dkimpy_sign(message, key, monkeypatch)


def test_a_message_without_from_is_refused(key: dkim.SigningKey) -> None:
    # RFC 6376 5.4: From MUST be signed; delivery.signing sends such a message unsigned.
    without_from = MESSAGE.replace(b"From: App <app@example.com>\r\n", b"")
    with pytest.raises(dkimpy.MessageFormatError):
        dkim.sign(without_from, key)


def test_a_message_dkimpy_cannot_parse_is_refused(key: dkim.SigningKey) -> None:
    with pytest.raises(dkimpy.MessageFormatError):
        dkim.sign(b"From: <app@example.com>\r\nnot a header field\r\n\r\nbody\r\n", key)


@pytest.mark.parametrize(
    "algorithm, private_key",
    [
        (DkimAlgorithm.RSA_SHA256, b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"),
        (DkimAlgorithm.RSA_SHA256, b""),
        (DkimAlgorithm.ED25519_SHA256, b"c2hvcnQ="),
        (DkimAlgorithm.ED25519_SHA256, b"not base64"),
    ],
)
def test_a_key_that_does_not_load_is_refused(algorithm: DkimAlgorithm, private_key: bytes) -> None:
    key = dkim.SigningKey(DOMAIN, SELECTOR, algorithm, private_key)
    with pytest.raises(dkimpy.KeyFormatError):
        dkim.sign(MESSAGE, key)


def test_a_key_of_the_other_algorithm_is_refused(pair: dkim.KeyPair) -> None:
    other = next(algorithm for algorithm in ALGORITHMS if algorithm is not pair.algorithm)
    with pytest.raises(dkimpy.KeyFormatError):
        dkim.sign(MESSAGE, dkim.SigningKey(DOMAIN, SELECTOR, other, pair.private_key))


def test_the_private_key_is_parsed_once_per_signing_key(key: dkim.SigningKey) -> None:
    loaded = key.loaded
    dkim.sign(MESSAGE, key)
    dkim.sign(RAGGED, key)
    assert key.loaded is loaded
    # The parsed key is no field: equality and repr (which leaves the private key out) are as before.
    assert key == dkim.SigningKey(key.domain, key.selector, key.algorithm, key.private_key)
    assert key.private_key.decode() not in repr(key)


def test_a_long_signing_domain_is_never_cut_by_the_fold(pair: dkim.KeyPair) -> None:
    """d= and i= of a 70-character domain stay whole (dkimpy's fold cuts them where a line ends)."""
    domain = "a" * 58 + ".example.com"
    key = dkim.SigningKey(domain, SELECTOR, pair.algorithm, pair.private_key)
    message = MESSAGE.replace(b"app@example.com", b"app@" + domain.encode())
    signed = dkim.sign(message, key, timestamp=NOW)
    header = signed[: signed.index(b"\r\nReceived: ")]
    assert b"d=" + domain.encode() + b";" in header and b"i=@" + domain.encode() + b";" in header
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    name = dkim.record_name(SELECTOR, domain).encode() + b"."
    value = dkim.record_value(pair.algorithm, pair.public_key).encode()
    assert dkimpy.verify(signed, dnsfunc=lambda asked, timeout=5: value if asked == name else None) is True
