"""TLS on a real listener: TLS 1.3 session resumption, and an ECDSA and an RSA certificate side by side.

Driven by Python's ssl over raw sockets (STARTTLS by hand, to offer a saved session) and by
``openssl s_client`` (``-sess_out`` then ``-sess_in``; ``-sigalgs`` and ``-cipher`` to allow RSA
only), on the STARTTLS port and on the implicit-TLS one.
"""

from __future__ import annotations

import re
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from smtp_proxy.devcert import write_self_signed
from tests.e2e.conftest import Listener, RawClient

pytestmark = pytest.mark.timeout(60)


class Session:
    """One SMTP session: STARTTLS (or implicit TLS), EHLO, QUIT, with an optional saved session.

    Ragged EOFs are not suppressed, so that ``closed_cleanly`` tells a close_notify after the
    221 from a bare TCP close.
    """

    def __init__(
        self,
        listener: Listener,
        context: ssl.SSLContext,
        *,
        implicit: bool = False,
        session: ssl.SSLSession | None = None,
    ) -> None:
        client = RawClient(listener.host, listener.port)
        wrap = {"server_hostname": "localhost", "session": session, "suppress_ragged_eofs": False}
        try:
            if implicit:
                client.sock = context.wrap_socket(client.sock, **wrap)
                assert client.reply().startswith(b"220 ")
            else:
                assert client.reply().startswith(b"220 ")
                client.send(b"EHLO client.test\r\n")
                assert b"STARTTLS" in client.reply()
                client.send(b"STARTTLS\r\n")
                assert client.reply().startswith(b"220 2.0.0")
                client.sock = context.wrap_socket(client.sock, **wrap)
            tls = client.sock
            assert isinstance(tls, ssl.SSLSocket)
            # Reading a reply after the handshake also reads the TLS 1.3 ticket the server sent before it.
            client.send(b"EHLO client.test\r\n")
            assert client.reply().startswith(b"250")
            self.version, self.reused, self.session = tls.version(), tls.session_reused, tls.session
            self.peer_der = tls.getpeercert(binary_form=True)
            client.send(b"QUIT\r\n")
            assert client.reply().startswith(b"221")
            try:
                self.closed_cleanly = tls.recv(1) == b""
            except ssl.SSLEOFError:
                self.closed_cleanly = False
        finally:
            client.close()


def _client(cert: Path, *, tls13: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    if tls13:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _s_client(listener: Listener, *flags: str, implicit: bool = False) -> str:
    """openssl s_client through QUIT; -ign_eof keeps it reading until the server closes (after the ticket)."""
    starttls = [] if implicit else ["-starttls", "smtp"]
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{listener.host}:{listener.port}",
            *starttls,
            "-servername",
            "localhost",
            "-crlf",
            "-ign_eof",
            *flags,
        ],
        input="QUIT\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "221 " in result.stdout, result.stdout
    return result.stdout


def _served_key(s_client_output: str) -> str:
    """The public key type of the certificate s_client printed: RSA or EC."""
    match = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", s_client_output, re.S)
    assert match, s_client_output
    return _key_type(x509.load_pem_x509_certificate(match.group().encode()).public_key())


def _peer_key(session: Session) -> object:
    assert session.peer_der is not None
    return x509.load_der_x509_certificate(session.peer_der).public_key()


def _key_type(public_key: object) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA"
    return "EC" if isinstance(public_key, ec.EllipticCurvePublicKey) else type(public_key).__name__


# --- TLS 1.3 resumption ------------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
def test_python_client_resumes_its_tls_1_3_session(start_listener, tls_files, implicit: bool) -> None:
    listener: Listener = start_listener(implicit_tls=implicit)
    context = _client(tls_files[0])

    first = Session(listener, context, implicit=implicit)
    assert first.version == "TLSv1.3"
    assert not first.reused
    assert first.session is not None and first.session.has_ticket

    second = Session(listener, context, implicit=implicit, session=first.session)
    assert second.version == "TLSv1.3"
    assert second.reused
    assert second.peer_der == first.peer_der
    # A resumed session brings its own ticket for the next time.
    third = Session(listener, context, implicit=implicit, session=second.session)
    assert third.reused
    listener.wait_idle()


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
def test_openssl_client_resumes_its_tls_1_3_session(
    start_listener, tmp_path: Path, tls_files, implicit: bool
) -> None:
    listener: Listener = start_listener(implicit_tls=implicit)
    saved = tmp_path / "session.pem"
    trust = ["-CAfile", str(tls_files[0]), "-verify_return_error", "-tls1_3"]

    first = _s_client(listener, *trust, "-sess_out", str(saved), implicit=implicit)
    assert "New, TLSv1.3" in first
    assert saved.read_text().startswith("-----BEGIN SSL SESSION PARAMETERS-----")

    second = _s_client(listener, *trust, "-sess_in", str(saved), implicit=implicit)
    assert "Reused, TLSv1.3" in second
    listener.wait_idle()


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["1.2", "1.3"])
def test_listener_ends_tls_with_close_notify(
    start_listener, tls_files, implicit: bool, version: ssl.TLSVersion
) -> None:
    # RFC 8446 6.1: without it, the client cannot tell the end of the session from a truncation.
    listener: Listener = start_listener(implicit_tls=implicit)
    context = _client(tls_files[0], tls13=False)
    context.minimum_version = context.maximum_version = version
    assert Session(listener, context, implicit=implicit).closed_cleanly
    listener.wait_idle()


