"""The listener against the command-line clients operators use: swaks and openssl s_client."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.conftest import Listener

# ./scripts/test installs both; without them these tests fail rather than skip.


def _swaks(listener: Listener, *extra: str, tls_files=None) -> subprocess.CompletedProcess[str]:
    args = [
        "swaks",
        "--server",
        f"{listener.host}:{listener.port}",
        "--helo",
        "client.test",
        "--from",
        "app@example.com",
        "--to",
        "someone@example.net",
        "--timeout",
        "10",
        *extra,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_swaks_starttls_auth_plain_delivers_one_message(listener: Listener) -> None:
    result = _swaks(
        listener,
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        listener.tenant,
        "--auth-password",
        listener.password,
        "--header",
        "Subject: swaks test",
        "--body",
        "hello from swaks",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    [stored] = listener.stored()
    assert stored.subject == "swaks test"
    assert b"hello from swaks" in listener.body(stored)


def test_swaks_auth_login_works(listener: Listener) -> None:
    result = _swaks(
        listener,
        "--tls",
        "--auth",
        "LOGIN",
        "--auth-user",
        listener.tenant,
        "--auth-password",
        listener.password,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(listener.stored()) == 1


def test_swaks_without_tls_cannot_authenticate(listener: Listener) -> None:
    result = _swaks(listener, "--auth", "PLAIN", "--auth-user", listener.tenant, "--auth-password", "x" * 12)
    assert result.returncode != 0
    assert listener.stored() == []


def _s_client(listener: Listener, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{listener.host}:{listener.port}",
            "-starttls",
            "smtp",
            "-servername",
            "localhost",
            *flags,
        ],
        input="QUIT\n",
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_negotiates_tls_1_2_and_1_3(listener: Listener, version: str) -> None:
    result = _s_client(listener, version)
    assert result.returncode == 0, result.stderr
    assert "TLSv1.2" in result.stdout or "TLSv1.3" in result.stdout
    if version == "-tls1_2":
        assert "ECDHE" in result.stdout and ("GCM" in result.stdout or "CHACHA20" in result.stdout)


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_openssl_old_tls_versions_are_refused(listener: Listener, version: str) -> None:
    # SECLEVEL=0 lets this client offer the old protocol, so the refusal is the server's.
    result = _s_client(listener, version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert result.returncode != 0
    assert (
        "Cipher is (NONE)" in result.stdout
        or "alert" in result.stderr.lower()
        or "error" in result.stderr.lower()
    )


def test_openssl_tls_1_2_without_ecdhe_gcm_is_refused(listener: Listener) -> None:
    result = _s_client(listener, "-tls1_2", "-cipher", "AES128-SHA")
    assert result.returncode != 0
