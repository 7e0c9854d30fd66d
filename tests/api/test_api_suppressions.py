"""/api/v1/suppressions: list (paged, by reason), add, delete; normalised addresses; isolation; audit."""

from __future__ import annotations

import uuid
from datetime import timedelta

from smtp_proxy.db.types import utcnow
from smtp_proxy.storage import suppressions
from tests.api.conftest import ApiServer, Client

SUPPRESSIONS = "/api/v1/suppressions"


def add(client: Client, address: str, **extra: str) -> dict:
    response = client.post(SUPPRESSIONS, json={"address": address, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def bounce(api: ApiServer, account_id: str, address: str, at_minutes: int = 0) -> None:
    """A hard bounce as the worker writes it (no message behind it here)."""
    with api.database.transaction() as session:
        entry = suppressions.Bounce(address, None, 550, "5.1.1 no such user")
        now = utcnow() + timedelta(minutes=at_minutes)
        suppressions.add_bounces(session, uuid.UUID(account_id), None, [entry], now)


def test_add_normalises_get_and_delete_then_the_address_is_gone(api: ApiServer) -> None:
    tenant = api.tenant()
    created = add(tenant.client, "  John.Doe+News@Example.COM ")
    assert created["address"] == "john.doe+news@example.com"
    assert (created["reason"], created["account_id"], created["message_id"]) == ("manual", tenant.id, None)
    response = tenant.client.post(SUPPRESSIONS, json={"address": "JOHN.DOE+news@example.com"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
    assert tenant.client.get(f"{SUPPRESSIONS}/{created['id']}").json() == created
    assert tenant.client.delete(f"{SUPPRESSIONS}/{created['id']}").status_code == 204
    assert tenant.client.get(f"{SUPPRESSIONS}/{created['id']}").status_code == 404
    assert tenant.client.get(SUPPRESSIONS).json() == {"items": [], "next_cursor": None}


def test_bad_addresses_and_fields_are_422(api: ApiServer) -> None:
    client = api.tenant().client
    for body in ({"address": "no-at-sign"}, {"address": "a@nodot"}, {"address": "a b@example.com"}):
        response = client.post(SUPPRESSIONS, json=body)
        assert response.status_code == 422, body
        assert list(response.json()["error"]["fields"]) == ["address"]
    response = client.post(SUPPRESSIONS, json={"address": "a@example.com", "reason": "hard_bounce"})
    assert response.status_code == 422
    response = client.get(SUPPRESSIONS, params={"reason": "spam", "limit": "0"})
    assert response.status_code == 422 and set(response.json()["error"]["fields"]) == {"reason", "limit"}


def test_list_pages_newest_first_and_filters_by_reason(api: ApiServer) -> None:
    tenant = api.tenant()
    for n in range(3):
        bounce(api, tenant.id, f"bounced{n}@example.net", at_minutes=n - 10)
    manual = add(tenant.client, "manual@example.net")
    first = tenant.client.get(SUPPRESSIONS, params={"limit": "2"}).json()
    assert [i["address"] for i in first["items"]] == ["manual@example.net", "bounced2@example.net"]
    second = tenant.client.get(SUPPRESSIONS, params={"limit": "2", "cursor": first["next_cursor"]}).json()
    assert [i["address"] for i in second["items"]] == ["bounced1@example.net", "bounced0@example.net"]
    assert second["next_cursor"] is None
    bounced = tenant.client.get(SUPPRESSIONS, params={"reason": "hard_bounce"}).json()["items"]
    assert [i["address"] for i in bounced] == [f"bounced{n}@example.net" for n in (2, 1, 0)]
    assert bounced[0]["response_code"] == 550 and bounced[0]["response_text"] == "5.1.1 no such user"
    assert tenant.client.get(SUPPRESSIONS, params={"reason": "manual"}).json()["items"] == [manual]
    one = tenant.client.get(SUPPRESSIONS, params={"address": "Bounced1@EXAMPLE.net"}).json()["items"]
    assert [i["address"] for i in one] == ["bounced1@example.net"]


def test_a_tenant_sees_only_its_own_and_an_admin_acts_for_any_account(api: ApiServer) -> None:
    first, second = api.tenant(), api.tenant()
    mine = add(first.client, "someone@example.net")
    # The other tenant: not in its list, 404 by id and for delete, 404 naming the account.
    assert second.client.get(SUPPRESSIONS).json()["items"] == []
    assert second.client.get(f"{SUPPRESSIONS}/{mine['id']}").status_code == 404
    assert second.client.delete(f"{SUPPRESSIONS}/{mine['id']}").status_code == 404
    assert second.client.get(SUPPRESSIONS, params={"account_id": first.id}).status_code == 404
    response = second.client.post(SUPPRESSIONS, json={"address": "x@example.net", "account_id": first.id})
    assert response.status_code == 404
    # The same address on another account's list is no conflict.
    add(second.client, "someone@example.net")
    # The admin: any account's list by account_id, and by id.
    listed = api.admin.get(SUPPRESSIONS, params={"account_id": first.id}).json()["items"]
    assert listed == [mine]
    for_first = add(api.admin, "Other@Example.net", account_id=first.id)
    assert for_first["account_id"] == first.id
    assert {i["address"] for i in first.client.get(SUPPRESSIONS).json()["items"]} == {
        "someone@example.net",
        "other@example.net",
    }
    assert api.admin.delete(f"{SUPPRESSIONS}/{mine['id']}").status_code == 204
    missing = str(uuid.uuid4())
    assert api.admin.get(SUPPRESSIONS, params={"account_id": missing}).status_code == 404


def test_add_and_delete_are_audited_without_the_address(api: ApiServer) -> None:
    tenant = api.tenant()
    created = add(tenant.client, "audited@example.net")
    tenant.client.delete(f"{SUPPRESSIONS}/{created['id']}")
    entries = [
        e for e in tenant.client.get("/api/v1/audit-log").json()["items"] if e["entity"] == "suppression"
    ]
    assert [(e["action"], e["entity_id"], e["account_id"]) for e in entries] == [
        ("delete", created["id"], tenant.id),
        ("create", created["id"], tenant.id),
    ]
    assert entries[1]["fields"] == ["address", "reason"]
    assert "audited" not in str(entries)
