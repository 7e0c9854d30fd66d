"""One entry point for every provider type: ``send(target, message, settings) -> Outcome``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from smtp_proxy.config import DeliveryConfig
from smtp_proxy.db.models import ProviderType
from smtp_proxy.delivery import mailgun, sendgrid, ses, smtp_transport
from smtp_proxy.delivery.outcome import Outcome, Outgoing, Target, deferred

log = logging.getLogger("smtp_proxy.delivery")

Transport = Callable[[Target, Outgoing, DeliveryConfig], Outcome]

TRANSPORTS: dict[ProviderType, Transport] = {
    ProviderType.SMTP: smtp_transport.send,
    ProviderType.SENDGRID: sendgrid.send,
    ProviderType.MAILGUN: mailgun.send,
    ProviderType.SES: ses.send,
}


def send(target: Target, message: Outgoing, settings: DeliveryConfig) -> Outcome:
    """Hand one message to one provider. A bug in a transport defers; it never loses the message."""
    try:
        return TRANSPORTS[target.provider_type](target, message, settings)
    except Exception:
        log.exception(
            "transport error",
            extra={"event": "delivery.transport_error", "provider_type": str(target.provider_type)},
        )
        return deferred(None, "internal error in the delivery transport")
