"""The shared objects create_app puts on the application, typed, for the blueprints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

from smtp_proxy.config import Config
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database
from smtp_proxy.sending_limits import SendingLimits

if TYPE_CHECKING:
    from smtp_proxy.api.auth import KeyCache


def database() -> Database:
    return current_app.extensions["smtp_proxy.db"]


def cipher() -> Cipher:
    return current_app.extensions["smtp_proxy.cipher"]


def config() -> Config:
    return current_app.extensions["smtp_proxy.config"]


def sending_limits() -> SendingLimits:
    """The app's counters (create_app makes one per app), read by the usage endpoint."""
    return current_app.extensions["smtp_proxy.sending_limits"]


def key_cache() -> KeyCache:
    return current_app.extensions["smtp_proxy.key_cache"]
