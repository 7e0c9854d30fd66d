"""Behaviour of smtp_proxy.config: defaults, environment expansion, validation, errors.

Every test passes an explicit ``env`` so that the environment of the test run
does not leak in (except the tests that are about ``os.environ`` itself).
"""

from __future__ import annotations

import base64
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtp_proxy.config import (
    DEFAULT_SQLITE_PATH,
    Config,
    DatabaseConfig,
    SecurityConfig,
    SmtpConfig,
    config_from_dict,
    encryption_keys,
    load_config,
)
from smtp_proxy.errors import ConfigError

KEY_BYTES = bytes(range(32))
KEY = base64.urlsafe_b64encode(KEY_BYTES).decode("ascii")
OLD_KEY_BYTES = bytes(range(100, 132))
OLD_KEY = base64.urlsafe_b64encode(OLD_KEY_BYTES).decode("ascii")
SHORT_KEY = base64.urlsafe_b64encode(b"k" * 16).decode("ascii")
LONG_KEY = base64.urlsafe_b64encode(b"k" * 64).decode("ascii")

SECTIONS = ("smtp", "api", "database", "logging", "tls", "security", "delivery")


def config_error(raw: Any, env: dict[str, str] | None = None) -> ConfigError:
    """The ConfigError that validating ``raw`` raises."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, env={} if env is None else env)
    return info.value


def load_error(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return info.value


# --- defaults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [{}, None], ids=["empty_mapping", "none"])
def test_defaults_when_document_is_empty(raw: Any) -> None:
    config = config_from_dict(raw, env={})

    assert config.smtp.port == 587
    assert config.smtp.implicit_tls_port is None
    assert config.smtp.metrics_port == 9101
    assert config.smtp.hostname == "smtp.example.com"
    assert config.smtp.max_message_size == 26_214_400
    assert config.api.port == 8080
    assert config.api.threads == 8
    assert config.api.rate_limit == "100/minute"
    assert config.database.url == ""
    assert config.database.pool_min == 20
    assert config.database.pool_max == 100
    assert config.logging.level == "info"
    assert config.logging.format == "json"
    assert config.security.encryption_key == ""
    assert config.security.previous_encryption_keys == ()
    assert config.security.bcrypt_cost == 12
    assert config == Config()


def test_defaults_durations_are_float_seconds() -> None:
    config = config_from_dict({}, env={})

    durations = {
        "smtp.read_timeout": (config.smtp.read_timeout, 30.0),
        "smtp.write_timeout": (config.smtp.write_timeout, 30.0),
        "api.read_timeout": (config.api.read_timeout, 10.0),
        "database.connect_timeout": (config.database.connect_timeout, 5.0),
    }
    for key, (value, expected) in durations.items():
        assert type(value) is float, key
        assert value == expected, key


def test_defaults_when_load_config_has_no_path() -> None:
    config = load_config(None, env={})

    assert config == Config()
    assert config.source is None


def test_defaults_when_section_is_null() -> None:
    config = config_from_dict({"smtp": None, "logging": None}, env={})

    assert config.smtp == SmtpConfig()
    assert config.logging.level == "info"


# --- ${VAR} expansion --------------------------------------------------------------------------------


def test_env_reference_replaced_when_variable_set() -> None:
    config = config_from_dict({"smtp": {"host": "${SMTP_HOST}"}}, env={"SMTP_HOST": "127.0.0.1"})

    assert config.smtp.host == "127.0.0.1"


def test_env_reference_replaced_when_embedded_in_text() -> None:
    raw = {"tls": {"cert_file": "${TLS_DIR}/cert.pem", "key_file": "${TLS_DIR}/${KEY_NAME}.pem"}}

    config = config_from_dict(raw, env={"TLS_DIR": "/srv/tls", "KEY_NAME": "key"})

    assert config.tls.cert_file == ("/srv/tls/cert.pem",)
    assert config.tls.key_file == ("/srv/tls/key.pem",)


@pytest.mark.parametrize("env", [{}, {"SMTP_HOST": ""}], ids=["unset", "empty"])
def test_env_default_used_when_variable_unset_or_empty(env: dict[str, str]) -> None:
    config = config_from_dict({"smtp": {"host": "${SMTP_HOST:-10.0.0.1}"}}, env=env)

    assert config.smtp.host == "10.0.0.1"


def test_env_default_ignored_when_variable_set() -> None:
    config = config_from_dict({"smtp": {"host": "${SMTP_HOST:-10.0.0.1}"}}, env={"SMTP_HOST": "::1"})

    assert config.smtp.host == "::1"


def test_env_default_may_be_empty() -> None:
    config = config_from_dict({"tls": {"cert_file": "${CERT:-}"}}, env={})

    assert config.tls.cert_file == ("",)


def test_env_reference_empty_when_variable_unset_without_default() -> None:
    config = config_from_dict({"tls": {"cert_file": "${TLS_CERT}", "key_file": "k-${X}-k"}}, env={})

    assert config.tls.cert_file == ("",)
    assert config.tls.key_file == ("k--k",)


@pytest.mark.parametrize(
    "value",
    ["a: b", "[1]", "{x: 1}", "- item", "true", "~", "&anchor x", "# comment", "${OTHER}"],
)
def test_env_value_kept_literally_when_it_looks_like_yaml(value: str) -> None:
    config = config_from_dict({"smtp": {"host": "${SMTP_HOST}"}}, env={"SMTP_HOST": value, "OTHER": "nope"})

    assert config.smtp.host == value


def test_env_value_kept_literally_when_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("tls:\n  cert_file: ${CERT}\n  key_file: '${KEY:-[1]}'\n", encoding="utf-8")

    config = load_config(path, env={"CERT": "a: b"})

    assert config.tls.cert_file == ("a: b",)
    assert config.tls.key_file == ("[1]",)


def test_env_expanded_when_inside_list() -> None:
    raw = {"security": {"previous_encryption_keys": ["${OLD_KEY}"]}}

    config = config_from_dict(raw, env={"OLD_KEY": OLD_KEY})

    assert config.security.previous_encryption_keys == (OLD_KEY,)


def test_env_explicit_mapping_used_instead_of_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_HOST", "from-os-environ")
    monkeypatch.setenv("DATABASE_URL", "postgresql://os/environ")

    config = config_from_dict({"smtp": {"host": "${SMTP_HOST}"}}, env={})

    assert config.smtp.host == ""
    assert config.database.url == ""


def test_env_taken_from_os_environ_when_env_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_HOST", "from-os-environ")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("SMTP_PROXY_ENCRYPTION_KEY", raising=False)

    config = config_from_dict({"smtp": {"host": "${SMTP_HOST}"}})

    assert config.smtp.host == "from-os-environ"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, 2525), ({"SMTP_PORT": ""}, 2525), ({"SMTP_PORT": "25"}, 25), ({"SMTP_PORT": " 465 "}, 465)],
    ids=["default", "empty_uses_default", "set", "whitespace"],
)
def test_int_parsed_when_given_as_string_from_env(env: dict[str, str], expected: int) -> None:
    config = config_from_dict({"smtp": {"port": "${SMTP_PORT:-2525}"}}, env=env)

    assert config.smtp.port == expected
    assert type(config.smtp.port) is int


def test_int_parsed_when_quoted_in_yaml() -> None:
    config = config_from_dict({"smtp": {"max_recipients": "50"}, "database": {"pool_min": "3"}}, env={})

    assert config.smtp.max_recipients == 50
    assert config.database.pool_min == 3


def test_int_from_env_rejected_when_not_a_number() -> None:
    error = config_error({"smtp": {"port": "${SMTP_PORT}"}}, env={"SMTP_PORT": "smtp"})

    assert error.key == "smtp.port"
    assert "expected an integer" in error.problem
    assert "'smtp'" in error.problem


def test_duration_parsed_when_given_from_env() -> None:
    config = config_from_dict({"smtp": {"read_timeout": "${TIMEOUT:-5m}"}}, env={})

    assert config.smtp.read_timeout == 300.0


@pytest.mark.parametrize("env", [{}, {"TLS_PORT": ""}], ids=["unset", "empty"])
def test_nullable_port_none_when_env_reference_empty(env: dict[str, str]) -> None:
    config = config_from_dict({"smtp": {"implicit_tls_port": "${TLS_PORT}"}}, env=env)

    assert config.smtp.implicit_tls_port is None


@pytest.mark.parametrize(
    "value",
    [
        "${",
        "${SMTP_HOST",
        "$ {SMTP_HOST} ${",
        "${1HOST}",
        "${SMTP-HOST}",
        "${HOST:default}",
        "${ HOST }",
        "${}",
    ],
)
def test_malformed_env_reference_rejected(value: str) -> None:
    error = config_error({"smtp": {"host": value}}, env={"SMTP_HOST": "x", "HOST": "x"})

    assert error.key == "smtp.host"
    assert "malformed" in error.problem
    assert "${VAR}" in error.problem


def test_malformed_env_reference_rejected_when_next_to_a_valid_one() -> None:
    # "${A}-${B" has a well-formed reference and a broken one; the broken one must
    # not slip through as the literal text "${B".
    error = config_error({"smtp": {"host": "${A}-${B"}}, env={"A": "a", "B": "b"})

    assert error.key == "smtp.host"
    assert "malformed" in error.problem


def test_malformed_env_reference_names_list_index() -> None:
    error = config_error({"security": {"previous_encryption_keys": [OLD_KEY, "${OLD"]}})

    assert error.key == "security.previous_encryption_keys[1]"
    assert "malformed" in error.problem


# --- database ----------------------------------------------------------------------------------------


def test_database_url_from_env_overrides_file() -> None:
    raw = {"database": {"url": "postgresql://file/db"}}

    config = config_from_dict(raw, env={"DATABASE_URL": "postgresql://env/db"})

    assert config.database.url == "postgresql://env/db"
    assert config.database.effective_url == "postgresql://env/db"
    assert not config.database.is_sqlite


def test_database_url_from_env_used_when_file_has_none() -> None:
    config = config_from_dict({}, env={"DATABASE_URL": "sqlite:////tmp/x.db"})

    assert config.database.url == "sqlite:////tmp/x.db"
    assert config.database.is_sqlite


def test_database_url_from_file_kept_when_env_empty() -> None:
    config = config_from_dict({"database": {"url": "postgresql://file/db"}}, env={"DATABASE_URL": ""})

    assert config.database.url == "postgresql://file/db"


def test_database_url_from_env_rejected_when_scheme_unsupported() -> None:
    error = config_error({}, env={"DATABASE_URL": "mysql://env/db"})

    assert error.key == "database.url"
    assert "postgresql://" in error.problem


def test_database_url_empty_means_embedded_sqlite() -> None:
    config = config_from_dict({"database": {"url": ""}}, env={})

    assert DEFAULT_SQLITE_PATH == Path("var") / "smtp-proxy.db"
    assert config.database.url == ""
    assert config.database.effective_url == "sqlite:///var/smtp-proxy.db"
    assert config.database.is_sqlite


def test_database_url_null_means_embedded_sqlite() -> None:
    config = config_from_dict({"database": {"url": None}}, env={})

    assert config.database.effective_url == "sqlite:///var/smtp-proxy.db"


@pytest.mark.parametrize(
    ("url", "is_sqlite"),
    [
        ("postgresql://user@db:5432/smtp", False),
        ("postgresql+psycopg2://user@db/smtp", False),
        ("sqlite:////var/lib/smtp-proxy/db.sqlite", True),
        ("sqlite:///relative.db", True),
    ],
)
def test_database_url_accepted_when_scheme_supported(url: str, is_sqlite: bool) -> None:
    config = config_from_dict({"database": {"url": url}}, env={})

    assert config.database.effective_url == url
    assert config.database.is_sqlite is is_sqlite
    assert DatabaseConfig(url=url).is_sqlite is is_sqlite


@pytest.mark.parametrize(
    "url", ["mysql://db/smtp", "postgres://db/smtp", "db.example.com/smtp", "sqlite:relative.db", "http://x"]
)
def test_database_url_rejected_when_scheme_unsupported(url: str) -> None:
    error = config_error({"database": {"url": url}})

    assert error.key == "database.url"
    assert "must start with postgresql:// or sqlite://" in error.problem


@pytest.mark.parametrize(("pool_min", "pool_max"), [(10, 5), (20, 19), (None, 10)])
def test_pool_max_rejected_when_below_pool_min(pool_min: int | None, pool_max: int) -> None:
    database: dict[str, Any] = {"pool_max": pool_max}
    if pool_min is not None:
        database["pool_min"] = pool_min

    error = config_error({"database": database})

    assert error.key == "database.pool_max"
    assert f"at least pool_min ({pool_min or 20})" in error.problem


def test_pool_max_accepted_when_equal_to_pool_min() -> None:
    config = config_from_dict({"database": {"pool_min": 5, "pool_max": 5}}, env={})

    assert (config.database.pool_min, config.database.pool_max) == (5, 5)


# --- durations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172_800.0),
        ("1.5m", 90.0),
        (" 10 s ", 10.0),
        ("45", 45.0),
        (45, 45.0),
        (2.5, 2.5),
        ("100ms", 0.1),
    ],
)
def test_duration_parsed_to_float_seconds(value: Any, seconds: float) -> None:
    config = config_from_dict({"api": {"read_timeout": value}}, env={})

    assert config.api.read_timeout == pytest.approx(seconds)
    assert type(config.api.read_timeout) is float


@pytest.mark.parametrize(
    "value",
    ["fast", "5 minutes", "5x", "-5s", "1e3s", "", "s", "5ms5", True, False, [5], {"s": 5}],
    ids=repr,
)
def test_duration_rejected_when_malformed(value: Any) -> None:
    error = config_error({"smtp": {"read_timeout": value}})

    assert error.key == "smtp.read_timeout"
    assert "expected a duration such as 30s or 5m" in error.problem


def test_duration_rejected_when_null() -> None:
    error = config_error({"smtp": {"write_timeout": None}})

    assert error.key == "smtp.write_timeout"
    assert "must not be empty" in error.problem


@pytest.mark.parametrize("value", ["50ms", "0s", 0, 0.05, -5], ids=repr)
def test_duration_rejected_when_below_minimum(value: Any) -> None:
    error = config_error({"database": {"connect_timeout": value}})

    assert error.key == "database.connect_timeout"
    assert "at least 0.1s" in error.problem


def test_duration_rejected_when_not_a_number() -> None:
    # YAML `.nan` parses to float('nan'); every comparison with NaN is false, so a
    # `< min` check alone lets it through, and a socket timeout of NaN fails later.
    error = config_error({"smtp": {"read_timeout": math.nan}})

    assert error.key == "smtp.read_timeout"


# --- integers and ports ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["many", "1.5", 1.5, "", [1], {"a": 1}, "0x10"], ids=repr)
def test_int_rejected_when_not_an_integer(value: Any) -> None:
    error = config_error({"smtp": {"max_connections": value}})

    assert error.key == "smtp.max_connections"
    assert "expected an integer" in error.problem


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize(
    ("section", "key"), [("smtp", "port"), ("smtp", "max_recipients"), ("api", "threads")]
)
def test_int_rejected_when_bool(section: str, key: str, value: bool) -> None:
    error = config_error({section: {key: value}})

    assert error.key == f"{section}.{key}"
    assert f"expected an integer, got {value!r}" in error.problem


def test_int_rejected_when_null() -> None:
    error = config_error({"smtp": {"port": None}})

    assert error.key == "smtp.port"
    assert "must not be empty" in error.problem


@pytest.mark.parametrize("value", [0, -1, 65536, 100_000, "70000"], ids=repr)
@pytest.mark.parametrize(
    "key", ["smtp.port", "smtp.implicit_tls_port", "smtp.metrics_port", "api.port"], ids=str
)
def test_port_rejected_when_out_of_range(key: str, value: Any) -> None:
    section, name = key.split(".")

    error = config_error({section: {name: value}})

    assert error.key == key
    assert "must be between 1 and 65535" in error.problem
    assert str(int(value)) in error.problem


@pytest.mark.parametrize("value", [1, 65535])
def test_port_accepted_when_at_range_bounds(value: int) -> None:
    config = config_from_dict({"api": {"port": value}}, env={})

    assert config.api.port == value


@pytest.mark.parametrize("value", [None, ""], ids=repr)
def test_nullable_port_none_when_null_or_empty(value: Any) -> None:
    config = config_from_dict({"smtp": {"implicit_tls_port": value, "metrics_port": value}}, env={})

    assert config.smtp.implicit_tls_port is None
    assert config.smtp.metrics_port is None


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("smtp.max_connections", 0, "must be at least 1, got 0"),
        ("smtp.max_connections_per_account", -3, "must be at least 1, got -3"),
        ("smtp.max_message_size", 1023, "must be at least 1024, got 1023"),
        ("smtp.max_recipients", 0, "must be at least 1, got 0"),
        ("database.pool_min", 0, "must be at least 1, got 0"),
        ("database.pool_max", 0, "must be at least 1, got 0"),
        ("api.threads", 0, "must be between 1 and 512, got 0"),
        ("api.threads", 513, "must be between 1 and 512, got 513"),
        ("security.bcrypt_cost", 3, "must be between 4 and 16, got 3"),
        ("security.bcrypt_cost", "17", "must be between 4 and 16, got 17"),
    ],
)
def test_int_rejected_when_outside_bounds(key: str, value: Any, expected: str) -> None:
    section, name = key.split(".")

    error = config_error({section: {name: value}})

    assert error.key == key
    assert error.problem == expected


def test_implicit_tls_port_rejected_when_equal_to_port() -> None:
    error = config_error({"smtp": {"port": 2525, "implicit_tls_port": 2525}})

    assert error.key == "smtp.implicit_tls_port"
    assert "must differ from smtp.port" in error.problem


def test_implicit_tls_port_rejected_when_equal_to_default_port() -> None:
    error = config_error({"smtp": {"implicit_tls_port": "587"}})

    assert error.key == "smtp.implicit_tls_port"


def test_implicit_tls_port_accepted_when_different_from_port() -> None:
    config = config_from_dict({"smtp": {"port": 587, "implicit_tls_port": 465}}, env={})

    assert (config.smtp.port, config.smtp.implicit_tls_port) == (587, 465)


# --- processes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["smtp", "api"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "must be between 1 and 256, got 0"),
        (-1, "must be between 1 and 256, got -1"),
        (257, "must be between 1 and 256, got 257"),
        ("many", "expected an integer, got 'many'"),
        (True, "expected an integer, got True"),
        (None, "must not be empty"),
    ],
    ids=repr,
)
def test_processes_rejected_when_not_a_count_or_auto(section: str, value: Any, problem: str) -> None:
    error = config_error({section: {"processes": value}})

    assert error.key == f"{section}.processes"
    assert error.problem == problem


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto "])
def test_processes_auto_is_one_per_usable_cpu(value: str) -> None:
    config = config_from_dict({"smtp": {"processes": value}, "api": {"processes": value}}, env={})

    assert config.smtp.processes == config.api.processes == len(os.sched_getaffinity(0))


def test_processes_taken_from_env_and_default_to_one() -> None:
    config = config_from_dict({"smtp": {"processes": "${SMTP_PROCESSES:-1}"}}, env={"SMTP_PROCESSES": "4"})

    assert (config.smtp.processes, config.api.processes) == (4, 1)


# --- choices, host names, rates ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [("DEBUG", "debug"), ("Warning", "warning"), ("error", "error")]
)
def test_logging_level_normalised_when_valid(value: str, expected: str) -> None:
    config = config_from_dict({"logging": {"level": value, "format": "TEXT"}}, env={})

    assert config.logging.level == expected
    assert config.logging.format == "text"


@pytest.mark.parametrize("value", ["verbose", "warn", "", "info "], ids=repr)
def test_logging_level_rejected_when_unknown(value: str) -> None:
    error = config_error({"logging": {"level": value}})

    assert error.key == "logging.level"
    assert "must be one of debug, info, warning, error, critical" in error.problem
    assert repr(value) in error.problem


@pytest.mark.parametrize("value", [10, True, ["info"]], ids=repr)
def test_logging_level_rejected_when_not_a_string(value: Any) -> None:
    error = config_error({"logging": {"level": value}})

    assert error.key == "logging.level"
    assert "expected a string" in error.problem


@pytest.mark.parametrize("value", ["xml", "JSONL", ""], ids=repr)
def test_logging_format_rejected_when_unknown(value: str) -> None:
    error = config_error({"logging": {"format": value}})

    assert error.key == "logging.format"
    assert "must be one of json, text" in error.problem


@pytest.mark.parametrize(
    "value", ["mail.example.com", "localhost", "mail.example.com.", "a-b.example.org", "MX1.Example.COM"]
)
def test_hostname_accepted_when_valid(value: str) -> None:
    config = config_from_dict({"smtp": {"hostname": value}}, env={})

    assert config.smtp.hostname == value


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("-mail.example.com", id="leading_hyphen"),
        pytest.param("mail-.example.com", id="trailing_hyphen"),
        pytest.param("mail_relay.example.com", id="underscore"),
        pytest.param("mail example.com", id="space"),
        pytest.param("mail..example.com", id="empty_label"),
        pytest.param("a" * 64 + ".example.com", id="label_too_long"),
        pytest.param("smtp://mail.example.com", id="url"),
        pytest.param("mail.example.com\n", id="trailing_newline"),
        pytest.param("mail.example.com\r\n", id="trailing_crlf"),
    ],
)
def test_hostname_rejected_when_invalid(value: str) -> None:
    error = config_error({"smtp": {"hostname": value}})

    assert error.key == "smtp.hostname"
    assert "not a valid host name" in error.problem


def test_hostname_rejected_when_null() -> None:
    error = config_error({"smtp": {"hostname": None}})

    assert error.key == "smtp.hostname"
    assert "must not be empty" in error.problem


@pytest.mark.parametrize(
    "value", ["100/minute", "10 per second", "5/hour", "1000/day", "100/minutes", "10/2 minutes"]
)
def test_rate_limit_accepted_when_valid(value: str) -> None:
    config = config_from_dict({"api": {"rate_limit": value}}, env={})

    assert config.api.rate_limit == value


@pytest.mark.parametrize("value", ["fast", "100", "100/fortnight", "/minute", "minute/100", ""], ids=repr)
def test_rate_limit_rejected_when_malformed(value: str) -> None:
    error = config_error({"api": {"rate_limit": value}})

    assert error.key == "api.rate_limit"
    assert "expected a rate such as 100/minute" in error.problem


def test_rate_limit_rejected_when_not_a_string() -> None:
    error = config_error({"api": {"rate_limit": 100}})

    assert error.key == "api.rate_limit"
    assert "expected a string" in error.problem


def test_str_rejected_when_given_a_mapping() -> None:
    error = config_error({"delivery": {"ca_file": {"path": "/x"}}})

    assert error.key == "delivery.ca_file"
    assert "expected a string" in error.problem


# --- encryption keys ---------------------------------------------------------------------------------


def test_encryption_key_accepted_when_32_bytes_of_base64() -> None:
    config = config_from_dict(
        {"security": {"encryption_key": KEY, "previous_encryption_keys": [OLD_KEY]}}, env={}
    )

    assert config.security.encryption_key == KEY
    assert config.security.previous_encryption_keys == (OLD_KEY,)
    assert encryption_keys(config.security) == (KEY_BYTES, (OLD_KEY_BYTES,))


@pytest.mark.parametrize(
    "value",
    ["not base64!!", "abc", "é" * 44, KEY[:-2]],
    ids=["punctuation", "short", "non_ascii", "no_padding"],
)
def test_encryption_key_rejected_when_not_base64(value: str) -> None:
    error = config_error({"security": {"encryption_key": value}})

    assert error.key == "security.encryption_key"
    assert "not valid base64" in error.problem
    assert "smtp-proxy keys generate" in error.problem


@pytest.mark.parametrize(("value", "length"), [(SHORT_KEY, 16), (LONG_KEY, 64)], ids=["16_bytes", "64_bytes"])
def test_encryption_key_rejected_when_wrong_length(value: str, length: int) -> None:
    error = config_error({"security": {"encryption_key": value}})

    assert error.key == "security.encryption_key"
    assert error.problem == f"must decode to 32 bytes, got {length}"


def test_encryption_key_rejected_when_not_a_string() -> None:
    error = config_error({"security": {"encryption_key": 12345}})

    assert error.key == "security.encryption_key"
    assert "expected a string" in error.problem


@pytest.mark.parametrize(
    ("value", "key", "problem"),
    [
        ([OLD_KEY, "abc"], "security.previous_encryption_keys[1]", "not valid base64"),
        ([SHORT_KEY], "security.previous_encryption_keys[0]", "must decode to 32 bytes, got 16"),
        ("abc", "security.previous_encryption_keys", "not valid base64"),
        (LONG_KEY, "security.previous_encryption_keys", "must decode to 32 bytes, got 64"),
        ([OLD_KEY, 7], "security.previous_encryption_keys[1]", "expected a string"),
        ({"old": OLD_KEY}, "security.previous_encryption_keys", "expected a list of keys"),
    ],
    ids=["bad_item", "short_item", "bad_string", "long_string", "int_item", "mapping"],
)
def test_previous_encryption_keys_rejected_when_invalid(value: Any, key: str, problem: str) -> None:
    error = config_error({"security": {"previous_encryption_keys": value}})

    assert error.key == key
    assert problem in error.problem


@pytest.mark.parametrize(
    ("value", "expected"),
    [([OLD_KEY, KEY], (OLD_KEY, KEY)), (OLD_KEY, (OLD_KEY,)), ("", ()), ([], ())],
    ids=["list", "single_string", "empty_string", "empty_list"],
)
def test_previous_encryption_keys_is_a_tuple(value: Any, expected: tuple[str, ...]) -> None:
    config = config_from_dict({"security": {"previous_encryption_keys": value}}, env={})

    assert config.security.previous_encryption_keys == expected


def test_encryption_key_and_key_file_rejected_when_both_set(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)

    error = config_error({"security": {"encryption_key": KEY, "encryption_key_file": str(key_file)}})

    assert error.key == "security.encryption_key_file"
    assert "either encryption_key or encryption_key_file" in error.problem


def test_encryption_keys_read_from_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n", encoding="ascii")
    config = config_from_dict(
        {"security": {"encryption_key_file": str(key_file), "previous_encryption_keys": [OLD_KEY]}}, env={}
    )

    assert encryption_keys(config.security) == (KEY_BYTES, (OLD_KEY_BYTES,))


def test_encryption_keys_read_from_env() -> None:
    config = config_from_dict(
        {"security": {"encryption_key": "${SMTP_PROXY_ENCRYPTION_KEY}"}},
        env={"SMTP_PROXY_ENCRYPTION_KEY": KEY},
    )

    assert encryption_keys(config.security) == (KEY_BYTES, ())


def test_encryption_keys_rejected_when_neither_key_nor_file_set() -> None:
    config = config_from_dict({}, env={})

    with pytest.raises(ConfigError) as info:
        encryption_keys(config.security)

    assert info.value.key == "security.encryption_key"
    assert "is required" in info.value.problem
    assert "smtp-proxy keys generate" in info.value.problem


@pytest.mark.parametrize("kind", ["missing", "directory", "not_ascii"])
def test_encryption_keys_rejected_when_key_file_unreadable(tmp_path: Path, kind: str) -> None:
    key_file = tmp_path / "key"
    if kind == "directory":
        key_file.mkdir()
    elif kind == "not_ascii":
        key_file.write_bytes(b"\xff\xfe" + KEY.encode())
    security = SecurityConfig(encryption_key_file=str(key_file))

    with pytest.raises(ConfigError) as info:
        encryption_keys(security)

    assert info.value.key == "security.encryption_key_file"
    assert f"cannot read {key_file}" in info.value.problem


def test_encryption_keys_rejected_when_key_file_holds_bad_key(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(SHORT_KEY + "\n")

    with pytest.raises(ConfigError) as info:
        encryption_keys(SecurityConfig(encryption_key_file=str(key_file)))

    assert info.value.key == "security.encryption_key_file"
    assert "must decode to 32 bytes, got 16" in info.value.problem


def test_encryption_keys_rejected_when_previous_key_invalid() -> None:
    security = SecurityConfig(encryption_key=KEY, previous_encryption_keys=(OLD_KEY, "abc"))

    with pytest.raises(ConfigError) as info:
        encryption_keys(security)

    assert info.value.key == "security.previous_encryption_keys[1]"


# --- structure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smpt", "server", "Logging"])
def test_unknown_section_rejected(name: str) -> None:
    error = config_error({"smtp": {}, name: {"port": 25}})

    assert error.key == name
    assert "unknown section" in error.problem
    assert "smtp, api, database, logging, tls, security" in error.problem


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_rejected_in_each_section(section: str) -> None:
    error = config_error({section: {"bogus_key": 1}})

    known = [f.name for f in dataclasses.fields(getattr(Config(), section))]
    assert error.key == f"{section}.bogus_key"
    assert "unknown key" in error.problem
    assert ", ".join(known) in error.problem


def test_unknown_key_rejected_when_misspelt() -> None:
    error = config_error({"smtp": {"prot": 25}})

    assert error.key == "smtp.prot"
    assert "port" in error.problem


@pytest.mark.parametrize("value", [[1, 2], "587", 587, True], ids=repr)
@pytest.mark.parametrize("section", SECTIONS)
def test_section_rejected_when_not_a_mapping(section: str, value: Any) -> None:
    error = config_error({section: value})

    assert error.key == section
    assert "expected a mapping of keys" in error.problem


@pytest.mark.parametrize("raw", [[{"smtp": {}}], "smtp", 42, True], ids=repr)
def test_top_level_rejected_when_not_a_mapping(raw: Any) -> None:
    error = config_error(raw)

    assert error.key == "(top level)"
    assert "expected a mapping of sections" in error.problem


def test_config_error_message_names_key_and_problem() -> None:
    error = config_error({"smtp": {"port": 0}})

    assert str(error) == "smtp.port: must be between 1 and 65535, got 0"


# --- files -------------------------------------------------------------------------------------------


def test_load_config_reads_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "smtp-proxy.yaml"
    path.write_text(
        "smtp:\n"
        "  port: ${SMTP_PORT:-2525}\n"
        "  hostname: mx.example.net\n"
        "  read_timeout: 2m\n"
        "database:\n"
        "  pool_min: 2\n"
        "  pool_max: 4\n"
        "logging:\n"
        "  level: debug\n",
        encoding="utf-8",
    )

    config = load_config(path, env={})

    assert config.smtp.port == 2525
    assert config.smtp.hostname == "mx.example.net"
    assert config.smtp.read_timeout == 120.0
    assert (config.database.pool_min, config.database.pool_max) == (2, 4)
    assert config.logging.level == "debug"
    assert config.source == str(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"], ids=repr)
def test_load_config_gives_defaults_when_file_empty(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")

    config = load_config(path, env={})

    assert config == Config()
    assert config.source == str(path)


def test_load_config_applies_env_when_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")

    config = load_config(path, env={"DATABASE_URL": "postgresql://env/db"})

    assert config.database.url == "postgresql://env/db"


def test_load_config_rejected_when_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"

    error = load_error(path)

    assert error.key == "--config"
    assert f"cannot read {path}" in error.problem
    assert "No such file or directory" in error.problem


def test_load_config_rejected_when_path_is_a_directory(tmp_path: Path) -> None:
    error = load_error(tmp_path)

    assert error.key == "--config"
    assert f"cannot read {tmp_path}" in error.problem


def test_load_config_rejected_when_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("smtp:\n  hostname: caf\xe9\n".encode("latin-1"))

    error = load_error(path)

    assert error.key == "--config"
    assert error.problem == f"{path} is not UTF-8 text"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("smtp:\n  port: 2525\n  host: a: b\n", 3),
        ("smtp:\n  port: 2525\n bad: indentation\n", 3),
        ("smtp:\n\tport: 1\n", 2),
        ("smtp:\n  port: 2525\n  host: [oops\n", 4),
        ("smtp: {}\n---\napi: {}\n", 2),
    ],
    ids=["mapping_in_value", "indentation", "tab", "unclosed_list", "two_documents"],
)
def test_load_config_rejected_when_yaml_invalid(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")

    error = load_error(path)

    assert error.key == "--config"
    assert error.problem.startswith(f"{path}: ")
    assert f"at line {line}, column " in error.problem


def test_load_config_rejected_when_file_has_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "smtp-proxy.yaml"
    path.write_text("logging:\n  levle: debug\n", encoding="utf-8")

    error = load_error(path)

    assert error.key == "logging.levle"
    assert "unknown key" in error.problem


def test_load_config_rejected_when_file_is_a_list(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- smtp\n- api\n", encoding="utf-8")

    error = load_error(path)

    assert error.key == "(top level)"


# --- TLS certificate files ---------------------------------------------------------------------------


def test_tls_files_are_one_pair_when_given_as_strings() -> None:
    config = config_from_dict({"tls": {"cert_file": "/tls/cert.pem", "key_file": "/tls/key.pem"}}, env={})

    assert config.tls.cert_file == ("/tls/cert.pem",)
    assert config.tls.key_file == ("/tls/key.pem",)


def test_tls_files_default_to_one_pair() -> None:
    config = config_from_dict({}, env={})

    assert config.tls.cert_file == ("/etc/smtp-proxy/tls/cert.pem",)
    assert config.tls.key_file == ("/etc/smtp-proxy/tls/key.pem",)


def test_tls_files_are_pairs_in_order_when_given_as_lists(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "tls:\n"
        "  cert_file: ['${TLS}/ecdsa.pem', '${TLS}/rsa.pem']\n"
        "  key_file:\n"
        "    - ${TLS}/ecdsa.key\n"
        "    - ${TLS}/rsa.key\n",
        encoding="utf-8",
    )

    config = load_config(path, env={"TLS": "/srv/tls"})

    assert config.tls.cert_file == ("/srv/tls/ecdsa.pem", "/srv/tls/rsa.pem")
    assert config.tls.key_file == ("/srv/tls/ecdsa.key", "/srv/tls/rsa.key")


def test_tls_key_file_list_may_leave_a_key_in_its_certificate_file() -> None:
    raw = {"tls": {"cert_file": ["ecdsa.pem", "rsa-with-key.pem"], "key_file": ["ecdsa.key", ""]}}

    config = config_from_dict(raw, env={})

    assert config.tls.key_file == ("ecdsa.key", "")


def test_tls_key_file_null_means_the_key_is_in_the_certificate_file() -> None:
    config = config_from_dict({"tls": {"cert_file": "combined.pem", "key_file": None}}, env={})

    assert config.tls.key_file == ("",)


@pytest.mark.parametrize(
    ("tls", "counts"),
    [
        ({"cert_file": ["a.pem", "b.pem"], "key_file": ["a.key"]}, ("1", "2")),
        ({"cert_file": ["a.pem"], "key_file": ["a.key", "b.key"]}, ("2", "1")),
        ({"cert_file": ["a.pem", "b.pem"], "key_file": "a.key"}, ("1", "2")),
        ({"cert_file": ["a.pem", "b.pem"]}, ("1", "2")),  # the default key file is one file
        ({"cert_file": "a.pem", "key_file": ["a.key", "b.key"]}, ("2", "1")),
    ],
    ids=["fewer_keys", "more_keys", "key_string", "key_default", "cert_string"],
)
def test_tls_files_rejected_when_lengths_differ(tls: dict[str, Any], counts: tuple[str, str]) -> None:
    error = config_error({"tls": tls})

    assert error.key == "tls.key_file"
    assert error.problem.startswith(f"names {counts[0]} file(s) but tls.cert_file names {counts[1]}")


@pytest.mark.parametrize("name", ["cert_file", "key_file"])
def test_tls_files_rejected_when_list_is_empty(name: str) -> None:
    error = config_error({"tls": {name: []}})

    assert error.key == f"tls.{name}"
    assert error.problem == "must name at least one file"


@pytest.mark.parametrize("item", [None, 1, ["nested.pem"], {"path": "x.pem"}], ids=repr)
def test_tls_files_rejected_naming_the_index_when_an_item_is_not_a_string(item: Any) -> None:
    error = config_error({"tls": {"cert_file": ["a.pem", item], "key_file": ["a.key", "b.key"]}})

    assert error.key == "tls.cert_file[1]"
    assert error.problem == f"expected a file name, got {item!r}"


@pytest.mark.parametrize("value", [{"path": "/x"}, 3, True], ids=repr)
def test_tls_files_rejected_when_neither_a_string_nor_a_list(value: Any) -> None:
    error = config_error({"tls": {"key_file": value}})

    assert error.key == "tls.key_file"
    assert "expected a file name or a list of file names" in error.problem


@pytest.mark.parametrize("name", ["config.yaml", "config.dev.yaml"])
def test_tls_files_in_the_shipped_configs_stay_strings(name: str) -> None:
    raw = yaml.safe_load((Path(__file__).parents[2] / "etc" / name).read_text(encoding="utf-8"))

    assert isinstance(raw["tls"]["cert_file"], str)
    config = config_from_dict({"tls": raw["tls"]}, env={})
    assert config.tls.cert_file == (raw["tls"]["cert_file"],)
    assert config.tls.key_file == (raw["tls"]["key_file"],)


def test_tls_files_change_is_a_changed_key() -> None:
    one = config_from_dict({"tls": {"cert_file": "a.pem", "key_file": "a.key"}}, env={})
    two = config_from_dict({"tls": {"cert_file": ["a.pem", "b.pem"], "key_file": ["a.key", "b.key"]}}, env={})

    assert two.changed_keys(one) == ["tls.cert_file", "tls.key_file"]


# --- the Config object -------------------------------------------------------------------------------


def test_config_immutable_when_assigning() -> None:
    config = config_from_dict({}, env={})

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.smtp.port = 25  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.smtp = SmtpConfig(port=25)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.database.url = "sqlite:///x.db"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.source = "elsewhere.yaml"  # type: ignore[misc]
    assert config.smtp.port == 587


def test_config_holds_no_mutable_containers() -> None:
    config = config_from_dict({"security": {"previous_encryption_keys": [OLD_KEY]}}, env={})

    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            assert not isinstance(getattr(value, f.name), (list, dict, set)), f"{section.name}.{f.name}"


def test_changed_keys_lists_dotted_keys_in_section_order() -> None:
    old = config_from_dict({}, env={})
    new = config_from_dict(
        {
            "logging": {"level": "debug"},
            "smtp": {"port": 2525, "read_timeout": "1m"},
            "security": {"previous_encryption_keys": [OLD_KEY]},
        },
        env={},
    )

    assert new.changed_keys(old) == [
        "smtp.port",
        "smtp.read_timeout",
        "logging.level",
        "security.previous_encryption_keys",
    ]
    assert old.changed_keys(new) == new.changed_keys(old)


def test_changed_keys_empty_when_only_source_differs() -> None:
    a = config_from_dict({"smtp": {"port": 2525}}, env={}, source="a.yaml")
    b = config_from_dict({"smtp": {"port": "2525"}}, env={}, source="b.yaml")

    assert a.changed_keys(b) == []
    assert a == b


def test_changed_keys_sees_equivalent_durations_as_equal() -> None:
    a = config_from_dict({"smtp": {"read_timeout": "1m"}}, env={})
    b = config_from_dict({"smtp": {"read_timeout": 60}}, env={})

    assert a.changed_keys(b) == []


# --- the CLI -----------------------------------------------------------------------------------------


def _smtp_proxy_executable() -> Path:
    candidates = [
        Path(sys.executable).parent / "smtp-proxy",
        Path(__file__).resolve().parents[2] / ".venv" / "bin" / "smtp-proxy",
    ]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    pytest.fail(f"smtp-proxy executable not found in {candidates}")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("smtp:\n  port: 70000\n", "smtp.port"),
        ("smtp:\n  prot: 25\n", "smtp.prot"),
        ("logging:\n  level: loud\n", "logging.level"),
        ("smtp: [\n", "--config"),
        ("smtp:\n  processes: 0\n", "smtp.processes"),
        ("smtp:\n  processes: many\n", "smtp.processes"),
    ],
    ids=["port_out_of_range", "unknown_key", "bad_choice", "invalid_yaml", "no_processes", "processes_word"],
)
def test_cli_exits_2_with_one_line_when_config_invalid(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SMTP_PROXY_CONFIG", "DATABASE_URL", "SMTP_PROXY_ENCRYPTION_KEY")
    }

    result = subprocess.run(
        [str(_smtp_proxy_executable()), "--config", str(path), "accounts", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("smtp-proxy: config error: ")
    assert f"{key}: " in lines[0]
    assert result.stdout == ""
    assert not (tmp_path / DEFAULT_SQLITE_PATH).exists()


def test_encryption_key_taken_from_env_when_file_names_no_key() -> None:
    key = base64.urlsafe_b64encode(b"k" * 32).decode()
    config = config_from_dict({}, env={"SMTP_PROXY_ENCRYPTION_KEY": key})
    assert config.security.encryption_key == key


def test_encryption_key_from_env_rejected_when_malformed() -> None:
    error = config_error({}, env={"SMTP_PROXY_ENCRYPTION_KEY": "short"})
    assert "SMTP_PROXY_ENCRYPTION_KEY" in error.key


def test_encryption_key_file_wins_over_env(tmp_path: Path) -> None:
    raw = {"security": {"encryption_key_file": str(tmp_path / "k")}}
    config = config_from_dict(
        raw, env={"SMTP_PROXY_ENCRYPTION_KEY": base64.urlsafe_b64encode(b"k" * 32).decode()}
    )
    assert config.security.encryption_key == ""


def test_encryption_keys_rejected_when_key_file_is_empty(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("\n")
    config = config_from_dict({"security": {"encryption_key_file": str(tmp_path / "k")}}, env={})
    with pytest.raises(ConfigError) as raised:
        encryption_keys(config.security)
    assert raised.value.key == "security.encryption_key_file" and "empty" in raised.value.problem


def test_previous_encryption_keys_empty_when_null() -> None:
    config = config_from_dict({"security": {"previous_encryption_keys": None}}, env={})
    assert config.security.previous_encryption_keys == ()


# --- delivery -------------------------------------------------------------------------------------


def test_delivery_defaults_match_the_documented_ones() -> None:
    delivery = config_from_dict({}, env={}).delivery
    assert (delivery.workers, delivery.batch_size, delivery.poll_interval, delivery.lease) == (
        8,
        50,
        1.0,
        300.0,
    )
    assert (delivery.retry_base, delivery.retry_max, delivery.max_attempts) == (60.0, 3600.0, 30)
    assert (delivery.max_age, delivery.retention) == (5 * 86400.0, 30 * 86400.0)
    assert (delivery.connect_timeout, delivery.send_timeout, delivery.allow_private_networks) == (
        10.0,
        60.0,
        False,
    )
    assert dict(delivery.endpoints) == {
        "sendgrid": "https://api.sendgrid.com",
        "mailgun": "https://api.mailgun.net",
        "mailgun_eu": "https://api.eu.mailgun.net",
        "ses": "https://email.{region}.amazonaws.com",
    }


def test_delivery_endpoints_override_some_and_keep_the_rest() -> None:
    raw = {
        "delivery": {
            "endpoints": {"sendgrid": "http://127.0.0.1:8025/fake/", "ses": "http://[::1]:9/{region}"}
        }
    }
    endpoints = config_from_dict(raw, env={}).delivery.endpoints
    assert endpoints["sendgrid"] == "http://127.0.0.1:8025/fake"  # no trailing slash
    assert endpoints["ses"] == "http://[::1]:9/{region}" and endpoints["mailgun"] == "https://api.mailgun.net"
    with pytest.raises(TypeError):
        endpoints["mailgun"] = "http://elsewhere"  # type: ignore[index]


@pytest.mark.parametrize(
    ("endpoints", "key"),
    [
        ({"postmark": "https://api.postmarkapp.com"}, "delivery.endpoints.postmark"),
        ({"sendgrid": "ftp://example.com"}, "delivery.endpoints.sendgrid"),
        ({"sendgrid": "https://example.com/x?y=1"}, "delivery.endpoints.sendgrid"),
        ({"mailgun": 42}, "delivery.endpoints.mailgun"),
        (["https://api.sendgrid.com"], "delivery.endpoints"),
    ],
)
def test_delivery_endpoints_rejected(endpoints: Any, key: str) -> None:
    assert config_error({"delivery": {"endpoints": endpoints}}).key == key


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("true", True), ("yes", True), ("0", False)])
def test_delivery_allow_private_networks_takes_booleans_and_their_spellings(
    value: Any, expected: bool
) -> None:
    assert (
        config_from_dict(
            {"delivery": {"allow_private_networks": value}}, env={}
        ).delivery.allow_private_networks
        is expected
    )


def test_delivery_allow_private_networks_from_the_environment() -> None:
    raw = {"delivery": {"allow_private_networks": "${ALLOW:-false}"}}
    assert config_from_dict(raw, env={"ALLOW": "true"}).delivery.allow_private_networks is True
    assert config_from_dict(raw, env={}).delivery.allow_private_networks is False


@pytest.mark.parametrize("value", [1, "maybe", None, []])
def test_delivery_allow_private_networks_rejects_other_values(value: Any) -> None:
    assert (
        config_error({"delivery": {"allow_private_networks": value}}).key == "delivery.allow_private_networks"
    )


def test_delivery_retry_max_below_retry_base_rejected() -> None:
    assert config_error({"delivery": {"retry_base": "10m", "retry_max": "1m"}}).key == "delivery.retry_max"


def test_delivery_bounces_default_on_and_delay_notice_after_four_hours() -> None:
    delivery = config_from_dict({}, env={}).delivery
    assert (delivery.bounces, delivery.delay_notice_after) == (True, 4 * 3600.0)
    raw = {"delivery": {"bounces": "false", "delay_notice_after": "90m"}}
    delivery = config_from_dict(raw, env={}).delivery
    assert (delivery.bounces, delivery.delay_notice_after) == (False, 5400.0)
    # At or past max_age it means no delay notice; an old config with a short max_age still loads.
    assert config_from_dict({"delivery": {"max_age": "1h"}}, env={}).delivery.delay_notice_after == 14_400.0


@pytest.mark.parametrize(
    ("delivery", "key", "problem"),
    [
        ({"bounces": "sometimes"}, "delivery.bounces", "expected true or false"),
        ({"delay_notice_after": "soon"}, "delivery.delay_notice_after", "expected a duration"),
        ({"delay_notice_after": "30s"}, "delivery.delay_notice_after", "must be at least 60s"),
    ],
)
def test_delivery_bounce_settings_rejected(delivery: dict[str, Any], key: str, problem: str) -> None:
    error = config_error({"delivery": delivery})
    assert error.key == key and problem in str(error)


def test_delivery_lease_shorter_than_one_attempt_rejected() -> None:
    error = config_error({"delivery": {"lease": "1m", "connect_timeout": "10s", "send_timeout": "60s"}})
    assert error.key == "delivery.lease"


@pytest.mark.parametrize("key", ["workers", "batch_size", "max_attempts"])
def test_delivery_counts_must_be_positive(key: str) -> None:
    assert config_error({"delivery": {key: 0}}).key == f"delivery.{key}"


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("section", SECTIONS)
def test_every_key_is_in_the_readme_and_the_production_example(section: str) -> None:
    """The documentation cannot drift from the code: each key has its row and its example line."""
    readme = (ROOT / "README.rst").read_text()
    heading = f"``{section}``\n\n"
    table = readme[readme.index(heading) + len(heading) :]
    table = table[: table.index("\n\n")]  # a table has no blank line
    example = yaml.safe_load((ROOT / "etc" / "config.yaml").read_text())[section]
    for f in dataclasses.fields(getattr(Config(), section)):
        assert f"``{f.name}``" in table, f"{section}.{f.name} missing from the README's table"
        assert f.name in example or (section, f.name) in NOT_IN_EXAMPLE, (
            f"{section}.{f.name} not in etc/config.yaml"
        )


# Alternatives to a key that the example shows instead.
NOT_IN_EXAMPLE = {("security", "encryption_key_file")}


def test_tls_config_built_in_code_refuses_a_bare_string() -> None:
    from smtp_proxy.config import TlsConfig

    with pytest.raises(TypeError, match="tuple of file names"):
        TlsConfig(cert_file="/tls/cert.pem")  # type: ignore[arg-type]
