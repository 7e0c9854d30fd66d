"""The ``smtp-proxy`` command: admin work and the listeners, on Flask's click CLI.

Every operator mistake ends in one line on stderr and a non-zero exit: 2 for
a configuration problem or a database not migrated to this version's schema
(nothing a retry or a restart can fix), 1 for anything else. Nothing imports
this module.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from flask import Flask
from flask.cli import FlaskGroup, ScriptInfo

from smtp_proxy import __version__, crypto
from smtp_proxy.config import SENDING_LIMITS, Config, load_config
from smtp_proxy.db.session import Database, safe_url
from smtp_proxy.db.types import iso_timestamp
from smtp_proxy.errors import (
    ConfigError,
    Conflict,
    DatabaseUnavailable,
    DecryptionError,
    NotFound,
    SchemaNotMigrated,
    ValidationError,
)
from smtp_proxy.logs import configure_logging
from smtp_proxy.reload import ConfigWatcher, start_watcher
from smtp_proxy.storage import accounts as account_store
from smtp_proxy.storage import credentials as credential_store
from smtp_proxy.storage import relay_networks
from smtp_proxy.storage.audit import CLI

if TYPE_CHECKING:  # alembic is loaded only by the commands that read the schema
    from smtp_proxy.db.schema_check import SchemaStatus

F = TypeVar("F", bound=Callable[..., Any])


class ConfigProblem(click.ClickException):
    """A configuration error: one line naming the key, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"smtp-proxy: config error: {self.message}", err=True)


class Failure(click.ClickException):
    def show(self, file: Any = None) -> None:
        click.echo(f"smtp-proxy: error: {self.message}", err=True)


class NotMigrated(Failure):
    """The database's schema is behind this code's: exit code 2, which the systemd units do not
    restart (``RestartPreventExitStatus=2``), as for a configuration error."""

    exit_code = 2


_RUNTIME = "smtp_proxy.runtime"


class Runtime:
    """What a command needs, built on first use from ``--config``."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None
        self._database: Database | None = None
        self.schema: SchemaStatus | None = None  # what the check found, once it passed

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as exc:
                raise ConfigProblem(str(exc)) from None
        return self._config

    @property
    def database(self) -> Database:
        """The database of a command that needs the schema: checked once, on first use.

        Raises SchemaNotMigrated when it is behind this code (before any command touches a
        table that may not be there), DatabaseUnavailable when it does not answer.
        """
        database = self.unchecked_database
        if self.schema is None:
            from smtp_proxy.db.schema_check import AHEAD, require_migrated

            status = self.schema = require_migrated(database.engine)
            if status.state == AHEAD:
                click.echo(
                    f"smtp-proxy: warning: the database is at revision {status.revision}, which this "
                    f"version ({status.head}) does not know; carrying on",
                    err=True,
                )
        return database

    @property
    def unchecked_database(self) -> Database:
        """The database whatever its schema: for ``db upgrade``, ``db current``, and the listeners
        (``serve_requires_schema`` checks at their start, tolerating a database that is down)."""
        if self._database is None:
            self._database = Database(self.config.database)
        return self._database

    def close(self) -> None:
        if self._database is not None:
            self._database.dispose()


def handle_errors(func: F) -> F:
    """Turn the project's exceptions into one-line CLI errors."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            raise ConfigProblem(str(exc)) from None
        except (ValidationError, Conflict, NotFound) as exc:
            raise Failure(str(exc)) from None
        except DecryptionError as exc:
            raise Failure(
                f"cannot decrypt stored data: {exc} (is the old key in previous_encryption_keys?)"
            ) from None
        except SchemaNotMigrated as exc:
            raise NotMigrated(_not_migrated(exc)) from None
        except DatabaseUnavailable:
            runtime = click.get_current_context().meta.get(_RUNTIME)
            where = safe_url(runtime.unchecked_database.engine) if runtime else "the database"
            raise Failure(f"database unavailable: cannot reach {where}") from None

    return wrapper  # type: ignore[return-value]


