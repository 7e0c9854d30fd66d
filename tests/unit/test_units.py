"""Sizes as the messages that name a limit print them."""

from __future__ import annotations

import pytest

from smtp_proxy.units import readable_size, size_limit


@pytest.mark.parametrize(
    ("octets", "readable"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (1023, "1023 bytes"),
        (1024, "1 KiB"),
        (65536, "64 KiB"),
        (1536, "1.5 KiB"),
        (1_048_576, "1 MiB"),
        (1_500_000, "1.4 MiB"),
        (25 * 1024 * 1024, "25 MiB"),
        (3 << 30, "3 GiB"),
    ],
)
def test_readable_size_picks_the_largest_binary_unit(octets: int, readable: str) -> None:
    assert readable_size(octets) == readable


def test_size_limit_gives_bytes_then_the_readable_unit() -> None:
    assert size_limit(65536) == "65536 bytes (64 KiB)"
    assert size_limit(1000) == "1000 bytes"  # under 1 KiB, bytes say it all
