"""The SendGrid, Mailgun and SES transports against FakeEsp over real sockets on 127.0.0.1.

Each test checks the bytes the fake received (path, credentials, body) or the Outcome the transport
made of the fake's answer. The fake checks every request against the provider's documented format
and, for SES, recomputes the SigV4 signature with its own code.
"""

from __future__ import annotations

import base64
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.policy import SMTP

import pytest
import requests

from smtp_proxy.config import DeliveryConfig, config_from_dict
from smtp_proxy.db.models import DeliveryStatus, ProviderType
from smtp_proxy.delivery import http, mailgun, sendgrid, ses
from smtp_proxy.delivery.outcome import Outcome, Outgoing, Target
from tests.fake_esp import API_KEY, SES_ACCESS_KEY, SES_API_KEY, SES_SECRET_KEY, FakeEsp

SEND_TIMEOUT = 0.5
RECIPIENTS = ("bob@example.org", "carol@example.org", "dave@example.net")  # To, Cc, Bcc


def build_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice Ünal <alice@example.com>"
    msg["To"] = "Bob <bob@example.org>"
    msg["Cc"] = "carol@example.org"
    msg["Subject"] = "Grüße – report"
    msg["Message-ID"] = "<report-7@example.com>"
    msg["X-Tenant"] = "acme"
    msg.set_content("Hello Bob, the report is attached. Ünïcödé.\n")
    msg.add_alternative("<p>Hello <b>Bob</b> <img src='cid:logo@example.com'></p>", subtype="html")
    msg.get_payload()[1].add_related(b"\x89PNG\r\n\x1a\nlogo", "image", "png", cid="<logo@example.com>")
    msg.add_attachment(b"%PDF-1.4\r\n\x00\xff binary", "application", "pdf", filename="report.pdf")
    return msg.as_bytes(policy=SMTP)


MESSAGE = Outgoing(uuid.uuid4(), "alice@example.com", RECIPIENTS, build_message())


@pytest.fixture
def fake() -> Iterator[FakeEsp]:
    with FakeEsp() as server:
        yield server
    http.close_session()  # drop this thread's pooled connections to the stopped server


@pytest.fixture
def settings(fake: FakeEsp) -> DeliveryConfig:
    delivery = {"endpoints": fake.endpoints(), "connect_timeout": 1, "send_timeout": SEND_TIMEOUT}
    return config_from_dict({"delivery": delivery}, env={}).delivery


def sendgrid_target(api_key: str = API_KEY) -> Target:
    return Target(uuid.uuid4(), "sendgrid", ProviderType.SENDGRID, {}, None, api_key)


def mailgun_target(api_key: str = API_KEY, **settings: str) -> Target:
    return Target(
        uuid.uuid4(), "mailgun", ProviderType.MAILGUN, {"domain": "mg.example.com", **settings}, None, api_key
    )


def ses_target(api_key: str = SES_API_KEY, region: str = "eu-west-1") -> Target:
    return Target(uuid.uuid4(), "ses", ProviderType.SES, {"region": region}, None, api_key)


Send = Callable[[DeliveryConfig], Outcome]
PROVIDERS: dict[str, tuple[Send, str]] = {
    "sendgrid": (lambda s: sendgrid.send(sendgrid_target(), MESSAGE, s), API_KEY),
    "mailgun": (lambda s: mailgun.send(mailgun_target(), MESSAGE, s), API_KEY),
    "ses": (lambda s: ses.send(ses_target(), MESSAGE, s), SES_SECRET_KEY),
}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the documented request formats ----------------------------------------------------------------


def test_sendgrid_posts_the_mapped_json_with_a_bearer_key(fake: FakeEsp, settings: DeliveryConfig) -> None:
    outcome = sendgrid.send(sendgrid_target(), MESSAGE, settings)

    (request,) = fake.requests
    assert request.valid, request.problems
    assert (request.method, request.path) == ("POST", "/sendgrid/v3/mail/send")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("smtp-proxy/")
    assert request.json == sendgrid.payload(MESSAGE)
    assert request.json["personalizations"] == [
        {
            "to": [{"email": "bob@example.org", "name": "Bob"}],
            "cc": [{"email": "carol@example.org"}],
            "bcc": [{"email": "dave@example.net"}],
        }
    ]
    assert request.json["subject"] == "Grüße – report"
    assert [a["filename"] for a in request.json["attachments"]][-1] == "report.pdf"
    # The fake answers 202 with an X-Message-Id, SendGrid's handle for its event logs.
    assert outcome.status is DeliveryStatus.DELIVERED and outcome.code == 202
    assert outcome.text.startswith("202 accepted, X-Message-Id ") and len(outcome.text) > 30


