"""The service manager's readiness protocol (sd_notify), in the few lines it takes.

``Type=notify`` units wait for ``READY=1`` before they count a listener as
started, so the message goes out only once every socket is bound. Outside
systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("smtp_proxy.systemd")


def notify(*fields: str) -> bool:
    """Send ``KEY=value`` fields to the service manager; True when a manager listened.

    ``NOTIFY_SOCKET`` names a datagram socket: a path, or ``@name`` in the
    abstract namespace. A failure is logged, never raised: readiness is a
    courtesy to the manager, not a reason to stop serving.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning(
            "NOTIFY_SOCKET is not a unix socket; not notifying", extra={"event": "systemd.notify_skipped"}
        )
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode("utf-8"))
    except OSError as error:
        log.warning(
            "cannot notify the service manager",
            extra={"event": "systemd.notify_failed", "error": error.strerror or str(error)},
        )
        return False
    return True


def ready(status: str) -> bool:
    """Every socket is bound and serving."""
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def stopping(status: str = "draining") -> bool:
    """SIGTERM arrived: the drain has begun."""
    return notify("STOPPING=1", f"STATUS={status}")
