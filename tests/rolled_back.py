"""A Database whose three access paths share one connection inside a transaction the test rolls back.

SQLAlchemy's recipe for joining a session into an external transaction: the fixture begins the
outer transaction on one connection; every ``transaction()``, ``autocommit()`` and ``read()`` of
this Database runs on that connection inside a SAVEPOINT, so a commit only releases the savepoint,
a failed statement rolls back to it, and the fixture's final rollback removes everything. For
code that runs in the test's own thread (Flask's test client); a second thread would share the
connection, and another connection would see nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from smtp_proxy.config import DatabaseConfig
from smtp_proxy.db.session import Database, translated_errors


class RolledBackDatabase(Database):
    def __init__(self, config: DatabaseConfig, connection: Connection) -> None:
        super().__init__(config)
        self.connection = connection
        self.sessions = scoped_session(
            sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        )

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[Connection]:
        with translated_errors(), self.connection.begin_nested():
            yield self.connection

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        session = Session(
            bind=self.connection,
            join_transaction_mode="create_savepoint",
            expire_on_commit=False,
            autoflush=False,
        )
        try:
            with translated_errors():
                yield session
        finally:
            session.close()
