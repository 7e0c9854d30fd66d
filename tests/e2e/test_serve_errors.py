"""A serve command whose port is taken stops with one line naming it, exit status 1, never a traceback."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console import SMTP_PROXY, clean_env, listener_config


@pytest.fixture
def taken() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run(
    tmp_path: Path, pg_url: str, key: str, tls_files, command: str, **sections: dict
) -> subprocess.CompletedProcess:
    path = listener_config(tmp_path, pg_url, key, tls_files, **sections)
    return subprocess.run(
        [SMTP_PROXY, "--config", str(path), "serve", command],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("command", "sections"),
    [
        ("smtp", lambda port: {"smtp": {"port": port}}),
        ("smtp", lambda port: {"smtp": {"implicit_tls_port": port}}),
        ("smtp", lambda port: {"smtp": {"metrics_port": port}}),
        ("api", lambda port: {"api": {"port": port}}),
        ("worker", lambda port: {"delivery": {"metrics_port": port}}),
        ("all", lambda port: {"smtp": {"port": port}}),
        ("all", lambda port: {"api": {"port": port}}),
        ("all", lambda port: {"smtp": {"metrics_port": port}}),
    ],
    ids=[
        "smtp-port",
        "smtp-implicit-tls",
        "smtp-metrics",
        "api",
        "worker-metrics",
        "all-smtp",
        "all-api",
        "all-metrics",
    ],
)
def test_a_taken_port_is_one_line_naming_it_and_exit_1(
    tmp_path: Path, pg_url: str, encryption_key: str, tls_files, taken: int, command: str, sections
) -> None:
    result = run(tmp_path, pg_url, encryption_key, tls_files, command, **sections(taken))
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr.strip()
        == f"smtp-proxy: error: cannot listen on 127.0.0.1:{taken}: Address already in use"
    )
    assert "Traceback" not in result.stdout
