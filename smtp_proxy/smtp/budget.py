"""The listener's budget for message bytes held in memory (``max_data_in_flight``).

The protocol core takes from it as it keeps DATA and gives back what it drops; the adapter
gives back a stored message's bytes (``MessageReceived.held``). It lives outside the core
because it holds a lock: one object is shared by every session thread of a listener.
"""

from __future__ import annotations

import threading

__all__ = ["InFlightBudget"]


class InFlightBudget:
    """A thread-safe byte budget; satisfies ``smtp_proxy.smtp.protocol.DataBudget``."""

    __slots__ = ("_limit", "_held", "_lock")

    def __init__(self, limit: int) -> None:
        """Raises ValueError for a limit below one byte (no budget at all is ``None``)."""
        if limit < 1:
            raise ValueError(f"the in-flight limit must be positive, not {limit}")
        self._limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        """A new limit (a config reload); bytes already held stay held, new takes see the new limit."""
        if limit < 1:
            raise ValueError(f"the in-flight limit must be positive, not {limit}")
        with self._lock:
            self._limit = limit

    @property
    def held(self) -> int:
        return self._held

    def take(self, size: int) -> bool:
        """Take ``size`` bytes if they all fit under the limit; nothing is taken otherwise."""
        with self._lock:
            if self._held + size > self._limit:
                return False
            self._held += size
            return True

    def give(self, size: int) -> None:
        """Give back bytes taken before.

        Giving back more than is held would be a caller's bug; the count stops at zero
        rather than let later takes exceed the limit.
        """
        with self._lock:
            self._held = max(0, self._held - size)
