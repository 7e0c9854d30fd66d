"""DKIM (RFC 6376, RFC 8463): key pairs, the DNS record to publish, signing, and checking the record.

No database and no config: the storage layer seals what ``generate`` returns, the worker hands
``sign`` the opened key, and the API asks ``check_published`` about a key's record. Signing and
verifying are dkimpy's; the keys are made with ``cryptography``.

What we sign: relaxed/relaxed canonicalisation (it survives the re-folding and trailing-space
changes relays make), the RFC 6376 5.4.1 header fields the message has, and From, To and Subject
once more than they occur (oversigning), so that nobody can add a second one without breaking
the signature.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dkim
import dns.exception
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from smtp_proxy.contract import DkimAlgorithm

log = logging.getLogger("smtp_proxy.dkim")

RSA_BITS = 2048
CANONICALIZE = (b"relaxed", b"relaxed")
OVERSIGNED = (b"from", b"to", b"subject")
# RFC 6376 5.4.1's list as dkimpy keeps it.
SIGNED = frozenset(dkim.DKIM.SHOULD)

# A TXT lookup: the name (ASCII, no trailing dot) to the record's text, None when there is none.
TxtLookup = Callable[[str], "str | None"]


class DnsLookupError(Exception):
    """The DNS could not answer (timeout, SERVFAIL): neither published nor absent."""


@dataclass(frozen=True)
class KeyPair:
    """A new key: the private half in the form ``sign`` takes, the public half as the record's p=."""

    algorithm: DkimAlgorithm
    private_key: bytes = field(repr=False)
    public_key: str


@dataclass(frozen=True)
class SigningKey:
    """An enabled key as the worker holds it: which domain it signs for, and how."""

    domain: str
    selector: str
    algorithm: DkimAlgorithm
    private_key: bytes = field(repr=False)


def default_selector(now: datetime | None = None) -> str:
    """``sp<yyyymm>``: a new selector each month, so a rotated key gets a name of its own."""
    return "sp" + (now or datetime.now(UTC)).strftime("%Y%m")


def generate(algorithm: DkimAlgorithm) -> KeyPair:
    """A new key pair: RSA 2048 (PKCS#1 PEM, dkimpy's form) or Ed25519 (the base64 seed)."""
    if algorithm is DkimAlgorithm.ED25519_SHA256:
        key = ed25519.Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return KeyPair(algorithm, base64.b64encode(seed), base64.b64encode(public).decode("ascii"))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(algorithm, pem, base64.b64encode(der).decode("ascii"))


def record_name(selector: str, domain: str) -> str:
    """Where the public key is published (RFC 6376 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def record_value(algorithm: DkimAlgorithm, public_key: str) -> str:
    """The TXT record's text: ``v=DKIM1; k=rsa|ed25519; p=...``."""
    kind = "ed25519" if algorithm is DkimAlgorithm.ED25519_SHA256 else "rsa"
    return f"v=DKIM1; k={kind}; p={public_key}"


def signing_domain(header_from: str, domains: set[str]) -> str | None:
    """The domain among ``domains`` that signs mail from ``header_from``: itself, else its nearest parent."""
    name = header_from.lower().rstrip(".")
    while name:
        if name in domains:
            return name
        _, _, name = name.partition(".")
        if "." not in name:
            return None  # never a top-level domain
    return None


def sign(message: bytes, key: SigningKey) -> bytes:
    """The message with a DKIM-Signature field on top.

    ``message`` must have CRLF line ends (what goes on the wire), so that the bytes signed are
    the bytes sent. Raises ``dkim.DKIMException`` for a message or key dkimpy cannot handle.
    """
    signer = dkim.DKIM(message, linesep=b"\r\n")
    present = [name for name, _ in signer.headers if name.lower() in SIGNED]
    header = signer.sign(
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key.private_key,
        signature_algorithm=key.algorithm.value.encode("ascii"),
        canonicalize=CANONICALIZE,
        include_headers=[*present, *OVERSIGNED],
    )
    return header + message


def dns_txt(name: str, timeout: float = 5.0) -> str | None:
    """The TXT record at ``name`` through the system's resolver; its strings joined (RFC 6376 3.6.2.2).

    None when the name or the record does not exist; DnsLookupError when the DNS does not answer.
    """
    try:
        answer = dns.resolver.resolve(name, "TXT", lifetime=timeout)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.DNSException as error:
        raise DnsLookupError(type(error).__name__) from None
    for rdata in answer:
        text = b"".join(rdata.strings).decode("ascii", "replace")
        if text.lstrip().lower().startswith("v=dkim1") or "p=" in text:
            return text
    return None


@dataclass(frozen=True)
class Published:
    """What the DNS holds for a key: ``published`` (a record exists), ``matches`` (it is this key's)."""

    published: bool
    matches: bool
    found: str | None


def check_published(selector: str, domain: str, public_key: str, lookup: TxtLookup) -> Published:
    """Compare the record at the key's name with the key; raises DnsLookupError when DNS fails."""
    found = lookup(record_name(selector, domain))
    if found is None:
        return Published(False, False, None)
    tags = _tags(found)
    published_key = "".join(tags.get("p", "").split())
    return Published(True, published_key == public_key, found)


def _tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = value.strip()
    return tags
