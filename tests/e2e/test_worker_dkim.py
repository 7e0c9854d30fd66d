"""DKIM signing at delivery: keys made through the API, messages through the real worker and providers,
signatures checked with dkimpy's verifier against the TXT record the API said to publish."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dkim as dkimpy
import pytest
from sqlalchemy import update

from smtp_proxy.api import create_app
from smtp_proxy.config import Config
from smtp_proxy.db.models import DkimKey, Message, MessageStatus, ProviderType
from smtp_proxy.db.session import Database
from smtp_proxy.storage import accounts
from smtp_proxy.storage.audit import CLI
from smtp_proxy.storage.messages import enqueue_message, message_body
from tests import fake_esp
from tests.e2e.test_worker import Queue, delivery_config, sink, start_worker  # noqa: F401
from tests.fake_esp import FakeEsp
from tests.smtp_sink import SmtpSink
from tests.waiting import wait_for

DOMAINS = ("example.com", "*.example.com", "example.org")


class Tenant(Queue):
    """A tenant with an API key, who makes DKIM keys through the API and queues messages of its own."""

    def __init__(self, config: Config) -> None:
        database = Database(config.database)
        with database.transaction() as session:
            created = accounts.create_account(
                session,
                name="signer",
                email="ops@example.com",
                allowed_domains=list(DOMAINS),
                bcrypt_cost=4,
                actor=CLI,
            )
        database.dispose()
        super().__init__(config, account_name="signer")
        self.app = create_app(config, self.database)
        self.headers = {"Authorization": f"Bearer {created.api_key}"}

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        with self.app.test_client() as client:
            response = client.open(f"/api/v1{path}", method=method, json=body, headers=self.headers)
        return response.status_code, response.get_json(silent=True)

    def dkim_key(self, domain: str, algorithm: str = "rsa-sha256", **extra: Any) -> dict[str, Any]:
        status, body = self.call("POST", "/dkim-keys", {"domain": domain, "algorithm": algorithm, **extra})
        assert status == 201, body
        return body

    def send(self, sender: str, to: str = "rcpt@example.net", subject: str = "hello") -> uuid.UUID:
        data = (
            f"From: App <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.com>\r\nDate: Thu, 10 Dec 2026 10:00:00 +0000\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n"
            "Line one.\r\n.a line that starts with a dot\r\n\r\n-- \r\nend\r\n"
        ).encode()
        with self.database.transaction() as session:
            return enqueue_message(
                session,
                self.cipher,
                account_id=self.account_id,
                sender=sender,
                recipients=[to],
                data=data,
                correlation_id=f"dkim-{uuid.uuid4().hex[:8]}",
            ).id

    def stored(self, message_id: uuid.UUID) -> bytes:
        with self.database.transaction() as session:
            body = message_body(self.cipher, session.get(Message, message_id))
        self.database.remove_session()
        return body

    def delivered(self, message_id: uuid.UUID) -> None:
        wait_for(
            lambda: self.message(message_id).status is MessageStatus.DELIVERED, what="delivered", timeout=20
        )


def published(*keys: dict[str, Any]) -> Callable[..., bytes | None]:
    """dkimpy's ``dnsfunc`` answering with the records the API told the tenant to publish."""
    records = {f"{key['dns_record']['name']}.".encode(): key["dns_record"]["value"].encode() for key in keys}
    return lambda name, timeout=5: records.get(name)


def signature_tags(data: bytes) -> dict[bytes, bytes]:
    signer = dkimpy.DKIM(data)
    (value,) = [v for name, v in signer.headers if name.lower() == b"dkim-signature"]
    return dict(
        (k.strip(), b"".join(v.split()))
        for k, _, v in (t.partition(b"=") for t in value.split(b";"))
        if k.strip()
    )


@pytest.fixture
def tenant(delivery_config: Callable[..., Config]) -> Iterator[Tenant]:  # noqa: F811
    made = Tenant(delivery_config())
    yield made
    made.database.dispose()


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_a_signed_message_verifies_after_the_smtp_provider_and_a_tampered_one_does_not(
    tenant: Tenant,
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
    algorithm: str,
) -> None:
    key = tenant.dkim_key("example.com", algorithm)
    tenant.rule(tenant.smtp_provider(sink, "sink"), 0)
    message_id = tenant.send("app@example.com")
    start_worker()
    (received,) = sink.wait_for(1, timeout=20)
    tenant.delivered(message_id)

    # Byte for byte: our signature field on top of the message as stored, nothing else changed.
    stored = tenant.stored(message_id)
    assert received.data.startswith(b"DKIM-Signature: ") and received.data.endswith(b"\r\n" + stored)
    tags = signature_tags(received.data)
    assert tags[b"a"] == algorithm.encode() and tags[b"c"] == b"relaxed/relaxed"
    assert (tags[b"d"], tags[b"s"]) == (b"example.com", key["selector"].encode())
    signed = tags[b"h"].split(b":")
    assert [signed.count(name) for name in (b"from", b"to", b"subject")] == [2, 2, 2]  # oversigned
    assert {b"date", b"message-id", b"content-type"} <= set(signed)

    dns = published(key)
    assert dkimpy.verify(received.data, dnsfunc=dns) is True
    assert dkimpy.verify(received.data.replace(b"Line one.", b"Line 1."), dnsfunc=dns) is False
    added_from = received.data.replace(b"\r\nFrom: ", b"\r\nFrom: <ceo@example.com>\r\nFrom: ", 1)
    assert dkimpy.verify(added_from, dnsfunc=dns) is False
    other = tenant.dkim_key("example.com", algorithm, selector="other")  # another key at the same name
    wrong_key = {"dns_record": {**key["dns_record"], "value": other["dns_record"]["value"]}}
    assert dkimpy.verify(received.data, dnsfunc=published(wrong_key)) is False


