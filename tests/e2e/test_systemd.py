"""The systemd units in etc/systemd/ and the readiness protocol they rely on.

Three tiers. The unit files are parsed and held to the deployment rules (user,
capabilities, sandboxing, stop and reload). ``systemd-analyze verify`` checks
copies that point at this venv's ``smtp-proxy``. The real ``serve`` commands
run with a NOTIFY_SOCKET of the test's own, as systemd runs a ``Type=notify``
unit, because systemd is not PID 1 here.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from smtp_proxy.delivery.worker import DRAIN_SECONDS as WORKER_DRAIN_SECONDS
from smtp_proxy.smtp.server import DRAIN_SECONDS as SMTP_DRAIN_SECONDS
from tests.conftest import free_port
from tests.e2e.conftest import ServeProcess
from tests.waiting import wait_for

UNIT_DIR = Path(__file__).resolve().parents[2] / "etc" / "systemd"
SMTP_PROXY = Path(sys.executable).parent / "smtp-proxy"
INSTALLED_SMTP_PROXY = "/opt/smtp-proxy/bin/smtp-proxy"
CONFIG = "/etc/smtp-proxy/config.yaml"
TARGET = "smtp-proxy.target"
ALL = "smtp-proxy-all.service"
# The split units, with the listener each one serves.
SPLIT = {
    "smtp-proxy-smtp.service": "smtp",
    "smtp-proxy-api.service": "api",
    "smtp-proxy-worker.service": "worker",
}
SERVICES = {**SPLIT, ALL: "all"}
# The units that bind port 587 and so hold one thread and one descriptor per SMTP session.
SMTP_UNITS = ("smtp-proxy-smtp.service", ALL)
BENCHMARK_SESSIONS = 10_000
TRUE = frozenset({"yes", "true", "on", "1"})

# --- a unit file parser ---------------------------------------------------------------------------

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str, name: str = "unit") -> Unit:
    """Sections of ``KEY=value`` pairs in file order; a key may repeat, as systemd allows.

    Comments (``#``, ``;``) and blank lines are skipped, a trailing backslash
    continues the line, and a section named twice is merged (systemd does the same).
    """
    sections: Unit = {}
    current: str | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep or not key.strip():
            raise AssertionError(f"{name}:{number}: not KEY=value inside a section: {raw!r}")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every assignment of ``key``, in order."""
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str | None:
    """The assignment in force for a single-valued setting: the last one."""
    found = values(unit, section, key)
    return found[-1] if found else None


def words(unit: Unit, section: str, key: str) -> list[str]:
    """A list setting as systemd reads it: assignments add up, an empty one resets."""
    result: list[str] = []
    for assigned in values(unit, section, key):
        result = result + assigned.split() if assigned else []
    return result


_SPAN_UNITS = {
    **dict.fromkeys(("us", "usec"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 1e-3),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
}


def timespan(text: str) -> float:
    """Seconds in a systemd time span (``45``, ``45s``, ``1min 30s``, ``infinity``); see systemd.time(7)."""
    text = text.strip()
    if text == "infinity":
        return math.inf
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if not re.fullmatch(r"(\s*\d+(\.\d+)?\s*[a-z]+)+\s*", text):
        raise ValueError(f"not a time span: {text!r}")
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        if unit not in _SPAN_UNITS:
            raise ValueError(f"unknown time unit {unit!r} in {text!r}")
        total += float(number) * _SPAN_UNITS[unit]
    return total


def load(name: str) -> Unit:
    path = UNIT_DIR / name
    return parse_unit(path.read_text(), name)


def test_parser_reads_repeats_resets_comments_and_continuations() -> None:
    unit = parse_unit(
        "# comment\n[Service]\n; another\nA=1\nA=2\nL=x y\nL=\nL=z \\\n  w\n\n[Install]\nWantedBy=t\n"
    )
    assert values(unit, "Service", "A") == ["1", "2"]
    assert value(unit, "Service", "A") == "2"
    assert words(unit, "Service", "L") == ["z", "w"]
    assert value(unit, "Install", "WantedBy") == "t"
    assert value(unit, "Service", "Missing") is None
    with pytest.raises(AssertionError):
        parse_unit("A=1\n")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45", 45), ("45s", 45), ("1min", 60), ("1min 30s", 90), ("2m30s", 150), ("500ms", 0.5), ("1h", 3600)],
)
def test_timespan_reads_systemd_spans(text: str, seconds: float) -> None:
    assert timespan(text) == seconds


def test_timespan_refuses_what_systemd_would_refuse() -> None:
    for bad in ("", "45 parsecs", "s45", "-1s"):
        with pytest.raises(ValueError):
            timespan(bad)
    assert timespan("infinity") == math.inf


# --- the unit files -------------------------------------------------------------------------------


def test_the_unit_directory_holds_exactly_the_five_units() -> None:
    assert sorted(p.name for p in UNIT_DIR.iterdir()) == sorted([*SERVICES, TARGET])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_runs_its_listener_as_the_unprivileged_user_under_notify(name: str) -> None:
    unit = load(name)
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "NotifyAccess") == "main"
    assert len(values(unit, "Service", "ExecStart")) == 1
    command = value(unit, "Service", "ExecStart")
    assert command is not None
    argv = shlex.split(command)
    # Exactly the path: a prefix such as "+" or "!" would run it outside User= or the sandbox.
    assert argv[0] == INSTALLED_SMTP_PROXY, command
    assert argv[1:3] == ["--config", CONFIG], command
    assert argv[-2:] == ["serve", SERVICES[name]], command
    assert len(argv) == 5, command
    # Nothing else runs, so nothing runs with other rights (ExecStartPre=+... would run as root).
    assert sorted({k for k, _ in unit["Service"] if k.startswith("Exec")}) == ["ExecReload", "ExecStart"]
    assert value(unit, "Service", "User") == "smtp-proxy"
    assert value(unit, "Service", "Group") == "smtp-proxy"
    assert value(unit, "Service", "DynamicUser") in (None, "no")
    assert value(unit, "Service", "EnvironmentFile") == "-/etc/smtp-proxy/environment"
    assert value(unit, "Service", "StateDirectory") == "smtp-proxy"
    assert value(unit, "Service", "WorkingDirectory") == "/var/lib/smtp-proxy"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_only_the_units_that_bind_587_hold_a_capability(name: str) -> None:
    unit = load(name)
    bounding = values(unit, "Service", "CapabilityBoundingSet")
    assert bounding, "CapabilityBoundingSet= must be set: the default keeps every capability"
    assert not any(v.startswith("~") for v in bounding), bounding
    if name in SMTP_UNITS:
        assert words(unit, "Service", "AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]
        assert words(unit, "Service", "CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    else:
        assert words(unit, "Service", "AmbientCapabilities") == []
        assert words(unit, "Service", "CapabilityBoundingSet") == []


HARDENING = {
    "NoNewPrivileges": TRUE,
    "ProtectSystem": {"strict"},
    "ProtectHome": TRUE,
    "PrivateTmp": TRUE,
    "PrivateDevices": TRUE,
    "ProtectKernelTunables": TRUE,
    "ProtectKernelModules": TRUE,
    "ProtectKernelLogs": TRUE,
    "ProtectControlGroups": TRUE,
    "ProtectClock": TRUE,
    "ProtectHostname": TRUE,
    "RestrictNamespaces": TRUE,
    "RestrictRealtime": TRUE,
    "RestrictSUIDSGID": TRUE,
    "LockPersonality": TRUE,
    "SystemCallArchitectures": {"native"},
    "UMask": {"0077"},
}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_is_sandboxed(name: str) -> None:
    unit = load(name)
    wrong = {
        key: value(unit, "Service", key)
        for key, allowed in HARDENING.items()
        if (value(unit, "Service", key) or "").lower() not in allowed
    }
    assert wrong == {}
    assert sorted(words(unit, "Service", "RestrictAddressFamilies")) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    # An allow-list first, then the privileged calls taken out of it.
    assert values(unit, "Service", "SystemCallFilter") == ["@system-service", "~@privileged"]
    # ctypes and cffi callbacks need writable executable memory.
    assert (value(unit, "Service", "MemoryDenyWriteExecute") or "no").lower() not in TRUE
    # ProtectSystem=strict leaves only the state directory writable; nothing may add to that.
    writable = ("ReadWritePaths", "ReadWriteDirectories", "RuntimeDirectory", "CacheDirectory")
    writable += ("LogsDirectory", "ConfigurationDirectory")
    assert [k for k, _ in unit["Service"] if k in writable] == []


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_stop_outlasts_the_drain_reload_is_sighup_and_failures_restart(name: str) -> None:
    unit = load(name)
    reload = value(unit, "Service", "ExecReload")
    assert reload is not None and shlex.split(reload) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert value(unit, "Service", "KillSignal") == "SIGTERM"
    stop = value(unit, "Service", "TimeoutStopSec")
    assert stop is not None
    drain = max(SMTP_DRAIN_SECONDS, WORKER_DRAIN_SECONDS)
    assert drain < timespan(stop) < math.inf, f"TimeoutStopSec={stop} must outlast the {drain:g} s drain"
    assert value(unit, "Service", "Restart") == "on-failure"
    restart_sec = value(unit, "Service", "RestartSec")
    assert restart_sec is not None and timespan(restart_sec) > 0
    if SERVICES[name] != "worker":
        # Several processes (smtp.processes, api.processes): SIGTERM goes to the supervising
        # parent only, which forwards it; systemd's own SIGTERM to every process would race it.
        assert value(unit, "Service", "KillMode") == "mixed"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_starts_after_the_network_and_only_orders_itself_after_postgresql(name: str) -> None:
    unit = load(name)
    assert "network-online.target" in words(unit, "Unit", "After")
    assert "network-online.target" in words(unit, "Unit", "Wants")
    # The database may be on another host: ordering only, never a dependency.
    for key in ("Wants", "Requires", "Requisite", "BindsTo"):
        assert "postgresql.service" not in words(unit, "Unit", key)
    for documentation in words(unit, "Unit", "Documentation"):
        assert documentation.startswith(("man:", "https://")), documentation


@pytest.mark.parametrize("name", SMTP_UNITS)
def test_smtp_units_have_room_for_a_thread_and_a_descriptor_per_session(name: str) -> None:
    unit = load(name)
    nofile = value(unit, "Service", "LimitNOFILE")
    assert nofile is not None and int(nofile.split(":")[0]) >= 65536
    tasks = value(unit, "Service", "TasksMax")
    assert tasks is not None
    # Sessions, plus the bcrypt pool, the API's and the worker's threads under `serve all`.
    assert tasks == "infinity" or int(tasks) >= BENCHMARK_SESSIONS + 1024, tasks


def test_target_wants_the_three_listeners_and_each_is_part_of_it() -> None:
    target = load(TARGET)
    assert sorted(words(target, "Unit", "Wants")) == sorted(SPLIT)
    assert words(target, "Install", "WantedBy") == ["multi-user.target"]
    for name in SPLIT:
        unit = load(name)
        assert words(unit, "Unit", "PartOf") == [TARGET], name
        assert words(unit, "Install", "WantedBy") == [TARGET], name


def test_one_process_unit_conflicts_with_the_split_units_and_waits_for_them_to_stop() -> None:
    unit = load(ALL)
    assert sorted(words(unit, "Unit", "Conflicts")) == sorted([TARGET, *SPLIT])
    # Without an ordering the conflicting stop and this start run at once, and the ports clash.
    ordered = set(words(unit, "Unit", "After")) | set(words(unit, "Unit", "Before"))
    assert {TARGET, *SPLIT} <= ordered
    assert words(unit, "Unit", "PartOf") == []
    assert words(unit, "Install", "WantedBy") == ["multi-user.target"]


# --- systemd-analyze verify -----------------------------------------------------------------------


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze not found: install Debian's 'systemd' package (./scripts/test does)")
    return found


def _verify(directory: Path) -> tuple[int, list[str]]:
    """``systemd-analyze verify`` on every unit in ``directory``: exit code and output lines."""
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0"}
    units = sorted(str(p) for p in directory.iterdir())
    result = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=directory,
    )
    return result.returncode, (result.stdout + result.stderr).splitlines()


def _copy_units(directory: Path) -> Path:
    """The units, with ExecStart on this venv's smtp-proxy (verify checks that it is executable)."""
    assert SMTP_PROXY.exists(), SMTP_PROXY
    directory.mkdir()
    for path in UNIT_DIR.iterdir():
        text = path.read_text()
        (directory / path.name).write_text(text.replace(INSTALLED_SMTP_PROXY, str(SMTP_PROXY)))
    return directory


def _about_ours(lines: list[str], directory: Path) -> list[str]:
    names = [*SERVICES, TARGET]
    return [line for line in lines if str(directory) in line or any(n in line for n in names)]


def test_systemd_analyze_verify_finds_nothing_wrong(tmp_path: Path) -> None:
    units = _copy_units(tmp_path / "units")
    code, lines = _verify(units)
    assert (code, _about_ours(lines, units)) == (0, []), "\n".join(lines)


def test_systemd_analyze_verify_would_report_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive in a copy is reported against that file."""
    units = _copy_units(tmp_path / "units")
    broken = units / "smtp-proxy-api.service"
    broken.write_text(broken.read_text().replace("ProtectClock=yes", "ProtectClocks=yes"))
    _code, lines = _verify(units)
    reported = _about_ours(lines, units)
    assert any("smtp-proxy-api.service" in line and "ProtectClocks" in line for line in reported), lines


# --- readiness, as systemd sees it ----------------------------------------------------------------


@dataclass
class Notification:
    fields: dict[str, str]
    sender_pid: int | None  # from SCM_CREDENTIALS: what NotifyAccess=main compares with the main PID


class NotifySocket:
    """The datagram socket systemd binds for a Type=notify unit, including the sender's credentials."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, served: ServeProcess, timeout: float = 20.0) -> Notification:
        """The next datagram; fails early if the process exits first."""
        deadline = time.monotonic() + timeout
        credentials = struct.calcsize("iII")
        while True:
            self.sock.settimeout(0.1)
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(4096, socket.CMSG_SPACE(credentials))
            except TimeoutError:
                if served.process.poll() is not None:
                    raise AssertionError(
                        f"exited {served.process.returncode} before notifying:\n{served.output()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"no notification within {timeout} s:\n{served.output()}") from None
                continue
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:credentials])[0]
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            return Notification(fields, pid)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Ports:
    smtp: int
    smtp_metrics: int
    api: int
    delivery_metrics: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), free_port())

    def bound_by(self, command: str) -> dict[str, int]:
        """What each serve command binds; ``serve all`` leaves ``delivery.metrics_port`` unused."""
        return {
            "smtp": {"smtp.port": self.smtp, "smtp.metrics_port": self.smtp_metrics},
            "api": {"api.port": self.api},
            "worker": {"delivery.metrics_port": self.delivery_metrics},
            "all": {"smtp.port": self.smtp, "api.port": self.api, "smtp.metrics_port": self.smtp_metrics},
        }[command]