def _not_migrated(error: SchemaNotMigrated) -> str:
    """The operator's line for a schema behind: the check's own, or, when a query met a missing
    table (``db.session.translate``) after the check passed, one naming the revision it found."""
    runtime = click.get_current_context().meta.get(_RUNTIME)
    if runtime is None or runtime.schema is None:
        return str(error)
    return (
        f"the database at {safe_url(runtime.unchecked_database.engine)} lacks a table or column this "
        f"version needs, though it is at revision {runtime.schema.revision}"
    )


def _create_app() -> Flask:
    """Flask's ScriptInfo calls this: the API app for the command's config and database."""
    from smtp_proxy.api import create_app

    runtime = runtime_of(click.get_current_context())
    return create_app(runtime.config, runtime.unchecked_database)


class SmtpProxyGroup(FlaskGroup):
    """FlaskGroup without the options that only make sense for ``flask run``."""

    def __init__(self, **extra: Any) -> None:
        super().__init__(
            create_app=_create_app,
            add_default_commands=False,
            add_version_option=False,
            load_dotenv=False,
            set_debug_flag=False,
            **extra,
        )
        self.params = [p for p in self.params if p.name not in ("app", "env_file", "debug")]

    # FlaskGroup would build the app to look for app-provided commands, even for
    # --help; there are none, and a broken config must not print a traceback here.
    def list_commands(self, ctx: click.Context) -> list[str]:
        return click.Group.list_commands(self, ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return click.Group.get_command(self, ctx, name)


@click.group(cls=SmtpProxyGroup)
@click.option(
    "--config",
    "config_path",
    envvar="SMTP_PROXY_CONFIG",
    type=click.Path(dir_okay=False),
    help="YAML configuration file (env SMTP_PROXY_CONFIG). Without it, defaults and the environment.",
)
@click.version_option(__version__, prog_name="smtp-proxy")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Multi-tenant SMTP submission relay: admin commands and listeners."""
    runtime = Runtime(config_path)
    ctx.meta[_RUNTIME] = runtime
    ctx.call_on_close(runtime.close)
    # Admin commands print JSON on stdout; their log lines, if any, go to stderr.
    # `serve` commands replace this with the configured handler.
    logging.basicConfig(stream=sys.stderr, level=logging.CRITICAL)


def runtime_of(ctx: click.Context) -> Runtime:
    return ctx.meta[_RUNTIME]


def _emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


# --- db -------------------------------------------------------------------------------------------


@main.group(cls=click.Group)
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_context
@handle_errors
def db_upgrade(ctx: click.Context) -> None:
    """Apply pending migrations (safe to run again, and from several hosts at once)."""
    from smtp_proxy.db.migrate import upgrade

    before, after = upgrade(runtime_of(ctx).unchecked_database.engine)
    if before == after:
        click.echo(f"database is up to date at revision {after}")
    else:
        click.echo(f"database upgraded from {before or 'empty'} to {after}")


@db.command("current")
@click.pass_context
@handle_errors
def db_current(ctx: click.Context) -> None:
    """Show the schema revision of the database and of this code."""
    from smtp_proxy.db.migrate import current_revision, head_revision

    current = current_revision(runtime_of(ctx).unchecked_database.engine)
    click.echo(f"database: {current or 'empty'}; code: {head_revision()}")


# --- accounts -------------------------------------------------------------------------------------


@main.group(cls=click.Group)
def accounts() -> None:
    """Tenant accounts."""


def _account_json(account: Any) -> dict[str, Any]:
    return {
        "id": str(account.id),
        "name": account.name,
        "email": account.email,
        "allowed_domains": account.allowed_domains,
        "is_admin": account.is_admin,
        "active": account.active,
        "allow_any_header_from": bool(account.allow_any_header_from),
        "limits": dict(account.limits or {}),
        "relay_networks": relay_networks.render(account),
        "bounces": account.bounces,
        "created_at": iso_timestamp(account.created_at),
    }


def _read_password_stdin() -> str:
    line = sys.stdin.readline()
    if not line:
        raise ValidationError("password", "nothing was read from standard input")
    return line.rstrip("\r\n")


_DEFAULT = object()  # --limit NAME=default: drop the account's own value


def _parse_limits(values: tuple[str, ...]) -> dict[str, Any]:
    """``--limit NAME=VALUE`` options: VALUE an integer, ``none`` (unlimited) or ``default``."""
    parsed: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip().lower()
        if not sep or name not in SENDING_LIMITS:
            raise ValidationError(
                "--limit", f"expected NAME=VALUE with NAME one of {', '.join(SENDING_LIMITS)}, got {item!r}"
            )
        if raw == "none":
            parsed[name] = None
        elif raw == "default":
            parsed[name] = _DEFAULT
        elif raw.isascii() and raw.isdigit() and int(raw) > 0:
            parsed[name] = int(raw)
        else:
            problem = f"{name}: expected a positive integer, none or default, got {raw!r}"
            raise ValidationError("--limit", problem)
    return parsed


def _merge_limits(own: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    merged = dict(own)
    for name, value in given.items():
        if value is _DEFAULT:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


_LIMIT_HELP = (
    "An own sending limit, NAME=VALUE (repeat): NAME one of "
    + ", ".join(SENDING_LIMITS)
    + "; VALUE a positive integer, none (unlimited) or default (the config's)."
)


@accounts.command("create")
@click.option("--name", required=True, help="Account name; also the SMTP AUTH user name.")
@click.option("--email", required=True, help="Contact address of the tenant.")
@click.option("--domain", "domains", multiple=True, required=True, help="Allowed sender domain (repeat).")
@click.option("--admin", is_flag=True, help="May manage all accounts through the API.")
@click.option(
    "--allow-any-header-from", is_flag=True, help="From:/Sender: may name any domain (sends for others)."
)
@click.option("--limit", "limit_options", multiple=True, metavar="NAME=VALUE", help=_LIMIT_HELP)
@click.option("--password-stdin", is_flag=True, help="Read the SMTP password from stdin (else generated).")
@click.pass_context
@handle_errors
def accounts_create(
    ctx: click.Context,
    name: str,
    email: str,
    domains: tuple[str, ...],
    admin: bool,
    allow_any_header_from: bool,
    limit_options: tuple[str, ...],
    password_stdin: bool,
) -> None:
    """Create an account and print its credentials once, as JSON.

    A domain (or *. pattern) overlapping one of another active account is refused,
    unless security.unique_sender_domains is false.
    """
    runtime = runtime_of(ctx)
    limits = _merge_limits({}, _parse_limits(limit_options))
    password = _read_password_stdin() if password_stdin else None
    security = runtime.config.security
    with runtime.database.transaction() as session:
        created = account_store.create_account(
            session,
            name=name,
            email=email,
            allowed_domains=list(domains),
            password=password,
            is_admin=admin,
            allow_any_header_from=allow_any_header_from,
            limits=limits,
            unique_domains=security.unique_sender_domains,
            bcrypt_cost=security.bcrypt_cost,
            actor=CLI,
        )
    _emit(
        {
            "id": str(created.account.id),
            "name": created.account.name,
            "api_key": created.api_key,
            "password": created.password,
        }
    )


@accounts.command("update")
@click.argument("name")
@click.option("--domain", "domains", multiple=True, help="Allowed sender domain (repeat); replaces the list.")
@click.option(
    "--allow-any-header-from/--no-allow-any-header-from",
    default=None,
    help="From:/Sender: may name any domain, or only the allowed ones.",
)
@click.option("--limit", "limit_options", multiple=True, metavar="NAME=VALUE", help=_LIMIT_HELP)
@click.option("--admin/--no-admin", default=None, help="May manage all accounts through the API, or not.")
@click.option("--activate", is_flag=True, help="Reactivate a deactivated account.")
@click.option(
    "--relay-network",
    "relay_tls",
    multiple=True,
    metavar="CIDR",
    help="A network whose clients send as the account without AUTH, after STARTTLS (repeat).",
)
@click.option(
    "--relay-network-without-tls",
    "relay_clear",
    multiple=True,
    metavar="CIDR",
    help="The same, for devices that cannot do TLS: they send in the clear (repeat).",
)
@click.option("--no-relay-networks", is_flag=True, help="Withdraw every relay network of the account.")
@click.option(
    "--bounces/--no-bounces",
    default=None,
    help="Send delivery status notifications to the account's senders, or not.",
)
@click.option(
    "--bounces-default", is_flag=True, help="Drop the account's own setting: delivery.bounces holds."
)
@click.pass_context
@handle_errors
def accounts_update(
    ctx: click.Context,
    name: str,
    domains: tuple[str, ...],
    allow_any_header_from: bool | None,
    limit_options: tuple[str, ...],
    admin: bool | None,
    activate: bool,
    relay_tls: tuple[str, ...],
    relay_clear: tuple[str, ...],
    no_relay_networks: bool,
    bounces: bool | None,
    bounces_default: bool,
) -> None:
    """Change an account's domains, header-From exemption, limits, admin flag, relay networks or
    bounce setting; print it as JSON.

    Limits given are set one by one; the others keep their value. A domain (or a
    reactivated account's domain) that another active account holds is refused,
    unless security.unique_sender_domains is false. Relay networks given replace the
    account's list; one that overlaps another account's is refused.
    """
    runtime = runtime_of(ctx)
    given_limits = _parse_limits(limit_options)
    changes: dict[str, Any] = {}
    if domains:
        changes["allowed_domains"] = list(domains)
    if allow_any_header_from is not None:
        changes["allow_any_header_from"] = allow_any_header_from
    if admin is not None:
        changes["is_admin"] = admin
    if activate:
        changes["active"] = True
    if bounces_default and bounces is not None:
        raise ValidationError("bounces", "--bounces-default cannot be given with --bounces/--no-bounces")
    if bounces is not None or bounces_default:
        changes["bounces"] = bounces
    if no_relay_networks and (relay_tls or relay_clear):
        raise ValidationError("relay_networks", "--no-relay-networks cannot be given with networks")
    if relay_tls or relay_clear or no_relay_networks:
        changes["relay_networks"] = [{"network": n, "require_tls": True} for n in relay_tls] + [
            {"network": n, "require_tls": False} for n in relay_clear
        ]
    if not changes and not given_limits:
        raise ValidationError("update", "nothing to change; see --help")
    security = runtime.config.security
    with runtime.database.transaction() as session:
        account = account_store.get_account_by_name(session, name)
        if given_limits:
            changes["limits"] = _merge_limits(dict(account.limits or {}), given_limits)
        account_store.update_account(
            session,
            account,
            changes,
            actor=CLI,
            bcrypt_cost=security.bcrypt_cost,
            unique_domains=security.unique_sender_domains,
        )
        body = _account_json(account)
    _emit(body)


@accounts.command("list")
@click.pass_context
@handle_errors
def accounts_list(ctx: click.Context) -> None:
    """List every account as a JSON array."""
    with runtime_of(ctx).database.transaction() as session:
        _emit([_account_json(a) for a in account_store.list_accounts(session)])


@accounts.command("set-password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the new password from stdin (else generated).")
@click.pass_context
@handle_errors
def accounts_set_password(ctx: click.Context, name: str, password_stdin: bool) -> None:
    """Set a new SMTP password and print it once, as JSON."""
    runtime = runtime_of(ctx)
    password = _read_password_stdin() if password_stdin else None
    with runtime.database.transaction() as session:
        account = account_store.get_account_by_name(session, name)
        password = account_store.set_password(
            session, account, runtime.config.security.bcrypt_cost, password, actor=CLI
        )
    _emit({"name": name, "password": password})


@accounts.command("rotate-key")
@click.argument("name")
@click.pass_context
@handle_errors
def accounts_rotate_key(ctx: click.Context, name: str) -> None:
    """Issue a new API key (the old one stops working) and print it once."""
    with runtime_of(ctx).database.transaction() as session:
        account = account_store.get_account_by_name(session, name)
        api_key = account_store.rotate_api_key(session, account, actor=CLI)
    _emit({"name": name, "api_key": api_key})


@accounts.command("deactivate")
@click.argument("name")
@click.pass_context
@handle_errors
def accounts_deactivate(ctx: click.Context, name: str) -> None:
    """Stop an account's SMTP AUTH and API access; its data is kept."""
    with runtime_of(ctx).database.transaction() as session:
        account = account_store.get_account_by_name(session, name)
        account_store.deactivate_account(session, account, actor=CLI)
    click.echo(f"account {name} deactivated")


# --- SMTP credentials -----------------------------------------------------------------------------


@main.group(cls=click.Group)
def credentials() -> None:
    """SMTP credentials: several logins per account, each revoked on its own."""


def _credential_json(credential: Any) -> dict[str, Any]:
    """The API's rendering (never the hash); the API package is loaded only when needed."""
    from smtp_proxy.api.smtp_credentials import render

    return render(credential)


@credentials.command("create")
@click.argument("account_name", metavar="ACCOUNT")
@click.argument("label")
@click.option("--username", help="SMTP user name: ACCOUNT or ACCOUNT.<anything> (default ACCOUNT.LABEL).")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password (16+ characters) from stdin (else generated)."
)
@click.option(
    "--allowed-ip",
    "allowed_ips",
    multiple=True,
    metavar="CIDR",
    help="A network it may AUTH from (repeat); without any, anywhere.",
)
@click.option(
    "--allowed-domain",
    "allowed_domains",
    multiple=True,
    metavar="DOMAIN",
    help="A sender domain of the account's it may use (repeat); without any, all of them.",
)
@click.pass_context
@handle_errors
def credentials_create(
    ctx: click.Context,
    account_name: str,
    label: str,
    username: str | None,
    password_stdin: bool,
    allowed_ips: tuple[str, ...],
    allowed_domains: tuple[str, ...],
) -> None:
    """Add an SMTP credential to an account; print it with its password, once, as JSON."""
    runtime = runtime_of(ctx)
    password = _read_password_stdin() if password_stdin else None
    with runtime.database.transaction() as session:
        account = account_store.get_account_by_name(session, account_name)
        created = credential_store.create_credential(
            session,
            account,
            label=label,
            username=username,
            password=password,
            allowed_ips=list(allowed_ips),
            allowed_domains=list(allowed_domains) or None,
            bcrypt_cost=runtime.config.security.bcrypt_cost,
            actor=CLI,
        )
        body = {**_credential_json(created.credential), "password": created.password}
    _emit(body)


@credentials.command("list")
@click.argument("account_name", metavar="ACCOUNT")
@click.pass_context
@handle_errors
def credentials_list(ctx: click.Context, account_name: str) -> None:
    """List an account's SMTP credentials as a JSON array, oldest first."""
    with runtime_of(ctx).database.transaction() as session:
        account = account_store.get_account_by_name(session, account_name)
        _emit([_credential_json(c) for c in credential_store.list_credentials(session, account.id)])


def _set_enabled(ctx: click.Context, username: str, enabled: bool) -> None:
    runtime = runtime_of(ctx)
    with runtime.database.transaction() as session:
        credential = credential_store.get_by_username(session, username)
        account = account_store.get_account(session, credential.account_id)
        credential_store.update_credential(
            session,
            credential,
            account,
            {"enabled": enabled},
            bcrypt_cost=runtime.config.security.bcrypt_cost,
            actor=CLI,
        )
        body = _credential_json(credential)
    _emit(body)


@credentials.command("disable")
@click.argument("username")
@click.pass_context
@handle_errors
def credentials_disable(ctx: click.Context, username: str) -> None:
    """Refuse AUTH with this user name; its open sessions end at their next MAIL FROM."""
    _set_enabled(ctx, username, False)


@credentials.command("enable")
@click.argument("username")
@click.pass_context
@handle_errors
def credentials_enable(ctx: click.Context, username: str) -> None:
    """Accept AUTH with this user name again."""
    _set_enabled(ctx, username, True)


@credentials.command("delete")
@click.argument("username")
@click.pass_context
@handle_errors
def credentials_delete(ctx: click.Context, username: str) -> None:
    """Delete an SMTP credential; its messages are kept, without it."""
    with runtime_of(ctx).database.transaction() as session:
        credential = credential_store.get_by_username(session, username)
        credential_store.delete_credential(session, credential, actor=CLI)
    click.echo(f"credential {username} deleted")


# --- keys and TLS ---------------------------------------------------------------------------------


@main.group(cls=click.Group)
def keys() -> None:
    """Encryption keys."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new key for security.encryption_key (SMTP_PROXY_ENCRYPTION_KEY)."""
    click.echo(crypto.generate_encryption_key())


@keys.command("reencrypt")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 10_000))
@click.pass_context
@handle_errors
def keys_reencrypt(ctx: click.Context, batch_size: int) -> None:
    """Re-seal data written under previous_encryption_keys with the current key.

    Run after a key rotation; once it reports nothing left, the old key can be
    removed from security.previous_encryption_keys. Safe to interrupt and rerun.
    """
    from smtp_proxy.storage import dkim_keys, messages, providers, webhooks

    runtime = runtime_of(ctx)
    cipher = crypto.Cipher.from_config(runtime.config.security)
    with runtime.database.transaction() as session:
        secrets_done = providers.reseal_secrets(session, cipher)
        webhook_secrets = webhooks.reseal_secrets(session, cipher)
        dkim_done = dkim_keys.reseal_keys(session, cipher)
    bodies_done, after = 0, None
    while True:
        with runtime.database.transaction() as session:
            count, after = messages.reseal_bodies(session, cipher, after, batch_size)
        bodies_done += count
        if after is None:
            break
    _emit(
        {
            "provider_secrets": secrets_done,
            "webhook_secrets": webhook_secrets,
            "dkim_keys": dkim_done,
            "message_bodies": bodies_done,
            "key_id": cipher.current_key_id,
        }
    )


