"""The Flask application factory of the management API."""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, Response, g, request

from smtp_proxy.config import Config
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.logs import new_correlation_id, set_correlation_id

log = logging.getLogger("smtp_proxy.api")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(config: Config, database: Database | None = None) -> Flask:
    """Build the app around a config and a shared ``Database`` (made here if not given).

    Raises ConfigError when no encryption key is configured: the API seals
    provider secrets, so it does not start without one.
    """
    app = Flask("smtp_proxy.api")
    app.extensions["smtp_proxy.config"] = config
    app.extensions["smtp_proxy.cipher"] = Cipher.from_config(config.security)
    app.extensions["smtp_proxy.db"] = database or Database(config.database)

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

    from smtp_proxy.api import health

    app.register_blueprint(health.bp)
    return app
