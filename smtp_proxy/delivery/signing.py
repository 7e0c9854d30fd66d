"""DKIM signing at delivery: each account's enabled keys, cached briefly, applied to the raw message.

Only the providers that take the message as bytes (smtp, Mailgun's MIME endpoint, SES raw) send
what we sign; SendGrid's mapping rebuilds the message from its parts, which would break any
signature, so it is handed the message unsigned.

The keys of an account are read and opened at most every ``KEYS_TTL`` seconds per process, so a
burst of one tenant's mail costs one query and one decryption, not one per message; a key
disabled or deleted stops signing within that time.

A signing failure never holds up or loses a message: it goes out unsigned, and the failure is
logged (``delivery.dkim_failed``) and counted. (The keys themselves are read with the routes,
before any provider is tried: while the database is away the message waits for its next claim,
as it does for its routes, rather than going out unsigned.) Retrying would not help: what fails is the
message (headers dkimpy cannot parse) or the stored key (sealed under a key the process no
longer has), and neither changes by waiting, while the mail would age in the queue. A receiver
that enforces DMARC may still take it through SPF alignment at the provider.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

from cachetools import TTLCache

from smtp_proxy import dkim
from smtp_proxy.contract import ProviderType
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.delivery import metrics
from smtp_proxy.delivery.outcome import Outgoing
from smtp_proxy.delivery.smtp_client import wire_body
from smtp_proxy.errors import DecryptionError
from smtp_proxy.storage import dkim_keys

log = logging.getLogger("smtp_proxy.delivery")

# Providers handed the message's bytes as they are: a signature made here reaches the receiver.
RAW_PROVIDERS = frozenset({ProviderType.SMTP, ProviderType.MAILGUN, ProviderType.SES})
KEYS_TTL = 5.0
KEYS_CACHED = 10_000

Keys = dict[str, dkim.SigningKey]  # an account's enabled keys by domain


class Signer:
    """Signs an account's outgoing messages with its enabled key for the From: domain."""

    def __init__(
        self, database: Database, cipher: Cipher, ttl: float = KEYS_TTL, size: int = KEYS_CACHED
    ) -> None:
        self.database, self.cipher = database, cipher
        self._keys: TTLCache[uuid.UUID, Keys] = TTLCache(size, ttl, timer=time.monotonic)
        self._lock = threading.Lock()  # TTLCache is not thread-safe

    def keys(self, account_id: uuid.UUID) -> Keys:
        """The account's enabled keys by domain (the newest of a domain's); cached for ``ttl``.

        Raises DatabaseUnavailable; a key that cannot be opened is left out and logged.
        """
        with self._lock:
            cached = self._keys.get(account_id)
        if cached is not None:
            return cached
        try:
            with self.database.read() as session:
                found = dkim_keys.signing_keys(session, self.cipher, account_id)
        except DecryptionError:
            log.error(
                "a DKIM private key cannot be decrypted (check the encryption keys); sending unsigned",
                extra={"event": "delivery.dkim_key_unreadable", "account_id": str(account_id)},
            )
            found = []
        by_domain: Keys = {}
        for key in found:
            by_domain.setdefault(key.domain, key)  # newest first
        with self._lock:
            self._keys[account_id] = by_domain
        return by_domain

    @staticmethod
    def sign(keys: Keys, outgoing: Outgoing) -> Outgoing:
        """``outgoing`` with a DKIM-Signature on top, or unchanged when no key applies or signing fails."""
        try:
            domain = dkim.signing_domain(_from_domain(outgoing.data), set(keys)) if keys else None
            key = keys[domain] if domain else None
            if key is None:
                metrics.DKIM_SIGNATURES.labels("unsigned").inc()
                return outgoing
            signed = dkim.sign(wire_body(outgoing.data), key)
        except Exception as error:
            metrics.DKIM_SIGNATURES.labels("failed").inc()
            log.warning(
                "DKIM signing failed; sending unsigned",
                extra={
                    "event": "delivery.dkim_failed",
                    "message_id": str(outgoing.message_id),
                    "error": type(error).__name__,
                },
                exc_info=True,
            )
            return outgoing
        metrics.DKIM_SIGNATURES.labels("signed").inc()
        return Outgoing(outgoing.message_id, outgoing.sender, outgoing.recipients, signed)

    @classmethod
    def once(cls, keys: Keys, outgoing: Outgoing) -> Callable[[], Outgoing]:
        """A callable that signs ``outgoing`` on its first call and returns the same result after:
        one signature per delivery attempt, however many raw providers failover tries."""
        done: list[Outgoing] = []

        def signed() -> Outgoing:
            if not done:
                done.append(cls.sign(keys, outgoing))
            return done[0]

        return signed


def _from_domain(data: bytes) -> str:
    """The domain of the first address in the From: field; "" when there is none."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    fields = BytesHeaderParser(policy=compat32).parsebytes(head).get_all("From") or []
    for _name, address in getaddresses([str(value) for value in fields]):
        if "@" in address:
            return address.rpartition("@")[2].strip().lower()
    return ""
