"""Does some connection hold a database transaction open right now?

Given to a stand-in's ``on_request`` hook, it looks at the database from the stand-in's
thread while the application waits for the HTTP answer, so a test can prove that no
transaction (and the locks it holds) stays open across an outbound call:

    probe = TransactionProbe(database_url)
    standin.on_request = probe
    ...
    assert probe.calls and not probe.held

PostgreSQL: any other session of this database ``idle in transaction``
(``pg_stat_activity``). SQLite: a write transaction open elsewhere, found by starting
one (``BEGIN IMMEDIATE`` without waiting); a read-only one does not block anyone there.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool


class TransactionProbe:
    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.calls = 0
        self.held: list[str] = []  # what was found open, one entry per call that found one
        self._lock = threading.Lock()

    def __call__(self, *_request: Any) -> None:
        found = self._open_elsewhere()
        with self._lock:
            self.calls += 1
            if found:
                self.held.append(found)

    def _open_elsewhere(self) -> str | None:
        url = make_url(self.url)
        if url.get_backend_name() == "sqlite":
            connection = sqlite3.connect(url.database or "", timeout=0, isolation_level=None)
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("ROLLBACK")
                return None
            except sqlite3.OperationalError as exc:  # "database is locked"
                return f"sqlite: {exc}"
            finally:
                connection.close()
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                rows = connection.execute(text(
                    "SELECT state, left(query, 120) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND state LIKE 'idle in transaction%'")).all()
        finally:
            engine.dispose()
        return "; ".join(f"{state}: {query}" for state, query in rows) or None
