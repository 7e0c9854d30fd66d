"""glibc malloc tuning: arenas capped, freed memory handed back, at a bounded rate."""

from __future__ import annotations

import pytest

from smtp_proxy import memory


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_arenas_can_be_capped() -> None:
    assert memory.limit_arenas(8) is True  # this project runs on glibc (Debian)


def test_free_memory_in_the_middle_of_the_heap_goes_back_to_the_kernel() -> None:
    # 1 KB blocks come from glibc's heap (not pymalloc, not mmap); one kept after
    # them stops glibc's own trimming of the heap top, as live objects do in a listener.
    blocks = [bytes(1000) + bytes([i % 256]) for i in range(60_000)]
    pin = bytes(1000) + b"pin"
    del blocks
    before = _rss_kib()
    assert memory.release_free_memory() is True
    after = _rss_kib()
    assert before - after > 30 * 1024, (before, after)
    assert pin


def test_the_releaser_runs_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: runs.append(1) or True)
    now = [100.0]
    releaser = memory.FreeMemoryReleaser(interval=1.0, clock=lambda: now[0])
    assert releaser() is True
    now[0] += 0.5
    assert releaser() is False
    assert len(runs) == 1
    now[0] += 0.6
    assert releaser() is True
    assert len(runs) == 2
