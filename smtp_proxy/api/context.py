"""The shared objects create_app puts on the application, typed, for the blueprints."""

from __future__ import annotations

from flask import current_app

from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database


def database() -> Database:
    return current_app.extensions["smtp_proxy.db"]


def cipher() -> Cipher:
    return current_app.extensions["smtp_proxy.cipher"]
