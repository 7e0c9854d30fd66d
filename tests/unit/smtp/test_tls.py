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
from cryptography.hazmat.primitives.asymmetric import ec, rsa

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
    session: ssl.SSLSession | None = None
    session_reused: bool = False
    client_error: BaseException | None = None
    server_error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None

    @property
    def key_type(self) -> str:
        """The served certificate's public key type: RSA or EC."""
        assert self.peer_der is not None
        key = x509.load_der_x509_certificate(self.peer_der).public_key()
        if isinstance(key, rsa.RSAPublicKey):
            return "RSA"
        return "EC" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> Handshake:
    """One TLS handshake over a socket pair, the server side on a thread.

    The server writes one byte after its handshake, as the listener writes its first reply:
    reading it, the client also reads the TLS 1.3 session ticket sent before it.
    """
    result = Handshake()
    client_sock, server_sock = socket.socketpair()
    client_sock.settimeout(10)
    server_sock.settimeout(10)

    def serve() -> None:
        try:
            with server.wrap_socket(server_sock, server_side=True) as tls:
                tls.sendall(b"!")
                tls.recv(1)  # until the client closes
        except (ssl.SSLError, OSError) as error:
            result.server_error = error
        finally:
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(client_sock, server_hostname="localhost", session=session) as tls:
            result.version, result.cipher = tls.version(), tls.cipher()[0]
            result.peer_der = tls.getpeercert(binary_form=True)
            assert tls.recv(1) == b"!"
            result.session, result.session_reused = tls.session, tls.session_reused
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


def one_pair(cert: Path | str, key: Path | str) -> TlsConfig:
    return TlsConfig(cert_file=(str(cert),), key_file=(str(key),))


def pairs(*files: tuple[Path, Path]) -> TlsConfig:
    return TlsConfig(cert_file=tuple(str(c) for c, _ in files), key_file=tuple(str(k) for _, k in files))


@pytest.fixture
def cert_pair(tmp_path: Path) -> tuple[Path, Path]:
    return write_self_signed(tmp_path / "tls")


@pytest.fixture
def tls_config(cert_pair: tuple[Path, Path]) -> TlsConfig:
    cert, key = cert_pair
    return one_pair(cert, key)


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
        make_server_context(one_pair(missing, cert_pair[1]))
    _assert_one_line(caught.value, "tls.cert_file", str(missing), "No such file or directory")
    assert caught.value.problem == f"cannot load certificate {missing}: No such file or directory"


def test_missing_key_file_is_a_config_error_naming_the_key_file(
    tmp_path: Path, cert_pair: tuple[Path, Path]
) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as caught:
        make_server_context(one_pair(cert_pair[0], missing))
    _assert_one_line(caught.value, "tls.key_file", str(missing), "No such file or directory")


def test_directory_as_certificate_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError) as caught:
        make_server_context(one_pair(tmp_path, cert_pair[1]))
    _assert_one_line(caught.value, "tls.cert_file", str(tmp_path))


def test_garbage_certificate_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    with pytest.raises(ConfigError) as caught:
        make_server_context(one_pair(garbage, cert_pair[1]))
    _assert_one_line(caught.value, "tls.cert_file", str(garbage), "no PEM certificate")


def test_corrupt_pem_certificate_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN CERTIFICATE-----\nAAAA!!!!\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError) as caught:
        make_server_context(one_pair(corrupt, cert_pair[1]))
    _assert_one_line(caught.value, "tls.cert_file", str(corrupt), "invalid PEM data")


def test_garbage_key_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00\xff binary junk")
    with pytest.raises(ConfigError) as caught:
        make_server_context(one_pair(cert_pair[0], garbage))
    _assert_one_line(caught.value, "tls.key_file", str(garbage), "no PEM private key")


def test_mismatched_key_is_a_config_error(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    _, other_key = write_self_signed(tmp_path / "other")
    with pytest.raises(ConfigError) as caught:
        make_server_context(one_pair(cert_pair[0], other_key))
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
        make_server_context(one_pair(cert_pair[0], encrypted))
    _assert_one_line(caught.value, "tls.key_file", str(encrypted), "encrypted")


def test_certificate_and_key_in_one_file_with_empty_key_file(
    tmp_path: Path, cert_pair: tuple[Path, Path]
) -> None:
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert_pair[1].read_bytes() + cert_pair[0].read_bytes())
    context = make_server_context(one_pair(combined, ""))
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
    assert holder.reload(one_pair(cert, key)) is True
    assert holder.config.cert_file == (str(cert),)
    result = handshake(holder.context, client_context(cert))
    assert serial(result.peer_der) == pem_serial(cert)


