"""Amazon SES API v2 SendEmail with a raw message, signed with AWS Signature Version 4.

POST ``{base}/v2/email/outbound-emails`` (``{region}`` in the base URL filled in) with
``Content.Raw.Data`` = the received bytes, base64, and ``Destination.ToAddresses`` = the envelope
recipients, so that Bcc recipients get it too. ``FromEmailAddress`` carries the envelope sender and
is left out for the null reverse-path, where SES falls back on the From header. botocore signs the
request (service ``ses``); the shared requests session sends it. No boto3: one call needs no client.

Errors come back as a JSON body with ``message`` and an ``x-amzn-ErrorType`` header. Throttling
and pauses are temporary whatever their status (SES documents ThrottlingException and some others
as 400); everything else follows the HTTP status.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re

import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from requests.auth import AuthBase

from smtp_proxy.config import DeliveryConfig
from smtp_proxy.contract import SES_REGION
from smtp_proxy.delivery import http
from smtp_proxy.delivery.outcome import Outcome, Outgoing, Target, deferred, delivered, failed

PATH = "/v2/email/outbound-emails"
SERVICE = "ses"
# SES refuses a message with more than 50 recipients (To + Cc + Bcc): more go in several calls.
MAX_RECIPIENTS = 50
# A region is a host label in the default endpoint: hold it to AWS's shape, e.g. eu-west-1, us-gov-west-1.
REGION = re.compile(SES_REGION)
# Error types that a later attempt (or another provider) can get past.
TEMPORARY_ERRORS = frozenset(
    {
        "TooManyRequestsException",  # 429: the sending rate
        "ThrottlingException",  # 400 in AWS's common errors; also the daily quota
        "Throttling",
        "LimitExceededException",
        "SendingPausedException",  # the account's sending is paused, not suspended
        "RequestExpired",  # our clock or a long stall; a new signature fixes it
        "RequestTimeoutException",
        "ServiceUnavailable",
        "InternalFailure",
    }
)


class SigV4(AuthBase):
    """Signs the prepared request as sent: its method, URL, body and content type.

    Only Content-Type, Host and X-Amz-Date are signed, so the headers that requests adds
    (User-Agent, Accept-Encoding, Connection) cannot break the signature.
    """

    def __init__(self, access_key: str, secret_key: str, region: str) -> None:
        self._credentials = Credentials(access_key, secret_key)
        self._region = region

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        aws = AWSRequest(
            method=request.method,
            url=request.url,
            data=request.body,
            headers={"Content-Type": request.headers["Content-Type"]},
        )
        SigV4Auth(self._credentials, SERVICE, self._region).add_auth(aws)
        request.headers["X-Amz-Date"] = aws.headers["X-Amz-Date"]
        request.headers["Authorization"] = aws.headers["Authorization"]
        return request

    def __repr__(self) -> str:
        return f"SigV4(<redacted>, region={self._region})"


def send(target: Target, message: Outgoing, settings: DeliveryConfig) -> Outcome:
    """SendEmail with the raw message; 200 is delivered, with SES's MessageId as the text.

    More than ``MAX_RECIPIENTS`` recipients go in several calls. A later call
    refused for now leaves its recipients in ``retry_recipients``, for the
    worker's follow-up message, instead of sending the earlier ones again.
    """
    access_key, _, secret_key = (target.api_key or "").partition(":")
    if not access_key or not secret_key:
        return failed(None, "the SES provider's API key must be ACCESS_KEY_ID:SECRET_ACCESS_KEY")
    region = str(target.settings.get("region") or "").strip()
    if not REGION.fullmatch(region):
        return failed(None, f"the SES provider's region {region!r} is not an AWS region name")
    if not message.recipients:
        return failed(None, "the message has no recipients")
    url = settings.endpoints["ses"].replace("{region}", region) + PATH
    auth = SigV4(access_key, secret_key, region)
    recipients = message.recipients
    chunks = [recipients[i : i + MAX_RECIPIENTS] for i in range(0, len(recipients), MAX_RECIPIENTS)]
    texts: list[str] = []
    code: int | None = None
    for number, chunk in enumerate(chunks):
        part = dataclasses.replace(message, recipients=chunk)
        outcome = _send_one(url, settings, auth, part, (secret_key,))
        if number == 0 and (not outcome.delivered or len(chunks) == 1):
            return outcome  # the first call decides for the whole message
        if not outcome.delivered:
            # The earlier calls went out: delivered, with the rest retried (temporary) or named (permanent).
            rest = recipients[number * MAX_RECIPIENTS :]
            text = f"{'; '.join(texts)}; {len(rest)} of {len(recipients)} not sent: {outcome.text}"
            return delivered(code, text)._replace(retry_recipients=rest if outcome.temporary else ())
        code = code or outcome.code
        texts.append(outcome.text)
    return delivered(code, "; ".join(texts))


def _send_one(
    url: str, settings: DeliveryConfig, auth: SigV4, message: Outgoing, secrets: tuple[str, ...]
) -> Outcome:
    """One SendEmail call, for at most ``MAX_RECIPIENTS`` recipients."""
    response = http.post(
        url,
        settings,
        data=json.dumps(request_body(message)).encode("ascii"),
        headers={"Content-Type": "application/json"},
        auth=auth,
        secrets=secrets,
    )
    if isinstance(response, Outcome):
        return response
    return _outcome(response, secrets)


def request_body(message: Outgoing) -> dict[str, object]:
    """The SendEmail JSON for a raw message."""
    body: dict[str, object] = {
        "Destination": {"ToAddresses": list(message.recipients)},
        "Content": {"Raw": {"Data": base64.b64encode(message.data).decode("ascii")}},
    }
    if message.sender:
        body["FromEmailAddress"] = message.sender
    return body


def _outcome(response: requests.Response, secrets: tuple[str, ...]) -> Outcome:
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        document = {}
    if 200 <= response.status_code < 300 and document.get("MessageId"):
        return delivered(response.status_code, f"MessageId {document['MessageId']}")
    # "MessageRejected:http://internal.amazon.com/coral/..." -> "MessageRejected"
    error_type = response.headers.get("x-amzn-ErrorType", "").split(":")[0].strip()
    error_type = error_type or str(document.get("__type") or document.get("code") or "").rpartition("#")[2]
    detail = document.get("message") or document.get("Message") or response.text
    text = f"{error_type}: {detail}" if error_type else str(detail)
    if error_type in TEMPORARY_ERRORS:
        return deferred(response.status_code, http.scrub(text, secrets))
    return http.outcome(response, text, secrets=secrets)
