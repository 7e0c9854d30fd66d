"""A self-signed certificate for development and tests (``smtp-proxy tls dev-cert``)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def write_self_signed(
    out_dir: Path, hostname: str = "localhost", days: int = 365, *, rsa_key: bool = False
) -> tuple[Path, Path]:
    """Write ``cert.pem`` (mode 0644) and ``key.pem`` (0600), valid for hostname, localhost and 127.0.0.1.

    The key is ECDSA P-256, the cheapest to sign a handshake with; ``rsa_key`` makes it RSA-2048,
    for clients without ECDSA (beside the ECDSA pair in ``tls.cert_file``/``tls.key_file`` lists).
    Each file is created fresh and renamed into place: a symlink there is replaced, not followed.
    """
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        alt_names.append(x509.DNSName("localhost"))
    alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    cert_path, key_path = out_dir / "cert.pem", out_dir / "key.pem"
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_fresh(key_path, key_bytes, 0o600)
    _write_fresh(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _write_fresh(path: Path, data: bytes, mode: int) -> None:
    """Put data at path as a new file with exactly ``mode``, whatever was there before.

    The bytes go to a temporary file in the same directory, created with
    O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600 (``tempfile.mkstemp``), fsynced, then renamed
    over path. A symlink at path is replaced, never followed (the file it points to is
    untouched), and an old file's mode or owner is never kept. A failure leaves path as it was.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # exact: the umask cannot widen or narrow it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