def test_holder_init_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        TlsContextHolder(one_pair(tmp_path / "x.pem", tmp_path / "y.pem"))
    assert caught.value.key == "tls.cert_file"


# --- one certificate per key type ------------------------------------------------------------------


@pytest.fixture
def rsa_pair(tmp_path: Path) -> tuple[Path, Path]:
    return write_self_signed(tmp_path / "rsa", rsa_key=True)


def trusting(*certs: Path) -> ssl.SSLContext:
    """A client context that trusts each of the (self-signed) certificates."""
    context = ssl.create_default_context(cadata="".join(c.read_text() for c in certs))
    return context


@pytest.mark.parametrize("rsa_first", [False, True], ids=["ecdsa_listed_first", "rsa_listed_first"])
def test_default_clients_get_the_ecdsa_certificate_whatever_the_order(
    cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path], rsa_first: bool
) -> None:
    config = pairs(rsa_pair, cert_pair) if rsa_first else pairs(cert_pair, rsa_pair)
    context = make_server_context(config)
    for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED):
        client = trusting(cert_pair[0], rsa_pair[0])
        client.maximum_version = maximum
        result = handshake(context, client)
        assert result.ok, (result.client_error, result.server_error)
        assert result.key_type == "EC", result.version
        assert serial(result.peer_der) == pem_serial(cert_pair[0])


@pytest.mark.parametrize("rsa_first", [False, True], ids=["ecdsa_listed_first", "rsa_listed_first"])
def test_a_client_offering_only_rsa_suites_gets_the_rsa_certificate(
    cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path], rsa_first: bool
) -> None:
    config = pairs(rsa_pair, cert_pair) if rsa_first else pairs(cert_pair, rsa_pair)
    client = trusting(cert_pair[0], rsa_pair[0])
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    result = handshake(make_server_context(config), client)
    assert result.ok, (result.client_error, result.server_error)
    assert (result.version, result.cipher) == ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")
    assert result.key_type == "RSA"
    assert serial(result.peer_der) == pem_serial(rsa_pair[0])


def test_two_certificates_of_one_key_type_are_a_config_error(
    tmp_path: Path, cert_pair: tuple[Path, Path]
) -> None:
    # P-384 and P-256 share OpenSSL's one ECDSA slot: the second would silently replace the first.
    other = write_self_signed(tmp_path / "other")
    with pytest.raises(ConfigError) as caught:
        make_server_context(pairs(cert_pair, other))
    _assert_one_line(caught.value, "tls.cert_file[1]", str(other[0]), "ECDSA", str(cert_pair[0]))
    assert "tls.cert_file[0]" in caught.value.problem


def test_two_rsa_certificates_are_a_config_error(
    tmp_path: Path, cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path]
) -> None:
    other = write_self_signed(tmp_path / "rsa2", rsa_key=True)
    with pytest.raises(ConfigError) as caught:
        make_server_context(pairs(rsa_pair, cert_pair, other))
    _assert_one_line(caught.value, "tls.cert_file[2]", str(other[0]), "RSA", "tls.cert_file[0]")


def test_errors_name_the_index_of_the_bad_pair(
    tmp_path: Path, cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path]
) -> None:
    missing = tmp_path / "missing.key"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    rsa_cert, ec_key = rsa_pair[0], cert_pair[1]
    cases = [
        (pairs(cert_pair, (rsa_cert, missing)), "tls.key_file[1]", str(missing), "No such file"),
        (pairs((garbage, ec_key), rsa_pair), "tls.cert_file[0]", str(garbage), "no PEM certificate"),
        # The ECDSA key matches the ECDSA certificate already loaded, not the RSA one it is paired with.
        (pairs(cert_pair, (rsa_cert, ec_key)), "tls.cert_file[1]", str(ec_key), "does not match"),
        (pairs(cert_pair, (rsa_cert, "")), "tls.cert_file[1]", str(rsa_cert), "no PEM private key"),
    ]
    for config, key, *fragments in cases:
        with pytest.raises(ConfigError) as caught:
            make_server_context(config)
        _assert_one_line(caught.value, key, *fragments)


def test_a_pair_may_keep_its_key_in_the_certificate_file(
    tmp_path: Path, cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path]
) -> None:
    combined = tmp_path / "rsa-combined.pem"
    combined.write_bytes(rsa_pair[1].read_bytes() + rsa_pair[0].read_bytes())
    context = make_server_context(pairs(cert_pair, (combined, "")))
    client = trusting(rsa_pair[0])
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    result = handshake(context, client)
    assert result.ok, (result.client_error, result.server_error)
    assert result.key_type == "RSA"


