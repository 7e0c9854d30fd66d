"""The configuration: YAML in, a frozen and fully validated ``Config`` out.

Values may reference the environment as ``${VAR}`` or ``${VAR:-default}``; the
expansion happens on parsed scalars, so an environment value is never re-read
as YAML. ``DATABASE_URL`` overrides ``database.url``, and an empty database URL
means the embedded SQLite file ``var/smtp-proxy.db``; ``SMTP_PROXY_ENCRYPTION_KEY``
supplies the encryption key when the file names neither a key nor a key file. Durations are written as
``500ms``, ``30s``, ``5m``, ``1h`` or ``2d`` (a bare number means seconds) and
are held as float seconds; sizes are plain byte counts. Relative paths are
relative to the working directory.

Every problem raises ``ConfigError(key, problem)`` naming the dotted key, so
that the CLI can stop with one line. Only yaml and the standard library are
imported here.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from smtp_proxy.errors import ConfigError

DEFAULT_SQLITE_PATH = Path("var") / "smtp-proxy.db"
KEY_ENV = "SMTP_PROXY_ENCRYPTION_KEY"

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_RATE_LIMIT = re.compile(r"^\s*\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day)s?\s*$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")
MAX_PROCESSES = 256
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _opt(default: Any, kind: str, **rules: Any) -> Any:
    """A dataclass field with its YAML kind and validation rules in metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"kind": kind, **rules})
    return field(default=default, metadata={"kind": kind, **rules})


@dataclass(frozen=True)
class SmtpConfig:
    host: str = _opt("0.0.0.0", "str")
    port: int = _opt(587, "port")
    implicit_tls_port: int | None = _opt(None, "port", nullable=True)
    hostname: str = _opt("smtp.example.com", "hostname")
    max_connections: int = _opt(1000, "int", min=1)
    max_connections_per_account: int = _opt(100, "int", min=1)
    read_timeout: float = _opt(30.0, "duration", min=0.1)
    write_timeout: float = _opt(30.0, "duration", min=0.1)
    max_message_size: int = _opt(26_214_400, "int", min=1024)
    max_recipients: int = _opt(100, "int", min=1)
    metrics_port: int | None = _opt(9101, "port", nullable=True)
    # Fair use of the listener between clients and tenants; 0 turns the per-IP cap off.
    max_connections_per_ip: int = _opt(20, "int", min=0)
    auth_timeout: float = _opt(60.0, "duration", min=0.1)
    max_session_time: float = _opt(1800.0, "duration", min=1)
    max_data_in_flight: int = _opt(536_870_912, "int", min=65_536)
    # From:/Sender: addresses must be in the account's allowed domains (per account exemption).
    header_from_check: bool = _opt(True, "bool")
    # AUTH throttle: failures per client address (IPv6 by /64) and per user name, per window.
    auth_failures_per_ip: int = _opt(10, "int", min=1)
    auth_failures_per_user: int = _opt(10, "int", min=1)
    auth_failure_window: float = _opt(900.0, "duration", min=1)
    # Processes serving the ports (supervisor.py); ``auto``: one per usable CPU.
    processes: int = _opt(1, "processes")
    # Load balancers whose connections start with a PROXY protocol header naming the client.
    proxy_protocol_from: tuple[Network, ...] = _opt((), "networks")
    proxy_protocol_timeout: float = _opt(5.0, "duration", min=0.1)


@dataclass(frozen=True)
class ApiConfig:
    host: str = _opt("0.0.0.0", "str")
    port: int = _opt(8080, "port")
    threads: int = _opt(8, "int", min=1, max=512)
    # waitress has one inactivity timeout: nothing received and nothing sent for this long.
    read_timeout: float = _opt(10.0, "duration", min=0.1)
    rate_limit: str = _opt("100/minute", "rate_limit")
    # Empty: limits.storage. Kept for configs written before the limits section.
    rate_limit_storage: str = _opt("", "str")
    # Per client address, for requests without a valid key, before any database lookup.
    unauthenticated_rate_limit: str = _opt("60/minute", "rate_limit")
    processes: int = _opt(1, "processes")
    # Load balancers whose connections start with a PROXY protocol header (as for SMTP), and
    # HTTP proxies whose X-Forwarded-For names the client.
    proxy_protocol_from: tuple[Network, ...] = _opt((), "networks")
    trusted_proxies: tuple[Network, ...] = _opt((), "networks")


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = _opt("", "str")
    pool_min: int = _opt(20, "int", min=1)
    pool_max: int = _opt(100, "int", min=1)
    connect_timeout: float = _opt(5.0, "duration", min=0.1)

    @property
    def effective_url(self) -> str:
        """The URL to connect to: the configured one, else the embedded SQLite file."""
        return self.url or f"sqlite:///{DEFAULT_SQLITE_PATH}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_url.startswith("sqlite")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _opt("info", "choice", choices=LOG_LEVELS)
    format: str = _opt("json", "choice", choices=("json", "text"))


