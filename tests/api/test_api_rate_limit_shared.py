"""Two API instances share one rate limit through Redis (api.rate_limit_storage)."""

from __future__ import annotations

from tests.api.conftest import ApiServer


def test_instances_sharing_redis_share_one_limit_per_key(start_api, redis_url: str) -> None:
    first: ApiServer = start_api(rate_limit="4/minute", rate_limit_storage=redis_url)
    second: ApiServer = start_api(rate_limit="4/minute", rate_limit_storage=redis_url)
    tenant = first.tenant()  # counted against the first admin's key, not the tenant's
    on_first = first.client(tenant.api_key)
    on_second = second.client(tenant.api_key)
    codes = [on_first.get("/api/v1/providers").status_code for _ in range(2)]
    codes += [on_second.get("/api/v1/providers").status_code for _ in range(2)]
    assert codes == [200, 200, 200, 200]
    limited = on_second.get("/api/v1/providers")
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) > 0
    assert on_first.get("/api/v1/providers").status_code == 429  # the same count on the other instance
