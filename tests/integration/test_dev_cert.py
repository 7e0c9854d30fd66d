"""``smtp-proxy tls dev-cert --out DIR`` on real files: fresh files, exact modes, symlinks replaced.

The command runs in this process (tests/cli_runner.py) under the umask the case names, set for
the call and restored after it.
"""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.cli_runner import run_cli

UMASKS = [pytest.param(0o022, id="umask022"), pytest.param(0, id="umask000")]


def dev_cert(out: Path, umask: int) -> subprocess.CompletedProcess[str]:
    previous = os.umask(umask)
    try:
        return run_cli(["tls", "dev-cert", "--out", str(out)])
    finally:
        os.umask(previous)


def run_ok(out: Path, umask: int) -> None:
    result = dev_cert(out, umask)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def assert_fresh_pair(out: Path) -> None:
    """A regular 0600 key and a regular 0644 cert that belong together, and nothing else in out."""
    cert, key = out / "cert.pem", out / "key.pem"
    assert stat.S_ISREG(key.lstat().st_mode)
    assert stat.S_ISREG(cert.lstat().st_mode)
    assert mode(key) == 0o600
    assert mode(cert) == 0o644
    assert key.lstat().st_nlink == 1
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)  # raises if the key does not match the certificate
    assert sorted(p.name for p in out.iterdir()) == ["cert.pem", "key.pem"], "a temporary file was left"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "tls"
    directory.mkdir()
    return directory


@pytest.mark.parametrize("umask", UMASKS)
def test_new_directory_gets_exact_modes(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "fresh" / "tls"
    run_ok(out, umask)
    assert_fresh_pair(out)
    assert mode(out) & 0o022 == 0, "the directory holding the key is group- or world-writable"


@pytest.mark.parametrize("umask", UMASKS)
def test_symlinks_at_the_targets_are_replaced_not_followed(tmp_path: Path, out: Path, umask: int) -> None:
    victims = tmp_path / "victims"
    victims.mkdir()
    key_victim, cert_victim = victims / "key-victim", victims / "cert-victim"
    key_victim.write_text("do not touch\n")
    cert_victim.write_text("do not touch either\n")
    key_victim.chmod(0o644)
    cert_victim.chmod(0o600)
    before = {p: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns) for p in (key_victim, cert_victim)}
    (out / "key.pem").symlink_to(key_victim)
    (out / "cert.pem").symlink_to(cert_victim)

    run_ok(out, umask)

    assert_fresh_pair(out)
    for path, (content, st_mode, mtime) in before.items():
        assert path.read_bytes() == content
        assert path.stat().st_mode == st_mode
        assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in victims.iterdir()) == ["cert-victim", "key-victim"]


@pytest.mark.parametrize("umask", UMASKS)
def test_dangling_symlink_does_not_create_its_target(tmp_path: Path, out: Path, umask: int) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "key.pem").symlink_to(elsewhere / "planted-key")
    (out / "cert.pem").symlink_to(elsewhere / "planted-cert")

    run_ok(out, umask)

    assert_fresh_pair(out)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("umask", UMASKS)
def test_old_files_modes_are_not_kept(out: Path, umask: int) -> None:
    key, cert = out / "key.pem", out / "cert.pem"
    key.write_text("old key\n")
    cert.write_text("old cert\n")
    key.chmod(0o644)
    cert.chmod(0o666)

    run_ok(out, umask)

    assert_fresh_pair(out)
    assert b"PRIVATE KEY" in key.read_bytes()


def test_old_key_is_replaced_not_rewritten_in_place(tmp_path: Path, out: Path) -> None:
    """A hard link to the old key keeps the old bytes: the new key is a new inode, not a truncation."""
    key = out / "key.pem"
    key.write_text("old key\n")
    key.chmod(0o644)
    link = tmp_path / "hard-link-to-old-key"
    os.link(key, link)
    old_inode = key.stat().st_ino

    run_ok(out, 0o022)

    assert_fresh_pair(out)
    assert key.stat().st_ino != old_inode
    assert link.read_text() == "old key\n"
    assert mode(link) == 0o644


def test_running_twice_gives_a_new_pair(out: Path) -> None:
    run_ok(out, 0o022)
    first = (out / "key.pem").read_bytes()
    run_ok(out, 0)
    assert_fresh_pair(out)
    assert (out / "key.pem").read_bytes() != first


def test_unwritable_target_is_one_line_error_and_leaves_no_temporary_file(out: Path) -> None:
    (out / "key.pem").mkdir()
    result = dev_cert(out, 0o022)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("smtp-proxy: error: cannot write")
    assert str(out / "key.pem") in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["key.pem"]


def test_default_key_is_ecdsa_p256_and_rsa_flag_gives_rsa_2048(tmp_path: Path) -> None:
    for flags, name in (([], "ecdsa"), (["--rsa"], "rsa")):
        out = tmp_path / name
        result = run_cli(["tls", "dev-cert", "--out", str(out), *flags])
        assert result.returncode == 0, result.stderr
        assert_fresh_pair(out)
        public_key = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes()).public_key()
        if name == "ecdsa":
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            assert public_key.curve.name == "secp256r1"
        else:
            assert isinstance(public_key, rsa.RSAPublicKey)
            assert public_key.key_size == 2048
