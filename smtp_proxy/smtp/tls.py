"""TLS for STARTTLS (RFC 3207) and implicit TLS on the submissions port (RFC 8314).

Imports ssl, cryptography (to tell key types apart), config, errors and logging
only. The server context refuses TLS 1.0 and 1.1 (RFC 8996). Under TLS 1.2 it
offers only forward-secret AEAD suites (ECDHE with AES-GCM or ChaCha20-Poly1305),
and TLS 1.3 keeps OpenSSL's own suites. It may hold one certificate per key type
(an ECDSA one, cheap to sign with, beside an RSA one for old clients), and a
client that comes back with its session ticket skips the certificate and its
signature. ``TlsContextHolder`` lets a certificate renewal (certbot, ACME) take
effect without a restart. A new context is built and swapped in one
assignment, so a handshake in progress keeps the context it started with, and
a broken new file leaves the old certificates in service.
"""

from __future__ import annotations

import logging
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from smtp_proxy.config import TlsConfig
from smtp_proxy.errors import ConfigError

log = logging.getLogger("smtp_proxy.smtp.tls")

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# OpenSSL's certificate slots: every elliptic curve shares the ECDSA one.
_KEY_TYPES: tuple[tuple[type, str], ...] = (
    (rsa.RSAPublicKey, "RSA"),
    (ec.EllipticCurvePublicKey, "ECDSA"),
    (ed25519.Ed25519PublicKey, "Ed25519"),
    (ed448.Ed448PublicKey, "Ed448"),
    (dsa.DSAPublicKey, "DSA"),
)


def make_server_context(config: TlsConfig) -> ssl.SSLContext:
    """A server context with the certificates loaded. Raises ConfigError naming the bad file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION  # CRIME
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_SINGLE_ECDH_USE
    # Client-initiated renegotiation is a CPU sink for a TLS 1.2 client; absent on old OpenSSL.
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # TLS 1.3 sends session tickets after every handshake (two by default), each
    # a cost most mailers never redeem; one keeps resumption for those that do.
    context.num_tickets = 1
    _load_cert_chain(context, config)
    return context


def _load_cert_chain(context: ssl.SSLContext, config: TlsConfig) -> None:
    """Load every certificate and key pair; raises ConfigError naming the key (and index) of a bad file.

    OpenSSL keeps one certificate per key type and serves the one the client's offer
    allows (its TLS 1.3 signature algorithms, its TLS 1.2 suites), preferring ECDSA.
    A second certificate of a type would silently replace the first, so it is an error.
    """
    pairs = list(zip(config.cert_file, config.key_file, strict=True))
    loaded: dict[str, str] = {}  # key type -> the key and file that holds it
    for index, (cert_file, key_file) in enumerate(pairs):
        suffix = f"[{index}]" if len(pairs) > 1 else ""
        cert_key, key_key = f"tls.cert_file{suffix}", f"tls.key_file{suffix}"
        cert_text = _load_pair(context, cert_file, key_file or None, cert_key, key_key)
        if len(pairs) > 1:  # one pair: no slot to share, and no second parser to trip on it
            key_type = _key_type(cert_text, cert_file, cert_key)
            if key_type in loaded:
                raise ConfigError(
                    cert_key,
                    f"cannot load certificate {cert_file}: its key is {key_type}, as in "
                    f"{loaded[key_type]}; give one certificate per key type",
                )
            loaded[key_type] = f"{cert_key} ({cert_file})"


def _load_pair(
    context: ssl.SSLContext, cert_file: str, key_file: str | None, cert_key: str, key_key: str
) -> str:
    """Load one certificate and its key; returns the certificate file's text."""
    cert_text = _read(cert_key, "certificate", cert_file)
    key_text = _read(key_key, "private key", key_file) if key_file else cert_text
    key_where, key_named = (key_file, key_key) if key_file else (cert_file, cert_key)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(cert_key, f"cannot load certificate {cert_file}: no PEM certificate in it")
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError(key_named, f"cannot load private key {key_where}: no PEM private key in it")
    if "BEGIN ENCRYPTED PRIVATE KEY" in key_text or "Proc-Type: 4,ENCRYPTED" in key_text:
        problem = "it is encrypted; give a key without a passphrase"
        raise ConfigError(key_named, f"cannot load private key {key_where}: {problem}")
    try:
        # First alone: in the shared context OpenSSL checks a key against the certificate of the
        # key's own type, so an ECDSA key given with an RSA certificate would pass, matching the
        # ECDSA pair loaded before, and leave the RSA certificate without a key.
        # The password callback stops OpenSSL from prompting on a terminal for an encrypted key.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=_no_password)
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            problem = f"the private key {key_where} does not match the certificate"
        elif error.reason == "NO_CERTIFICATE_ASSIGNED":  # a key of another type than the certificate's
            problem = f"the private key {key_where} does not match the certificate (another key type)"
        else:
            problem = f"invalid PEM data in it or in {key_where} ({error.reason or error.library or 'SSL'})"
        raise ConfigError(cert_key, f"cannot load certificate {cert_file}: {problem}") from None
    except OSError as error:
        # The files were readable a moment ago; they are being replaced right now.
        problem = error.strerror or str(error)
        raise ConfigError(cert_key, f"cannot load certificate {cert_file}: {problem}") from None
    return cert_text


def _key_type(cert_text: str, cert_file: str, cert_key: str) -> str:
    """The type of the leaf certificate's public key: OpenSSL's slot for it."""
    try:
        public_key = x509.load_pem_x509_certificate(cert_text.encode("latin-1")).public_key()
    except ValueError as error:
        # OpenSSL took it; cryptography is stricter about some old encodings.
        problem = f"cannot tell its key type ({str(error).splitlines()[0]})"
        raise ConfigError(cert_key, f"cannot load certificate {cert_file}: {problem}") from None
    for cls, name in _KEY_TYPES:
        if isinstance(public_key, cls):
            return name
    return type(public_key).__name__


def _read(key: str, what: str, path: str) -> str:
    """The file's text, read here so that an unreadable file is named in the error."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("latin-1")
    except OSError as error:
        raise ConfigError(key, f"cannot load {what} {path}: {error.strerror or error}") from None


def _no_password() -> bytes:
    return b""


class TlsContextHolder:
    """The current server context; swapped atomically when the certificate or key file changes."""

    def __init__(self, config: TlsConfig) -> None:
        """Raises ConfigError when the certificate cannot be loaded."""
        self._lock = threading.Lock()
        self._context = make_server_context(config)
        self._config = config

    @property
    def context(self) -> ssl.SSLContext:
        """The context for the next handshake; read it once per connection."""
        return self._context

    @property
    def config(self) -> TlsConfig:
        return self._config

    def reload(self, config: TlsConfig) -> bool:
        """Rebuild from the files now on disk. True when swapped; False keeps the old context."""
        # Serialised so that two reloads (SIGHUP and a file event) cannot swap out of order.
        with self._lock:
            try:
                context = make_server_context(config)
            except ConfigError as error:
                log.error(
                    "TLS reload failed; keeping the current certificates",
                    extra={"event": "tls.reload_failed", "config_key": error.key, "problem": error.problem},
                )
                return False
            self._context = context
            self._config = config
        log.info(
            "TLS certificate reloaded",
            extra={
                "event": "tls.reloaded",
                "cert_file": _as_configured(config.cert_file),
                "key_file": _as_configured(config.key_file),
            },
        )
        return True


def _as_configured(files: tuple[str, ...]) -> str | list[str]:
    """File names as the config gives them: one string, or a list when there are several."""
    return files[0] if len(files) == 1 else list(files)
