"""The MAIL FROM policy: an account's current state from the database, and its sending limits.

A session authenticates once and may then send for up to ``smtp.max_session_time``.
What an admin changes meanwhile must still reach it, in every listener process, so
the state a transaction depends on (active, the credential enabled, allowed domains,
the header-From exemption, the account's own limits) is read from the database, not
from the session: ``AccountStates`` keeps each account's policy, with the state of each
of its credentials, for ``STATE_TTL`` seconds, and a MAIL FROM after that re-reads it
with one query (``storage.auth.find_policy``), whichever of the account's credentials
(or relay networks) the session came by: an account's thousand devices cost what one
does. A deactivation, or a credential disabled or deleted, therefore ends a live
session at its next MAIL FROM within a few seconds, whichever process holds it.

``MailPolicy.check`` answers the core's ``MailFromOffered``: a deactivated account
gets 421 and the session closes; an account over a sending limit gets ``451 4.7.1
... try again in N seconds``; otherwise the transaction starts, its recipients
capped by what is left of the day's recipient budget. ``MailPolicy.stored`` counts
a message once it was committed; nothing is counted for one that was not.

Imports storage, the sending limits, the protocol's replies and address matching;
no socket.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from smtp_proxy.config import Config
from smtp_proxy.db.session import Database
from smtp_proxy.errors import DatabaseUnavailable
from smtp_proxy.sending_limits import SendingLimits, effective_limits
from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.addresses import domain_allowed
from smtp_proxy.smtp.credentials import AuthenticatedAccount
from smtp_proxy.smtp.replies import Reply
from smtp_proxy.storage.auth import Policy, effective_domains, find_policy

log = logging.getLogger("smtp_proxy.smtp")

# Seconds an account's state is trusted before a MAIL FROM reads it again; with the
# database round trip, a change reaches every live session within about this long.
STATE_TTL = 2.0
MAX_STATES = 100_000


@dataclass(frozen=True)
class AccountState:
    """What a transaction depends on that an admin may change while a session is open."""

    id: uuid.UUID
    active: bool
    allowed_domains: tuple[str, ...]
    allow_any_header_from: bool
    limits: Mapping[str, Any]


@dataclass(frozen=True)
class _Entry:
    policy: Policy | None  # None: no such account
    expires: float


class AccountStates:
    """Account policies by id, each re-read from the database once older than ``ttl``; thread-safe."""

    def __init__(
        self,
        database: Database,
        *,
        ttl: float = STATE_TTL,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_STATES,
    ) -> None:
        self._database = database
        self._ttl = ttl
        self._clock = clock
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[uuid.UUID, _Entry] = {}

    def get(self, account: AuthenticatedAccount) -> AccountState:
        """The state of the account as this session reaches it, at most ``ttl`` seconds old.

        A credential that no longer exists (or now belongs elsewhere), or an account that no
        longer exists, reads as inactive. While the database does not answer, a state read
        before is used however old; without one, ``DatabaseUnavailable`` is raised.
        """
        now = self._clock()
        with self._lock:
            entry = self._entries.get(account.id)
        # A state that would refuse this session is read again before it does: the session may
        # have logged in after it was read, with a credential made or enabled since. A refusal
        # closes the session, so this costs at most one more query per session.
        if entry is None or now >= entry.expires or not _state(entry.policy, account).active:
            try:
                with self._database.autocommit() as connection:
                    policy = find_policy(connection, account.id)
            except DatabaseUnavailable:
                if entry is None:
                    raise
            else:
                entry = _Entry(policy, self._clock() + self._ttl)
                with self._lock:
                    if len(self._entries) >= self._max_entries:
                        self._prune(now)
                    self._entries[account.id] = entry
            finally:
                self._database.remove_session()
        return _state(entry.policy, account)

    def _prune(self, now: float) -> None:
        """Drop expired states, then the oldest half if all are fresh; the caller holds the lock."""
        for key in [key for key, entry in self._entries.items() if entry.expires <= now]:
            del self._entries[key]
        if len(self._entries) >= self._max_entries:
            for key in list(self._entries)[: len(self._entries) // 2]:
                del self._entries[key]


def _state(policy: Policy | None, account: AuthenticatedAccount) -> AccountState:
    """What the session may do now: its account's policy, narrowed by its credential's state."""
    inactive = AccountState(account.id, False, (), False, {})
    if policy is None:
        return inactive
    domains = policy.allowed_domains
    active = policy.active
    if account.credential_id is not None:
        credential = policy.credentials.get(account.credential_id)
        if credential is None:  # deleted
            return inactive
        active = active and credential.enabled
        domains = effective_domains(domains, credential.allowed_domains)
    return AccountState(policy.id, active, tuple(domains), policy.allow_any_header_from, dict(policy.limits))


@dataclass(frozen=True)
class MailDecision:
    """The answer to a MAIL FROM, in the terms of ``SmtpSession.mail_checked``."""

    refusal: Reply | None
    reason: str | None  # why it was refused (metrics, logs): "account_disabled", "messages_per_minute", ...
    account: AuthenticatedAccount  # with the current domains and header-From check
    recipients_left: int | None = None
    recipients_refusal: Reply | None = None


class MailPolicy:
    """Decides whether an authenticated account may start a transaction now; thread-safe."""

    def __init__(self, states: AccountStates, limits: SendingLimits) -> None:
        self.states = states
        self.limits = limits

    def check(self, account: AuthenticatedAccount, sender: str, config: Config) -> MailDecision:
        """Raises ``DatabaseUnavailable`` when the account's state cannot be read at all."""
        state = self.states.get(account)
        current = replace(
            account,
            allowed_domains=state.allowed_domains,
            header_from_check=config.smtp.header_from_check and not state.allow_any_header_from,
        )
        if not state.active:
            return MailDecision(R.R421_ACCOUNT_DISABLED, "account_disabled", current)
        domain = sender.rpartition("@")[2]
        if not domain_allowed(domain, state.allowed_domains):
            # The core checked the domains the session authenticated with; these are newer.
            return MailDecision(R.R553_SENDER_NOT_ALLOWED, "sender_domain", current)
        limits = effective_limits(config.limits, state.limits)
        verdict = self.limits.check(account.id, limits)
        if verdict.wait is not None:
            return MailDecision(R.rate_exceeded(verdict.wait), verdict.window, current)
        if verdict.recipients is None:
            return MailDecision(None, None, current)
        count, seconds = verdict.recipients
        return MailDecision(
            None, None, current, recipients_left=count, recipients_refusal=R.rate_exceeded(seconds)
        )

    def stored(self, account_id: uuid.UUID, recipients: int) -> None:
        """Count one committed message in every window."""
        self.limits.record(account_id, recipients)