@dataclass(frozen=True)
class TlsConfig:
    # One file each, or two lists of the same length: pair i is (cert_file[i], key_file[i]), one
    # pair per key type (ECDSA and RSA side by side). An empty key file: the key is in the cert file.
    cert_file: tuple[str, ...] = _opt(("/etc/smtp-proxy/tls/cert.pem",), "files")
    key_file: tuple[str, ...] = _opt(("/etc/smtp-proxy/tls/key.pem",), "files")

    def __post_init__(self) -> None:
        # Built in code with a bare string, each character would be taken for a file name.
        for name in ("cert_file", "key_file"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"TlsConfig.{name} takes a tuple of file names, not a string")


@dataclass(frozen=True)
class SecurityConfig:
    encryption_key: str = _opt("", "key")
    encryption_key_file: str = _opt("", "str")
    # Keys that still decrypt data written before a rotation; never used to encrypt.
    previous_encryption_keys: tuple[str, ...] = _opt((), "key_list")
    bcrypt_cost: int = _opt(12, "int", min=4, max=16)
    # One sender domain, one tenant: a domain (or pattern) another active account holds is refused.
    unique_sender_domains: bool = _opt(True, "bool")


# The ESPs' public API base URLs; tests aim them at local fakes. ``{region}`` is the SES region.
DEFAULT_ENDPOINTS: Mapping[str, str] = MappingProxyType(
    {
        "sendgrid": "https://api.sendgrid.com",
        "mailgun": "https://api.mailgun.net",
        "mailgun_eu": "https://api.eu.mailgun.net",
        "ses": "https://email.{region}.amazonaws.com",
    }
)