def test_mailgun_posts_the_raw_bytes_and_one_to_field_per_envelope_recipient(
    fake: FakeEsp, settings: DeliveryConfig
) -> None:
    outcome = mailgun.send(mailgun_target(), MESSAGE, settings)

    (request,) = fake.requests
    assert request.valid, request.problems
    assert (request.method, request.path) == ("POST", "/mailgun/v3/mg.example.com/messages.mime")
    assert request.headers["authorization"] == "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode()
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert request.form == {"to": list(RECIPIENTS)}
    assert request.files == {"message": MESSAGE.data}  # byte for byte, Bcc recipient only in `to`
    assert request.region == "us"
    assert outcome.status is DeliveryStatus.DELIVERED and outcome.code == 200
    assert "Queued. Thank you." in outcome.text


@pytest.mark.parametrize(("region", "expected"), [("eu", "eu"), ("EU", "eu"), ("us", "us"), (None, "us")])
def test_mailgun_region_picks_the_endpoint(
    fake: FakeEsp, settings: DeliveryConfig, region: str | None, expected: str
) -> None:
    target = mailgun_target(**({"region": region} if region else {}))
    assert mailgun.send(target, MESSAGE, settings).delivered
    (request,) = fake.requests
    assert request.region == expected
    assert request.path.startswith({"eu": "/mailgun-eu/v3/", "us": "/mailgun/v3/"}[expected])


def test_mailgun_domain_is_one_quoted_path_segment(fake: FakeEsp, settings: DeliveryConfig) -> None:
    mailgun.send(mailgun_target(domain="mg.example.com/../../v3/other?x=1"), MESSAGE, settings)
    (request,) = fake.requests
    assert request.path == "/mailgun/v3/mg.example.com%2F..%2F..%2Fv3%2Fother%3Fx%3D1/messages.mime"
    assert request.domain == "mg.example.com/../../v3/other?x=1"


def test_mailgun_without_domain_or_with_unknown_region_fails_before_any_request(
    fake: FakeEsp, settings: DeliveryConfig
) -> None:
    no_domain = Target(uuid.uuid4(), "mailgun", ProviderType.MAILGUN, {}, None, API_KEY)
    assert mailgun.send(no_domain, MESSAGE, settings)[:3] == (
        DeliveryStatus.FAILED,
        None,
        "the Mailgun provider has no sending domain",
    )
    outcome = mailgun.send(mailgun_target(region="ap"), MESSAGE, settings)
    assert outcome.status is DeliveryStatus.FAILED and "region" in outcome.text
    assert fake.requests == []


def test_ses_posts_a_signed_raw_send_email(fake: FakeEsp, settings: DeliveryConfig) -> None:
    outcome = ses.send(ses_target(), MESSAGE, settings)

    (request,) = fake.requests
    assert request.valid, request.problems  # includes the fake's own recomputation of the signature
    assert (request.method, request.path) == ("POST", "/ses/eu-west-1/v2/email/outbound-emails")
    authorization = request.headers["authorization"]
    assert authorization.startswith(
        f"AWS4-HMAC-SHA256 Credential={SES_ACCESS_KEY}/{request.headers['x-amz-date'][:8]}"
    )
    assert (
        "/eu-west-1/ses/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=" in authorization
    )
    assert request.json == {
        "FromEmailAddress": "alice@example.com",
        "Destination": {"ToAddresses": list(RECIPIENTS)},
        "Content": {"Raw": {"Data": base64.b64encode(MESSAGE.data).decode()}},
    }
    assert outcome.status is DeliveryStatus.DELIVERED and outcome.code == 200
    assert outcome.text.startswith("MessageId ")


