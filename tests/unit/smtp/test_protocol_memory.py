"""SmtpSession: DATA held in memory costs a small constant factor of its size, whatever its lines.

The reader once kept one bytes object per line: a body of short lines ending in bare LF
cost ~15x the bytes received. Peaks are measured with tracemalloc over the whole reception,
the final ``message()`` copy included, fed in the listener's 64 KiB reads.
"""

from __future__ import annotations

import tracemalloc

import pytest

from smtp_proxy.smtp.protocol import MessageReceived

CONTENT = 4 * 1024 * 1024
READ = 65536  # smtp_proxy.smtp.server.RECV_SIZE


def peak_of_reception(make_driver, stream: bytes) -> tuple[int, bytes]:
    """(peak bytes allocated while the stream is received, the message handed over)."""
    driver = make_driver(max_message_size=4 * CONTENT).authenticated()
    driver.open_data("alice@example.com", ["bob@dest.test"])
    reads = [stream[start : start + READ] for start in range(0, len(stream), READ)]
    outputs = []
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for data in reads:
            outputs.extend(driver.session.receive(data))
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    (message,) = [item for item in outputs if isinstance(item, MessageReceived)]
    return peak, message.data


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"ab\n", id="bare-lf"),
        pytest.param(b"ab\ncd\r\n", id="mixed"),
        pytest.param(b"ab\r\n", id="crlf"),
        pytest.param(b".x\n", id="stuffed-bare-lf"),
    ],
)
def test_data_of_short_lines_costs_under_three_times_its_size(make_driver, line: bytes) -> None:
    stream = line * (CONTENT // len(line)) + b"end\r\n.\r\n"
    peak, data = peak_of_reception(make_driver, stream)
    assert len(data) >= CONTENT * 0.95
    assert data.endswith(b"\r\nend\r\n")
    assert peak <= 3 * len(data), (peak, len(data), peak / len(data))