@dataclass(frozen=True)
class DeliveryConfig:
    workers: int = _opt(8, "int", min=1, max=256)
    batch_size: int = _opt(50, "int", min=1, max=10_000)
    poll_interval: float = _opt(1.0, "duration", min=0.01)
    lease: float = _opt(300.0, "duration", min=1)
    retry_base: float = _opt(60.0, "duration", min=0.001)
    retry_max: float = _opt(3600.0, "duration", min=0.001)
    max_attempts: int = _opt(30, "int", min=1)
    max_age: float = _opt(432_000.0, "duration", min=1)
    connect_timeout: float = _opt(10.0, "duration", min=0.1)
    send_timeout: float = _opt(60.0, "duration", min=0.1)
    # Off: an smtp provider's host on loopback, private or link-local addresses is refused.
    allow_private_networks: bool = _opt(False, "bool")
    endpoints: Mapping[str, str] = field(
        default_factory=lambda: DEFAULT_ENDPOINTS, metadata={"kind": "endpoints"}
    )
    # Extra CA certificates (PEM) trusted for smtp providers' TLS; empty: the system store.
    ca_file: str = _opt("", "str")
    retention: float = _opt(2_592_000.0, "duration", min=60)
    metrics_host: str = _opt("0.0.0.0", "str")
    metrics_port: int | None = _opt(9102, "port", nullable=True)
    # Fair delivery: providers tried per attempt, the attempt's time bound (None: twice
    # connect_timeout + send_timeout) and one account's messages in flight per worker process
    # (None: half of workers, at least 1).
    max_failover: int = _opt(3, "int", min=1)
    attempt_budget: float | None = _opt(None, "duration", min=0.1, nullable=True)
    max_in_flight_per_account: int | None = _opt(None, "int", min=1, nullable=True)
    # Delivery status notifications (RFC 3464) to the envelope sender: the default of accounts
    # without a setting of their own, and how long a message waits before its sender hears of
    # the delay (once). Not shorter than max_age: no delay notice, and an existing config with a
    # short max_age keeps working.
    bounces: bool = _opt(True, "bool")
    delay_notice_after: float = _opt(14_400.0, "duration", min=60)

    @property
    def effective_attempt_budget(self) -> float:
        if self.attempt_budget is not None:
            return self.attempt_budget
        return 2 * (self.connect_timeout + self.send_timeout)

    @property
    def effective_max_in_flight_per_account(self) -> int:
        if self.max_in_flight_per_account is not None:
            return self.max_in_flight_per_account
        return max(1, self.workers // 2)


# The per-account sending limits, in the order the usage endpoint lists them.
SENDING_LIMITS = ("messages_per_minute", "messages_per_hour", "messages_per_day", "recipients_per_day")


@dataclass(frozen=True)
class LimitsConfig:
    """Shared counters and per-tenant quotas; an account's own ``limits`` override the defaults."""

    # memory:// counts per process; redis://host:port is shared by every instance.
    storage: str = _opt("memory://", "str")
    messages_per_minute: int | None = _opt(None, "int", min=1, nullable=True)
    messages_per_hour: int | None = _opt(None, "int", min=1, nullable=True)
    messages_per_day: int | None = _opt(None, "int", min=1, nullable=True)
    recipients_per_day: int | None = _opt(None, "int", min=1, nullable=True)
    max_providers_per_account: int = _opt(50, "int", min=1)
    max_rules_per_account: int = _opt(200, "int", min=1)


@dataclass(frozen=True)
class Config:
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    source: str | None = field(default=None, compare=False)

    @property
    def api_rate_limit_storage(self) -> str:
        """Where the API's rate-limit counters live: ``api.rate_limit_storage`` or ``limits.storage``."""
        return self.api.rate_limit_storage or self.limits.storage

    def changed_keys(self, other: Config) -> list[str]:
        """Dotted keys whose values differ between two configs."""
        changed = []
        for section in dataclasses.fields(self):
            if section.name == "source":
                continue
            mine, theirs = getattr(self, section.name), getattr(other, section.name)
            for f in dataclasses.fields(mine):
                if getattr(mine, f.name) != getattr(theirs, f.name):
                    changed.append(f"{section.name}.{f.name}")
        return changed


_SECTIONS: dict[str, type] = {
    "smtp": SmtpConfig,
    "api": ApiConfig,
    "database": DatabaseConfig,
    "logging": LoggingConfig,
    "tls": TlsConfig,
    "security": SecurityConfig,
    "delivery": DeliveryConfig,
    "limits": LimitsConfig,
}


def expand_env(value: str, env: Mapping[str, str], key: str) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset ``${VAR}`` becomes ''."""

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        current = env.get(name, "")
        if current == "" and default is not None:
            return default
        return current

    if "${" in _ENV_REF.sub("", value):
        raise ConfigError(key, "malformed ${...} reference (use ${VAR} or ${VAR:-default})")
    return _ENV_REF.sub(repl, value)


def parse_duration(value: Any, key: str) -> float:
    """``30s`` -> 30.0; a bare number is seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration such as 30s or 5m, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a duration such as 30s or 5m, got {value!r}")
        return float(value)
    match = _DURATION.fullmatch(str(value))
    if not match:
        raise ConfigError(key, f"expected a duration such as 30s or 5m, got {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def decode_key(value: str, key: str) -> bytes:
    """An AES-256 key is 32 bytes written as URL-safe base64 (``smtp-proxy keys generate``)."""
    try:
        raw = base64.urlsafe_b64decode(value.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ConfigError(key, "not valid base64; generate one with `smtp-proxy keys generate`") from None
    if len(raw) != 32:
        raise ConfigError(key, f"must decode to 32 bytes, got {len(raw)}")
    return raw


def _coerce(value: Any, meta: Mapping[str, Any], key: str) -> Any:
    kind = meta["kind"]
    if value is None or (isinstance(value, str) and value == "" and meta.get("nullable")):
        if meta.get("nullable"):
            return None
        if kind in ("str", "key"):
            return ""
        if kind == "files":
            return ("",)
        if kind in ("key_list", "networks"):
            return ()
        raise ConfigError(key, "must not be empty")
    if kind in ("int", "port"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {value!r}") from None
        low, high = (1, 65535) if kind == "port" else (meta.get("min"), meta.get("max"))
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(key, f"must be {bounds}, got {number}")
        return number
    if kind == "processes":
        if isinstance(value, str) and value.strip().lower() == "auto":
            return usable_cpus()
        return _coerce(value, {"kind": "int", "min": 1, "max": MAX_PROCESSES}, key)
    if kind == "bool":
        # A string comes from ${VAR} expansion.
        flag = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
            str(value).strip().lower()
        )
        if isinstance(value, bool) or (isinstance(value, str) and flag is not None):
            return value if isinstance(value, bool) else flag
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if kind == "endpoints":
        return _endpoints(value, key)
    if kind == "files":
        return _files(value, key)
    if kind == "networks":
        return _networks(value, key)
    if kind == "duration":
        seconds = parse_duration(value, key)
        if seconds < meta.get("min", 0):
            raise ConfigError(key, f"must be at least {meta['min']}s")
        return seconds
    if not isinstance(value, str):
        if kind == "key_list":
            if not isinstance(value, list):
                raise ConfigError(key, "expected a list of keys")
            return tuple(_coerce(v, {"kind": "key"}, f"{key}[{i}]") for i, v in enumerate(value))
        raise ConfigError(key, f"expected a string, got {value!r}")
    if kind == "choice":
        lowered = value.lower()
        if lowered not in meta["choices"]:
            raise ConfigError(key, f"must be one of {', '.join(meta['choices'])}, got {value!r}")
        return lowered
    if kind == "hostname" and not _HOSTNAME.fullmatch(value):
        raise ConfigError(key, f"not a valid host name: {value!r}")
    if kind == "rate_limit" and not _RATE_LIMIT.match(value):
        raise ConfigError(key, f"expected a rate such as 100/minute, got {value!r}")
    if kind == "key" and value:
        decode_key(value, key)
    if kind == "key_list":
        return (_coerce(value, {"kind": "key"}, key),) if value else ()
    return value


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), for ``processes: auto``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _endpoints(value: Any, key: str) -> Mapping[str, str]:
    """The ESP base URLs: any of the known names, each http(s)://host[:port][/path]; the rest default."""
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping of {', '.join(DEFAULT_ENDPOINTS)} to URLs")
    merged = dict(DEFAULT_ENDPOINTS)
    for name, url in value.items():
        if name not in DEFAULT_ENDPOINTS:
            raise ConfigError(f"{key}.{name}", f"unknown endpoint (known: {', '.join(DEFAULT_ENDPOINTS)})")
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
            raise ConfigError(f"{key}.{name}", f"expected an http:// or https:// base URL, got {url!r}")
        merged[name] = url.rstrip("/")
    return MappingProxyType(merged)


def _files(value: Any, key: str) -> tuple[str, ...]:
    """A file name, or a non-empty list of them; a plain string is a list of one."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a file name or a list of file names, got {value!r}")
    if not value:
        raise ConfigError(key, "must name at least one file")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{key}[{index}]", f"expected a file name, got {item!r}")
    return tuple(value)


def _networks(value: Any, key: str) -> tuple[Network, ...]:
    """CIDRs (``10.0.0.0/24``, ``2001:db8::/64``) or single addresses; a string is a list of one.

    Strict: host bits set (``10.0.0.1/24``) are refused rather than silently widened, and so is
    a /0, which would let every address on the internet name itself as anyone.
    """
    if isinstance(value, str):
        value = [value] if value.strip() else []
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of networks such as 10.0.0.0/24, got {value!r}")
    networks: list[Network] = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(item, str):
            raise ConfigError(where, f"expected a network such as 10.0.0.0/24, got {item!r}")
        try:
            network = ipaddress.ip_network(item.strip())
        except ValueError:
            try:
                meant = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ConfigError(where, f"not a network such as 10.0.0.0/24: {item!r}") from None
            raise ConfigError(where, f"{item!r} has host bits set (did you mean {meant}?)") from None
        if network.prefixlen == 0:
            raise ConfigError(where, f"{item!r} would trust every address; name your balancers")
        networks.append(network)
    return tuple(networks)


def _expand_tree(node: Any, env: Mapping[str, str], key: str) -> Any:
    if isinstance(node, str):
        return expand_env(node, env, key)
    if isinstance(node, list):
        return [_expand_tree(v, env, f"{key}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: _expand_tree(v, env, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    return node


def _build_section(cls: type, raw: Any, name: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(name, "expected a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(fields)})")
    values = {k: _coerce(v, fields[k].metadata, f"{name}.{k}") for k, v in raw.items()}
    return cls(**values)


def config_from_dict(raw: Any, env: Mapping[str, str] | None = None, source: str | None = None) -> Config:
    """Validate a parsed YAML document; ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "expected a mapping of sections")
    raw = _expand_tree(raw, env, "")
    for name in raw:
        if name not in _SECTIONS:
            raise ConfigError(str(name), f"unknown section (known: {', '.join(_SECTIONS)})")
    sections = {name: _build_section(cls, raw.get(name), name) for name, cls in _SECTIONS.items()}
    if env.get("DATABASE_URL"):
        sections["database"] = dataclasses.replace(sections["database"], url=env["DATABASE_URL"])
    security = sections["security"]
    if not security.encryption_key and not security.encryption_key_file and env.get(KEY_ENV):
        # The key's conventional home, also when the file does not mention it.
        sections["security"] = dataclasses.replace(
            security,
            encryption_key=_coerce(
                env[KEY_ENV], {"kind": "key"}, f"security.encryption_key (from {KEY_ENV})"
            ),
        )
    config = Config(**sections, source=source)
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    db = config.database
    if db.pool_max < db.pool_min:
        raise ConfigError("database.pool_max", f"must be at least pool_min ({db.pool_min})")
    url = db.effective_url
    if not re.match(r"^(postgresql(\+psycopg2)?|sqlite)://", url):
        raise ConfigError("database.url", "must start with postgresql:// or sqlite://")
    smtp = config.smtp
    if smtp.implicit_tls_port is not None and smtp.implicit_tls_port == smtp.port:
        raise ConfigError("smtp.implicit_tls_port", "must differ from smtp.port")
    tls = config.tls
    if len(tls.key_file) != len(tls.cert_file):
        raise ConfigError(
            "tls.key_file",
            f"names {len(tls.key_file)} file(s) but tls.cert_file names {len(tls.cert_file)}; "
            "give one key file per certificate file, in the same order",
        )
    delivery = config.delivery
    if delivery.retry_max < delivery.retry_base:
        raise ConfigError("delivery.retry_max", f"must be at least retry_base ({delivery.retry_base:g}s)")
    if delivery.lease < 2 * (delivery.connect_timeout + delivery.send_timeout):
        raise ConfigError(
            "delivery.lease", "must be at least twice connect_timeout + send_timeout (one attempt's bound)"
        )
    storage = config.limits.storage
    if not re.match(r"^(memory|redis|rediss|redis\+sentinel|redis\+cluster)://", storage):
        raise ConfigError("limits.storage", f"expected memory:// or redis://host:port, got {storage!r}")
    sec = config.security
    if sec.encryption_key and sec.encryption_key_file:
        raise ConfigError("security.encryption_key_file", "set either encryption_key or encryption_key_file")


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file; ``None`` gives the defaults (plus the environment)."""
    if path is None:
        return config_from_dict({}, env)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{path} is not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError("--config", f"{path}: {problem}{where}") from None
    return config_from_dict(raw, env, source=str(path))


def encryption_keys(config: SecurityConfig) -> tuple[bytes, tuple[bytes, ...]]:
    """The current key and the decrypt-only previous keys; a missing key is an error."""
    value, key = config.encryption_key, "security.encryption_key"
    if not value and config.encryption_key_file:
        key = "security.encryption_key_file"
        try:
            value = Path(config.encryption_key_file).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(key, f"cannot read {config.encryption_key_file}: {detail}") from None
        if not value:
            raise ConfigError(key, f"{config.encryption_key_file} is empty")
    if not value:
        raise ConfigError(
            "security.encryption_key",
            "is required (set SMTP_PROXY_ENCRYPTION_KEY; `smtp-proxy keys generate` makes one)",
        )
    previous = tuple(
        decode_key(k, f"security.previous_encryption_keys[{i}]")
        for i, k in enumerate(config.previous_encryption_keys)
    )
    return decode_key(value, key), previous
