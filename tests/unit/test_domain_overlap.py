"""validation.patterns_overlap: two patterns overlap exactly when some domain is allowed by both.

"Allowed" is what smtp.addresses.domain_allowed says, the check the listener makes at MAIL FROM;
the tests hold the two functions to each other on a set of names.
"""

from __future__ import annotations

import itertools

import pytest

from smtp_proxy.smtp.addresses import domain_allowed
from smtp_proxy.validation import first_overlap, patterns_overlap

OVERLAPPING = [
    ("a.com", "a.com"),
    ("*.a.com", "*.a.com"),
    ("*.a.com", "b.a.com"),
    ("*.a.com", "c.b.a.com"),  # any depth
    ("*.a.com", "*.b.a.com"),
    ("*.a.com", "*.c.b.a.com"),
    ("A.Com", "a.com"),  # case
    ("a.com.", "a.com"),  # a trailing dot
    ("*.A.COM.", "B.a.com"),
    (" a.com ", "a.com"),
]
DISJOINT = [
    ("a.com", "b.com"),
    ("*.a.com", "a.com"),  # a wildcard covers subdomains only, never the domain itself
    ("*.a.com", "xa.com"),  # not a label boundary
    ("*.a.com", "*.xa.com"),
    ("*.a.com", "a.com.evil.net"),
    ("*.b.a.com", "a.com"),
    ("*.b.a.com", "c.a.com"),
    ("*.b.a.com", "*.c.a.com"),
    ("b.a.com", "c.a.com"),
]


@pytest.mark.parametrize(("first", "second"), OVERLAPPING)
def test_overlapping_patterns_overlap_either_way_round(first: str, second: str) -> None:
    assert patterns_overlap(first, second)
    assert patterns_overlap(second, first)


@pytest.mark.parametrize(("first", "second"), DISJOINT)
def test_disjoint_patterns_do_not_overlap_either_way_round(first: str, second: str) -> None:
    assert not patterns_overlap(first, second)
    assert not patterns_overlap(second, first)


PATTERNS = sorted({p.strip().lower().rstrip(".") for pair in OVERLAPPING + DISJOINT for p in pair})
# Witnesses: each pattern's base name and a name one label below it. If two patterns overlap, one
# of these is covered by both (an exact name itself; for two wildcards, a name under the deeper base).
NAMES = sorted({name for p in PATTERNS for name in (p.removeprefix("*."), "w." + p.removeprefix("*."))})


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations_with_replacement(PATTERNS, 2)))
def test_overlap_agrees_with_what_domain_allowed_lets_through(first: str, second: str) -> None:
    # A shared name proves an overlap; every overlap has a witness among NAMES.
    shared = [name for name in NAMES if domain_allowed(name, [first]) and domain_allowed(name, [second])]
    assert patterns_overlap(first, second) == bool(shared), shared


def test_first_overlap_names_the_wanted_and_the_held_pattern() -> None:
    assert first_overlap(["new.example", "b.a.com"], ["x.org", "*.a.com"]) == ("b.a.com", "*.a.com")
    assert first_overlap(["a.com"], ["*.a.com", "b.com"]) is None
    assert first_overlap([], ["a.com"]) is None
    assert first_overlap(["a.com"], []) is None
