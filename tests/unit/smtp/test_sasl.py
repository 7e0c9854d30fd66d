"""SASL PLAIN and LOGIN decoding steps of smtp_proxy.smtp.sasl."""

from __future__ import annotations

import base64

import pytest

from smtp_proxy.smtp.sasl import (
    PASSWORD_CHALLENGE,
    USERNAME_CHALLENGE,
    SaslError,
    decode_response,
    decode_text,
    parse_plain,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- decode_response ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("YWxpY2U=", b"alice"),
        ("YWI=", b"ab"),
        ("YWJj", b"abc"),
        ("AGFsaWNlAHNlY3JldA==", b"\x00alice\x00secret"),
        ("+/+/", b"\xfb\xff\xbf"),
        ("", b""),
    ],
)
def test_decode_response_returns_octets_when_valid(text: str, expected: bytes) -> None:
    assert decode_response(text) == expected


def test_decode_response_returns_empty_when_lone_equals_sign() -> None:
    assert decode_response("=") == b""


@pytest.mark.parametrize(
    "text",
    [
        # Padding.
        "YQ",
        "YQ=",
        "YWJjZA",
        "YQ===",
        "YQ==YQ==",
        "YQ==a",
        "=YQ=",
        "==",
        "===",
        # Characters outside the alphabet.
        "YQ!=",
        "YQ-_",
        "YW.j",
        "*",
        "-",
        "YWxp\x00Y2U=",
        "YWxpY2U=\x00",
        # Whitespace anywhere.
        " YWxpY2U=",
        "YWxpY2U= ",
        "YWxp Y2U=",
        "YWxp\tY2U=",
        "YWxpY2U=\r\n",
        "YWxpY2U=\n",
        "YWxp\nY2U=",
        # Non-ASCII.
        "YWxpY2U=é",
        "ÿ",
        "ＹＷＪｊ",
    ],
)
def test_decode_response_raises_base64_when_invalid(text: str) -> None:
    with pytest.raises(SaslError) as caught:
        decode_response(text)
    assert caught.value.kind == "base64"


def test_decode_response_accepts_response_when_2048_characters() -> None:
    assert decode_response("A" * 2048) == bytes(1536)


@pytest.mark.parametrize("text", ["A" * 2052, "A" * 4096, "A" * 2049, "!" * 5000, "A" * 100_000])
def test_decode_response_raises_malformed_when_over_2048_characters(text: str) -> None:
    with pytest.raises(SaslError) as caught:
        decode_response(text)
    assert caught.value.kind == "malformed"


# --- parse_plain ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\x00alice\x00secret", ("alice", "secret")),
        (b"alice\x00alice\x00secret", ("alice", "secret")),
        (b"\x00alice@example.com\x00s3cr3t!", ("alice@example.com", "s3cr3t!")),
        (b"\x00alice\x00pass word with spaces", ("alice", "pass word with spaces")),
        (b"\x00alice\x00=:*\\\"'", ("alice", "=:*\\\"'")),
        (b"\x00a\x00b", ("a", "b")),
        ("\x00jürgen\x00päss→wörd".encode(), ("jürgen", "päss→wörd")),
        ("jürgen\x00jürgen\x00🔑".encode(), ("jürgen", "🔑")),
        (b"\x00alice\x00" + b"p" * 255, ("alice", "p" * 255)),
        (b"\x00" + b"u" * 255 + b"\x00secret", ("u" * 255, "secret")),
    ],
)
def test_parse_plain_returns_credentials_when_valid(message: bytes, expected: tuple[str, str]) -> None:
    assert parse_plain(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        # The authorization identity differs from the user name.
        b"bob\x00alice\x00secret",
        b"Alice\x00alice\x00secret",
        b"alice \x00alice\x00secret",
        # Too few or too many NUL separators.
        b"",
        b"alicesecret",
        b"alice\x00secret",
        b"\x00alicesecret",
        b"\x00alice\x00secret\x00",
        b"\x00\x00alice\x00secret",
        b"alice\x00alice\x00secret\x00extra",
        b"\x00alice\x00sec\x00ret",
        b"\x00\x00\x00",
        # Empty user name or password.
        b"\x00\x00secret",
        b"\x00alice\x00",
        b"\x00\x00",
        b"alice\x00\x00secret",
        # Not UTF-8.
        b"\x00alice\x00\xff",
        b"\x00alice\x00secr\xe9t",
        b"\x00\xc3\x00secret",
        b"\xff\x00alice\x00secret",
        b"\x00alice\x00\xed\xa0\x80",
        b"\x00alice\x00\xc0\xaf",
        b"\x00alice\x00\xf8\x88\x80\x80\x80",
    ],
)
def test_parse_plain_raises_malformed_when_invalid(message: bytes) -> None:
    with pytest.raises(SaslError) as caught:
        parse_plain(message)
    assert caught.value.kind == "malformed"


@pytest.mark.parametrize(
    "message",
    [b"bob\x00alice\x00hunter2", b"\x00alice\x00hunter2\x00", b"\x00alice\x00hunter2\xff"],
)
def test_parse_plain_hides_password_when_refused(message: bytes) -> None:
    with pytest.raises(SaslError) as caught:
        parse_plain(message)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\x00alice\x00secret", ("alice", "secret")),
        (b"alice\x00alice\x00secret", ("alice", "secret")),
    ],
)
def test_parse_plain_returns_credentials_when_decoded_from_base64(
    message: bytes, expected: tuple[str, str]
) -> None:
    assert parse_plain(decode_response(_b64(message))) == expected


def test_parse_plain_raises_malformed_when_empty_response() -> None:
    with pytest.raises(SaslError) as caught:
        parse_plain(decode_response("="))
    assert caught.value.kind == "malformed"


# --- decode_text (LOGIN) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (b"alice", "alice"),
        (b"alice@example.com", "alice@example.com"),
        (b"pass word", "pass word"),
        ("jürgen".encode(), "jürgen"),
        ("🔑".encode(), "🔑"),
        (b"", ""),
    ],
)
def test_decode_text_returns_text_when_utf8(response: bytes, expected: str) -> None:
    assert decode_text(response) == expected


@pytest.mark.parametrize(
    "response",
    [b"\xff", b"\xc3", b"caf\xe9", b"\xed\xa0\x80", b"\xc0\xaf", b"a\x00b", b"\x00", b"alice\x00"],
)
def test_decode_text_raises_malformed_when_invalid(response: bytes) -> None:
    with pytest.raises(SaslError) as caught:
        decode_text(response)
    assert caught.value.kind == "malformed"


def test_decode_text_returns_user_name_when_login_step_decoded() -> None:
    assert decode_text(decode_response(_b64(b"alice"))) == "alice"


# --- challenges and SaslError ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenge", "literal", "prompt"),
    [(USERNAME_CHALLENGE, "VXNlcm5hbWU6", b"Username:"), (PASSWORD_CHALLENGE, "UGFzc3dvcmQ6", b"Password:")],
)
def test_challenge_decodes_to_prompt_when_login(challenge: str, literal: str, prompt: bytes) -> None:
    assert challenge == literal
    assert base64.b64decode(challenge, validate=True) == prompt
    assert decode_response(challenge) == prompt


@pytest.mark.parametrize("kind", ["base64", "malformed"])
def test_sasl_error_keeps_kind_when_raised(kind: str) -> None:
    error = SaslError(kind, "message")  # type: ignore[arg-type]
    assert isinstance(error, ValueError)
    assert error.kind == kind
    assert str(error) == "message"