def config_dict(pg_url: str, encryption_key: str, tls_files: tuple[Path, Path], ports: Ports) -> dict:
    cert, key = tls_files
    return {
        "smtp": {
            "host": "127.0.0.1",
            "port": ports.smtp,
            "hostname": "mx.test",
            "metrics_port": ports.smtp_metrics,
        },
        "api": {"host": "127.0.0.1", "port": ports.api, "threads": 2},
        "database": {"url": pg_url, "pool_min": 2, "pool_max": 10, "connect_timeout": "2s"},
        "logging": {"level": "info", "format": "json"},
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "security": {"encryption_key": encryption_key, "bcrypt_cost": 4},
        "delivery": {
            "workers": 2,
            "poll_interval": "100ms",
            "metrics_host": "127.0.0.1",
            "metrics_port": ports.delivery_metrics,
        },
    }


@pytest.fixture
def ports() -> Ports:
    return Ports.free()


@pytest.fixture
def write_config(
    tmp_path: Path, pg_url: str, encryption_key: str, tls_files: tuple[Path, Path], ports: Ports
) -> Callable[..., Path]:
    """Write the test config (``logging.level`` overridable) to ``path``, default tmp_path/config.yaml."""

    def write(path: Path | None = None, level: str = "info") -> Path:
        path = path or tmp_path / "config.yaml"
        config = config_dict(pg_url, encryption_key, tls_files, ports)
        config["logging"]["level"] = level
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start serve commands; every one still running is killed (by pid) at teardown."""
    started: list[ServeProcess] = []

    def start(command: str, config: Path, notify_socket: str | None) -> ServeProcess:
        served = ServeProcess(
            command, config, tmp_path / f"serve-{command}-{len(started)}.log", notify_socket
        )
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[Callable[..., NotifySocket]]:
    """A notify socket: a path in tmp_path, or ``@name`` in the abstract namespace."""
    sockets: list[NotifySocket] = []

    def bind(abstract: bool = False) -> NotifySocket:
        address = f"@smtp-proxy-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
        assert len(address) < 108, f"socket path too long for AF_UNIX: {address}"
        sockets.append(NotifySocket(address))
        return sockets[-1]

    yield bind
    for sock in sockets:
        sock.close()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def smtp_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        greeting = sock.recv(512)
        sock.sendall(b"QUIT\r\n")
        sock.recv(512)
    return greeting


def wait_accepting(served: ServeProcess, port: int, timeout: float = 20.0) -> None:
    def accepting() -> bool:
        if accepts(port):
            return True
        if served.process.poll() is not None:
            raise AssertionError(f"the process exited before port {port} accepted:\n{served.output()}")
        return False

    wait_for(accepting, f"port {port} to accept", timeout=timeout, interval=0.05)


@pytest.mark.parametrize(
    ("command", "abstract"),
    [("smtp", False), ("api", False), ("worker", False), ("all", False), ("api", True)],
    ids=["smtp", "api", "worker", "all", "api-abstract-socket"],
)
def test_ready_comes_once_every_port_accepts_and_stopping_on_sigterm(
    command: str, abstract: bool, write_config, ports: Ports, serve, notify_socket
) -> None:
    manager = notify_socket(abstract)
    served = serve(command, write_config(), manager.address)

    ready = manager.receive(served)
    # Checked at once, without retrying: systemd starts dependent units the moment READY=1 arrives.
    refused = {key: port for key, port in ports.bound_by(command).items() if not accepts(port)}
    assert ready.fields.get("READY") == "1", ready.fields
    assert ready.fields.get("MAINPID") == str(served.process.pid)
    assert ready.sender_pid == served.process.pid, "NotifyAccess=main drops datagrams from other processes"
    assert ready.fields.get("STATUS"), ready.fields
    assert refused == {}, f"not accepting when READY=1 arrived:\n{served.output()}"

    served.process.send_signal(signal.SIGTERM)
    stopping = manager.receive(served)
    assert stopping.fields.get("STOPPING") == "1", stopping.fields
    assert stopping.sender_pid == served.process.pid
    assert served.process.wait(timeout=40) == 0, served.output()
    assert served.events("systemd.notify_failed") == []


# One of each way of waiting for SIGTERM: `serve api` (and `all`) in waitress's loop,
# `serve worker` (and `smtp`) in lifecycle.wait_for.
@pytest.mark.parametrize("command", ["api", "worker"])
def test_sigterm_the_moment_ready_arrives_still_drains_and_exits_0(
    command: str, write_config, serve, notify_socket
) -> None:
    # systemd may stop a unit as soon as it is started (`systemctl stop` queued
    # behind the start job): from READY=1 on, SIGTERM must mean a drain.
    manager = notify_socket()
    served = serve(command, write_config(), manager.address)
    assert manager.receive(served).fields.get("READY") == "1"
    served.process.send_signal(signal.SIGTERM)
    code = served.process.wait(timeout=40)
    assert code == 0, f"SIGTERM right after READY=1 ended serve {command} with {code}:\n{served.output()}"
    assert manager.receive(served, timeout=1).fields.get("STOPPING") == "1"


def test_without_notify_socket_the_listener_serves_as_usual(write_config, ports: Ports, serve) -> None:
    served = serve("smtp", write_config(), None)
    wait_accepting(served, ports.smtp)
    assert smtp_greeting(ports.smtp).startswith(b"220 ")
    assert served.terminate() == 0, served.output()
    assert [e for e in served.events() if str(e.get("event", "")).startswith("systemd.")] == []


def test_a_notify_socket_nobody_listens_on_is_logged_and_the_listener_serves(
    tmp_path: Path, write_config, ports: Ports, serve
) -> None:
    # A socket file left behind by a manager that is gone: connect() is refused.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(str(stale))
    served = serve("api", write_config(), str(stale))
    wait_accepting(served, ports.api)
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.api}/healthz", timeout=5) as response:
        assert response.status == 200
    warning = served.wait_for_event("systemd.notify_failed")
    assert warning["level"] == "warning"
    assert served.process.poll() is None
    assert served.terminate() == 0, served.output()


def test_sighup_reloads_the_config_of_serve_all_and_it_keeps_serving(
    tmp_path: Path, write_config, ports: Ports, serve, notify_socket
) -> None:
    # The config path is a symlink swapped to a file in another directory, as
    # config management does: the file watcher (on the first file's directory)
    # cannot see that, so only SIGHUP, what ExecReload sends, can load it.
    link = tmp_path / "etc" / "config.yaml"
    link.parent.mkdir()
    link.symlink_to(write_config(tmp_path / "v1" / "config.yaml", level="info"))
    manager = notify_socket()
    served = serve("all", link, manager.address)
    assert manager.receive(served).fields.get("READY") == "1"
    assert smtp_greeting(ports.smtp).startswith(b"220 ")  # at info: no smtp.connect line

    # The watcher watches the directory of the file the link pointed to at start, not the
    # link's: the swap below happens where it does not look.
    watching = served.wait_for_event("config.watching")
    assert Path(watching["directory"]) == (tmp_path / "v1").resolve()
    swap = link.with_name("config.yaml.new")
    swap.symlink_to(write_config(tmp_path / "v2" / "config.yaml", level="debug"))
    swap.replace(link)
    assert served.events("config.reloaded") == []

    os.kill(served.process.pid, signal.SIGHUP)
    reloaded = served.wait_for_event("config.reloaded")
    assert reloaded["changed"] == ["logging.level"]
    assert reloaded["restart_required"] == []

    assert smtp_greeting(ports.smtp).startswith(b"220 ")
    served.wait_for_event("smtp.connect")  # a debug line: the new level is in force
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.api}/healthz", timeout=5) as response:
        assert response.status == 200
    events = [e.get("event") for e in served.events()]
    assert events.count("smtp.connect") == 1
    assert events.index("config.reloaded") < events.index("smtp.connect")
    assert served.process.poll() is None
    assert served.terminate() == 0, served.output()


def test_serve_all_in_several_processes_is_ready_once_every_child_serves_and_stops_on_sigterm(
    write_config, ports: Ports, serve, notify_socket
) -> None:
    # With smtp.processes and api.processes above 1, only the supervising parent speaks to
    # the service manager: the children tell it, and it says READY=1 once for all of them.
    path = write_config()
    config = yaml.safe_load(path.read_text())
    config["smtp"]["processes"] = 2
    config["api"]["processes"] = 2
    path.write_text(yaml.safe_dump(config))
    manager = notify_socket()
    served = serve("all", path, manager.address)
    try:
        ready = manager.receive(served)
        refused = {key: port for key, port in ports.bound_by("all").items() if not accepts(port)}
        assert ready.fields.get("READY") == "1", ready.fields
        assert ready.fields.get("MAINPID") == str(served.process.pid)
        assert ready.sender_pid == served.process.pid
        assert refused == {}, f"not accepting when READY=1 arrived:\n{served.output()}"

        served.process.send_signal(signal.SIGTERM)
        stopping = manager.receive(served)
        assert stopping.fields.get("STOPPING") == "1", stopping.fields
        assert stopping.sender_pid == served.process.pid
        assert served.process.wait(timeout=40) == 0, served.output()
        # Read once every process has written its last line.
        roles = sorted(line["role"] for line in served.events("supervisor.child_ready"))
        assert roles == ["api/0", "api/1", "smtp/0", "smtp/1", "worker/0"], served.output()
        stopped = served.events("supervisor.child_stopped")
        assert sorted(line["role"] for line in stopped) == roles
        assert [line["exit_code"] for line in stopped] == [0] * len(roles), stopped
    finally:
        if served.process.poll() is None:
            served.terminate()  # the children end with their parent's drain, not with a kill of it
