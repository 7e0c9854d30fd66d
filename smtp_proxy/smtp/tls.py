"""TLS for STARTTLS (RFC 3207) and implicit TLS on the submissions port (RFC 8314).

Imports ssl, config, errors and logging only. The server context refuses
TLS 1.0 and 1.1 (RFC 8996). Under TLS 1.2 it offers only forward-secret AEAD
suites (ECDHE with AES-GCM or ChaCha20-Poly1305), and TLS 1.3 keeps OpenSSL's
own suites. ``TlsContextHolder`` lets a certificate renewal (certbot, ACME)
take effect without a restart. A new context is built and swapped in one
assignment, so a handshake in progress keeps the context it started with, and
a broken new file leaves the old certificate in service.
"""

from __future__ import annotations

import logging
import ssl
import threading

from smtp_proxy.config import TlsConfig
from smtp_proxy.errors import ConfigError

log = logging.getLogger("smtp_proxy.smtp.tls")

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def make_server_context(config: TlsConfig) -> ssl.SSLContext:
    """A server context with the certificate loaded. Raises ConfigError naming the bad file."""
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
    cert_file, key_file = config.cert_file, config.key_file or None
    cert_text = _read("tls.cert_file", "certificate", cert_file)
    key_text = _read("tls.key_file", "private key", key_file) if key_file else cert_text
    key_where = key_file or cert_file
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError("tls.cert_file", f"cannot load certificate {cert_file}: no PEM certificate in it")
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError(
            "tls.key_file" if key_file else "tls.cert_file",
            f"cannot load private key {key_where}: no PEM private key in it",
        )
    if "BEGIN ENCRYPTED PRIVATE KEY" in key_text or "Proc-Type: 4,ENCRYPTED" in key_text:
        raise ConfigError(
            "tls.key_file" if key_file else "tls.cert_file",
            f"cannot load private key {key_where}: it is encrypted; give a key without a passphrase",
        )
    try:
        # The password callback stops OpenSSL from prompting on a terminal for an encrypted key.
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            problem = f"the private key {key_where} does not match the certificate"
        else:
            problem = f"invalid PEM data in it or in {key_where} ({error.reason or error.library or 'SSL'})"
        raise ConfigError("tls.cert_file", f"cannot load certificate {cert_file}: {problem}") from None
    except OSError as error:
        # The files were readable a moment ago; they are being replaced right now.
        raise ConfigError(
            "tls.cert_file", f"cannot load certificate {cert_file}: {error.strerror or error}"
        ) from None


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
                    "TLS reload failed; keeping the current certificate",
                    extra={"event": "tls.reload_failed", "config_key": error.key, "problem": error.problem},
                )
                return False
            self._context = context
            self._config = config
        log.info(
            "TLS certificate reloaded",
            extra={"event": "tls.reloaded", "cert_file": config.cert_file, "key_file": config.key_file},
        )
        return True
