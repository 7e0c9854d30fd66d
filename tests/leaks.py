"""What a test leaves behind: threads still running and sockets still open after its teardown.

The autouse check in tests/conftest.py compares both against what was there before the test.
Sockets that a session-scoped fixture keeps open on purpose (the pooled connections of the shared
rolled-back database) are registered here with ``keep_socket`` and not counted, and so are the
product's few lifelong threads (``LIFELONG_THREADS``, each with its reason).
"""

from __future__ import annotations

import os
import threading

_kept: set[str] = set()

# Daemon threads the product starts once and keeps for the life of the process, with no way to stop
# them: counted as leaks, they would fail whichever test first needs them.
LIFELONG_THREADS = {
    # delivery/deadline.py: the Watchdog's thread, started at the first watched attempt, parked
    # on its condition while nothing is due.
    "delivery-deadlines",
    # sending_limits.py: sends a shared storage's counts every FLUSH_SECONDS once anything was
    # counted; it holds no socket of its own between flushes.
    "limits-flush",
}


def open_sockets() -> dict[int, str]:
    """This process's socket descriptors: fd -> 'socket:[inode]'."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile (the listing's own descriptor among them)
            continue
        if target.startswith("socket:"):
            found[int(name)] = target
    return found


def keep_socket(fd: int) -> None:
    """A socket a session-scoped fixture holds on purpose, until the session ends."""
    _kept.add(os.readlink(f"/proc/self/fd/{fd}"))


def _tcp_endpoints() -> dict[str, str]:
    """'socket:[inode]' -> 'local -> remote' for this process's TCP sockets, to name a leak."""
    found = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as rows:
                lines = rows.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = (_endpoint(field) for field in fields[1:3])
            found[f"socket:[{fields[9]}]"] = f"{local} -> {remote}"
    return found


def _endpoint(field: str) -> str:
    address, port = field.split(":")
    if len(address) == 8:  # IPv4, little-endian
        return ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)) + f":{int(port, 16)}"
    return f"[{address}]:{int(port, 16)}"


def new_sockets(before: dict[int, str]) -> list[str]:
    known = set(before.values()) | _kept
    leaked = {fd: target for fd, target in open_sockets().items() if target not in known}
    if not leaked:
        return []
    tcp = _tcp_endpoints()
    return sorted(f"fd {fd} ({tcp.get(target, target)})" for fd, target in leaked.items())


def new_threads(before: set[threading.Thread]) -> list[str]:
    return sorted(
        thread.name
        for thread in threading.enumerate()
        if thread not in before
        and thread.is_alive()
        and thread.name not in LIFELONG_THREADS
        # A thread started outside the threading module (the SMTP server's session threads) shows
        # up as a _DummyThread once it calls into threading; CPython reports it alive forever.
        and not isinstance(thread, threading._DummyThread)
    )
