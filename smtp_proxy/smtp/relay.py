"""Which account a client's address sends as without AUTH: the relay networks, kept in memory.

Every connection asks, so the answer must cost no query: each process keeps every
grant (``storage.relay_networks.all_grants``) and reads them again once they are
``ttl`` seconds old, so a network an admin grants or withdraws, or an account they
deactivate, reaches every process within that long. A session that got a grant is
checked again at each MAIL FROM like any other (``account_state``). While the database
does not answer, the grants read before stay in force; with none read yet, there are
none (clients must AUTH).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from smtp_proxy.db.session import Database
from smtp_proxy.errors import DatabaseUnavailable
from smtp_proxy.proxy_protocol import client_address
from smtp_proxy.smtp.credentials import AuthenticatedAccount
from smtp_proxy.smtp.protocol import RelayGrant
from smtp_proxy.storage.relay_networks import Grant, all_grants

log = logging.getLogger("smtp_proxy.smtp")

GRANTS_TTL = 5.0


class RelayNetworks:
    """The relay networks of every account, at most ``ttl`` seconds old; thread-safe."""

    def __init__(
        self, database: Database, *, ttl: float = GRANTS_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._database = database
        self._ttl = ttl
        self._clock = clock
        self._grants: list[Grant] = []
        self._expires = float("-inf")
        self._lock = threading.Lock()  # one reader at a time; the others use what is there
        self._failing = False

    def grant_for(self, client_ip: str, *, header_from_check: bool = True) -> RelayGrant | None:
        """The grant whose network holds ``client_ip``, for an active account; None when none does.

        ``header_from_check`` is ``smtp.header_from_check``; an account exempt from it is exempt
        either way.
        """
        grants = self._current()
        if not grants:
            return None
        address = client_address(client_ip)
        if address is None:
            return None
        for grant in grants:
            if address.version == grant.network.version and address in grant.network:
                if not grant.active:
                    return None
                account = AuthenticatedAccount(
                    grant.account_id,
                    grant.account_name,
                    grant.allowed_domains,
                    header_from_check=header_from_check and not grant.allow_any_header_from,
                )
                return RelayGrant(account, grant.require_tls)
        return None

    def _current(self) -> list[Grant]:
        if self._clock() < self._expires:
            return self._grants
        # Only the first read is waited for; later ones leave the others the grants read before.
        if not self._lock.acquire(blocking=self._expires == float("-inf")):
            return self._grants
        try:
            if self._clock() >= self._expires:
                self._read()
        finally:
            self._lock.release()
        return self._grants

    def _read(self) -> None:
        try:
            with self._database.autocommit() as connection:
                self._grants = all_grants(connection)
        except DatabaseUnavailable as error:
            if not self._failing:
                log.warning(
                    "relay networks could not be read; the last ones read stay in force",
                    extra={"event": "smtp.relay_networks_unavailable", "error_class": type(error).__name__},
                )
            self._failing = True
        else:
            self._failing = False
        finally:
            self._database.remove_session()
        # Failed or not, ask again only after the TTL: an outage costs one attempt per TTL.
        self._expires = self._clock() + self._ttl