def test_ses_region_is_substituted_into_the_endpoint_and_the_signature(
    fake: FakeEsp, settings: DeliveryConfig
) -> None:
    assert ses.send(ses_target(region="us-gov-west-1"), MESSAGE, settings).delivered
    (request,) = fake.requests
    assert request.path == "/ses/us-gov-west-1/v2/email/outbound-emails"
    assert "/us-gov-west-1/ses/aws4_request" in request.headers["authorization"]


def test_ses_null_sender_leaves_from_email_address_out(fake: FakeEsp, settings: DeliveryConfig) -> None:
    bounce = Outgoing(uuid.uuid4(), "", ("bob@example.org",), MESSAGE.data)
    assert ses.send(ses_target(), bounce, settings).delivered
    assert "FromEmailAddress" not in fake.requests[0].json


def test_ses_wrong_secret_fails_the_signature_check(fake: FakeEsp, settings: DeliveryConfig) -> None:
    wrong = f"{SES_ACCESS_KEY}:not-the-secret-key-at-all"
    outcome = ses.send(ses_target(api_key=wrong), MESSAGE, settings)
    assert (outcome.status, outcome.code) == (DeliveryStatus.FAILED, 403)
    assert outcome.text.startswith("SignatureDoesNotMatch: ")
    assert not fake.requests[0].valid


@pytest.mark.parametrize("api_key", ["AKIAONLYTHEKEY", ":secret", "AKIA:", ""])
def test_ses_malformed_api_key_fails_clearly_without_a_request(
    fake: FakeEsp, settings: DeliveryConfig, api_key: str
) -> None:
    outcome = ses.send(ses_target(api_key=api_key), MESSAGE, settings)
    assert outcome[:3] == (
        DeliveryStatus.FAILED,
        None,
        "the SES provider's API key must be ACCESS_KEY_ID:SECRET_ACCESS_KEY",
    )
    assert fake.requests == []


@pytest.mark.parametrize("region", ["", "eu-west-1.evil.example/x", "EU-WEST-1", "nowhere"])
def test_ses_bad_region_fails_without_a_request(fake: FakeEsp, settings: DeliveryConfig, region: str) -> None:
    outcome = ses.send(ses_target(region=region), MESSAGE, settings)
    assert outcome.status is DeliveryStatus.FAILED and "region" in outcome.text
    assert fake.requests == []


def test_ses_more_than_50_recipients_go_in_calls_of_50(fake: FakeEsp, settings: DeliveryConfig) -> None:
    crowd = Outgoing(
        uuid.uuid4(), "alice@example.com", tuple(f"u{i}@example.org" for i in range(120)), MESSAGE.data
    )
    outcome = ses.send(ses_target(), crowd, settings)
    assert outcome.status is DeliveryStatus.DELIVERED and outcome.retry_recipients == ()
    sent = [delivery.recipients for delivery in fake.messages("ses")]
    assert [len(chunk) for chunk in sent] == [50, 50, 20]
    assert sum(sent, ()) == crowd.recipients
    assert all(delivery.raw == MESSAGE.data for delivery in fake.messages("ses"))


def test_ses_a_later_call_refused_for_now_leaves_its_recipients_to_retry(
    fake: FakeEsp, settings: DeliveryConfig
) -> None:
    crowd = Outgoing(
        uuid.uuid4(), "alice@example.com", tuple(f"u{i}@example.org" for i in range(120)), MESSAGE.data
    )
    fake.queue(200, 429)
    outcome = ses.send(ses_target(), crowd, settings)
    assert outcome.status is DeliveryStatus.DELIVERED and "70 of 120 not sent" in outcome.text
    assert outcome.retry_recipients == crowd.recipients[50:]
    assert len(fake.requests) == 2  # it stops at the first refusal


def test_ses_the_first_call_refused_decides_for_the_whole_message(
    fake: FakeEsp, settings: DeliveryConfig
) -> None:
    crowd = Outgoing(
        uuid.uuid4(), "alice@example.com", tuple(f"u{i}@example.org" for i in range(60)), MESSAGE.data
    )
    fake.queue(503)
    outcome = ses.send(ses_target(), crowd, settings)
    assert (outcome.status, outcome.code, outcome.retry_recipients) == (DeliveryStatus.DEFERRED, 503, ())
    assert len(fake.requests) == 1


