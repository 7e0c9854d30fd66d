"""What the storage-level tests share: a config, a Database and a Cipher on each database in turn."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from smtp_proxy.config import Config
from smtp_proxy.crypto import Cipher
from smtp_proxy.db.session import Database


@pytest.fixture
def config(db_url: str, make_config) -> Config:
    return make_config(db_url)


@pytest.fixture
def database(config: Config) -> Iterator[Database]:
    db = Database(config.database)
    yield db
    db.dispose()


@pytest.fixture
def cipher(config: Config) -> Cipher:
    return Cipher.from_config(config.security)
