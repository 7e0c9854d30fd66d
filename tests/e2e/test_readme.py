"""The README's quickstart, run as written against a fresh checkout's ``./scripts/run``.

A copy of the repository (its tracked files, as a clone would have them, with
no ``.venv`` and no ``var/``) runs ``./scripts/run``, which makes its own venv,
database, key, certificate and demo tenant and then serves everything in one
process on the ports the README names. Every ``code-block:: bash`` of the
Quickstart section then runs, in order, in one bash session in that copy, as
a reader would type them in a second terminal. The README cannot drift from
the product without this test failing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
PORTS = {"SMTP": 2587, "API": 8080, "metrics": 9101, "the quickstart's SMTP server": 1025}
SETUP_TIMEOUT = 420  # a fresh venv: pip installs every dependency
QUICKSTART_TIMEOUT = 240


def quickstart_blocks(readme: str) -> list[str]:
    """The bash code blocks of the Quickstart section, in order, indented as the raw file has them.

    Not dedented: a reader who copies from ``README.rst`` itself (not the rendered page) pastes the
    indentation too, and the blocks must run that way as well.
    """
    section = readme[readme.index("\nQuickstart\n---") : readme.index("\nThe ``smtp-proxy`` command\n")]
    return [block for language, block in literal_blocks(section) if language == "bash"]


def literal_blocks(text: str) -> list[tuple[str, str]]:
    """Every literal block of a reStructuredText document: (language, raw text), in order.

    ``.. code-block:: bash`` gives ``"bash"``; a paragraph ending in ``::`` gives ``""``. The text
    is the block's lines as they stand in the file, indentation included.
    """
    blocks = []
    lines = text.split("\n")
    for number, line in enumerate(lines):
        directive = re.fullmatch(r"(\s*)\.\. code-block:: (\w+)\s*", line)
        if directive:
            language, indent = directive.group(2), len(directive.group(1))
        elif line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            language, indent = "", len(line) - len(line.lstrip())
        else:
            continue
        body: list[str] = []
        for following in lines[number + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        text_of_block = "\n".join(body).strip("\n")
        if text_of_block:
            blocks.append((language, text_of_block))
    return blocks


HEREDOC = re.compile(r"(?<![<0-9])<<(-?)[ \t]*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2")


def unterminated_heredocs(block: str) -> list[str]:
    """The heredocs of a shell block (raw text) whose terminator bash would not find.

    bash ends a heredoc only at a line that is exactly its word (``<<-``: after leading tabs). A
    block indented in README.rst carries its indentation into a reader's paste, so an indented
    terminator is never found: the heredoc swallows the rest of the input.
    """
    lines = block.split("\n")
    missing = []
    for number, line in enumerate(lines):
        for match in HEREDOC.finditer(line):
            strip_tabs, word = match.group(1) == "-", match.group(3)
            ends = (rest.lstrip("\t") if strip_tabs else rest for rest in lines[number + 1 :])
            if word not in ends:
                missing.append(f"<<{match.group(1)}{word} on {line.strip()!r}")
    return missing


def python_c_scripts(block: str) -> list[str]:
    """The code of every single-quoted ``python3 -c '...'`` in a shell block."""
    return re.findall(r"python3? -c '([^']*)'", block)


# Polling helpers the quickstart's bash session calls between blocks (each gives up after 60 s).
WAITS = """\
until_listening() {
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
    sleep 0.1
  done
  return 1
}
until_delivered() {
  for _ in $(seq 600); do
    curl -s -H "Authorization: Bearer $KEY" http://127.0.0.1:8080/api/v1/messages | python3 -c '
import json, sys
statuses = [item["status"] for item in json.load(sys.stdin)["items"]]
sys.exit(statuses != ["delivered"] * int(sys.argv[1]))' "$1" && return
    sleep 0.1
  done
  return 1
}
"""


def wait_after(block: str) -> str:
    """The wait a reader's pause stands for after this block, if any."""
    if "aiosmtpd" in block:
        return "until_listening 1025\n"
    if "smtplib" in block:
        return "until_delivered 2\n"
    return ""


def test_the_quickstart_has_runnable_blocks() -> None:
    blocks = quickstart_blocks((ROOT / "README.rst").read_text())
    assert len(blocks) >= 5
    assert any("swaks" in block for block in blocks) and any("smtplib" in block for block in blocks)
    assert any("curl" in block for block in blocks)
    assert [wait_after(block) for block in blocks].count("") == len(blocks) - 2


def test_the_readers_checks_catch_an_indented_heredoc() -> None:
    # What a newcomer hit: the quickstart's smtplib block as it was, pasted from the raw file.
    before = "    python3 - <<'PY'\n    import smtplib\n    print('accepted')\n    PY"
    assert unterminated_heredocs(before) == ["<<PY on \"python3 - <<'PY'\""]
    assert unterminated_heredocs("cat <<EOF\nx\nEOF") == []
    assert unterminated_heredocs("cat <<-EOF\n\tx\n\tEOF") == []
    assert unterminated_heredocs("cat <<< word; echo $((1 << 2))") == []
    indented = "    python3 -c 'import json\n    print(json)'"
    with pytest.raises(IndentationError):
        compile(python_c_scripts(indented)[0], "<readme>", "exec")