@main.group(cls=click.Group)
def tls() -> None:
    """TLS certificates."""


@tls.command("dev-cert")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--hostname", default="localhost", show_default=True)
@click.option("--rsa", "rsa_key", is_flag=True, help="An RSA-2048 key instead of ECDSA P-256.")
@handle_errors
def tls_dev_cert(out_dir: str, hostname: str, rsa_key: bool) -> None:
    """Write a self-signed certificate and key for development (cert.pem, key.pem)."""
    from smtp_proxy.devcert import write_self_signed

    try:
        cert, key = write_self_signed(Path(out_dir), hostname, rsa_key=rsa_key)
    except OSError as exc:
        name = exc.filename2 or exc.filename  # for a rename, filename2 is the target
        where = f" {name}" if name else ""
        raise Failure(f"cannot write the certificate or key{where}: {exc.strerror or exc}") from None
    click.echo(f"wrote {cert} and {key}")


# --- serve ----------------------------------------------------------------------------------------


@main.group(cls=click.Group)
def serve() -> None:
    """Run a listener in the foreground."""


def serve_requires_schema(runtime: Runtime) -> None:
    """A listener refuses to start on a database behind this code (SchemaNotMigrated: one line,
    exit 2); one that does not answer now is waited for, as the listeners always do."""
    from smtp_proxy.db.schema_check import require_migrated

    try:
        require_migrated(runtime.unchecked_database.engine)
    except SchemaNotMigrated:
        raise
    except DatabaseUnavailable:
        return  # logged as db.unavailable; the listeners retry


