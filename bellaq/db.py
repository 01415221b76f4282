"""Schema creation (``bellaq db init``) and SQLite tuning for concurrent writers."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine

from bellaq.extensions import db


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets readers run beside the one writer; the busy timeout queues writers instead of failing.
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()


def init_db(app: Flask) -> None:
    """Create every table that does not exist yet (idempotent)."""
    import bellaq.models  # noqa: F401  (registers the tables)

    with app.app_context():
        db.create_all()
