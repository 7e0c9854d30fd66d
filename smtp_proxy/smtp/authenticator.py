"""The listener's AUTH policy: who may log in, how often, and in how many sessions at once.

The socket adapter hands over what the core's ``CredentialsOffered`` carries and the
client's address, and gets back what ``SmtpSession.credentials_checked`` needs. In
between: the throttle and the password check in their safe order
(``credentials.authenticate``: count, decide, verify), then the account's share of
``smtp.max_connections_per_account``, with the metrics and log lines of each failure.
A session that got an account gives its slot back with ``release`` when it ends.

No socket and no database of its own: the verifier reads the account.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from smtp_proxy.config import Config
from smtp_proxy.smtp import metrics
from smtp_proxy.smtp.account_sessions import AccountSessions
from smtp_proxy.smtp.credentials import (
    AuthenticatedAccount,
    AuthThrottle,
    CredentialVerifier,
    authenticate,
    log_auth_failure,
)
from smtp_proxy.smtp.protocol import AuthOutcome, CredentialsOffered

log = logging.getLogger("smtp_proxy.smtp")


class Authenticator:
    """Answers AUTH attempts for every session of a listener; thread-safe."""

    def __init__(
        self,
        verifier: CredentialVerifier,
        throttle: AuthThrottle,
        config: Callable[[], Config],
        sessions: AccountSessions | None = None,
    ) -> None:
        """``config`` gives the live config: its limits apply from the next attempt.
        ``sessions``: the session counts, shared by every listener of the process."""
        self.verifier = verifier
        self.throttle = throttle
        self.sessions = sessions if sessions is not None else AccountSessions()
        self._config = config

    def authenticate(
        self, offered: CredentialsOffered, client_ip: str
    ) -> tuple[AuthOutcome, AuthenticatedAccount | None]:
        """The outcome for the core, and the account when it is ``OK``.

        An ``OK`` account holds one of its session slots until ``release``. A database
        outage is ``TEMPORARY`` and is neither counted nor logged as a failed login.
        """
        smtp = self._config().smtp
        result = authenticate(
            self.verifier,
            self.throttle,
            client_ip=client_ip,
            username=offered.username,
            password=offered.password,
            header_from_check=smtp.header_from_check,
        )
        account = result.account
        if account is None:
            reason = result.failure or "invalid_credentials"
            metrics.AUTH_FAILURES.labels(reason).inc()
            if reason == "database_unavailable":
                return AuthOutcome.TEMPORARY, None
            log_auth_failure(
                log,
                client_ip=client_ip,
                username=offered.username,
                mechanism=offered.mechanism,
                reason=reason,
            )
            if reason.startswith("throttled"):
                return AuthOutcome.THROTTLED, None
            return AuthOutcome.INVALID, None
        if not self.sessions.acquire(account.id, smtp.max_connections_per_account):
            log.warning(
                "too many sessions for account",
                extra={"event": "smtp.account_limit", "client_ip": client_ip, "account": account.name},
            )
            return AuthOutcome.TOO_MANY_SESSIONS, None
        log.debug(
            "authenticated", extra={"event": "smtp.auth_ok", "client_ip": client_ip, "account": account.name}
        )
        return AuthOutcome.OK, account

    def release(self, account: AuthenticatedAccount) -> None:
        """The session that ``authenticate`` gave this account ended."""
        self.sessions.release(account.id)
