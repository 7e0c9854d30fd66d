"""`smtp-proxy serve api` as a real process, spoken to over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.console import SMTP_PROXY
from tests.waiting import wait_for


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:  # it holds the response's socket
            return error.code, error.headers, json.loads(error.read())


def _wait_http(url: str, process: subprocess.Popen, timeout: float = 20.0) -> None:
    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server exited early with {process.returncode}: {process.stderr.read()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except urllib.error.HTTPError as error:
            error.close()
            return False
        except (urllib.error.URLError, ConnectionError):
            return False

    wait_for(answers, f"{url} to answer", timeout=timeout, interval=0.1)


class ApiProcess:
    def __init__(self, config_path: Path, port: int, env: dict[str, str]) -> None:
        self.config_path = config_path
        self.base = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [SMTP_PROXY, "--config", str(config_path), "serve", "api"],
            env=env,
            cwd=config_path.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        try:
            _wait_http(self.base + "/healthz", self.process)
        except BaseException:
            self.stop()  # the process and its reader end with the failed start
            raise

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for_event(self, event: str, timeout: float = 20.0) -> dict:
        """The first JSON log line with this event, waiting for it to be written."""

        def found() -> dict | None:
            return next(
                (line for line in _log_lines("".join(self.lines)) if line.get("event") == event), None
            )

        return wait_for(found, f"a {event} log line", timeout=timeout)

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        return self.process.returncode, "".join(self.lines)


def _write_config(path: Path, port: int, db_url: str, key: str, level: str = "info") -> None:
    path.write_text(
        f"""
api:
  host: 127.0.0.1
  port: {port}
  threads: 2
database:
  url: {db_url}
  connect_timeout: 1s
logging:
  level: {level}
  format: json
security:
  encryption_key: {key}
  bcrypt_cost: 4