@contextlib.contextmanager
def _serving(ctx: click.Context, where: str) -> Iterator[ConfigWatcher | None]:
    """Around every listener: JSON logs, the schema check, the config watcher, and a bind error
    as one line."""
    runtime = runtime_of(ctx)
    config = runtime.config
    configure_logging(config.logging, background=True)
    serve_requires_schema(runtime)
    watcher = start_watcher(config)
    try:
        yield watcher
    except OSError as exc:
        # lifecycle.binding names the address that failed; ``where`` is the fallback.
        raise Failure(f"cannot listen on {exc.filename or where}: {exc.strerror or exc}") from None
    finally:
        if watcher is not None:
            watcher.stop()


def _supervised(ctx: click.Context, command: str, where: str) -> bool:
    """Serve in several processes when the config asks for it (``supervised.py``); False if not."""
    config = runtime_of(ctx).config
    smtp = config.smtp.processes if command in ("smtp", "all") else 1
    api = config.api.processes if command in ("api", "all") else 1
    if smtp == 1 and api == 1:
        return False
    from smtp_proxy.supervised import serve_supervised

    # No thread in the parent: each child starts its own log writer and config watcher.
    configure_logging(config.logging)
    # Nor a database connection: the check's is closed before the first fork.
    runtime = runtime_of(ctx)
    try:
        serve_requires_schema(runtime)
    finally:
        runtime.unchecked_database.dispose()
    try:
        code = serve_supervised(command, config, _app_for)
    except OSError as exc:
        raise Failure(f"cannot listen on {exc.filename or where}: {exc.strerror or exc}") from None
    if code:
        sys.exit(code)
    return True