def test_a_subdomain_sender_is_signed_with_its_parent_domains_key(
    tenant: Tenant,
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    key = tenant.dkim_key("example.com", "ed25519-sha256")
    tenant.rule(tenant.smtp_provider(sink, "sink"), 0)
    message_id = tenant.send("news@mail.example.com")
    start_worker()
    (received,) = sink.wait_for(1, timeout=20)
    tenant.delivered(message_id)
    assert signature_tags(received.data)[b"d"] == b"example.com"
    assert dkimpy.verify(received.data, dnsfunc=published(key)) is True


def test_no_key_for_the_domain_or_a_disabled_key_sends_unsigned(
    tenant: Tenant,
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    key = tenant.dkim_key("example.com", "ed25519-sha256", enabled=False)
    tenant.rule(tenant.smtp_provider(sink, "sink"), 0)
    ids = [tenant.send("app@example.com"), tenant.send("app@example.org")]
    start_worker()
    received = sink.wait_for(2, timeout=20)
    for message_id in ids:
        tenant.delivered(message_id)
    assert sorted(r.data for r in received) == sorted(tenant.stored(i) for i in ids)  # as stored: unsigned
    assert key["enabled"] is False


def test_raw_http_providers_are_signed_sendgrid_is_not(tenant: Tenant, start_worker) -> None:  # noqa: F811
    key = tenant.dkim_key("example.com", "ed25519-sha256")
    with FakeEsp() as esp:
        sendgrid = tenant.provider("sg", ProviderType.SENDGRID, api_key=fake_esp.API_KEY)
        ses = tenant.provider(
            "ses", ProviderType.SES, api_key=fake_esp.SES_API_KEY, settings={"region": "eu-west-1"}
        )
        mailgun = tenant.provider(
            "mg", ProviderType.MAILGUN, api_key=fake_esp.API_KEY, settings={"domain": "mg.example.com"}
        )
        tenant.rule(sendgrid, 0, recipient_domains=["sg.example.net"])
        tenant.rule(ses, 1, recipient_domains=["ses.example.net"])
        tenant.rule(mailgun, 2, recipient_domains=["mg.example.net"])
        ids = [tenant.send("app@example.com", f"rcpt@{name}.example.net") for name in ("sg", "ses", "mg")]
        start_worker(endpoints=esp.endpoints())
        for message_id in ids:
            tenant.delivered(message_id)
        (to_ses,) = esp.messages("ses")
        (to_mailgun,) = esp.messages("mailgun")
        (to_sendgrid,) = esp.messages("sendgrid")
        assert esp.invalid() == []
    dns = published(key)
    for delivery, message_id in ((to_ses, ids[1]), (to_mailgun, ids[2])):
        assert delivery.raw is not None and delivery.raw.endswith(b"\r\n" + tenant.stored(message_id))
        assert dkimpy.verify(delivery.raw, dnsfunc=dns) is True
    assert b"dkim" not in to_sendgrid.request.body.lower()
    assert to_sendgrid.sender == "app@example.com"


def test_a_key_that_cannot_sign_sends_the_message_unsigned(
    tenant: Tenant,
    sink: SmtpSink,  # noqa: F811
    start_worker,  # noqa: F811
) -> None:
    """A key that does not load (here: sealed garbage) must not hold the message: it goes out as stored."""
    key = tenant.dkim_key("example.com", "rsa-sha256")
    key_id = uuid.UUID(key["id"])
    garbage = tenant.cipher.encrypt(
        b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END", b"dkim_keys.private_key:" + key_id.bytes
    )
    with tenant.database.transaction() as session:
        session.execute(update(DkimKey).where(DkimKey.id == key_id).values(private_key_encrypted=garbage))
    tenant.rule(tenant.smtp_provider(sink, "sink"), 0)
    message_id = tenant.send("app@example.com")
    start_worker()
    (received,) = sink.wait_for(1, timeout=20)
    tenant.delivered(message_id)
    assert received.data == tenant.stored(message_id)
