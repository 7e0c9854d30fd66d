"""The decoding steps of SASL PLAIN (RFC 4616) and LOGIN for SMTP AUTH (RFC 4954).

Part of the pure protocol core: this module imports only the standard library.
The protocol module owns the exchange (challenges, "*" to cancel, the initial response);
this module turns one client line into octets and octets into credentials, and its
errors say which reply fits. Error messages never quote the client's data, so they are
safe to log.
"""

from __future__ import annotations

import binascii
from typing import Literal

__all__ = [
    "PASSWORD_CHALLENGE",
    "USERNAME_CHALLENGE",
    "SaslError",
    "decode_response",
    "decode_text",
    "parse_plain",
]

SaslErrorKind = Literal["base64", "malformed"]

# Credentials are never this long; the cap bounds the decoding work for one line.
MAX_RESPONSE = 2048

# LOGIN was only ever a draft (draft-murchison-sasl-login); clients expect these two prompts,
# base64-encoded as every challenge is (RFC 4954 4): "VXNlcm5hbWU6" and "UGFzc3dvcmQ6".
USERNAME_CHALLENGE = binascii.b2a_base64(b"Username:", newline=False).decode("ascii")
PASSWORD_CHALLENGE = binascii.b2a_base64(b"Password:", newline=False).decode("ascii")


class SaslError(ValueError):
    """A client response that cannot be used; ``kind`` says which reply fits.

    ``base64``: not valid base64 (501 5.5.2, RFC 4954 4); ``malformed``: decodes, but is
    not a usable message (535 5.7.8).
    """

    def __init__(self, kind: SaslErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: SaslErrorKind = kind


def decode_response(text: str) -> bytes:
    """The octets of one client response line; raises SaslError.

    Decoding is strict: whitespace, missing padding and data after padding are all refused.
    """
    if len(text) > MAX_RESPONSE:
        raise SaslError("malformed", f"response longer than {MAX_RESPONSE} characters")
    if text == "=":
        return b""  # RFC 4954 4: "=" stands for an empty response
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise SaslError("base64", "response is not valid base64") from None


def parse_plain(response: bytes) -> tuple[str, str]:
    """``(authcid, password)`` from a PLAIN message; raises SaslError("malformed").

    RFC 4616 2: message = [authzid] NUL authcid NUL passwd, in UTF-8. An authzid other than
    the authcid would ask to act as another account, which is not supported.
    """
    parts = response.split(b"\x00")
    if len(parts) != 3:
        raise SaslError("malformed", "PLAIN message must hold exactly two NUL separators")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise SaslError("malformed", "PLAIN message is not UTF-8") from None
    if not authcid or not password:
        raise SaslError("malformed", "PLAIN user name and password must not be empty")  # RFC 4616 2
    if authzid and authzid != authcid:
        raise SaslError("malformed", "authorization identity differs from the user name")
    return authcid, password


def decode_text(response: bytes) -> str:
    """A LOGIN user name or password as text; raises SaslError("malformed").

    A NUL is refused as well: no account name or password holds one, and PostgreSQL text
    cannot store one, so it would only turn a failed login into a database error.
    """
    try:
        text = response.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("malformed", "LOGIN response is not UTF-8") from None
    if "\x00" in text:
        raise SaslError("malformed", "LOGIN response contains NUL")
    return text
