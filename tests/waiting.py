"""Waiting for a condition that another thread or process brings about, for tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 5.0, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    Raises AssertionError naming ``what`` when ``timeout`` seconds pass first, so a test
    cannot forget to check the outcome.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
