"""The ``smtp-proxy`` console script as a real process: its path, a clean environment, a config file.

For the tests that run it as an operator does (exit codes, one-line errors, listeners); the
in-process runner is ``tests.cli_runner``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import free_port

SMTP_PROXY = str(Path(sys.executable).parent / "smtp-proxy")


def clean_env() -> dict[str, str]:
    """This process's environment without the operator's settings a test must not pick up."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_PROXY_", "DATABASE_URL"))}


def listener_config(
    tmp_path: Path, db_url: str, key: str, tls_files: tuple[Path, Path], **sections: dict[str, Any]
) -> Path:
    """``tmp_path/config.yaml`` for listeners on free 127.0.0.1 ports, no metrics ports, ``sections``
    merged over it."""
    config: dict[str, dict[str, Any]] = {
        "smtp": {"host": "127.0.0.1", "port": free_port(), "metrics_port": None},
        "api": {"host": "127.0.0.1", "port": free_port()},
        "database": {"url": db_url},
        "tls": {"cert_file": str(tls_files[0]), "key_file": str(tls_files[1])},
        "security": {"encryption_key": key, "bcrypt_cost": 4},
        "delivery": {"metrics_host": "127.0.0.1", "metrics_port": None},
    }
    for name, values in sections.items():
        config[name].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