def test_tls_1_2_client_resumes_its_session_too(start_listener, tls_files) -> None:
    # A TLS 1.2 session ticket (RFC 5077): the abbreviated handshake, without a key exchange.
    listener: Listener = start_listener()
    context = _client(tls_files[0], tls13=False)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    first = Session(listener, context)
    second = Session(listener, context, session=first.session)
    assert (first.version, second.version) == ("TLSv1.2", "TLSv1.2")
    assert (first.reused, second.reused) == (False, True)
    listener.wait_idle()


# --- an ECDSA and an RSA certificate -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_self_signed(tmp_path_factory.mktemp("tls-rsa"), "localhost", rsa_key=True)


@pytest.fixture
def dual_listener(start_listener, tls_files, rsa_files):
    """Listeners serving the ECDSA and the RSA pair, the RSA one listed first (order gives no preference)."""

    def start(implicit: bool = False) -> Listener:
        tls = {
            "cert_file": [str(rsa_files[0]), str(tls_files[0])],
            "key_file": [str(rsa_files[1]), str(tls_files[1])],
        }
        return start_listener(implicit_tls=implicit, tls=tls)

    return start


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
def test_openssl_default_client_gets_the_ecdsa_certificate(dual_listener, implicit: bool) -> None:
    listener: Listener = dual_listener(implicit)
    for version in ("-tls1_3", "-tls1_2"):
        output = _s_client(listener, version, implicit=implicit)
        assert _served_key(output) == "EC", version
        assert "Peer signature type: ECDSA" in output


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
def test_openssl_client_allowing_only_rsa_gets_the_rsa_certificate(dual_listener, implicit: bool) -> None:
    listener: Listener = dual_listener(implicit)
    tls13 = _s_client(listener, "-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256", implicit=implicit)
    assert _served_key(tls13) == "RSA"
    assert "Peer signature type: RSA-PSS" in tls13
    tls12 = _s_client(listener, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256", implicit=implicit)
    assert _served_key(tls12) == "RSA"
    assert "ECDHE-RSA-AES128-GCM-SHA256" in tls12


def test_python_clients_get_the_certificate_their_offer_allows(dual_listener, tls_files, rsa_files) -> None:
    listener: Listener = dual_listener()
    default = ssl.create_default_context(cadata=tls_files[0].read_text() + rsa_files[0].read_text())
    assert _key_type(_peer_key(Session(listener, default))) == "EC"

    rsa_only = ssl.create_default_context(cadata=rsa_files[0].read_text())
    rsa_only.maximum_version = ssl.TLSVersion.TLSv1_2
    rsa_only.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    served = Session(listener, rsa_only)
    assert _key_type(_peer_key(served)) == "RSA"
    assert x509.load_der_x509_certificate(served.peer_der) == x509.load_pem_x509_certificate(
        rsa_files[0].read_bytes()
    )
    listener.wait_idle()


def test_dual_certificates_resume_like_one(dual_listener, tls_files) -> None:
    listener: Listener = dual_listener()
    context = _client(tls_files[0])
    first = Session(listener, context)
    assert Session(listener, context, session=first.session).reused


def test_swaks_starttls_works_with_both_certificates(dual_listener) -> None:
    listener: Listener = dual_listener()
    result = subprocess.run(
        ["swaks", "--server", f"{listener.host}:{listener.port}", "--tls", "--quit-after", "TLS"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"TLS started with cipher TLSv1\.[23]", result.stdout), result.stdout
