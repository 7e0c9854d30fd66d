"""One entry point for every provider type: ``send(target, message, settings, deadline) -> Outcome``."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from smtp_proxy.config import DeliveryConfig
from smtp_proxy.contract import ProviderType
from smtp_proxy.delivery import mailgun, sendgrid, ses, smtp_client
from smtp_proxy.delivery.outcome import Outcome, Outgoing, Target, deferred

log = logging.getLogger("smtp_proxy.delivery")

Transport = Callable[[Target, Outgoing, DeliveryConfig], Outcome]

TRANSPORTS: dict[ProviderType, Transport] = {
    ProviderType.SMTP: smtp_client.send,
    ProviderType.SENDGRID: sendgrid.send,
    ProviderType.MAILGUN: mailgun.send,
    ProviderType.SES: ses.send,
}
# Timeouts are never cut below this, so that a nearly spent budget still makes a valid setting.
MIN_TIMEOUT = 0.1


def send(
    target: Target, message: Outgoing, settings: DeliveryConfig, deadline: float | None = None
) -> Outcome:
    """Hand one message to one provider. A bug in a transport defers; it never loses the message.

    ``deadline`` (time.monotonic) is the end of the message's attempt budget. The SMTP client
    (``smtp_client``) cuts its session there (its watchdog); the HTTP transports get timeouts no
    longer than what is left, which bounds each connect and each read: enough for the endpoints
    the operator configures, which, unlike an smtp provider's host, no tenant chooses.
    """
    try:
        if target.provider_type is ProviderType.SMTP and deadline is not None:
            return smtp_client.send(target, message, settings, deadline)
        return TRANSPORTS[target.provider_type](target, message, within(settings, deadline))
    except Exception:
        log.exception(
            "transport error",
            extra={"event": "delivery.transport_error", "provider_type": str(target.provider_type)},
        )
        return deferred(None, "internal error in the delivery transport")


def within(settings: DeliveryConfig, deadline: float | None) -> DeliveryConfig:
    """The settings with connect and send timeouts no longer than the time left before deadline."""
    if deadline is None:
        return settings
    left = max(MIN_TIMEOUT, deadline - time.monotonic())
    if settings.connect_timeout <= left and settings.send_timeout <= left:
        return settings
    connect, send_ = min(settings.connect_timeout, left), min(settings.send_timeout, left)
    return dataclasses.replace(settings, connect_timeout=connect, send_timeout=send_)