"""
    )


@pytest.fixture
def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_PROXY_", "DATABASE_URL"))}
    return env


@pytest.fixture
def api(tmp_path: Path, pg_url: str, encryption_key: str, clean_env: dict[str, str]) -> Iterator[ApiProcess]:
    port = free_port()
    config = tmp_path / "config.yaml"
    _write_config(config, port, pg_url, encryption_key)
    server = ApiProcess(config, port, clean_env)
    yield server
    server.stop()


def _log_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_health_and_readiness_answer_json(api: ApiProcess) -> None:
    status, headers, body = _get(api.base + "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    assert len(headers["X-Request-ID"]) == 32
    status, _headers, body = _get(api.base + "/readyz")
    assert status == 200 and body["database"] == "ok"


def test_the_readmes_probe_examples_are_what_the_probes_print(api: ApiProcess) -> None:
    # The quickstart shows what ``curl -s`` prints for each probe; it is compared with the real
    # body byte for byte (curl prints it as is), so the README cannot drift from the endpoint.
    readme = (Path(__file__).resolve().parents[2] / "README.rst").read_text()
    examples = dict(re.findall(r"curl -s http://127\.0\.0\.1:8080(/\w+) +# (\{.*\})", readme))
    assert set(examples) == {"/healthz", "/readyz"}, examples
    for path, shown in examples.items():
        with urllib.request.urlopen(api.base + path, timeout=10) as response:
            printed = response.read().decode()
        assert printed.rstrip("\n") == shown, (path, printed)
        assert json.loads(printed) == json.loads(shown)


def test_request_id_is_echoed_or_replaced_when_unsafe(api: ApiProcess) -> None:
    _status, headers, _body = _get(api.base + "/healthz", {"X-Request-ID": "abc-123.x_y"})
    assert headers["X-Request-ID"] == "abc-123.x_y"
    _status, headers, _body = _get(api.base + "/healthz", {"X-Request-ID": "bad id\twith spaces" + "x" * 80})
    assert headers["X-Request-ID"] != "" and " " not in headers["X-Request-ID"]
    assert len(headers["X-Request-ID"]) == 32


def test_unknown_path_does_not_crash_the_server(api: ApiProcess) -> None:
    request = urllib.request.Request(api.base + "/nope")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=5)
    raised.value.close()
    assert raised.value.code == 404
    status, _headers, _body = _get(api.base + "/healthz")
    assert status == 200


def test_readyz_is_503_with_retry_after_while_database_is_unreachable(
    tmp_path: Path, encryption_key: str, clean_env: dict[str, str]
) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    _write_config(config, port, f"postgresql://u:secretpw@127.0.0.1:{free_port()}/x", encryption_key)
    server = ApiProcess(config, port, clean_env)
    try:
        status, headers, body = _get(server.base + "/readyz")
        assert status == 503
        assert headers["Retry-After"].isdigit()
        assert body["error"]["code"] == "database_unavailable"
        assert "secretpw" not in json.dumps(body)
    finally:
        returncode, output = server.stop()
    assert "secretpw" not in output


def test_sigterm_stops_the_server_with_exit_code_zero_and_json_logs(api: ApiProcess) -> None:
    returncode, output = api.stop()
    assert returncode == 0
    lines = _log_lines(output)
    assert any(line.get("event") == "api.listening" for line in lines)
    for line in lines:
        assert {"timestamp", "level", "logger", "message", "correlation_id"} <= line.keys()


def test_log_level_follows_the_config_file_without_restart(
    api: ApiProcess, pg_url: str, encryption_key: str
) -> None:
    port = int(api.base.rsplit(":", 1)[1])
    _write_config(api.config_path, port, pg_url, encryption_key, level="debug")
    reloaded = api.wait_for_event("config.reloaded")
    assert reloaded["changed"] == ["logging.level"]
    assert reloaded["restart_required"] == []


def test_sighup_rereads_the_config_file(api: ApiProcess, pg_url: str, encryption_key: str) -> None:
    port = int(api.base.rsplit(":", 1)[1])
    _write_config(api.config_path, port, pg_url, encryption_key, level="warning")
    api.process.send_signal(signal.SIGHUP)
    assert "logging.level" in api.wait_for_event("config.reloaded")["changed"]


def test_broken_config_file_on_reload_keeps_the_server_running(api: ApiProcess) -> None:
    api.config_path.write_text("api: [this is not: valid\n")
    rejected = api.wait_for_event("config.reload_rejected")
    assert rejected["key"] == "--config"
    status, _headers, _body = _get(api.base + "/healthz")
    assert status == 200
    returncode, _output = api.stop()
    assert returncode == 0


def test_request_log_line_carries_the_clients_request_id(api: ApiProcess) -> None:
    _get(api.base + "/readyz", {"X-Request-ID": "trace-42"})

    def logged() -> dict | None:
        lines = [line for line in _log_lines("".join(api.lines)) if line.get("event") == "api.request"]
        return next((line for line in lines if line["correlation_id"] == "trace-42"), None)

    line = wait_for(logged, "the request's api.request line")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/readyz", 200)
    assert line["duration_ms"] >= 0


def test_serve_api_refuses_to_start_without_an_encryption_key(
    tmp_path: Path, pg_url: str, clean_env: dict[str, str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"api:\n  host: 127.0.0.1\n  port: {free_port()}\ndatabase:\n  url: {pg_url}\n")
    result = subprocess.run(
        [SMTP_PROXY, "--config", str(config), "serve", "api"],
        env=clean_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "security.encryption_key" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_server_on_a_busy_port_fails_in_one_line(api: ApiProcess, clean_env: dict[str, str]) -> None:
    result = subprocess.run(
        [SMTP_PROXY, "--config", str(api.config_path), "serve", "api"],
        env=clean_env,
        cwd=api.config_path.parent,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr and "Traceback" not in result.stderr
    status, _headers, _body = _get(api.base + "/healthz")
    assert status == 200


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_during_requests_always_exits_0(
    tmp_path: Path, pg_url: str, encryption_key: str, clean_env: dict[str, str], attempt: int
) -> None:
    """A stop signal that lands inside a request handler must not be swallowed."""
    port = free_port()
    config = tmp_path / "config.yaml"
    _write_config(config, port, pg_url, encryption_key)
    server = ApiProcess(config, port, clean_env)
    stop = threading.Event()
    answered: list[int] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                urllib.request.urlopen(server.base + "/readyz", timeout=2).close()
                answered.append(1)
            except urllib.error.HTTPError as error:  # 503 while it drains: close what it holds
                error.close()
            except (urllib.error.URLError, ConnectionError, OSError):
                pass

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # Requests under way, the signal arriving at a different point of them in each attempt.
        wait_for(lambda: len(answered) >= 10 * (attempt + 1), "requests answered", timeout=20)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        server.stop()
