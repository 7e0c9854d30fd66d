"""/api/v1/routing-rules over real HTTP: priority order, conditions, own providers only, tenant isolation."""

from __future__ import annotations

import json
import uuid
from typing import Any

from smtp_proxy.db.models import RoutingRule
from tests.api.checks import assert_error, assert_invalid, field_error
from tests.api.conftest import ApiServer, Client

RULES = "/api/v1/routing-rules"
PROVIDERS = "/api/v1/providers"
JSON = {"Content-Type": "application/json"}


def make_provider(client: Client, name: str = "sendgrid-main") -> str:
    body = {"name": name, "provider_type": "sendgrid", "api_key": f"SG.key-for-{name}"}
    response = client.post(PROVIDERS, json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def rule(provider_id: str, name: str = "default", priority: int = 10, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider_id": provider_id, "priority": priority, **extra}


def create(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(RULES, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def listed(client: Client) -> list[dict[str, Any]]:
    response = client.get(RULES)
    assert response.status_code == 200, response.text
    return response.json()["items"]


# --- CRUD -----------------------------------------------------------------------------------------------


def test_create_get_list_update_delete(api: ApiServer) -> None:
    tenant = api.tenant()
    first, second = make_provider(tenant.client, "first"), make_provider(tenant.client, "second")
    conditions = {
        "recipient_domains": ["example.com", "*.example.org"],
        "sender_domains": ["mail.example.net"],
        "headers": [{"name": "X-Campaign", "contains": "newsletter"}],
        "weight": 50,
    }
    response = tenant.client.post(
        RULES, json=rule(first, "newsletters", 5, conditions=conditions, enabled=False)
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["Location"] == f"{RULES}/{created['id']}"
    assert uuid.UUID(created["id"])
    assert created["name"] == "newsletters"
    assert created["provider_id"] == first
    assert created["priority"] == 5
    assert created["conditions"] == conditions
    assert created["enabled"] is False
    assert created["created_at"] and created["updated_at"]

    # Left out: enabled defaults to true, conditions to none.
    minimal = create(tenant.client, rule(first, "catch-all", 100))
    assert minimal["enabled"] is True
    assert minimal["conditions"] == {}

    path = f"{RULES}/{created['id']}"
    assert tenant.client.get(path).json() == created
    assert listed(tenant.client) == [created, minimal]

    changes = {
        "name": "renamed",
        "priority": 7,
        "enabled": True,
        "provider_id": second,
        "conditions": {"weight": 100},
    }
    response = tenant.client.put(path, json=changes)
    assert response.status_code == 200, response.text
    updated = response.json()
    assert {key: updated[key] for key in changes} == changes
    assert updated["id"] == created["id"]
    assert updated["created_at"] == created["created_at"]
    assert tenant.client.get(path).json() == updated

    # A partial update leaves the other fields alone.
    response = tenant.client.put(path, json={"enabled": False})
    assert response.status_code == 200, response.text
    assert response.json() == {**updated, "enabled": False, "updated_at": response.json()["updated_at"]}

    response = tenant.client.delete(path)
    assert response.status_code == 204
    assert response.content == b""
    assert_error(tenant.client.get(path), 404, "not_found")
    assert_error(tenant.client.put(path, json={"enabled": True}), 404, "not_found")
    assert_error(tenant.client.delete(path), 404, "not_found")
    assert listed(tenant.client) == [minimal]


def test_list_ordered_by_priority_ascending(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    ids = {}
    for name, priority in (("p30", 30), ("p0", 0), ("p10-first", 10), ("p20", 20), ("p10-second", 10)):
        ids[name] = create(tenant.client, rule(provider, name, priority))["id"]
    create(tenant.client, rule(provider, "max", 2147483647))
    assert [item["name"] for item in listed(tenant.client)] == [
        "p0",
        "p10-first",
        "p10-second",
        "p20",
        "p30",
        "max",
    ]
    # A new priority moves the rule.
    assert tenant.client.put(f"{RULES}/{ids['p30']}", json={"priority": 1}).status_code == 200
    assert tenant.client.put(f"{RULES}/{ids['p0']}", json={"priority": 25}).status_code == 200
    items = listed(tenant.client)
    assert [item["name"] for item in items] == ["p30", "p10-first", "p10-second", "p20", "p0", "max"]
    assert [item["priority"] for item in items] == [1, 10, 10, 20, 25, 2147483647]


def test_missing_and_unknown_fields_are_422(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    full = rule(provider)
    cases: list[tuple[dict[str, Any], str]] = [
        ({k: v for k, v in full.items() if k != "name"}, "name"),
        ({k: v for k, v in full.items() if k != "provider_id"}, "provider_id"),
        ({k: v for k, v in full.items() if k != "priority"}, "priority"),
        ({**full, "name": ""}, "name"),
        ({**full, "name": "n" * 101}, "name"),
        ({**full, "enabled": "true"}, "enabled"),
        ({**full, "account_id": str(uuid.uuid4())}, "account_id"),
        ({**full, "id": str(uuid.uuid4())}, "id"),
        ({**full, "conditions": []}, "conditions"),
        ({**full, "conditions": "example.com"}, "conditions"),
    ]
    failures = []
    for body, field in cases:
        problem = field_error(tenant.client.post(RULES, json=body), field)
        if problem:
            failures.append(f"{json.dumps(body)} -> {problem}")
    assert not failures, "\n".join(failures)
    assert listed(tenant.client) == []

    existing = create(tenant.client, full)
    path = f"{RULES}/{existing['id']}"
    for change, field in (({}, "body"), ({"colour": "blue"}, "colour"), ({"name": None}, "name")):
        problem = field_error(tenant.client.put(path, json=change), field)
        if problem:
            failures.append(f"PUT {json.dumps(change)} -> {problem}")
    assert not failures, "\n".join(failures)
    assert tenant.client.get(path).json() == existing


# --- priority -------------------------------------------------------------------------------------------

BAD_PRIORITIES: list[Any] = [-1, "1", 1.5, True, False, None, 2147483648, [1], {"value": 1}]


def test_invalid_priority_is_422(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    failures = []
    for priority in BAD_PRIORITIES:
        problem = field_error(tenant.client.post(RULES, json=rule(provider, priority=priority)), "priority")
        if problem:
            failures.append(f"create {priority!r} -> {problem}")
    assert listed(tenant.client) == []

    existing = create(tenant.client, rule(provider, priority=0))
    path = f"{RULES}/{existing['id']}"
    for priority in BAD_PRIORITIES:
        problem = field_error(tenant.client.put(path, json={"priority": priority}), "priority")
        if problem:
            failures.append(f"update {priority!r} -> {problem}")
    assert not failures, "\n".join(failures)
    assert tenant.client.get(path).json() == existing


# --- provider_id ----------------------------------------------------------------------------------------


def test_provider_of_another_tenant_is_422_like_an_unknown_one(api: ApiServer) -> None:
    alice, bob = api.tenant(), api.tenant()
    alices_provider = make_provider(alice.client, "alice-provider")
    bobs_provider = make_provider(bob.client, "bob-provider")

    foreign = alice.client.post(RULES, json=rule(bobs_provider))
    unknown = alice.client.post(RULES, json=rule(str(uuid.uuid4())))
    assert_invalid(foreign, "provider_id")
    assert_invalid(unknown, "provider_id")
    # Bob's provider is exactly as unknown to Alice as a random id: nothing tells it exists.
    assert foreign.json() == unknown.json()
    assert bobs_provider not in foreign.text
    assert "bob-provider" not in foreign.text
    assert set(foreign.json()["error"]["fields"]) == {"provider_id"}
    assert listed(alice.client) == []
    assert listed(bob.client) == []

    existing = create(alice.client, rule(alices_provider))
    path = f"{RULES}/{existing['id']}"
    foreign = alice.client.put(path, json={"provider_id": bobs_provider})
    unknown = alice.client.put(path, json={"provider_id": str(uuid.uuid4())})
    assert_invalid(foreign, "provider_id")
    assert_invalid(unknown, "provider_id")
    assert foreign.json() == unknown.json()
    assert alice.client.get(path).json() == existing

    # Bob's provider is untouched and carries no rule of Alice's.
    assert bob.client.get(f"{PROVIDERS}/{bobs_provider}").json()["name"] == "bob-provider"
    assert listed(bob.client) == []
    with api.database.transaction() as session:
        attached = session.query(RoutingRule).filter_by(provider_id=uuid.UUID(bobs_provider)).count()
    api.database.remove_session()
    assert attached == 0


def test_malformed_provider_id_is_422(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    bad_ids: list[Any] = [
        "not-a-uuid",
        "",
        "1' OR '1'='1",
        uuid.UUID(provider).hex,
        f"{{{provider}}}",
        f"{provider}0",
        provider[:-1],
        42,
        None,
        [provider],
    ]
    failures = []
    for bad in bad_ids:
        problem = field_error(tenant.client.post(RULES, json=rule(bad)), "provider_id")
        if problem:
            failures.append(f"create {bad!r} -> {problem}")
    existing = create(tenant.client, rule(provider))
    for bad in bad_ids:
        problem = field_error(
            tenant.client.put(f"{RULES}/{existing['id']}", json={"provider_id": bad}), "provider_id"
        )
        if problem:
            failures.append(f"update {bad!r} -> {problem}")
    assert not failures, "\n".join(failures)
    assert listed(tenant.client) == [existing]
    # An upper-case spelling of a valid id is the same id.
    upper = create(tenant.client, rule(provider.upper(), "upper"))
    assert upper["provider_id"] == provider


# --- conditions -----------------------------------------------------------------------------------------

BAD_CONDITIONS: list[tuple[dict[str, Any], str]] = [
    ({"unknown": 1}, "conditions.unknown"),
    ({"weight": 0}, "conditions.weight"),
    ({"weight": 101}, "conditions.weight"),
    ({"weight": -5}, "conditions.weight"),
    ({"weight": "50"}, "conditions.weight"),
    ({"weight": 50.5}, "conditions.weight"),
    ({"weight": True}, "conditions.weight"),
    ({"headers": [{"name": "X-Campaign"}]}, "conditions.headers.0.contains"),
    ({"headers": [{"contains": "x"}]}, "conditions.headers.0.name"),
    ({"headers": [{"name": "X-Campaign", "contains": ""}]}, "conditions.headers.0.contains"),
    ({"headers": [{"name": "X:Campaign", "contains": "x"}]}, "conditions.headers.0.name"),
    ({"headers": [{"name": "X Campaign", "contains": "x"}]}, "conditions.headers.0.name"),
    ({"headers": [{"name": "", "contains": "x"}]}, "conditions.headers.0.name"),
    ({"headers": [{"name": "X-Ünicode", "contains": "x"}]}, "conditions.headers.0.name"),
    (
        {"headers": [{"name": "X-Ok", "contains": "x"}, {"name": "Bad:Name", "contains": "x"}]},
        "conditions.headers.1.name",
    ),
    ({"headers": [{"name": "X-Ok", "contains": "x", "regex": ".*"}]}, "conditions.headers.0.regex"),
    ({"headers": {"name": "X-Ok", "contains": "x"}}, "conditions.headers"),
    ({"recipient_domains": ["not a domain"]}, "conditions.recipient_domains"),
    ({"recipient_domains": ["example.com", "-bad-.example"]}, "conditions.recipient_domains"),
    ({"recipient_domains": ["localhost"]}, "conditions.recipient_domains"),
    ({"recipient_domains": ["example.123"]}, "conditions.recipient_domains"),
    ({"recipient_domains": ["*.*.example.com"]}, "conditions.recipient_domains"),
    ({"recipient_domains": ["user@example.com"]}, "conditions.recipient_domains"),
    ({"recipient_domains": ["exa_mple.com"]}, "conditions.recipient_domains"),
    ({"recipient_domains": "example.com"}, "conditions.recipient_domains"),
    ({"recipient_domains": [5]}, "conditions.recipient_domains.0"),
    ({"sender_domains": ["bad domain.example"]}, "conditions.sender_domains"),
    ({"sender_domains": ["'; DROP TABLE routing_rules; --"]}, "conditions.sender_domains"),
]


def test_invalid_conditions_name_the_nested_field(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    existing = create(tenant.client, rule(provider, conditions={"weight": 10}))
    failures = []
    for conditions, field in BAD_CONDITIONS:
        response = tenant.client.post(RULES, json=rule(provider, "bad", conditions=conditions))
        problem = field_error(response, field)
        if problem:
            failures.append(f"create {json.dumps(conditions)} -> {problem}")
        response = tenant.client.put(f"{RULES}/{existing['id']}", json={"conditions": conditions})
        problem = field_error(response, field)
        if problem:
            failures.append(f"update {json.dumps(conditions)} -> {problem}")
    assert not failures, "\n".join(failures)
    assert listed(tenant.client) == [existing]


def test_valid_condition_bounds(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    for weight in (1, 100):
        assert create(tenant.client, rule(provider, f"w{weight}", conditions={"weight": weight}))[
            "conditions"
        ] == {"weight": weight}
    headers = [{"name": "X-Mailer~!#$%&'*+.^_`|", "contains": '\'; DROP TABLE x; -- %s "ü"'}]
    created = create(tenant.client, rule(provider, "headers", conditions={"headers": headers}))
    assert created["conditions"] == {"headers": headers}
    assert tenant.client.get(f"{RULES}/{created['id']}").json()["conditions"] == {"headers": headers}


def test_domain_patterns_are_normalised(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    conditions = {
        "recipient_domains": [
            "Example.COM",
            "bücher.example",
            "*.Sub.Example.ORG",
            "example.com",
            "trailing.example.",
        ],
        "sender_domains": ["*.BÜCHER.example", "xn--bcher-kva.example", "例え.テスト"],
        "weight": 30,
    }
    created = create(tenant.client, rule(provider, conditions=conditions))
    expected = {
        "recipient_domains": [
            "example.com",
            "xn--bcher-kva.example",
            "*.sub.example.org",
            "trailing.example",
        ],
        "sender_domains": ["*.xn--bcher-kva.example", "xn--bcher-kva.example", "xn--r8jz45g.xn--zckzah"],
        "weight": 30,
    }
    assert created["conditions"] == expected
    assert tenant.client.get(f"{RULES}/{created['id']}").json()["conditions"] == expected

    response = tenant.client.put(
        f"{RULES}/{created['id']}", json={"conditions": {"sender_domains": ["MAIL.Example.NET"]}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["conditions"] == {"sender_domains": ["mail.example.net"]}
    assert listed(tenant.client)[0]["conditions"] == {"sender_domains": ["mail.example.net"]}


# --- tenant isolation -----------------------------------------------------------------------------------


def test_other_tenants_rule_is_404_and_untouched(api: ApiServer) -> None:
    owner, intruder = api.tenant(), api.tenant()
    provider = make_provider(owner.client)
    intruders_provider = make_provider(intruder.client)
    existing = create(owner.client, rule(provider, "owners-rule", conditions={"weight": 5}))
    path = f"{RULES}/{existing['id']}"
    unknown = assert_error(owner.client.get(f"{RULES}/{uuid.uuid4()}"), 404, "not_found")

    for response in (
        intruder.client.get(path),
        intruder.client.put(path, json={"name": "hijacked"}),
        intruder.client.put(path, json={"provider_id": intruders_provider}),
        intruder.client.put(path, json={"priority": 0, "enabled": False}),
        intruder.client.delete(path),
    ):
        error = assert_error(response, 404, "not_found")
        assert error == unknown
        assert "owners-rule" not in response.text
    assert listed(intruder.client) == []
    assert owner.client.get(path).json() == existing
    assert listed(owner.client) == [existing]


def test_unknown_and_malformed_rule_ids_are_404(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    existing = create(tenant.client, rule(provider))
    for path in (f"{RULES}/{uuid.uuid4()}", f"{RULES}/not-a-uuid", f"{RULES}/1%27%20OR%20%271%27=%271"):
        assert_error(tenant.client.get(path), 404, "not_found")
        assert_error(tenant.client.put(path, json={"enabled": False}), 404, "not_found")
        assert_error(tenant.client.delete(path), 404, "not_found")
    # A provider's id is not a rule's.
    assert_error(tenant.client.get(f"{RULES}/{provider}"), 404, "not_found")
    assert listed(tenant.client) == [existing]


def test_deleting_a_provider_deletes_its_rules(api: ApiServer) -> None:
    tenant = api.tenant()
    doomed, kept = make_provider(tenant.client, "doomed"), make_provider(tenant.client, "kept")
    doomed_rules = [create(tenant.client, rule(doomed, f"doomed-{i}", i)) for i in range(3)]
    survivor = create(tenant.client, rule(kept, "survivor", 1))

    assert tenant.client.delete(f"{PROVIDERS}/{doomed}").status_code == 204
    for gone in doomed_rules:
        assert_error(tenant.client.get(f"{RULES}/{gone['id']}"), 404, "not_found")
        assert_error(tenant.client.put(f"{RULES}/{gone['id']}", json={"provider_id": kept}), 404, "not_found")
    assert listed(tenant.client) == [survivor]
    assert tenant.client.get(f"{RULES}/{survivor['id']}").json() == survivor
    with api.database.transaction() as session:
        remaining = session.query(RoutingRule).filter_by(provider_id=uuid.UUID(doomed)).count()
    api.database.remove_session()
    assert remaining == 0
    # The deleted provider cannot be used for a new rule either.
    assert_invalid(tenant.client.post(RULES, json=rule(doomed)), "provider_id")


# --- hostile input and bodies ---------------------------------------------------------------------------

HOSTILE_NAMES = [
    "x'; DROP TABLE routing_rules; --",
    'quote " double',
    "%s %(name)s {0}",
    "Zürich 東京 🚀",
    "\u202eright-to-left",
    "back\\slash",
]


def test_hostile_names_are_stored_and_returned_literally(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    for priority, name in enumerate(HOSTILE_NAMES):
        created = create(tenant.client, rule(provider, name, priority))
        assert created["name"] == name
        assert tenant.client.get(f"{RULES}/{created['id']}").json()["name"] == name
    assert [item["name"] for item in listed(tenant.client)] == HOSTILE_NAMES
    assert listed(api.tenant().client) == []


def test_nul_character_in_a_text_field_is_a_field_error(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    cases = [
        (
            rule(provider, "nul\u0000name"),
            "name",
        ),  # psycopg2: ValueError, a string literal cannot contain NUL
        (
            rule(provider, conditions={"headers": [{"name": "X-Tag", "contains": "a\u0000b"}]}),
            "conditions.headers.0.contains",  # jsonb: unsupported Unicode escape sequence
        ),
    ]
    failures = []
    for body, field in cases:
        problem = field_error(tenant.client.post(RULES, json=body), field)
        if problem:
            failures.append(f"{field}: {problem}")
    assert not failures, "\n".join(failures)


def test_bad_bodies_are_400_415_413(api: ApiServer) -> None:
    tenant = api.tenant()
    provider = make_provider(tenant.client)
    existing = create(tenant.client, rule(provider))
    path = f"{RULES}/{existing['id']}"
    for data in (b"{", b"[]", b"", b"null"):
        assert_error(tenant.client.post(RULES, data=data, headers=JSON), 400, "bad_request")
        assert_error(tenant.client.put(path, data=data, headers=JSON), 400, "bad_request")
    payload = json.dumps(rule(provider, "other"))
    assert_error(
        tenant.client.post(RULES, data=payload, headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(tenant.client.put(path, data='{"priority": 1}'), 415, "unsupported_media_type")
    big = json.dumps(
        rule(provider, "big", conditions={"headers": [{"name": "X", "contains": "y" * (65 * 1024)}]})
    )
    assert_error(tenant.client.post(RULES, data=big, headers=JSON), 413, "payload_too_large")
    assert listed(tenant.client) == [existing]
