"""The layering rules of the package, checked on the source (STYLE: a pure core, thin adapters)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "smtp_proxy"
CORE = [
    "smtp/protocol.py",
    "smtp/replies.py",
    "smtp/addresses.py",
    "smtp/sasl.py",
    "smtp/trace.py",
    "smtp/alignment.py",
    "proxy_protocol.py",
    "units.py",
    "long_lines.py",
]
CORE_ALLOWED = {
    "__future__",
    "binascii",
    "base64",
    "collections.abc",
    "dataclasses",
    "datetime",
    "email.errors",
    "email.message",
    "email.parser",
    "email.policy",
    "email.utils",
    "enum",
    "ipaddress",
    "itertools",
    "re",
    "typing",
    "smtp_proxy.smtp",
    "smtp_proxy.smtp.replies",
    "smtp_proxy.smtp.addresses",
    "smtp_proxy.smtp.sasl",
    "smtp_proxy.smtp.alignment",
    "smtp_proxy.units",
    "smtp_proxy.long_lines",
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", CORE)
def test_protocol_core_imports_only_the_standard_library_it_needs(module: str) -> None:
    """No socket, ssl, threading, database or config in the core: every RFC corner stays unit-testable."""
    assert imports_of(PACKAGE / module) <= CORE_ALLOWED


def test_nothing_imports_the_cli() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name not in ("cli.py", "__main__.py"):
            assert "smtp_proxy.cli" not in imports_of(path), path


@pytest.mark.parametrize(("layer", "forbidden"), [("api", "smtp_proxy.smtp"), ("smtp", "smtp_proxy.api")])
def test_listeners_do_not_import_each_other(layer: str, forbidden: str) -> None:
    for path in (PACKAGE / layer).rglob("*.py"):
        assert not any(name.startswith(forbidden) for name in imports_of(path)), path


def test_only_storage_and_db_build_queries() -> None:
    """Adapters call the storage layer; they do not import SQL constructors themselves."""
    for layer in ("smtp", "api", "delivery"):
        for path in (PACKAGE / layer).rglob("*.py"):
            assert "sqlalchemy.sql" not in imports_of(path), path
            assert not any(
                isinstance(node, ast.ImportFrom)
                and node.module == "sqlalchemy"
                and {a.name for a in node.names} & {"select", "insert", "update", "delete", "text"}
                for node in ast.walk(ast.parse(path.read_text()))
            ), path


DELIVERY_CORE = ["delivery/routing.py", "delivery/backoff.py", "delivery/outcome.py", "delivery/verdict.py"]
# The transports (and what only they use) and everything that reaches the database.
TRANSPORTS = tuple(
    f"smtp_proxy.delivery.{name}"
    for name in ("transports", "smtp_client", "sendgrid", "mailgun", "ses", "http", "network", "deadline")
)
DELIVERY_FORBIDDEN = (
    "socket",
    "ssl",
    "threading",
    "sqlalchemy",
    "smtplib",
    "requests",
    "botocore",
    "smtp_proxy.storage",
    "smtp_proxy.db",
    *TRANSPORTS,
)


@pytest.mark.parametrize("module", DELIVERY_CORE)
def test_delivery_decisions_are_pure(module: str) -> None:
    """Routing, backoff, outcomes and the verdict on an attempt decide from plain values: no storage,
    no transport, no socket, so every branch is testable without them."""
    imported = imports_of(PACKAGE / module)
    assert not {name for name in imported if name.startswith(DELIVERY_FORBIDDEN)}, imported


def test_listeners_and_worker_do_not_import_each_other() -> None:
    for layer, forbidden in (("delivery", ("smtp_proxy.api",)), ("api", ("smtp_proxy.delivery",))):
        for path in (PACKAGE / layer).rglob("*.py"):
            assert not any(name.startswith(forbidden) for name in imports_of(path)), path


# The socket adapter moves bytes, runs TLS and drains; the authenticator and the intake own policy
# and storage.
SOCKET_ADAPTER = "smtp/server.py"


def test_the_socket_adapter_does_not_reach_storage() -> None:
    imported = imports_of(PACKAGE / SOCKET_ADAPTER)
    assert not {
        name
        for name in imported
        if name.startswith(("smtp_proxy.storage", "smtp_proxy.db.models", "sqlalchemy"))
    }, imported


def test_the_api_writes_through_storage_only() -> None:
    """No ORM model and no SQLAlchemy in the API: every write (and its audit row) is a storage call."""
    for path in (PACKAGE / "api").rglob("*.py"):
        imported = imports_of(path)
        assert not {name for name in imported if name.startswith(("smtp_proxy.db.models", "sqlalchemy"))}, (
            path
        )


def test_storage_writes_take_an_explicit_actor() -> None:
    """An actor with a default would audit a forgetful caller as someone else (the operator)."""
    for path in (PACKAGE / "storage").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            arguments = node.args
            positional = arguments.posonlyargs + arguments.args
            with_default = positional[len(positional) - len(arguments.defaults) :]
            defaults = {a.arg for a in with_default}
            defaults |= {
                a.arg
                for a, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
                if default is not None
            }
            assert "actor" not in defaults, f"{path.name}:{node.lineno} {node.name}() defaults its actor"


def test_the_contract_is_standard_library_only() -> None:
    """Every layer imports the contract, so it may import nothing of theirs."""
    imported = imports_of(PACKAGE / "contract.py")
    assert {name.split(".")[0] for name in imported} <= {"__future__", "enum", "re", "typing"}, imported


def test_the_supervisor_holds_nothing_a_fork_could_break() -> None:
    """The parent forks again for every restart: no database, Redis or metrics client in it."""
    imported = imports_of(PACKAGE / "supervisor.py")
    assert {name.split(".")[0] for name in imported} <= {
        "__future__",
        "collections",
        "contextlib",
        "ctypes",
        "dataclasses",
        "errno",
        "logging",
        "os",
        "secrets",
        "selectors",
        "signal",
        "smtp_proxy",
        "socket",
        "struct",
        "sys",
        "time",
    }, imported
    assert {name for name in imported if name.startswith("smtp_proxy")} <= {"smtp_proxy", "smtp_proxy.logs"}


def test_the_multiprocess_metrics_mode_is_chosen_before_prometheus_client_is_imported() -> None:
    """prometheus_client picks its value class at import: neither the command line nor
    supervised.py may import it (or a module defining a metric) before ``serve_supervised``
    has set the directory."""
    top_level = set()
    for node in ast.parse((PACKAGE / "supervised.py").read_text()).body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module)
    assert not {n for n in top_level if n.startswith("prometheus_client")}, top_level
    assert {n for n in top_level if n.startswith("smtp_proxy")} <= {"smtp_proxy.config"}, top_level
    probe = (
        "import sys, smtp_proxy.cli, smtp_proxy.supervised\n"
        "print(sorted(m for m in sys.modules if 'prometheus' in m))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
