"""Which permanent refusals are hard bounces: a verdict on the recipient, not on the message.

Pure (stdlib only). A hard bounce puts the recipient on the account's suppression list, so the
rule errs towards *not* suppressing whenever the reply may be about something else:

- Only 5xx replies; a 4xx is temporary by definition (RFC 5321 4.2.1).
- With an RFC 3463 enhanced status code, its subject decides: ``5.1.x`` (addressing: no such
  user, bad domain), ``5.2.x`` (mailbox: disabled, full for good) and ``5.4.x`` (routing: the
  domain cannot be reached, how some providers refuse unknown users) are about the recipient.
  ``5.7.x`` (policy: content, spam, relaying, authentication) and ``5.3.x``, ``5.5.x``, ``5.6.x``
  (the provider's system, the protocol, the content) are about the message or the sender: a
  recipient refused for those is *not* suppressed.
- Without an enhanced code, a 5xx to RCPT names that recipient. At DATA (one recipient) only the
  mailbox replies 550, 551 and 553 count; 552 and 554 there are usually size or content.
"""

from __future__ import annotations

import re

# "5.1.1 ..." at the start of the reply text (smtplib strips the basic code).
_ENHANCED = re.compile(r"\s*([245])\.([0-9]{1,3})\.[0-9]{1,3}(?![0-9.])")
RECIPIENT_SUBJECTS = frozenset({1, 2, 4})
DATA_MAILBOX_CODES = frozenset({550, 551, 553})


def enhanced_subject(text: str) -> int | None:
    """The subject digit of the reply's enhanced status code (5.<subject>.x), if it has one."""
    match = _ENHANCED.match(text)
    return int(match.group(2)) if match else None


def is_hard(code: int, text: str, *, at_data: bool = False) -> bool:
    """Whether a refusal of one recipient (RCPT, or DATA with one recipient) suppresses it."""
    if not 500 <= code < 600:
        return False
    subject = enhanced_subject(text)
    if subject is not None:
        return subject in RECIPIENT_SUBJECTS
    return not at_data or code in DATA_MAILBOX_CODES
