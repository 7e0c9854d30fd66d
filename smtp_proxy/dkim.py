"""DKIM (RFC 6376, RFC 8463): key pairs, the DNS record to publish, signing, and checking the record.

No database and no config: the storage layer seals what ``generate`` returns, the worker hands
``sign`` the opened key, and the API asks ``check_published`` about a key's record. The keys are
made with ``cryptography``. In ``sign``, dkimpy parses the message, canonicalises it, hashes the
chosen header fields and folds the DKIM-Signature field; the signature itself is OpenSSL's, through
``cryptography``. dkimpy would compute RSA in pure Python, about 7 ms per message for RSA 2048
with the GIL held; OpenSSL takes under 1 ms, and the GIL is released meanwhile.

What we sign: relaxed/relaxed canonicalisation (it survives the re-folding and trailing-space
changes relays make), the RFC 6376 5.4.1 header fields the message has, and From, To and Subject
once more than they occur (oversigning), so that nobody can add a second one without breaking
the signature.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

import dkim
import dns.exception
import dns.resolver
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy

from smtp_proxy.contract import DkimAlgorithm

log = logging.getLogger("smtp_proxy.dkim")

RSA_BITS = 2048
CANONICALIZE = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
OVERSIGNED = (b"from", b"to", b"subject")
# RFC 6376 5.4.1's list as dkimpy keeps it.
SIGNED = frozenset(dkim.DKIM.SHOULD)
FIELD_NAME = b"DKIM-Signature"
# What b= holds while the field is folded for hashing: as long as dkimpy's, so that b= goes to a
# line of its own and the folding before it is the same once the signature replaces it.
B_STAND_IN = b"0" * 60
FOLD_WIDTH = 72  # dkimpy's, header name included
SPLITTABLE = frozenset({b"b", b"bh", b"h"})  # tags whose values may hold folding white space

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

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

    @cached_property
    def loaded(self) -> PrivateKey:
        """The private key parsed by ``cryptography``: once per SigningKey, not once per message.

        Raises ``dkim.KeyFormatError`` when it does not parse as the algorithm's key; nothing is
        cached then, so each ``sign`` raises it again.
        """
        return _load(self.algorithm, self.private_key)


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


def sign(message: bytes, key: SigningKey, *, timestamp: int | None = None) -> bytes:
    """The message with a DKIM-Signature field on top; ``timestamp`` is its t= (default: now).

    ``message`` must have CRLF line ends (what goes on the wire), so that the bytes signed are
    the bytes sent. Raises ``dkim.DKIMException``: MessageFormatError for a message dkimpy cannot
    parse or one without a From field (RFC 6376 5.4: From MUST be signed), KeyFormatError for a
    key that does not load.
    """
    parsed = dkim.DKIM(message, linesep=b"\r\n")
    present = [name.lower() for name, _ in parsed.headers if name.lower() in SIGNED]
    if b"from" not in present:
        raise dkim.MessageFormatError("no From field to sign")
    signed = (*present, *OVERSIGNED)
    domain = key.domain.encode("ascii")
    now = int(time.time()) if timestamp is None else timestamp
    body_hash = hashlib.sha256(CANONICALIZE.canonicalize_body(parsed.body)).digest()
    tags = [
        (b"v", b"1"),
        (b"a", key.algorithm.value.encode("ascii")),
        (b"c", CANONICALIZE.to_c_value()),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", key.selector.encode("ascii")),
        (b"t", b"%d" % now),
        (b"h", b" : ".join(signed)),
        (b"bh", base64.b64encode(body_hash)),
    ]
    # RFC 6376 3.7: the header hash ends with this field as it will be sent, b= empty and without
    # its CRLF; hash_headers takes the value of b= out (dkim.RE_BTAG) and canonicalises.
    unsigned = _fold([*tags, (b"b", B_STAND_IN)])
    header_hash = hashlib.sha256()
    dkim.hash_headers(
        header_hash,
        CANONICALIZE,
        CANONICALIZE.canonicalize_headers(parsed.headers),
        signed,
        (FIELD_NAME, b" " + unsigned),
        None,
    )
    signature = _signature(key.loaded, header_hash.digest())
    value = _fold([*tags, (b"b", base64.b64encode(signature))])
    return FIELD_NAME + b": " + value + b"\r\n" + message


def _tag_list(tags: list[tuple[bytes, bytes]]) -> bytes:
    return b"; ".join(name + b"=" + value for name, value in tags)


def _fold(tags: list[tuple[bytes, bytes]]) -> bytes:
    """The field's value folded to 72 columns: dkimpy's fold, which is what its own signer makes.

    That fold cuts a token longer than a line where the line ends, which is harmless inside b=
    and bh= (RFC 6376 3.5 ignores their white space) but breaks d=, i= or s= of a long domain.
    A tag list with such a tag is folded between tags and inside b=, bh= and h= only.
    """
    width = FOLD_WIDTH - len(FIELD_NAME) - 1
    if all(name in SPLITTABLE or len(name) + len(value) + 2 < width for name, value in tags):
        return dkim.fold(_tag_list(tags), namelen=len(FIELD_NAME))
    atoms: list[bytes] = []
    for n, (name, value) in enumerate(tags):
        end = b";" if n + 1 < len(tags) else b""
        if name in (b"b", b"bh"):
            chunks = [value[i : i + 64] for i in range(0, len(value), 64)] or [b""]
            atoms += [name + b"=" + chunks[0], *chunks[1:]]
        else:
            atoms += (name + b"=" + value).split(b" ")  # h= is "from : to : ...": FWS is allowed there
        atoms[-1] += end
    lines = [atoms[0]]
    for atom in atoms[1:]:
        if atom.startswith(b"b=") or len(lines[-1]) + 1 + len(atom) > width:
            lines.append(atom)  # b= starts a line, so what precedes it is the same signed or not
            width = FOLD_WIDTH - 1
        else:
            lines[-1] += b" " + atom
    return b"\r\n ".join(lines)


def _signature(key: PrivateKey, digest: bytes) -> bytes:
    """Sign the SHA-256 ``digest`` of the header hash input.

    RSA: PKCS#1 v1.5 over the digest (RFC 6376 3.3.1). Ed25519: the 32 digest bytes are the
    message that Ed25519 signs (RFC 8463 3), so both algorithms hash the same way.
    """
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)
    try:
        return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    except ValueError as error:  # a modulus too short for the digest and its padding
        raise dkim.ParameterError(f"RSA key of {key.key_size} bits cannot sign: {error}") from None


def _load(algorithm: DkimAlgorithm, private_key: bytes) -> PrivateKey:
    """Parse a stored private key: RSA as PKCS#1 PEM, Ed25519 as its base64 seed."""
    try:
        if algorithm is DkimAlgorithm.ED25519_SHA256:
            return ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(private_key))
        # The RSA key checks (p and q prime, and so on) take about 50 ms, and the worker loads an
        # account's keys again every few seconds. They guard against a key from elsewhere; ours
        # all come from ``generate`` and are stored under authenticated encryption (AES-GCM),
        # so what opens is what we made. OpenSSL also checks each CRT result before using it.
        loaded = serialization.load_pem_private_key(
            private_key, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise dkim.KeyFormatError(f"the {algorithm.value} private key does not load") from error
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise dkim.KeyFormatError(f"the {algorithm.value} private key is a {type(loaded).__name__}")
    return loaded


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
