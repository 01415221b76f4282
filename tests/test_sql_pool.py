"""The SQL pool: no ping or rollback round trips on the hot path, and still no transaction left
open on a pooled connection and no dead connection failing more than one request."""

from __future__ import annotations

import pymysql
import pytest
import sqlalchemy as sa

from bellaq.extensions import db
from bellaq.models import Task
from tests.conftest import MYSQL_HOST

CHAT = "/v1/chat/completions"


def _row(task_id: str) -> dict:
    return {"id": task_id, "owner": "o", "batch_id": "", "endpoint": CHAT, "queue": "q", "level": 0,
            "data": "{}", "status": "waiting", "response_mode": "callback", "callback_url": "", "timeout": 60,
            "instance_id": "", "start_time": 1, "expire_time": 60001, "attempts": 0}


def _count(task_id: str) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).where(Task.__table__.c.id == task_id)).scalar_one()


def test_work_left_uncommitted_on_a_returned_connection_is_rolled_back(app):
    with app.app_context():
        raw = db.engine.raw_connection()  # used without SQLAlchemy's transactions
        cursor = raw.cursor()
        cursor.execute(*_insert_sql(raw, "task_raw"))
        cursor.close()
        raw.close()
        assert _count("task_raw") == 0
        with db.engine.connect() as conn:  # abandoned mid-transaction: its close rolls back
            conn.execute(sa.insert(Task.__table__), [_row("task_open")])
        assert _count("task_open") == 0
        with db.engine.begin() as conn:
            conn.execute(sa.insert(Task.__table__), [_row("task_done")])
        assert _count("task_done") == 1


def _insert_sql(raw, task_id: str) -> tuple[str, tuple]:
    mark = "?" if type(raw.dbapi_connection).__module__.startswith("sqlite3") else "%s"
    return (f"INSERT INTO tasks (id, owner, batch_id, endpoint, queue, level, data, status, response_mode, "
            f"callback_url, timeout, instance_id, start_time, attempts) VALUES ({', '.join([mark] * 14)})",
            (task_id, "o", "", CHAT, "q", 0, "{}", "waiting", "callback", "", 60, "", 1, 0))


@pytest.mark.mysql
def test_a_committed_connection_goes_back_without_a_rollback_and_a_failed_one_with_one(tmp_path, redis_prefix,
                                                                                       mysql_url):
    from tests.conftest import make_settings, running_app

    with running_app(make_settings(tmp_path, redis_prefix, mysql_url)) as app, app.app_context():
        rollbacks: list[int] = []
        with db.engine.begin() as conn:
            dbapi = conn.connection.dbapi_connection
            real = dbapi.rollback
            dbapi.rollback = lambda: (rollbacks.append(1), real())[1]
            conn.execute(sa.insert(Task.__table__), [_row("task_a")])
        assert rollbacks == []
        with pytest.raises(sa.exc.IntegrityError), db.engine.connect() as conn:
            assert conn.connection.dbapi_connection is dbapi  # the pool is LIFO
            conn.execute(sa.insert(Task.__table__), [_row("task_b")])
            conn.commit()
            conn.execute(sa.insert(Task.__table__), [_row("task_a")])
        assert rollbacks == [1]  # the failed transaction, rolled back by its close
        assert _count("task_b") == 1


@pytest.mark.mysql
def test_a_connection_the_server_killed_fails_at_most_one_request(tmp_path, redis_prefix, mysql_url):
    from bellaq.keys import create_key
    from tests.conftest import auth, make_settings, running_app

    name = mysql_url.rsplit("/", 1)[1].split("?")[0]
    with running_app(make_settings(tmp_path, redis_prefix, mysql_url)) as app:
        client = app.test_client()
        with app.app_context():
            _row_, raw = create_key("u", "user")
        user = auth(raw)
        admin = auth("bq-test-admin-key")
        assert client.post("/v1/queue/register", headers=admin,
                           json={"queue": "kq", "endpoint": CHAT, "builtin": False}).status_code == 200
        body = {"endpoint": CHAT, "queue": "kq", "callback_url": "http://127.0.0.1:9/cb",
                "data": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
        first = client.post("/v1/queue/put", headers=user, json=body)
        assert first.status_code == 200, first.text

        def kill_pooled() -> int:
            other = pymysql.connect(host=MYSQL_HOST, user="root", password="", autocommit=True)
            with other.cursor() as cur:
                cur.execute("SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
                            (name,))
                ids = [row[0] for row in cur.fetchall()]
                for session in ids:
                    cur.execute(f"KILL {int(session)}")
            other.close()
            return len(ids)

        assert kill_pooled() >= 1
        # A put's INSERT runs again on a new connection: it does not fail at all.
        again = client.post("/v1/queue/put", headers=user, json=body)
        assert again.status_code == 200, again.text
        assert kill_pooled() >= 1
        task_id = again.json["data"]
        answers = [client.get(f"/v1/queue/{task_id}", headers=user).status_code for _ in range(2)]
        assert answers in ([200, 200], [503, 200]), answers


@pytest.mark.mysql
def test_a_put_on_mariadb_is_one_statement_that_commits_itself(tmp_path, redis_prefix, mysql_url):
    """The put group's INSERT runs on the autocommit twin: no COMMIT (nor ROLLBACK) is sent, and
    the row is there for every other connection at once."""
    from bellaq.keys import create_key
    from tests.conftest import auth, make_settings, running_app

    def sent() -> dict[str, int]:
        other = pymysql.connect(host=MYSQL_HOST, user="root", password="", autocommit=True)
        with other.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_commit', 'Com_rollback', 'Com_insert')")
            counts = {name: int(value) for name, value in cur.fetchall()}
        other.close()
        return counts

    with running_app(make_settings(tmp_path, redis_prefix, mysql_url)) as app:
        client = app.test_client()
        with app.app_context():
            _row_, raw = create_key("u", "user")
        user = auth(raw)
        assert client.post("/v1/queue/register", headers=auth("bq-test-admin-key"),
                           json={"queue": "ac", "endpoint": CHAT, "builtin": False}).status_code == 200
        body = {"endpoint": CHAT, "queue": "ac", "callback_url": "http://127.0.0.1:9/cb",
                "data": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
        assert client.post("/v1/queue/put", headers=user, json=body).status_code == 200  # the key is cached
        before = sent()
        ids = [client.post("/v1/queue/put", headers=user, json=body).json["data"] for _ in range(5)]
        after = sent()
        assert after["Com_insert"] - before["Com_insert"] == 5
        assert after["Com_commit"] == before["Com_commit"] and after["Com_rollback"] == before["Com_rollback"]
        with app.app_context():
            assert all(_count(task_id) == 1 for task_id in ids)