def test_holder_reload_swaps_in_a_renewed_pair_of_certificates(
    cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config = pairs(cert_pair, rsa_pair)
    holder = TlsContextHolder(config)
    old_ec, old_rsa = pem_serial(cert_pair[0]), pem_serial(rsa_pair[0])
    write_self_signed(cert_pair[0].parent)  # same paths, new keys and certificates
    write_self_signed(rsa_pair[0].parent, rsa_key=True)
    assert (pem_serial(cert_pair[0]), pem_serial(rsa_pair[0])) != (old_ec, old_rsa)

    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp.tls"):
        assert holder.reload(config) is True
    [record] = caplog.records
    assert record.event == "tls.reloaded"
    assert record.cert_file == [str(cert_pair[0]), str(rsa_pair[0])]
    assert record.key_file == [str(cert_pair[1]), str(rsa_pair[1])]
    client = trusting(cert_pair[0], rsa_pair[0])
    assert serial(handshake(holder.context, client).peer_der) == pem_serial(cert_pair[0])
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    assert serial(handshake(holder.context, client).peer_der) == pem_serial(rsa_pair[0])


def test_holder_reload_with_one_broken_file_of_a_pair_keeps_the_old_context(
    cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    holder = TlsContextHolder(pairs(cert_pair, rsa_pair))
    context = holder.context
    rsa_pair[1].write_text("-----BEGIN PRIVATE KEY-----\ntruncated")

    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp.tls"):
        assert holder.reload(pairs(cert_pair, rsa_pair)) is False
    assert holder.context is context
    [record] = caplog.records
    assert (record.event, record.config_key) == ("tls.reload_failed", "tls.cert_file[1]")
    assert str(rsa_pair[1]) in record.problem


def test_holder_reload_from_one_pair_to_two(
    cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    holder = TlsContextHolder(pairs(cert_pair))
    client = trusting(cert_pair[0], rsa_pair[0])
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    assert not handshake(holder.context, client).ok  # no RSA certificate yet

    with caplog.at_level(logging.INFO, logger="smtp_proxy.smtp.tls"):
        assert holder.reload(pairs(cert_pair, rsa_pair)) is True
        assert handshake(holder.context, client).key_type == "RSA"
        assert holder.config.cert_file == (str(cert_pair[0]), str(rsa_pair[0]))
        # One pair is logged as the config gives it: strings.
        assert holder.reload(pairs(cert_pair)) is True
    assert caplog.records[-1].cert_file == str(cert_pair[0])
    assert caplog.records[-1].key_file == str(cert_pair[1])


# --- TLS 1.3 session resumption --------------------------------------------------------------------


def test_tls_1_3_client_resumes_with_its_ticket(tls_config: TlsConfig, cert_pair: tuple[Path, Path]) -> None:
    context = make_server_context(tls_config)
    client = client_context(cert_pair[0], minimum=ssl.TLSVersion.TLSv1_3)
    first = handshake(context, client)
    assert first.ok and first.version == "TLSv1.3"
    assert first.session is not None and first.session.has_ticket
    assert not first.session_reused

    second = handshake(context, client, session=first.session)
    assert second.ok, (second.client_error, second.server_error)
    assert second.session_reused
    assert context.session_stats()["hits"] == 1


def test_tickets_resume_with_either_certificate(
    cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path]
) -> None:
    context = make_server_context(pairs(cert_pair, rsa_pair))
    client = trusting(cert_pair[0], rsa_pair[0])
    first = handshake(context, client)
    assert handshake(context, client, session=first.session).session_reused
    tls12_rsa = trusting(rsa_pair[0])
    tls12_rsa.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12_rsa.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    first = handshake(context, tls12_rsa)
    resumed = handshake(context, tls12_rsa, session=first.session)
    assert resumed.ok and resumed.session_reused and resumed.key_type == "RSA"


def test_a_ticket_from_before_a_reload_gives_a_full_handshake(
    tls_config: TlsConfig, cert_pair: tuple[Path, Path]
) -> None:
    # A new context has new ticket keys: an old ticket is declined, never an error.
    holder = TlsContextHolder(tls_config)
    client = client_context(cert_pair[0])
    first = handshake(holder.context, client)
    assert holder.reload(tls_config) is True
    after = handshake(holder.context, client, session=first.session)
    assert after.ok, (after.client_error, after.server_error)
    assert not after.session_reused


def test_key_of_another_type_than_the_certificate_is_a_config_error(
    cert_pair: tuple[Path, Path], rsa_pair: tuple[Path, Path]
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_server_context(one_pair(cert_pair[0], rsa_pair[1]))
    _assert_one_line(caught.value, "tls.cert_file", str(rsa_pair[1]), "does not match", "another key type")
