"""The Flask application factory of the management API."""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry
from prometheus_flask_exporter import PrometheusMetrics

from smtp_proxy.api.auth import KeyCache
from smtp_proxy.api.rate_limit import RateLimit
from smtp_proxy.api.schemas import MAX_BODY_BYTES
from smtp_proxy.config import Config
from smtp_proxy.counters import open_storage
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.logs import new_correlation_id, set_correlation_id
from smtp_proxy.sending_limits import SendingLimits

log = logging.getLogger("smtp_proxy.api")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(config: Config, database: Database | None = None) -> Flask:
    """Build the app around a config and a shared ``Database`` (made here if not given).

    Raises ConfigError when no encryption key is configured: the API seals
    provider secrets, so it does not start without one.
    """
    app = Flask("smtp_proxy.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]  # fields in the documented order
    app.extensions["smtp_proxy.config"] = config
    app.extensions["smtp_proxy.cipher"] = Cipher.from_config(config.security)
    app.extensions["smtp_proxy.db"] = database or Database(config.database)
    app.extensions["smtp_proxy.key_cache"] = KeyCache()
    app.extensions["smtp_proxy.rate_limit"] = RateLimit(config)  # applied by api/auth.py
    # The usage endpoint reads the sending counters here. With memory:// they are this
    # process's own (another process's counts are not seen); with redis:// every instance's.
    app.extensions["smtp_proxy.sending_limits"] = SendingLimits(open_storage(config.limits.storage))

    @app.before_request
    def _correlate() -> None:
        # A client-chosen id is echoed only if it is short and plain; else we make one.
        offered = request.headers.get("X-Request-ID", "")
        g.request_id = offered if _REQUEST_ID.fullmatch(offered) else new_correlation_id()
        g.started = time.perf_counter()
        set_correlation_id(g.request_id)

    @app.after_request
    def _log_request(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        log.info(
            "request",
            extra={
                "event": "api.request",
                "client_ip": request.remote_addr,
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2),
            },
        )
        return response

    @app.teardown_appcontext
    def _end_session(_exc: BaseException | None) -> None:
        app.extensions["smtp_proxy.db"].remove_session()
        set_correlation_id(None)

    if config.api.trusted_proxies:  # before everything that reads the client's address
        from smtp_proxy.api.client_address import ForwardedFor

        app.wsgi_app = ForwardedFor(app.wsgi_app, config.api.trusted_proxies)  # type: ignore[method-assign]

    from smtp_proxy.api import errors, health, v1

    errors.register(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(v1.bp)
    # Per app, not the process-wide default registry: a process may build several apps.
    registry = CollectorRegistry()
    PrometheusMetrics(app, registry=registry, group_by="endpoint", default_labels={})
    app.extensions["smtp_proxy.metrics_registry"] = registry  # `serve all` adds it to the shared endpoint
    return app
