"""Mailgun's "send in MIME format" API: the received bytes go through unchanged, with the envelope.

POST ``{base}/v3/{domain}/messages.mime`` as multipart/form-data: one ``to`` field per envelope
recipient (the documented array form; a comma-separated list would break on a quoted local part
holding a comma) and the message as the file field ``message``. Mailgun takes Bcc from ``to``: the
headers are not consulted for recipients. The domain picks the sending domain and its credentials;
``region: eu`` picks the EU endpoint, where EU domains live.
"""

from __future__ import annotations

import base64
from urllib.parse import quote

from smtp_proxy.config import DeliveryConfig
from smtp_proxy.delivery import http
from smtp_proxy.delivery.outcome import Outcome, Outgoing, Target, failed

REGIONS = {"us": "mailgun", "eu": "mailgun_eu"}
MAX_RECIPIENTS = 1000


def send(target: Target, message: Outgoing, settings: DeliveryConfig) -> Outcome:
    """POST the message to messages.mime; 200 is delivered (Mailgun answers "Queued" with an id)."""
    if not target.api_key:
        return failed(None, "the Mailgun provider has no API key")
    domain = str(target.settings.get("domain") or "").strip()
    if not domain:
        return failed(None, "the Mailgun provider has no sending domain")
    region = str(target.settings.get("region") or "us").lower()
    if region not in REGIONS:
        return failed(None, f"unknown Mailgun region {region!r} (expected us or eu)")
    if not message.recipients:
        return failed(None, "the message has no recipients")
    if len(message.recipients) > MAX_RECIPIENTS:
        return failed(None, f"Mailgun takes at most {MAX_RECIPIENTS} recipients per message")
    url = f"{settings.endpoints[REGIONS[region]]}/v3/{quote(domain, safe='')}/messages.mime"
    fields: list[tuple[str, tuple[str | None, str | bytes, str | None]]] = [
        ("to", (None, recipient, None)) for recipient in message.recipients
    ]
    fields.append(("message", ("message.eml", message.data, "message/rfc822")))
    basic = base64.b64encode(f"api:{target.api_key}".encode()).decode("ascii")
    secrets = (target.api_key, basic)
    response = http.post(url, settings, files=fields, auth=("api", target.api_key), secrets=secrets)
    if isinstance(response, Outcome):
        return response
    return http.outcome(response, secrets=secrets)
