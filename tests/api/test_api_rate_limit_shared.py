"""Two API instances share one rate limit through Redis (api.rate_limit_storage)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.api.conftest import ApiServer, Client
from tests.pgcluster import free_port


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1, stopped by its pid."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: ./scripts/test installs it"
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_instances_sharing_redis_share_one_limit_per_key(start_api, redis_url: str) -> None:
    first: ApiServer = start_api(rate_limit="4/minute", rate_limit_storage=redis_url)
    second: ApiServer = start_api(rate_limit="4/minute", rate_limit_storage=redis_url)
    tenant = first.tenant()  # counted against the first admin's key, not the tenant's
    on_first = Client(first.base_url, tenant.api_key)
    on_second = Client(second.base_url, tenant.api_key)
    codes = [on_first.get("/api/v1/providers").status_code for _ in range(2)]
    codes += [on_second.get("/api/v1/providers").status_code for _ in range(2)]
    assert codes == [200, 200, 200, 200]
    limited = on_second.get("/api/v1/providers")
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) > 0
    assert on_first.get("/api/v1/providers").status_code == 429  # the same count on the other instance
