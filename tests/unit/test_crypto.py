"""smtp_proxy.crypto: bcrypt passwords, password policy, API keys, AES-GCM with rotation."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import string

import pytest

from smtp_proxy.config import SecurityConfig, config_from_dict, decode_key
from smtp_proxy.crypto import (
    MAX_PASSWORD_BYTES,
    MIN_PASSWORD_LENGTH,
    Cipher,
    api_key_digest,
    check_password_policy,
    generate_api_key,
    generate_encryption_key,
    generate_password,
    hash_password,
    key_id,
    verify_password,
)
from smtp_proxy.errors import ConfigError, DecryptionError, ValidationError

COST = 4
GOOD_PASSWORD = "correct horse battery staple"
AAD = b"messages.body_encrypted:" + bytes(16)


def new_key() -> bytes:
    return os.urandom(32)


# --- passwords ----------------------------------------------------------------------------------


def test_hash_and_verify_round_trip() -> None:
    hashed = hash_password(GOOD_PASSWORD, COST)
    assert hashed.startswith("$2")
    assert f"${COST:02d}$" in hashed
    assert GOOD_PASSWORD not in hashed
    assert verify_password(GOOD_PASSWORD, hashed) is True


def test_hashes_are_salted() -> None:
    first, second = hash_password(GOOD_PASSWORD, COST), hash_password(GOOD_PASSWORD, COST)
    assert first != second
    assert verify_password(GOOD_PASSWORD, first) and verify_password(GOOD_PASSWORD, second)


def test_unicode_password_round_trip() -> None:
    password = "pässwörd-ünïcödé-密码"
    hashed = hash_password(password, COST)
    assert verify_password(password, hashed) is True
    assert verify_password(password.replace("密", "蜜"), hashed) is False


@pytest.mark.parametrize(
    "wrong", ["correct horse battery stapl", "Correct horse battery staple", "", GOOD_PASSWORD + " "]
)
def test_wrong_password_is_false(wrong: str) -> None:
    assert verify_password(wrong, hash_password(GOOD_PASSWORD, COST)) is False


@pytest.mark.parametrize(
    "malformed",
    [
        "",
        "not-a-hash",
        "$2b$04$",
        "$2b$04$tooshort",
        "$2b$99$" + "a" * 53,
        "$9z$04$" + "a" * 53,
        "$2b$04$" + "é" * 53,
        "\x00" * 60,
    ],
)
def test_malformed_hash_is_false_not_an_exception(malformed: str) -> None:
    assert verify_password(GOOD_PASSWORD, malformed) is False


def test_truncated_hash_is_false() -> None:
    hashed = hash_password(GOOD_PASSWORD, COST)
    assert verify_password(GOOD_PASSWORD, hashed[:-5]) is False


def test_password_longer_than_72_bytes_is_false_on_verify() -> None:
    base = "a" * MAX_PASSWORD_BYTES
    hashed = hash_password(base, COST)
    assert verify_password(base, hashed) is True
    # bcrypt would silently ignore everything after byte 72; we refuse instead.
    assert verify_password(base + "b", hashed) is False
    assert verify_password(base + "a" * 100, hashed) is False


def test_password_longer_than_72_bytes_is_refused_on_hash() -> None:
    with pytest.raises(ValidationError) as info:
        hash_password("a" * (MAX_PASSWORD_BYTES + 1), COST)
    assert info.value.field == "password"


# --- password policy ----------------------------------------------------------------------------


def test_policy_accepts_a_good_password() -> None:
    check_password_policy(GOOD_PASSWORD)
    check_password_policy("x" * MIN_PASSWORD_LENGTH)
    check_password_policy("é" * (MAX_PASSWORD_BYTES // 2))  # exactly 72 bytes


@pytest.mark.parametrize("password", ["", "short", "x" * (MIN_PASSWORD_LENGTH - 1)])
def test_policy_refuses_too_short(password: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_password_policy(password)
    assert info.value.field == "password"
    assert "at least" in info.value.problem


def test_policy_counts_bytes_not_characters_for_the_maximum() -> None:
    # 37 two-byte characters: only 37 characters, but 74 bytes.
    password = "é" * 37
    assert len(password) < MAX_PASSWORD_BYTES < len(password.encode("utf-8"))
    with pytest.raises(ValidationError) as info:
        check_password_policy(password)
    assert info.value.field == "password"
    assert "bytes" in info.value.problem
    with pytest.raises(ValidationError):
        hash_password(password, COST)


def test_policy_refuses_too_long_ascii() -> None:
    with pytest.raises(ValidationError) as info:
        check_password_policy("a" * 200)
    assert "bytes" in info.value.problem


@pytest.mark.parametrize("control", ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9b"])
def test_policy_refuses_control_characters(control: str) -> None:
    password = "abcdefgh" + control + "ijklmnop"
    with pytest.raises(ValidationError) as info:
        check_password_policy(password)
    assert info.value.field == "password"
    assert "control" in info.value.problem
    with pytest.raises(ValidationError):
        hash_password(password, COST)


# --- generated secrets --------------------------------------------------------------------------


def test_generated_password_length_alphabet_and_policy() -> None:
    password = generate_password()
    assert len(password) == 32
    assert set(password) <= set(string.ascii_letters + string.digits)  # no "-" for a CLI to misread
    check_password_policy(password)
    assert verify_password(password, hash_password(password, COST))


def test_generated_passwords_are_random() -> None:
    passwords = {generate_password() for _ in range(200)}
    assert len(passwords) == 200
    assert not any(p.startswith("-") for p in passwords)
    # Every position varies: not a counter or a fixed prefix.
    for position in range(32):
        assert len({p[position] for p in passwords}) > 10


def test_generated_api_key_is_64_hex_characters() -> None:
    key = generate_api_key()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    keys = {generate_api_key() for _ in range(200)}
    assert len(keys) == 200


def test_api_key_digest_is_sha256_hex() -> None:
    key = generate_api_key()
    digest = api_key_digest(key)
    assert digest == hashlib.sha256(key.encode("utf-8")).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest != key
    assert api_key_digest(key) == digest
    assert api_key_digest(generate_api_key()) != digest
    assert api_key_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- AES-GCM ------------------------------------------------------------------------------------


def test_encrypt_decrypt_round_trip() -> None:
    cipher = Cipher(new_key())
    for plaintext in (b"", b"hello", os.urandom(10_000)):
        blob = cipher.encrypt(plaintext, AAD)
        if plaintext:
            assert plaintext not in blob
        assert cipher.decrypt(blob, AAD) == plaintext


def test_another_cipher_with_the_same_key_opens_it() -> None:
    key = new_key()
    blob = Cipher(key).encrypt(b"payload", AAD)
    assert Cipher(key).decrypt(blob, AAD) == b"payload"


def test_same_plaintext_gives_different_ciphertexts() -> None:
    cipher = Cipher(new_key())
    blobs = {cipher.encrypt(b"same plaintext", AAD) for _ in range(50)}
    assert len(blobs) == 50
    nonces = {blob[5:17] for blob in blobs}
    assert len(nonces) == 50


def test_wrong_aad_does_not_open() -> None:
    cipher = Cipher(new_key())
    blob = cipher.encrypt(b"tenant A secret", b"esp_providers.api_key:" + bytes(16))
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob, b"esp_providers.api_key:" + b"\x01" * 16)
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob, b"esp_providers.smtp_password:" + bytes(16))
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob, b"")


def test_every_tampered_byte_is_detected() -> None:
    cipher = Cipher(new_key())
    blob = cipher.encrypt(b"do not touch", AAD)
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(DecryptionError):
            cipher.decrypt(bytes(tampered), AAD)


def test_wrong_key_does_not_open() -> None:
    blob = Cipher(new_key()).encrypt(b"x", AAD)
    with pytest.raises(DecryptionError):
        Cipher(new_key()).decrypt(blob, AAD)


@pytest.mark.parametrize("cut", [0, 1, 5, 17, 32, 33])
def test_truncated_blob_does_not_open(cut: int) -> None:
    cipher = Cipher(new_key())
    blob = cipher.encrypt(b"some plaintext", AAD)
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob[:cut], AAD)
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob[:-1], AAD)


# Fixed bytes (not os.urandom at collection): every test process must collect the same ids.
_NOISE = bytes((i * 167 + 13) % 256 for i in range(100))


@pytest.mark.parametrize(
    "garbage", [b"", b"\x01", b"hello world", b"\x00" * 64, b"\x02" + _NOISE[:60], _NOISE]
)
def test_garbage_does_not_open(garbage: bytes) -> None:
    with pytest.raises(DecryptionError):
        Cipher(new_key()).decrypt(garbage, AAD)


def test_blob_layout_names_the_sealing_key() -> None:
    key = new_key()
    cipher = Cipher(key)
    blob = cipher.encrypt(b"abc", AAD)
    assert blob[:1] == b"\x01"
    assert blob[1:5] == key_id(key)
    assert cipher.current_key_id == key_id(key).hex()
    assert len(blob) == 1 + 4 + 12 + 3 + 16


# --- rotation -----------------------------------------------------------------------------------


def test_rotation_old_data_opens_with_previous_key() -> None:
    old, new = new_key(), new_key()
    old_blob = Cipher(old).encrypt(b"sealed before the rotation", AAD)
    rotated = Cipher(new, previous=(old,))
    assert rotated.decrypt(old_blob, AAD) == b"sealed before the rotation"
    assert rotated.needs_rotation(old_blob) is True

    new_blob = rotated.encrypt(b"sealed after the rotation", AAD)
    assert new_blob[1:5] == key_id(new)
    assert rotated.needs_rotation(new_blob) is False
    assert rotated.decrypt(new_blob, AAD) == b"sealed after the rotation"
    # The re-encrypted value no longer needs the old key.
    assert Cipher(new).decrypt(new_blob, AAD) == b"sealed after the rotation"


def test_rotation_without_the_previous_key_names_the_unknown_key_id() -> None:
    old, new = new_key(), new_key()
    old_blob = Cipher(old).encrypt(b"x", AAD)
    with pytest.raises(DecryptionError) as info:
        Cipher(new).decrypt(old_blob, AAD)
    assert "unknown key id" in str(info.value)
    assert key_id(old).hex() in str(info.value)


def test_several_previous_keys() -> None:
    k1, k2, k3 = new_key(), new_key(), new_key()
    blobs = {k: Cipher(k).encrypt(k, AAD) for k in (k1, k2)}
    cipher = Cipher(k3, previous=(k1, k2))
    for key, blob in blobs.items():
        assert cipher.decrypt(blob, AAD) == key
        assert cipher.needs_rotation(blob)


def test_previous_keys_never_encrypt() -> None:
    old, new = new_key(), new_key()
    cipher = Cipher(new, previous=(old,))
    for _ in range(20):
        assert cipher.encrypt(b"x", AAD)[1:5] == key_id(new)


# --- keys from the configuration ----------------------------------------------------------------


def test_cipher_from_config() -> None:
    key, old = generate_encryption_key(), generate_encryption_key()
    config = config_from_dict(
        {"security": {"encryption_key": key, "previous_encryption_keys": [old]}}, env={}
    )
    cipher = Cipher.from_config(config.security)
    assert cipher.current_key_id == key_id(decode_key(key, "k")).hex()
    old_blob = Cipher(decode_key(old, "k")).encrypt(b"legacy", AAD)
    assert cipher.decrypt(old_blob, AAD) == b"legacy"
    assert cipher.needs_rotation(old_blob)
    own = cipher.encrypt(b"fresh", AAD)
    assert Cipher(decode_key(key, "k")).decrypt(own, AAD) == b"fresh"


def test_cipher_from_config_reads_the_key_file(tmp_path) -> None:
    key = generate_encryption_key()
    path = tmp_path / "encryption.key"
    path.write_text(key + "\n", encoding="ascii")
    config = config_from_dict({"security": {"encryption_key_file": str(path)}}, env={})
    cipher = Cipher.from_config(config.security)
    assert cipher.current_key_id == key_id(decode_key(key, "k")).hex()


def test_cipher_from_config_without_a_key_is_a_config_error() -> None:
    config = config_from_dict({}, env={})
    with pytest.raises(ConfigError) as info:
        Cipher.from_config(config.security)
    assert info.value.key == "security.encryption_key"
    with pytest.raises(ConfigError):
        Cipher.from_config(SecurityConfig())


def test_generated_encryption_key_is_accepted_by_the_config() -> None:
    key = generate_encryption_key()
    assert len(base64.urlsafe_b64decode(key)) == 32
    config = config_from_dict({"security": {"encryption_key": key}}, env={})
    assert config.security.encryption_key == key
    assert generate_encryption_key() != key


def test_encryption_key_from_the_environment_reference() -> None:
    key = generate_encryption_key()
    config = config_from_dict(
        {"security": {"encryption_key": "${SMTP_PROXY_ENCRYPTION_KEY}"}},
        env={"SMTP_PROXY_ENCRYPTION_KEY": key},
    )
    blob = Cipher.from_config(config.security).encrypt(b"x", AAD)
    assert Cipher(decode_key(key, "k")).decrypt(blob, AAD) == b"x"