def _app_for(config: Config, database: Database) -> Flask:
    from smtp_proxy.api import create_app

    return create_app(config, database)


@serve.command("api")
@click.pass_context
@handle_errors
def serve_api(ctx: click.Context) -> None:
    """The JSON management API, served by waitress (api.processes processes)."""
    from smtp_proxy.lifecycle import serve_api as run

    runtime = runtime_of(ctx)
    config = runtime.config
    where = f"{config.api.host}:{config.api.port}"
    if _supervised(ctx, "api", where):
        return
    with _serving(ctx, where):
        app = ctx.ensure_object(ScriptInfo).load_app()
        run(config, app, runtime.unchecked_database)


@serve.command("smtp")
@click.pass_context
@handle_errors
def serve_smtp(ctx: click.Context) -> None:
    """The SMTP submission listener (STARTTLS on smtp.port, implicit TLS on implicit_tls_port)."""
    runtime = runtime_of(ctx)
    config = runtime.config
    if _supervised(ctx, "smtp", config.smtp.host):
        return
    from smtp_proxy.lifecycle import serve_smtp as run

    with _serving(ctx, config.smtp.host) as watcher:
        runtime.unchecked_database.warm(autocommit=True)  # the listener's statements all run there
        run(config, runtime.unchecked_database, watcher)


@serve.command("worker")
@click.pass_context
@handle_errors
def serve_worker(ctx: click.Context) -> None:
    """The queue worker: delivers queued messages through the tenants' providers."""
    from smtp_proxy.lifecycle import serve_worker as run

    runtime = runtime_of(ctx)
    delivery = runtime.config.delivery
    with _serving(ctx, f"{delivery.metrics_host}:{delivery.metrics_port} (delivery.metrics_port)") as watcher:
        run(runtime.config, runtime.unchecked_database, watcher)


@serve.command("all")
@click.pass_context
@handle_errors
def serve_all(ctx: click.Context) -> None:
    """SMTP listener, API and worker: in one process, or supervised children when processes > 1."""
    if _supervised(ctx, "all", "the smtp, api or metrics port"):
        return
    from smtp_proxy.lifecycle import serve_all as run

    runtime = runtime_of(ctx)
    with _serving(ctx, "the smtp, api or metrics port") as watcher:
        app = ctx.ensure_object(ScriptInfo).load_app()
        runtime.unchecked_database.warm(autocommit=True)
        run(runtime.config, runtime.unchecked_database, watcher, app)


if __name__ == "__main__":  # pragma: no cover
    main()