# -- answers -> outcomes ---------------------------------------------------------------------------

STATUSES = [
    (200, DeliveryStatus.DELIVERED),
    (202, DeliveryStatus.DELIVERED),
    (429, DeliveryStatus.DEFERRED),
    (500, DeliveryStatus.DEFERRED),
    (502, DeliveryStatus.DEFERRED),
    (503, DeliveryStatus.DEFERRED),
    (400, DeliveryStatus.FAILED),
    (401, DeliveryStatus.FAILED),
    (403, DeliveryStatus.FAILED),
    (413, DeliveryStatus.FAILED),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("status", "expected"), STATUSES)
def test_http_status_maps_to_the_outcome(
    fake: FakeEsp, settings: DeliveryConfig, provider: str, status: int, expected: DeliveryStatus
) -> None:
    fake.respond(status)
    send, _ = PROVIDERS[provider]
    outcome = send(settings)
    assert (outcome.status, outcome.code) == (expected, status)
    assert len(fake.requests) == 1 and fake.requests[0].valid


@pytest.mark.parametrize(
    ("error_type", "status", "expected"),
    [
        ("ThrottlingException", 400, DeliveryStatus.DEFERRED),
        ("SendingPausedException", 400, DeliveryStatus.DEFERRED),
        ("LimitExceededException", 400, DeliveryStatus.DEFERRED),
        ("TooManyRequestsException", 429, DeliveryStatus.DEFERRED),
        ("MessageRejected", 400, DeliveryStatus.FAILED),
        ("MailFromDomainNotVerifiedException", 400, DeliveryStatus.FAILED),
        ("AccountSuspendedException", 400, DeliveryStatus.FAILED),
    ],
)
def test_ses_error_type_decides_between_temporary_and_permanent(
    fake: FakeEsp, settings: DeliveryConfig, error_type: str, status: int, expected: DeliveryStatus
) -> None:
    fake.respond(
        status,
        {"message": "Maximum sending rate exceeded."},
        headers={"x-amzn-ErrorType": f"{error_type}:http://internal"},
    )
    outcome = ses.send(ses_target(), MESSAGE, settings)
    assert outcome[:3] == (expected, status, f"{error_type}: Maximum sending rate exceeded.")


def test_queued_answers_come_first_then_the_standing_one(fake: FakeEsp, settings: DeliveryConfig) -> None:
    fake.respond(503)
    fake.queue(429, 202)
    outcomes = [sendgrid.send(sendgrid_target(), MESSAGE, settings).code for _ in range(3)]
    assert outcomes == [429, 202, 503]
    assert len(fake.messages()) == 1


def test_redirects_are_not_followed(fake: FakeEsp, settings: DeliveryConfig) -> None:
    fake.respond(307, "moved", headers={"Location": f"{fake.url}/elsewhere/v3/mail/send"})
    outcome = sendgrid.send(sendgrid_target(), MESSAGE, settings)
    assert (outcome.status, outcome.code) == (DeliveryStatus.DEFERRED, 307)
    assert len(fake.requests) == 1


def test_wrong_api_key_is_a_permanent_failure(fake: FakeEsp, settings: DeliveryConfig) -> None:
    outcome = sendgrid.send(sendgrid_target(api_key="SG.wrong-key-123456"), MESSAGE, settings)
    assert (outcome.status, outcome.code) == (DeliveryStatus.FAILED, 401)
    outcome = mailgun.send(mailgun_target(api_key="key-wrong-123456"), MESSAGE, settings)
    assert (outcome.status, outcome.code) == (DeliveryStatus.FAILED, 401)
    assert [r.valid for r in fake.requests] == [False, False]


def test_connections_are_reused_between_messages(fake: FakeEsp, settings: DeliveryConfig) -> None:
    for _ in range(3):
        assert sendgrid.send(sendgrid_target(), MESSAGE, settings).delivered
    assert len({request.client for request in fake.requests}) == 1


