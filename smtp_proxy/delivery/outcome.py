"""What a transport is given and what it answers: one message, one provider, one outcome.

Transports never raise for anything the provider or the network does; they
map it onto an ``Outcome``: delivered, deferred (temporary: try again later or
at the next provider) or failed (permanent). The worker owns everything else.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from smtp_proxy.contract import DeliveryStatus, ProviderType

# delivery_logs.response_text holds up to 1000 characters; keep it short and on one line.
MAX_RESPONSE_TEXT = 500


@dataclass(frozen=True)
class Outgoing:
    """One message as received: the envelope and the exact bytes of DATA."""

    message_id: uuid.UUID
    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    data: bytes


@dataclass(frozen=True)
class Target:
    """One provider as the worker sees it: its settings and its opened secrets."""

    id: uuid.UUID
    name: str
    provider_type: ProviderType
    settings: Mapping[str, Any] = field(default_factory=dict)
    smtp_config: Mapping[str, Any] | None = None
    api_key: str | None = field(default=None, repr=False)
    smtp_password: str | None = field(default=None, repr=False)


class Refusal(NamedTuple):
    """One recipient refused by the provider, with its reply (in ``bounced``: a hard bounce)."""

    recipient: str
    code: int
    text: str


class Outcome(NamedTuple):
    status: DeliveryStatus
    code: int | None  # SMTP reply code or HTTP status; None when there was no answer
    text: str
    # Delivered to the others, refused for now: the worker queues a follow-up for these.
    retry_recipients: tuple[str, ...] = ()
    # Recipients refused for good (whatever the status): the worker adds them to the suppression list.
    bounced: tuple[Refusal, ...] = ()
    # Every recipient refused at RCPT with a reply of its own, for now or for good (the hard bounces
    # and the rest, such as a policy refusal): the sender's delivery status notice names each reply.
    refused: tuple[Refusal, ...] = ()

    @property
    def delivered(self) -> bool:
        return self.status is DeliveryStatus.DELIVERED

    @property
    def temporary(self) -> bool:
        return self.status is DeliveryStatus.DEFERRED


# Control characters (C0 but whitespace, DEL, C1) in a provider's reply: shown as "?" so that a
# reply cannot drive the terminal of whoever reads the log, the API or a notice (ESC sequences).
_CONTROLS = {code: "?" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if not chr(code).isspace()}
_CONTROLS[0] = None


def one_line(text: str) -> str:
    """``text`` on one line, its whitespace runs made one space, its control characters "?"."""
    return " ".join(text.translate(_CONTROLS).split())


def short_text(text: str | bytes, limit: int = MAX_RESPONSE_TEXT) -> str:
    """One line of printable text for the delivery log."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    line = one_line(text)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def delivered(code: int | None, text: str | bytes) -> Outcome:
    return Outcome(DeliveryStatus.DELIVERED, code, short_text(text))


def deferred(code: int | None, text: str | bytes) -> Outcome:
    return Outcome(DeliveryStatus.DEFERRED, code, short_text(text))


def failed(code: int | None, text: str | bytes) -> Outcome:
    return Outcome(DeliveryStatus.FAILED, code, short_text(text))


def from_smtp_reply(code: int, text: str | bytes) -> Outcome:
    """2xx delivered, 4xx temporary, anything else permanent (RFC 5321 4.2.1)."""
    if 200 <= code < 300:
        return delivered(code, text)
    if 400 <= code < 500:
        return deferred(code, text)
    return failed(code, text)


def from_http_status(status: int, text: str | bytes) -> Outcome:
    """2xx delivered; 429 and 5xx temporary; other 4xx permanent; anything else temporary."""
    if 200 <= status < 300:
        return delivered(status, text)
    if status == 429 or status >= 500:
        return deferred(status, text)
    if 400 <= status < 500:
        return failed(status, text)
    return deferred(status, text)
