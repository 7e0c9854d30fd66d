"""Sizes as people read them, for the messages that name a limit (SMTP replies, API errors).

Standard library only, and nothing of it: the SMTP core imports it too.
"""

from __future__ import annotations

_BINARY_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def readable_size(octets: int) -> str:
    """``65536`` -> ``"64 KiB"``, ``1500000`` -> ``"1.4 MiB"``, ``512`` -> ``"512 bytes"``."""
    for name, unit in _BINARY_UNITS:
        if octets >= unit:
            whole, rest = divmod(octets, unit)
            return f"{whole} {name}" if not rest else f"{octets / unit:.1f} {name}"
    return f"{octets} byte{'' if octets == 1 else 's'}"


def size_limit(octets: int) -> str:
    """The limit in bytes and in a unit people read: ``"65536 bytes (64 KiB)"``."""
    readable = readable_size(octets)
    return f"{octets} bytes" if readable.endswith(("byte", "bytes")) else f"{octets} bytes ({readable})"
