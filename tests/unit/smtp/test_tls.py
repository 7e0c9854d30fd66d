"""The server TLS context: versions, suites, load errors, and hot reload, over real handshakes."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smtp_proxy.config import TlsConfig
from smtp_proxy.devcert import write_self_signed
from smtp_proxy.errors import ConfigError
from smtp_proxy.smtp.tls import TlsContextHolder, make_server_context

pytestmark = pytest.mark.timeout(30)


@dataclass
class Handshake:
    version: str | None = None
    cipher: str | None = None
    peer_der: bytes | None = None
    client_error: BaseException | None = None
    server_error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> Handshake:
    """One TLS handshake over a socket pair, the server side on a thread."""
    result = Handshake()
    client_sock, server_sock = socket.socketpair()
    client_sock.settimeout(10)
    server_sock.settimeout(10)

    def serve() -> None:
        try:
            with server.wrap_socket(server_sock, server_side=True) as tls:
                tls.recv(1)  # until the client closes
        except (ssl.SSLError, OSError) as error:
            result.server_error = error
        finally:
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(client_sock, server_hostname="localhost") as tls:
            result.version, result.cipher = tls.version(), tls.cipher()[0]
            result.peer_der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError) as error:
        result.client_error = error
    finally:
        client_sock.close()
        thread.join(10)
    assert not thread.is_alive()
    return result


def client_context(cert: Path, *, minimum=None, maximum=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    return context


def serial(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def pem_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture
def cert_pair(tmp_path: Path) -> tuple[Path, Path]:
    return write_self_signed(tmp_path / "tls")


@pytest.fixture
def tls_config(cert_pair: tuple[Path, Path]) -> TlsConfig:
    cert, key = cert_pair
    return TlsConfig(cert_file=str(cert), key_file=str(key))


def test_context_refuses_versions_below_tls_1_2(tls_config: TlsConfig) -> None:
    context = make_server_context(tls_config)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    # A no-op (value 0) since OpenSSL 1.1, where a fresh ECDH key per handshake is always used.
    assert context.options & ssl.OP_SINGLE_ECDH_USE == ssl.OP_SINGLE_ECDH_USE
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        assert context.options & ssl.OP_NO_RENEGOTIATION


def test_context_offers_only_ecdhe_aead_suites_for_tls_1_2(tls_config: TlsConfig) -> None:
    context = make_server_context(tls_config)
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
        assert cipher["aead"], cipher["name"]
        assert "GCM" in cipher["name"] or "CHACHA20" in cipher["name"], cipher["name"]


def test_handshake_tls_1_2_negotiates_ecdhe_aead(tls_config: TlsConfig, cert_pair: tuple[Path, Path]) -> None:
    client = client_context(cert_pair[0], maximum=ssl.TLSVersion.TLSv1_2)
    result = handshake(make_server_context(tls_config), client)
    assert result.ok, (result.client_error, result.server_error)
    assert result.version == "TLSv1.2"
    assert result.cipher is not None and result.cipher.startswith("ECDHE-")
    assert "GCM" in result.cipher or "CHACHA20" in result.cipher


def test_handshake_tls_1_2_ignores_a_client_offering_only_cbc(
    tls_config: TlsConfig, cert_pair: tuple[Path, Path]
) -> None:
    client = client_context(cert_pair[0], maximum=ssl.TLSVersion.TLSv1_2)
    client.set_ciphers("ECDHE+AES+SHA1:ECDHE+AES+SHA256:AES128-SHA")
    result = handshake(make_server_context(tls_config), client)
    assert not result.ok


def test_handshake_tls_1_1_client_fails(tls_config: TlsConfig, cert_pair: tuple[Path, Path]) -> None:
    client = client_context(cert_pair[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1 and TLSv1_1
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        # The local OpenSSL may refuse to offer 1.1 at its default security level; lower it so
        # that where possible the refusal seen is the server's.
        client.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    result = handshake(make_server_context(tls_config), client)
    assert not result.ok
    assert result.version is None


def test_handshake_tls_1_3_works(tls_config: TlsConfig, cert_pair: tuple[Path, Path]) -> None:
    if not ssl.HAS_TLSv1_3:
        pytest.skip("this OpenSSL has no TLS 1.3")
    client = client_context(cert_pair[0], minimum=ssl.TLSVersion.TLSv1_3)
    result = handshake(make_server_context(tls_config), client)
    assert result.ok, (result.client_error, result.server_error)
    assert result.version == "TLSv1.3"
    assert serial(result.peer_der) == pem_serial(cert_pair[0])


def _assert_one_line(error: ConfigError, key: str, *fragments: str) -> None:
    assert error.key == key
    assert "\n" not in error.problem and "Traceback" not in error.problem
    for fragment in fragments:
        assert fragment in error.problem


def test_missing_certificate_file_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    missing = tmp_path / "nope" / "cert.pem"
    with pytest.raises(ConfigError) as caught:
        make_server_context(TlsConfig(cert_file=str(missing), key_file=str(cert_pair[1])))
    _assert_one_line(caught.value, "tls.cert_file", str(missing), "No such file or directory")
    assert caught.value.problem == f"cannot load certificate {missing}: No such file or directory"


def test_missing_key_file_is_a_config_error_naming_the_key_file(
    tmp_path: Path, cert_pair: tuple[Path, Path]
) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as caught:
        make_server_context(TlsConfig(cert_file=str(cert_pair[0]), key_file=str(missing)))
    _assert_one_line(caught.value, "tls.key_file", str(missing), "No such file or directory")


def test_directory_as_certificate_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError) as caught:
        make_server_context(TlsConfig(cert_file=str(tmp_path), key_file=str(cert_pair[1])))
    _assert_one_line(caught.value, "tls.cert_file", str(tmp_path))


def test_garbage_certificate_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    with pytest.raises(ConfigError) as caught:
        make_server_context(TlsConfig(cert_file=str(garbage), key_file=str(cert_pair[1])))
    _assert_one_line(caught.value, "tls.cert_file", str(garbage), "no PEM certificate")


def test_corrupt_pem_certificate_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN CERTIFICATE-----\nAAAA!!!!\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError) as caught:
        make_server_context(TlsConfig(cert_file=str(corrupt), key_file=str(cert_pair[1])))
    _assert_one_line(caught.value, "tls.cert_file", str(corrupt), "invalid PEM data")


def test_garbage_key_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00\xff binary junk")
    with pytest.raises(ConfigError) as caught:
        make_server_context(TlsConfig(cert_file=str(cert_pair[0]), key_file=str(garbage)))
    _assert_one_line(caught.value, "tls.key_file", str(garbage), "no PEM private key")


def test_mismatched_key_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    _, other_key = write_self_signed(tmp_path / "other")
    with pytest.raises(ConfigError) as caught:
        make_server_context(TlsConfig(cert_file=str(cert_pair[0]), key_file=str(other_key)))
    _assert_one_line(caught.value, "tls.cert_file", str(cert_pair[0]), str(other_key), "does not match")


def test_encrypted_key_is_a_config_error_without_a_prompt(
    tmp_path: Path, cert_pair: tuple[Path, Path]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ConfigError) as caught:
        make_server_context(TlsConfig(cert_file=str(cert_pair[0]), key_file=str(encrypted)))
    _assert_one_line(caught.value, "tls.key_file", str(encrypted), "encrypted")


def test_certificate_and_key_in_one_file_with_empty_key_file(
    tmp_path: Path, cert_pair: tuple[Path, Path]
) -> None:
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert_pair[1].read_bytes() + cert_pair[0].read_bytes())
    context = make_server_context(TlsConfig(cert_file=str(combined), key_file=""))
    result = handshake(context, client_context(cert_pair[0]))
    assert result.ok, (result.client_error, result.server_error)


def test_holder_reload_swaps_in_a_replaced_certificate(
    tls_config: TlsConfig, cert_pair: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    holder = TlsContextHolder(tls_config)
    old_context, old_serial = holder.context, pem_serial(cert_pair[0])
    write_self_signed(cert_pair[0].parent)  # same paths, new key and certificate
    new_serial = pem_serial(cert_pair[0])
    assert new_serial != old_serial

    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp.tls"):
        assert holder.reload(tls_config) is True
    assert holder.context is not old_context
    assert [r.event for r in caplog.records] == ["tls.reloaded"]
    result = handshake(holder.context, client_context(cert_pair[0]))
    assert result.ok, (result.client_error, result.server_error)
    assert serial(result.peer_der) == new_serial
    # A handshake that began on the old context keeps the old certificate.
    old = handshake(old_context, client_context(cert_pair[0]))
    assert old.client_error is not None  # the client now trusts only the new certificate


def test_holder_reload_with_broken_files_keeps_the_old_context(
    tls_config: TlsConfig, cert_pair: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    holder = TlsContextHolder(tls_config)
    context, trusted = holder.context, cert_pair[0].read_bytes()
    cert_pair[0].write_text("-----BEGIN CERTIFICATE-----\ntruncated")

    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp.tls"):
        assert holder.reload(tls_config) is False
    assert holder.context is context
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.event == "tls.reload_failed"
    assert record.config_key == "tls.cert_file"
    assert str(cert_pair[0]) in record.problem

    ca = cert_pair[0].parent / "trusted.pem"
    ca.write_bytes(trusted)
    result = handshake(holder.context, client_context(ca))
    assert result.ok, (result.client_error, result.server_error)
    assert serial(result.peer_der) == pem_serial(ca)


def test_holder_reload_with_new_paths(tls_config: TlsConfig, tmp_path: Path) -> None:
    holder = TlsContextHolder(tls_config)
    cert, key = write_self_signed(tmp_path / "renewed")
    assert holder.reload(TlsConfig(cert_file=str(cert), key_file=str(key))) is True
    assert holder.config.cert_file == str(cert)
    result = handshake(holder.context, client_context(cert))
    assert serial(result.peer_der) == pem_serial(cert)


def test_holder_init_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        TlsContextHolder(TlsConfig(cert_file=str(tmp_path / "x.pem"), key_file=str(tmp_path / "y.pem")))
    assert caught.value.key == "tls.cert_file"
