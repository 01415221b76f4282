"""``bellaq db init`` brings a database made by an older version up to date without losing rows."""

from __future__ import annotations

from sqlalchemy import inspect, text

from bellaq.db import add_missing_columns, init_db
from bellaq.extensions import db


def test_init_adds_missing_columns_and_indexes_and_keeps_rows(app) -> None:
    with app.app_context():
        engine = db.engine
        with engine.begin() as conn:
            # An older version's queues table: no rpm column, and a row in it.
            conn.execute(text("DROP TABLE queues"))
            conn.execute(text("CREATE TABLE queues (name VARCHAR(64) PRIMARY KEY, endpoint VARCHAR(256), "
                              "builtin BOOLEAN, strategy VARCHAR(32), upstream_base_url VARCHAR(1024), "
                              "upstream_api_key_env VARCHAR(128), max_in_flight INTEGER, "
                              "created_at BIGINT, updated_at BIGINT)"))
            conn.execute(text("INSERT INTO queues VALUES ('old', '/v1/embeddings', 1, 'fifo', NULL, NULL, "
                              "NULL, 1, 1)"))
            conn.execute(text("DROP INDEX ix_tasks_batch_status ON tasks" if engine.dialect.name != "sqlite"
                              else "DROP INDEX ix_tasks_batch_status"))
    init_db(app)
    with app.app_context():
        inspector = inspect(db.engine)
        assert {"rpm", "tpm", "default_max_tokens"} <= {c["name"] for c in inspector.get_columns("queues")}
        assert "ix_tasks_batch_status" in {i["name"] for i in inspector.get_indexes("tasks")}
        from bellaq.models import Queue

        row = db.session.get(Queue, "old")
        assert row is not None and row.endpoint == "/v1/embeddings" and row.rpm is None and row.tpm is None
        assert add_missing_columns(db.engine) == []  # idempotent
