"""``/readyz`` is 503 naming the problem while the database's schema is behind the code, ready at once
after ``db upgrade``, and then one ``SELECT 1`` per probe: a current schema is not asked again."""

from __future__ import annotations

import pytest
from sqlalchemy import event

from smtp_proxy.api import create_app
from smtp_proxy.db.migrate import head_revision, upgrade
from smtp_proxy.db.session import Database, safe_url
from tests.api.conftest import close_counters


@pytest.mark.parametrize("revision", [None, "0008"], ids=["empty", "older"])
def test_readyz_names_a_schema_behind_until_it_is_upgraded(
    unmigrated_pg_url, make_config, revision: str | None
) -> None:
    config = make_config(unmigrated_pg_url(revision))
    database = Database(config.database)
    app = create_app(config, database)
    client = app.test_client()
    try:
        behind = client.get("/readyz")
        assert behind.status_code == 503
        assert behind.headers["Retry-After"].isdigit()
        head = head_revision()
        assert behind.get_json() == {
            "status": "not ready",
            "database": "ok",
            "schema": "behind",
            "revision": revision,
            "head": head,
            "error": {
                "code": "database_not_migrated",
                "message": f"the database at {safe_url(database.engine)} is not migrated (revision "
                f"{revision or 'none'}, this version needs {head}): run smtp-proxy db upgrade",
            },
        }

        upgrade(database.engine)  # what `smtp-proxy db upgrade` runs; the schema behind was asked again
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.get_json() == {"status": "ready", "database": "ok", "schema": "current"}

        statements: list[str] = []
        event.listen(database.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        for _ in range(3):
            assert client.get("/readyz").status_code == 200
        assert statements == ["SELECT 1"] * 3
    finally:
        close_counters(app)
        database.dispose()
