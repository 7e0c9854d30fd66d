"""/api/v1/webhooks: endpoints with a secret shown once, rotation, deliveries and redelivery, isolation."""

from __future__ import annotations

import uuid

from smtp_proxy.db.models import WebhookEndpoint
from smtp_proxy.db.types import utcnow
from smtp_proxy.storage import webhooks
from tests.api.conftest import ApiServer

WEBHOOKS = "/api/v1/webhooks"
URL = "https://hooks.example.net/in"
KEYS = {"id", "url", "events", "enabled", "previous_secret_expires_at", "created_at", "updated_at"}


def test_create_shows_the_secret_once_then_list_get_patch_delete(api: ApiServer) -> None:
    client = api.tenant().client
    created = client.post(WEBHOOKS, json={"url": URL, "events": ["message.failed", "message.delivered"]})
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == KEYS | {"secret"} and body["secret"].startswith("whsec_")
    assert body["events"] == ["message.delivered", "message.failed"] and body["enabled"] is True
    assert created.headers["Location"] == f"{WEBHOOKS}/{body['id']}"
    shown = client.get(f"{WEBHOOKS}/{body['id']}").json()
    assert set(shown) == KEYS and body["secret"] not in client.get(WEBHOOKS).text
    change = {"enabled": False, "events": ["message.deferred"]}
    patched = client.request("PATCH", f"{WEBHOOKS}/{body['id']}", json=change)
    assert patched.status_code == 200, patched.text
    assert (patched.json()["enabled"], patched.json()["events"]) == (False, ["message.deferred"])
    assert client.delete(f"{WEBHOOKS}/{body['id']}").status_code == 204
    assert client.get(f"{WEBHOOKS}/{body['id']}").status_code == 404
    assert client.get(WEBHOOKS).json() == {"items": []}


def test_bad_urls_events_and_fields_are_422(api: ApiServer) -> None:
    client = api.tenant().client
    for body in (
        {"url": "http://hooks.example.net/in", "events": ["message.failed"]},  # https required here
        {"url": "https://user:pw@hooks.example.net/", "events": ["message.failed"]},
        {"url": URL, "events": ["message.opened"]},
        {"url": URL, "events": []},
        {"url": URL},
        {"url": URL, "events": ["message.failed"], "secret": "mine"},
    ):
        response = client.post(WEBHOOKS, json=body)
        assert response.status_code == 422, (body, response.text)
    assert client.get(WEBHOOKS).json() == {"items": []}


def test_an_account_holds_at_most_ten(api: ApiServer) -> None:
    client = api.tenant().client
    for _ in range(10):
        assert client.post(WEBHOOKS, json={"url": URL, "events": ["message.failed"]}).status_code == 201
    refused = client.post(WEBHOOKS, json={"url": URL, "events": ["message.failed"]})
    assert refused.status_code == 422 and "at most 10" in refused.text


def test_rotation_returns_a_new_secret_and_keeps_the_old_one_valid_for_a_day(api: ApiServer) -> None:
    client = api.tenant().client
    created = client.post(WEBHOOKS, json={"url": URL, "events": ["message.failed"]}).json()
    rotated = client.post(f"{WEBHOOKS}/{created['id']}/rotate-secret")
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["secret"] != created["secret"]
    assert rotated.json()["previous_secret_expires_at"] is not None
    with api.database.transaction() as session:
        endpoint = session.get(WebhookEndpoint, uuid.UUID(created["id"]))
        assert webhooks.signing_secrets(api.cipher, endpoint, now=utcnow()) == [
            rotated.json()["secret"],
            created["secret"],
        ]
    api.database.remove_session()


def test_deliveries_are_listed_and_an_event_can_be_sent_again(api: ApiServer) -> None:
    tenant = api.tenant()
    created = tenant.client.post(WEBHOOKS, json={"url": URL, "events": ["message.failed"]}).json()
    with api.database.transaction() as session:
        event_id = webhooks.record_event(
            session, account_id=uuid.UUID(tenant.id), kind="message.failed", payload={"message_id": "m"}
        )
    api.database.remove_session()
    listed = tenant.client.get(f"{WEBHOOKS}/{created['id']}/deliveries").json()["items"]
    assert [(d["event_id"], d["type"], d["status"], d["attempts"]) for d in listed] == [
        (str(event_id), "message.failed", "pending", 0)
    ]
    again = tenant.client.post(f"{WEBHOOKS}/{created['id']}/deliveries/{event_id}/redeliver")
    assert again.status_code == 202 and again.json() == {"event_id": str(event_id), "status": "pending"}
    missing = tenant.client.post(f"{WEBHOOKS}/{created['id']}/deliveries/{uuid.uuid4()}/redeliver")
    assert missing.status_code == 404


def test_another_tenants_endpoint_is_not_found_whatever_the_call(api: ApiServer) -> None:
    owner, other = api.tenant(), api.tenant()
    created = owner.client.post(WEBHOOKS, json={"url": URL, "events": ["message.failed"]}).json()
    path = f"{WEBHOOKS}/{created['id']}"
    for response in (
        other.client.get(path),
        other.client.request("PATCH", path, json={"enabled": False}),
        other.client.delete(path),
        other.client.post(f"{path}/rotate-secret"),
        other.client.get(f"{path}/deliveries"),
        other.client.post(f"{path}/deliveries/{uuid.uuid4()}/redeliver"),
    ):
        assert response.status_code == 404, response.text
    assert other.client.get(WEBHOOKS).json() == {"items": []}
    assert owner.client.get(path).json()["enabled"] is True
