"""The listener's mail intake: from MAIL FROM to the committed message behind the 250.

The socket adapter hands over the core's ``MailFromOffered``, ``MessageReceived``
and ``MessageRejected`` with the session they came from; the intake answers the
core and returns its next outputs. At MAIL FROM, the account's current state and
sending limits decide (``account_state.MailPolicy``). At the end of DATA, the
message gets its Received: trace field and is stored with one autocommit INSERT
(``storage.messages.enqueue_message``): the commit happens before
``message_queued`` produces the 250 (RFC 5321 6.1), and only a committed message
counts in the sending limits. A storage failure gives 451 and nothing is kept, so
the client retries. Each step has its metrics and one log line.

No socket; storage, the sending limits and the protocol core.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError

from smtp_proxy.config import Config
from smtp_proxy.counters import open_storage
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.errors import DatabaseUnavailable
from smtp_proxy.sending_limits import SendingLimits
from smtp_proxy.smtp import metrics
from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.account_state import AccountStates, MailPolicy
from smtp_proxy.smtp.credentials import AuthenticatedAccount
from smtp_proxy.smtp.protocol import MessageReceived, MessageRejected, Output, SmtpSession
from smtp_proxy.smtp.replies import Reply
from smtp_proxy.smtp.trace import received_field
from smtp_proxy.storage.messages import enqueue_message

log = logging.getLogger("smtp_proxy.smtp")

# The core's MessageRejected reasons that a fair-use limit or a tenant policy gave, and their
# name in smtp_proxy_smtp_limit_rejections_total.
POLICY_REJECTIONS = {"server_busy": "data_in_flight", "header_from": "header_from"}


class Intake:
    """Answers the mail events of every session of a listener; thread-safe."""

    def __init__(
        self,
        database: Database,
        cipher: Cipher,
        config: Callable[[], Config],
        mail_policy: MailPolicy | None = None,
    ) -> None:
        """``mail_policy`` is shared by every listener of a process (``lifecycle.SmtpListeners``);
        without one, the intake makes its own, its sending limits in ``limits.storage``."""
        self.database = database
        self.cipher = cipher
        self._config = config
        if mail_policy is None:
            limits = SendingLimits(open_storage(config().limits.storage))
            mail_policy = MailPolicy(AccountStates(database), limits)
        self.mail_policy = mail_policy

    def mail_from(
        self, session: SmtpSession, account: AuthenticatedAccount, sender: str
    ) -> tuple[list[Output], Reply | None]:
        """Answer ``MailFromOffered``: the core's next outputs, and the reply a RCPT past the
        day's recipient budget will get (give it to ``recipient_refused`` when it goes out)."""
        try:
            decision = self.mail_policy.check(account, sender, self._config())
        except DatabaseUnavailable:
            return session.mail_checked(R.R451_STORAGE_DOWN), None
        if decision.account != account:
            # Domains or the header-From exemption changed since AUTH: the core judges by these now.
            session.account_changed(decision.account)
        refusal = decision.refusal
        reason = decision.reason or "policy"
        if refusal is not None:
            metrics.LIMIT_REJECTIONS.labels(reason).inc()
            log.info(
                "transaction refused",
                extra={
                    "event": "smtp.mail_refused",
                    "account": account.name,
                    "sender": sender,
                    "reason": reason,
                    "code": refusal.code,
                },
            )
        outputs = session.mail_checked(
            refusal,
            recipients_left=decision.recipients_left,
            recipients_refusal=decision.recipients_refusal,
            reason=reason,
        )
        return outputs, decision.recipients_refusal

    @staticmethod
    def recipient_refused() -> None:
        """A RCPT past the day's recipient budget was refused."""
        metrics.LIMIT_REJECTIONS.labels("recipients_per_day").inc()

    def message(
        self,
        session: SmtpSession,
        message: MessageReceived,
        *,
        account: AuthenticatedAccount,
        client_ip: str,
        tls: tuple[str, str] | None,
        correlation_id: str,
    ) -> list[Output]:
        """Answer ``MessageReceived``: store the message with its trace field, then the core's 250,
        or its 451 when storage fails. ``tls`` is the session's (version, cipher)."""
        started = time.perf_counter()
        message_id = uuid.uuid4()
        trace = received_field(
            helo=session.connection.helo_name,
            client_ip=client_ip,
            hostname=session.policy.hostname,
            message_id=str(message_id),
            recipients=message.recipients,
            when=datetime.now(UTC),
            tls=tls,
            authenticated=account.credential_id is not None,
        )
        data = trace + message.data
        try:
            with self.database.autocommit() as connection:
                enqueue_message(
                    connection,
                    self.cipher,
                    account_id=account.id,
                    sender=message.sender,
                    recipients=list(message.recipients),
                    data=data,
                    correlation_id=correlation_id,
                    message_id=message_id,
                    credential_id=account.credential_id,
                    dsn_ret=message.dsn_ret,
                    dsn_envid=message.dsn_envid,
                    dsn_recipients=message.dsn_recipients,
                )
        except (DatabaseUnavailable, SQLAlchemyError) as error:
            metrics.MESSAGES.labels("rejected", "storage_unavailable").inc()
            log.warning(
                "message deferred: storage failed",
                extra={
                    "event": "smtp.message_deferred",
                    "sender": message.sender,
                    "recipients": len(message.recipients),
                    "size": len(data),
                    "code": 451,
                    "error_class": type(error).__name__,
                },
            )
            return session.message_deferred()
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        # Counted once committed, before the 250: a message that was not stored costs no quota.
        self.mail_policy.stored(account.id, len(message.recipients))
        metrics.MESSAGES.labels("accepted", "").inc()
        log.info(
            "message accepted",
            extra={
                "event": "smtp.message_accepted",
                "message_id": str(message_id),
                "account": account.name,
                "auth": account.auth,
                "sender": message.sender,
                "recipients": len(message.recipients),
                "size": len(data),
                "code": 250,
            },
        )
        return session.message_queued(str(message_id))

    @staticmethod
    def rejected(rejected: MessageRejected) -> None:
        """Count and log a message the core refused at the end of DATA."""
        metrics.MESSAGES.labels("rejected", rejected.reason).inc()
        limit = POLICY_REJECTIONS.get(rejected.reason)
        if limit is not None:
            metrics.LIMIT_REJECTIONS.labels(limit).inc()
        log.info(
            "message rejected",
            extra={
                "event": "smtp.message_rejected",
                "reason": rejected.reason,
                "sender": rejected.sender,
                "recipients": rejected.recipients,
                "size": rejected.size,
                "code": rejected.reply.code,
                **({"detail": rejected.detail} if rejected.detail else {}),
            },
        )
