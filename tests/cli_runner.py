"""The ``smtp-proxy`` click command run in the test's own process, answering like a subprocess.

click's CliRunner gives the command its own stdin, stdout, stderr and environment variables; the
code path is the console script's minus the interpreter start. An exception the command does not
turn into an exit code propagates and fails the test (a real process would print a traceback).
"""

from __future__ import annotations

import logging
import os
import subprocess

from click.testing import CliRunner

from smtp_proxy.cli import main

# The operator's settings, which a test must not pick up from the environment it runs in.
OPERATOR_VARIABLES = ("DATABASE_URL", "SMTP_PROXY_CONFIG", "SMTP_PROXY_ENCRYPTION_KEY")


def run_cli(
    args: list[str], *, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``smtp-proxy ARGS`` with only ``env`` of the operator's settings set."""
    cleared: dict[str, str | None] = {name: None for name in os.environ if name.startswith("SMTP_PROXY_")}
    cleared.update(dict.fromkeys(OPERATOR_VARIABLES))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = CliRunner().invoke(
            main,
            args,
            input=stdin,
            env={**cleared, **(env or {})},
            prog_name="smtp-proxy",
            catch_exceptions=False,
        )
    finally:
        # The group's logging.basicConfig must not leave a handler on CliRunner's closed stderr.
        root.handlers[:] = handlers
        root.setLevel(level)
    return subprocess.CompletedProcess(["smtp-proxy", *args], result.exit_code, result.stdout, result.stderr)