# -- no answer at all ------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_connection_refused_is_deferred(provider: str) -> None:
    base = f"http://127.0.0.1:{closed_port()}"
    endpoints = {"sendgrid": base, "mailgun": base, "mailgun_eu": base, "ses": base}
    settings = config_from_dict({"delivery": {"endpoints": endpoints, "connect_timeout": 1}}, env={}).delivery
    send, secret = PROVIDERS[provider]
    outcome = send(settings)
    assert (outcome.status, outcome.code) == (DeliveryStatus.DEFERRED, None)
    assert outcome.text == f"connection refused by {base.removeprefix('http://')}"
    assert secret not in outcome.text


@pytest.mark.parametrize("provider", PROVIDERS)
def test_read_timeout_is_deferred(fake: FakeEsp, settings: DeliveryConfig, provider: str) -> None:
    fake.respond(200, delay=SEND_TIMEOUT * 6)
    send, secret = PROVIDERS[provider]
    started = time.monotonic()
    outcome = send(settings)
    assert time.monotonic() - started < SEND_TIMEOUT * 4
    assert outcome[:3] == (
        DeliveryStatus.DEFERRED,
        None,
        f"no answer from 127.0.0.1:{fake.port} within {SEND_TIMEOUT:g}s",
    )
    assert secret not in outcome.text
    # The provider may still accept it: a retry after a read timeout can deliver the message twice.
    assert len(fake.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tls_failure_is_deferred(fake: FakeEsp, provider: str) -> None:
    """https:// to a plain-HTTP port: the handshake fails, as with a bad certificate or a proxy in the way."""
    base = f"https://127.0.0.1:{fake.port}"
    endpoints = {"sendgrid": base, "mailgun": base, "mailgun_eu": base, "ses": base}
    settings = config_from_dict({"delivery": {"endpoints": endpoints, "send_timeout": 2}}, env={}).delivery
    send, secret = PROVIDERS[provider]
    outcome = send(settings)
    assert (outcome.status, outcome.code) == (DeliveryStatus.DEFERRED, None)
    assert outcome.text.startswith(f"TLS error with 127.0.0.1:{fake.port}: ")
    assert secret not in outcome.text
    assert fake.requests == []


# -- secrets ---------------------------------------------------------------------------------------


BASIC = base64.b64encode(f"api:{API_KEY}".encode()).decode()
# What each provider could echo back of the credentials it was sent.
ECHOES = {
    "sendgrid": (f"Authorization: Bearer {API_KEY}", [API_KEY]),
    "mailgun": (f"Authorization: Basic {BASIC} (api:{API_KEY})", [API_KEY, BASIC]),
    "ses": (f"secret {SES_SECRET_KEY}", [SES_SECRET_KEY]),
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("status", [202, 400, 503])
def test_secrets_echoed_by_the_provider_never_reach_the_outcome(
    fake: FakeEsp, settings: DeliveryConfig, provider: str, status: int
) -> None:
    echo, secrets = ECHOES[provider]
    body = {"message": echo, "errors": [{"message": echo}], "id": echo}
    fake.respond(status, body, headers={"X-Message-Id": echo})
    send, _ = PROVIDERS[provider]
    outcome = send(settings)
    assert outcome.code == status
    for secret in secrets:
        assert secret not in outcome.text
    assert http.REDACTED in outcome.text


# -- the fake itself: it must be able to say no -----------------------------------------------------


def test_fake_rejects_requests_outside_the_documented_formats(fake: FakeEsp) -> None:
    body = sendgrid.payload(MESSAGE)
    body["content"] = list(reversed(body["content"]))  # text/html before text/plain
    body["headers"] = {"Subject": "reserved"}
    answer = requests.post(
        f"{fake.url}/v3/mail/send", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
    )
    assert answer.status_code == 400
    problems = fake.requests[-1].problems
    assert any("text/plain and text/html" in p for p in problems)
    assert any("reserved header" in p for p in problems)

    answer = requests.post(
        f"{fake.url}/v3/mg.example.com/messages.mime",
        data={"to": "bob@example.org", "message": "not a file"},
        auth=("api", API_KEY),
        timeout=5,
    )
    assert answer.status_code == 400
    assert fake.requests[-1].problems

    assert fake.messages() == []
    http.close_session()