def test_every_readme_shell_block_pastes_from_the_raw_file() -> None:
    """Each literal block, copied from README.rst with its indentation, parses as it would run."""
    readme = (ROOT / "README.rst").read_text()
    blocks = literal_blocks(readme)
    bash_blocks = [block for language, block in blocks if language == "bash"]
    assert len(bash_blocks) >= 7
    assert len(blocks) > 2 * len(bash_blocks)  # the ``::`` blocks are read too
    for _language, block in blocks:
        # A ``::`` block may be YAML or Python; a heredoc in any block is shell.
        assert not unterminated_heredocs(block), (
            f"a heredoc whose terminator is indented in README.rst, so a paste of the raw text "
            f"never ends it ({unterminated_heredocs(block)}); use python3 -c '...' or echo:\n{block}"
        )
        for script in python_c_scripts(block):
            # Python refuses code whose first line is indented: the raw paste, and the rendered one.
            compile(script, "<README.rst python3 -c>", "exec")
            compile(textwrap.dedent(script), "<README.rst python3 -c>", "exec")
    for block in bash_blocks:
        checked = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert checked.returncode == 0 and not checked.stderr, f"{checked.stderr}\n{block}"


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SMTP_PROXY_", "DATABASE_URL", "VIRTUAL_ENV"))
    }


def _stop_group(process: subprocess.Popen, timeout: float = 40) -> None:
    """SIGTERM the process group (the server drains), then SIGKILL what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The repository's files as a fresh clone has them: what git tracks (or would), nothing built."""
    busy = [f"{name} ({port})" for name, port in PORTS.items() if _port_open(port)]
    assert not busy, f"the README's ports are taken by something else: {', '.join(busy)}"
    target = tmp_path_factory.mktemp("checkout") / "smtp-proxy"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    yield target


@pytest.fixture(scope="module")
def running(checkout: Path) -> Iterator[tuple[Path, Path]]:
    """``./scripts/run`` in the fresh checkout, until every port the README uses answers."""
    log = checkout.parent / "scripts-run.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["./scripts/run"],
            cwd=checkout,
            env=_clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"./scripts/run exited:\n{log.read_text()[-4000:]}")
            return all(_port_open(PORTS[name]) for name in ("SMTP", "API", "metrics"))

        try:
            wait_for(up, "./scripts/run to serve every port", timeout=SETUP_TIMEOUT, interval=0.5)
        except AssertionError as error:
            raise AssertionError(f"{error}:\n{log.read_text()[-4000:]}") from None
        yield checkout, log
    finally:
        _stop_group(process)


# The suite's 120 s per test is too short for a fresh venv on a busy machine: this test's own
# bounds (setup, then the quickstart) apply.
@pytest.mark.timeout(SETUP_TIMEOUT + QUICKSTART_TIMEOUT + 60)
def test_the_quickstart_runs_as_written(running: tuple[Path, Path]) -> None:
    checkout, log = running
    assert "Demo tenant (saved in var/demo-tenant.json)" in log.read_text()
    blocks = quickstart_blocks((checkout / "README.rst").read_text())
    # One terminal, one bash session: variables carry from block to block. Where a reader would
    # look before going on, the script waits for what they would see: the throwaway SMTP server
    # listening, then both messages handed over by the worker.
    script = "set -euo pipefail\n" + WAITS + "".join(block + "\n" + wait_after(block) for block in blocks)
    output_file = checkout.parent / "quickstart.log"
    with output_file.open("w") as out:
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=checkout,
            env=_clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status = process.wait(timeout=QUICKSTART_TIMEOUT)
        finally:
            _stop_group(process, timeout=5)  # also the backgrounded SMTP server
    output = output_file.read_text()
    assert status == 0, (
        f"the quickstart failed:\n{output[-4000:]}\n--- scripts/run ---\n{log.read_text()[-3000:]}"
    )

    # swaks and smtplib each had a message accepted, after the commit.
    assert re.search(r"<~  250 2\.0\.0 Ok: queued as [0-9a-f-]{36}", output), output
    assert "accepted" in output
    # The throwaway SMTP server printed both, as the worker handed them over.
    assert output.count("---------- MESSAGE FOLLOWS ----------") == 2, output
    assert "first message" in output
    # The API shows both delivered, with their delivery logs.
    demo = json.loads((checkout / "var" / "demo-tenant.json").read_text())
    request = urllib.request.Request(
        "http://127.0.0.1:8080/api/v1/messages", headers={"Authorization": f"Bearer {demo['api_key']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        items = json.load(response)["items"]
    assert [item["status"] for item in items] == ["delivered", "delivered"]
    assert '"deliveries":[{' in output.replace(" ", "").replace("\n", "")
    # Health, readiness, metrics and the admin command.
    assert '{"status":"ok"}' in output and '"status":"ready"' in output
    assert 'smtp_proxy_delivery_messages_total{status="delivered"} 2.0' in output
    assert '"name": "shop"' in output
    # `serve all` has one metrics endpoint: the listener's, the worker's and the API's series.
    with urllib.request.urlopen("http://127.0.0.1:9101/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'smtp_proxy_smtp_messages_total{reason="",result="accepted"} 2.0' in metrics
    assert 'smtp_proxy_delivery_attempts_total{outcome="delivered",provider_type="smtp"} 2.0' in metrics
    assert "flask_http_request_duration_seconds_count" in metrics
