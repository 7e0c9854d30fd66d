"""Which providers a message tries, in which order: the tenant's routing rules applied.

Pure: rules and a message in, an ordered list of rules out; the caller passes
the random source, so every split is reproducible in tests.

A message tries the enabled rules whose conditions all hold, lowest priority
first. Within one priority, weights order the rules: a rule with weight ``w``
(1-100, 100 when absent) comes first with probability ``w / 100`` when the
weights add up to 100 or less, and ``w / sum`` otherwise. When the weights of
a priority add up to less than 100, the rest of the traffic falls through to
the next priority, and the rules passed over come last, as a final fallback
(a temporary failure everywhere else is the only way a message reaches them).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from smtp_proxy.smtp.addresses import domain_allowed

FULL_WEIGHT = 100


@dataclass(frozen=True)
class Rule:
    """One enabled rule with an enabled provider, as routing needs it."""

    id: Any
    priority: int
    conditions: Mapping[str, Any]
    provider_id: Any

    @property
    def weight(self) -> float:
        """1-100; absent (or not a number) is 100. The API accepts 30.0 as 30, so a float counts."""
        weight = self.conditions.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 1 <= weight <= FULL_WEIGHT:
            return FULL_WEIGHT
        return weight


@dataclass(frozen=True)
class Envelope:
    """What conditions look at: the envelope and the header fields as received."""

    sender: str
    recipients: Sequence[str]
    headers: Sequence[Sequence[str]]  # [name, value] pairs


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


def matches(conditions: Mapping[str, Any], envelope: Envelope) -> bool:
    """Whether every condition given holds; a rule without conditions matches everything."""
    wanted = conditions.get("recipient_domains")
    if wanted and not any(domain_allowed(_domain(r), wanted) for r in envelope.recipients):
        return False
    wanted = conditions.get("sender_domains")
    if wanted and not domain_allowed(_domain(envelope.sender), wanted):
        return False
    for header in conditions.get("headers") or ():
        name, text = str(header["name"]).lower(), str(header["contains"]).lower()
        if not any(n.lower() == name and text in v.lower() for n, v in envelope.headers):
            return False
    return True


def _weighted_order(rules: list[Rule], rng: random.Random) -> tuple[list[Rule], list[Rule]]:
    """One priority's rules: (the order to try them in, the rules the weights passed over)."""
    order: list[Rule] = []
    remaining = list(rules)
    total = sum(rule.weight for rule in remaining)
    # The share no rule takes falls through to the next priority.
    if rng.random() * max(total, FULL_WEIGHT) >= total:
        return [], remaining
    while remaining:
        point = rng.random() * sum(rule.weight for rule in remaining)
        for index, rule in enumerate(remaining):
            point -= rule.weight
            if point < 0 or index == len(remaining) - 1:
                order.append(remaining.pop(index))
                break
    return order, []


def plan(rules: Iterable[Rule], envelope: Envelope, rng: random.Random) -> list[Rule]:
    """The matching rules in the order to try them; empty when none matches."""
    ordered = sorted(rules, key=lambda rule: rule.priority)  # stable: ties keep the caller's order
    chosen: list[Rule] = []
    passed_over: list[Rule] = []
    for _priority, group in groupby(ordered, key=lambda rule: rule.priority):
        candidates = [rule for rule in group if matches(rule.conditions, envelope)]
        if candidates:
            first, rest = _weighted_order(candidates, rng)
            chosen += first
            passed_over += rest
    return chosen + passed_over


def once_per_provider(plan: Iterable[Rule]) -> list[Rule]:
    """The plan with each provider once, at its first place: two rules naming one provider try it once."""
    seen: set[Any] = set()
    kept: list[Rule] = []
    for rule in plan:
        if rule.provider_id not in seen:
            seen.add(rule.provider_id)
            kept.append(rule)
    return kept
