"""glibc malloc tuning for the long-running listeners.

A listener holds thousands of session threads. Left alone, glibc gives
threads up to eight malloc arenas per core, and the memory a burst of
sessions freed stays in the process (as fragments of those arenas) long after
the burst. ``limit_arenas`` caps the arenas; ``FreeMemoryReleaser`` hands
free pages back to the kernel with ``malloc_trim`` when the listener has gone
quiet. Both do nothing on a C library without these calls (musl, macOS).
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Callable

M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h


def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


_mallopt = _libc_function("mallopt")
_malloc_trim = _libc_function("malloc_trim")


def limit_arenas(count: int) -> bool:
    """Let all threads share at most ``count`` malloc arenas; True when applied.

    Call it before the session threads start: arenas that exist already stay.
    """
    return bool(_mallopt and _mallopt(M_ARENA_MAX, count) == 1)


def freeze_startup_objects() -> None:
    """Keep everything made at startup out of the collector's full passes.

    Modules, the config, the engine and the app live as long as the process;
    without this a full collection walks them all while every request or
    session waits for the GIL (a latency spike under load).
    """
    gc.collect()
    gc.freeze()


def release_free_memory() -> bool:
    """Collect cyclic garbage, then return free heap pages to the kernel; True when some were."""
    gc.collect()
    return bool(_malloc_trim and _malloc_trim(0) == 1)


class FreeMemoryReleaser:
    """Calls ``release_free_memory`` when asked, at most once per ``interval`` seconds.

    A full collection and ``malloc_trim`` (which walks every arena under its
    lock) take a few milliseconds, so they run when the listener has gone
    quiet, not per session. ctypes drops the GIL for the trim.
    """

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last = float("-inf")

    def __call__(self) -> bool:
        now = self._clock()
        with self._lock:
            if now - self._last < self._interval:
                return False
            self._last = now
        return release_free_memory()
