"""Secrets: bcrypt passwords, API keys kept as digests, AES-GCM at rest.

Ciphertexts carry a version byte and the id of the key that sealed them, so the
operator can rotate ``security.encryption_key`` and keep the old key in
``security.previous_encryption_keys`` until old rows are re-encrypted. The
associated data binds a ciphertext to its row and column, so a blob copied
into another tenant's row does not open.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import string
import unicodedata

import bcrypt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from smtp_proxy.config import SecurityConfig, encryption_keys
from smtp_proxy.errors import DecryptionError, ValidationError

_VERSION = b"\x01"
_KEY_ID_LEN = 4
_NONCE_LEN = 12
# bcrypt only reads 72 bytes; longer passwords are refused rather than truncated.
MAX_PASSWORD_BYTES = 72
MIN_PASSWORD_LENGTH = 12


def hash_password(password: str, cost: int) -> str:
    """bcrypt hash of a password that ``check_password_policy`` accepted."""
    check_password_policy(password)
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=cost)).decode("ascii")


def verify_password(password: str, password_hash: str) -> bool:
    """Constant-time check; False for anything malformed rather than an exception."""
    raw = password.encode("utf-8")
    if len(raw) > MAX_PASSWORD_BYTES or not password_hash:
        return False
    try:
        return bcrypt.checkpw(raw, password_hash.encode("ascii"))
    except ValueError:
        return False


def check_password_policy(password: str) -> None:
    """Raise ``ValidationError`` for a password we will not store."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationError("password", f"must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise ValidationError("password", f"must be at most {MAX_PASSWORD_BYTES} bytes in UTF-8")
    if any(unicodedata.category(c) == "Cc" for c in password):
        raise ValidationError("password", "must not contain control characters")


_PASSWORD_ALPHABET = string.ascii_letters + string.digits


def generate_password() -> str:
    """A random password for SMTP AUTH: 32 letters and digits (190 bits).

    No punctuation: a password that starts with "-" reads as an option to
    command-line clients (swaks), and legacy mailers' config files choke on
    quotes and the like.
    """
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(32))


def generate_api_key() -> str:
    """32 random bytes as hex. Shown once; only its digest is stored."""
    return secrets.token_hex(32)


def api_key_digest(api_key: str) -> str:
    """The SHA-256 hex digest under which an API key is stored and looked up."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def generate_encryption_key() -> str:
    """A new AES-256 key in the form ``security.encryption_key`` takes."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"smtp-proxy key id" + key).digest()[:_KEY_ID_LEN]


class Cipher:
    """AES-256-GCM with a current key and decrypt-only previous keys."""

    def __init__(self, current: bytes, previous: tuple[bytes, ...] = ()) -> None:
        self._current_id = key_id(current)
        self._keys = {key_id(k): AESGCM(k) for k in (*previous, current)}

    @classmethod
    def from_config(cls, config: SecurityConfig) -> Cipher:
        """Raises ``ConfigError`` when no key is configured."""
        current, previous = encryption_keys(config)
        return cls(current, previous)

    @property
    def current_key_id(self) -> str:
        return self._current_id.hex()

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._keys[self._current_id].encrypt(nonce, plaintext, aad)
        return _VERSION + self._current_id + nonce + sealed

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        header = 1 + _KEY_ID_LEN + _NONCE_LEN
        if len(blob) < header + 16 or blob[:1] != _VERSION:
            raise DecryptionError("not a smtp-proxy ciphertext")
        kid, nonce = blob[1 : 1 + _KEY_ID_LEN], blob[1 + _KEY_ID_LEN : header]
        aes = self._keys.get(kid)
        if aes is None:
            raise DecryptionError(f"sealed with unknown key id {kid.hex()}")
        try:
            return aes.decrypt(nonce, blob[header:], aad)
        except InvalidTag:
            raise DecryptionError("ciphertext failed authentication") from None

    def needs_rotation(self, blob: bytes) -> bool:
        """True when a ciphertext was sealed with a key other than the current one."""
        return blob[1 : 1 + _KEY_ID_LEN] != self._current_id
