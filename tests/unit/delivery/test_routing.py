"""Routing: conditions, priority order, weighted splits and the fall-through, with a seeded random source."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from smtp_proxy.delivery.routing import Envelope, Rule, matches, once_per_provider, plan

MESSAGE = Envelope(
    sender="app@shop.example.com",
    recipients=["a@gmail.com", "b@Corp.Example.org"],
    headers=[["Subject", "Your Invoice 42"], ["X-Campaign", "Spring-Sale"]],
)


def rule(name: str, priority: int = 0, **conditions: object) -> Rule:
    return Rule(id=name, priority=priority, conditions=conditions, provider_id=f"p-{name}")


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({}, True),
        ({"recipient_domains": ["gmail.com"]}, True),
        ({"recipient_domains": ["corp.example.org"]}, True),  # case-insensitive
        ({"recipient_domains": ["*.example.org"]}, True),
        ({"recipient_domains": ["example.org"]}, False),  # a wildcard is needed for subdomains
        ({"recipient_domains": ["yahoo.com", "hotmail.com"]}, False),
        ({"sender_domains": ["*.example.com"]}, True),
        ({"sender_domains": ["shop.example.com"]}, True),
        ({"sender_domains": ["example.com"]}, False),
        ({"headers": [{"name": "subject", "contains": "invoice"}]}, True),
        ({"headers": [{"name": "Subject", "contains": "receipt"}]}, False),
        ({"headers": [{"name": "X-Missing", "contains": "x"}]}, False),
        (
            {
                "headers": [
                    {"name": "Subject", "contains": "INVOICE"},
                    {"name": "x-campaign", "contains": "sale"},
                ]
            },
            True,
        ),
        ({"recipient_domains": ["gmail.com"], "sender_domains": ["other.com"]}, False),  # all must hold
        ({"weight": 50}, True),  # weight is not a condition
    ],
)
def test_conditions(conditions: dict[str, object], expected: bool) -> None:
    assert matches(conditions, MESSAGE) is expected


def test_null_sender_matches_no_sender_domain() -> None:
    bounce = Envelope(sender="", recipients=["a@gmail.com"], headers=[])
    assert not matches({"sender_domains": ["*.example.com"]}, bounce)
    assert matches({"recipient_domains": ["gmail.com"]}, bounce)


def test_priority_order_and_non_matching_rules_left_out() -> None:
    rules = [
        rule("backup", 20),
        rule("gmail", 5, recipient_domains=["gmail.com"]),
        rule("yahoo", 1, recipient_domains=["yahoo.com"]),
        rule("default", 10),
    ]
    order = plan(rules, MESSAGE, random.Random(1))
    assert [r.id for r in order] == ["gmail", "default", "backup"]


def test_no_matching_rule_gives_an_empty_plan() -> None:
    assert plan([rule("yahoo", 1, recipient_domains=["yahoo.com"])], MESSAGE, random.Random(1)) == []
    assert plan([], MESSAGE, random.Random(1)) == []


def test_equal_priorities_without_weights_split_evenly_and_keep_each_other_as_failover() -> None:
    rng = random.Random(7)
    firsts = Counter()
    for _ in range(4000):
        order = plan([rule("a", 1), rule("b", 1), rule("c", 2)], MESSAGE, rng)
        assert sorted(r.id for r in order[:2]) == ["a", "b"] and order[2].id == "c"
        firsts[order[0].id] += 1
    assert 0.45 < firsts["a"] / 4000 < 0.55


def test_weights_split_traffic_in_proportion() -> None:
    rng = random.Random(11)
    firsts = Counter(
        plan([rule("a", 1, weight=70), rule("b", 1, weight=30)], MESSAGE, rng)[0].id for _ in range(5000)
    )
    assert 0.67 < firsts["a"] / 5000 < 0.73


def test_weights_under_100_let_the_rest_fall_through_and_keep_the_passed_rule_last() -> None:
    rng = random.Random(3)
    firsts = Counter()
    for _ in range(5000):
        order = plan([rule("canary", 1, weight=10), rule("main", 2)], MESSAGE, rng)
        assert {r.id for r in order} == {"canary", "main"}  # both stay available for failover
        firsts[order[0].id] += 1
    assert 0.08 < firsts["canary"] / 5000 < 0.12


def test_a_lone_weighted_rule_still_takes_everything_when_nothing_else_matches() -> None:
    order = plan([rule("only", 1, weight=1)], MESSAGE, random.Random(5))
    assert [r.id for r in order] == ["only"]


def test_a_weight_stored_as_a_float_counts_like_the_integer() -> None:
    """JSON Schema takes 10.0 for an integer, so the API may store it that way."""
    rng = random.Random(9)
    firsts = Counter(
        plan([rule("canary", 1, weight=10.0), rule("main", 2)], MESSAGE, rng)[0].id for _ in range(5000)
    )
    assert 0.08 < firsts["canary"] / 5000 < 0.12


@pytest.mark.parametrize("weight", [None, True, "50", 0, 101, -5])
def test_a_weight_out_of_range_or_not_a_number_counts_as_full(weight: object) -> None:
    assert rule("r", 1, weight=weight).weight == 100


def test_once_per_provider_keeps_each_providers_first_rule_in_order() -> None:
    first, again, other = rule("a", 0), Rule("b", 1, {}, "p-a"), rule("c", 2)
    assert once_per_provider([first, again, other]) == [first, other]
    assert once_per_provider([]) == []
