"""Schema creation and additive upgrades (``bellaq db init``), and SQLite tuning for concurrent writers."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import event, inspect, text
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
    """Create every table that does not exist yet, then add what newer versions added to existing
    tables (idempotent; see :func:`add_missing_columns`)."""
    import bellaq.models  # noqa: F401  (registers the tables)

    with app.app_context():
        db.create_all()
        add_missing_columns(db.engine)


def add_missing_columns(engine: Engine) -> list[str]:
    """Bring tables made by an older version up to date, additively: a column or an index the
    models have and the table lacks is added (columns as NULL-able, or with their server default).
    Nothing is ever dropped or changed. Returns what was added, as ``table.name``."""
    added: list[str] = []
    inspector = inspect(engine)
    for table in db.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            default = ""
            if column.server_default is not None:
                default = f" DEFAULT {column.server_default.arg}"
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}{default}"))
            added.append(f"{table.name}.{column.name}")
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(engine)
                added.append(f"{table.name}.{index.name}")
    return added
