"""Puts that wait while another write is under way are written together, each failing alone."""

from __future__ import annotations

import json
import threading

import pytest

from tests.conftest import wait_for

CHAT = "/v1/chat/completions"


def _pending(n: int, queue: str = "grouped", ids: list[str] | None = None):
    from bellaq.put_group import PendingPut

    items = []
    for i in range(n):
        task_id = ids[i] if ids else f"task_group{i}"
        row = {"id": task_id, "owner": "o", "batch_id": "", "endpoint": CHAT, "queue": queue, "level": 0,
               "data": "{}", "status": "waiting", "response_mode": "callback", "callback_url": "http://x/cb",
               "timeout": 60, "instance_id": "", "start_time": 1, "expire_time": 60001, "attempts": 0}
        items.append(PendingPut(row, json.dumps({"task_id": task_id}), builtin=False))
    return items


def _submit_while_a_write_runs(app, items):
    """Submit every item from its own thread while the group is marked busy, then let it go."""
    from bellaq.put_group import put_group

    with app.app_context():
        group = put_group()
    errors: dict[str, BaseException] = {}

    def submit(item):
        with app.app_context():
            try:
                group.submit(item)
            except BaseException as err:  # noqa: BLE001
                errors[item.row["id"]] = err

    group._writing = True
    threads = [threading.Thread(target=submit, args=(item,)) for item in items]
    for t in threads:
        t.start()
    wait_for(lambda: len(group._pending) == len(items), message="every put to wait")
    with group._cond:
        group._writing = False
        group._cond.notify_all()
    for t in threads:
        t.join(timeout=30)
    return errors


def _statements(app):
    from sqlalchemy import event

    from bellaq.extensions import db

    seen: list[str] = []
    with app.app_context():
        # Puts are written on the autocommit twin (the engine itself on SQLite).
        for engine in {db.engine, app.extensions["bellaq.autocommit_engine"]}:
            event.listen(engine, "before_cursor_execute", lambda _c, _cur, stmt, *_a: seen.append(stmt))
    return seen


def test_waiting_puts_are_written_in_one_insert_and_all_enqueued(app):
    from bellaq.extensions import db
    from bellaq.models import Task

    statements = _statements(app)
    errors = _submit_while_a_write_runs(app, _pending(6))
    assert errors == {}
    assert len([s for s in statements if s.lstrip().upper().startswith("INSERT INTO TASKS")]) == 1
    engine = app.extensions["bellaq"].engine
    assert engine.stats("grouped", 0).waiting == 6
    with app.app_context():
        assert db.session.query(Task).filter(Task.queue == "grouped").count() == 6


def test_a_bad_row_fails_alone(app):
    ids = ["task_dup", "task_ok1", "task_dup", "task_ok2"]
    errors = _submit_while_a_write_runs(app, _pending(4, "dups", ids))
    from sqlalchemy.exc import IntegrityError

    assert list(errors) == ["task_dup"] and isinstance(errors["task_dup"], IntegrityError)
    assert app.extensions["bellaq"].engine.stats("dups", 0).waiting == 3  # ok1, ok2 and one task_dup


def test_a_level_whose_enqueue_fails_is_taken_back(app, monkeypatch):
    from redis.exceptions import ConnectionError

    from bellaq.errors import Unavailable
    from bellaq.extensions import db
    from bellaq.models import Task

    def down(*_a, **_k):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(app.extensions["bellaq"].engine, "enqueue_many", down)
    errors = _submit_while_a_write_runs(app, _pending(3, "down"))
    assert set(errors) == {"task_group0", "task_group1", "task_group2"}
    assert all(isinstance(e, Unavailable) for e in errors.values())
    with app.app_context():
        assert db.session.query(Task).filter(Task.queue == "down").count() == 0


@pytest.mark.slow
def test_concurrent_puts_over_http_all_become_takeable(app, admin, user, live_server):
    import requests

    requests.post(f"{live_server.url}/v1/queue/register", headers=admin,
                  json={"queue": "many", "endpoint": CHAT, "builtin": False}, timeout=10).raise_for_status()
    ids: list[str] = []

    def run():
        with requests.Session() as s:
            for i in range(25):
                resp = s.post(f"{live_server.url}/v1/queue/put", headers=user, timeout=30, json={
                    "endpoint": CHAT, "queue": "many", "callback_url": "http://127.0.0.1:9/cb",
                    "data": {"model": "m", "messages": [{"role": "user", "content": str(i)}]}})
                assert resp.status_code == 200, resp.text
                ids.append(resp.json()["data"])

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 200
    assert app.extensions["bellaq"].engine.stats("many", 0).waiting == 200
