"""The fixture's server answers over real HTTP."""

from __future__ import annotations

from tests.api.conftest import ApiServer


def test_admin_and_tenant_see_accounts_over_http(served_api: ApiServer) -> None:
    api = served_api
    tenant = api.tenant()
    everyone = api.admin.get("/api/v1/accounts")
    assert everyone.status_code == 200
    assert {tenant.id, api.admin_id} <= {item["id"] for item in everyone.json()["items"]}
    mine = tenant.client.get("/api/v1/accounts")
    assert [item["id"] for item in mine.json()["items"]] == [tenant.id]
    assert mine.headers["X-Request-ID"]
