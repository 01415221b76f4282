"""A held request is answered from the engine's claim, before the SQL write (issue 7): the result
the engine recorded is the task's end for everyone meanwhile (the task object, cancels,
timeouts), and SQL then stores that same result. Real Redis and event bus, SQLite and MariaDB."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bellaq import online, tasks
from bellaq.eventbus import COMPLETION
from bellaq.extensions import db
from bellaq.lease_tokens import BUILTIN_HOLDER
from bellaq.lost_completions import end_lost_completions
from bellaq.models import Task
from bellaq.services import services
from tests.conftest import make_settings

CHAT = "/v1/chat/completions"
ANSWER = {"status_code": 200, "request_id": "req-1", "body": {"answer": 42}}


@pytest.fixture
def settings(tmp_path: Path, redis_prefix: str, database_url: str):
    return make_settings(tmp_path, redis_prefix, database_url, lost_completion_grace=0.0)


@pytest.fixture
def chat(client, admin):
    resp = client.post("/v1/queue/register", json={"queue": "chat", "endpoint": CHAT, "builtin": False},
                       headers=admin)
    assert resp.status_code == 200, resp.json


def taken_task(app, client, user) -> dict:
    """A task leased to built-in workers, as the take gave it."""
    resp = client.post("/v1/queue/put", headers=user, json={
        "endpoint": CHAT, "queue": "chat", "data": {"model": "m", "messages": []},
        "callback_url": "http://127.0.0.1:9/cb"})
    assert resp.status_code == 200, resp.json
    with app.app_context():
        [task] = tasks.take([("chat", 0)], 1, holder=BUILTIN_HOLDER)
    assert task["task_id"] == resp.json["data"]
    return task


def completed_in_engine_only(app, task: dict) -> None:
    """The completer claimed the task in the engine and was stopped before its SQL write."""
    with app.app_context():
        outcome = services().engine.complete("chat", 0, task["task_id"], holder=BUILTIN_HOLDER,
                                             result=json.dumps(ANSWER))
        assert outcome == "completed"
        assert db.session.get(Task, task["task_id"]).status == "queued"


def test_the_task_object_shows_the_end_the_engine_recorded(app, client, user, chat):
    task = taken_task(app, client, user)
    with app.app_context():  # a held request's task
        db.session.execute(db.update(Task).where(Task.id == task["task_id"])
                           .values(instance_id="web-1", response_mode="blocking"))
        db.session.commit()
    completed_in_engine_only(app, task)
    shown = client.get(f"/v1/queue/{task['task_id']}", headers=user).json
    assert shown["status"] == "succeeded" and shown["result"] == ANSWER
    assert shown["completed_time"] >= shown["running_time"]


def test_cancel_and_timeout_leave_a_task_the_engine_completed_to_its_result(app, client, user, chat):
    task = taken_task(app, client, user)
    completed_in_engine_only(app, task)
    resp = client.post(f"/v1/queue/{task['task_id']}/cancel", headers=user)
    assert resp.status_code == 409 and resp.json["error"]["code"] == "task_already_ended"
    with app.app_context():
        row = db.session.get(Task, task["task_id"])
        assert tasks.end_as_timeout(row) is False
        assert row.status == "queued"
        assert end_lost_completions() == 1  # the reaper writes the recorded result, nothing else
        db.session.expire_all()
        row = db.session.get(Task, task["task_id"])
        assert row.status == "succeeded" and json.loads(row.result) == ANSWER


def test_complete_many_answers_the_held_request_before_the_sql_write(app, client, user, chat, monkeypatch):
    task = taken_task(app, client, user)
    with app.app_context():
        bus = online.bus()
        task = dict(task, instance_id=bus.instance_id, response_mode="blocking")
        waiter = bus.register(task["task_id"])
        seen: list[tuple[dict, str]] = []
        write = tasks.write_end_states

        def write_after_the_answer(group, statuses, result=None, results=None):
            # The held request already has its answer while the row is still open.
            event = waiter.get(timeout=10)
            seen.append((event, db.session.get(Task, task["task_id"]).status))
            return write(group, statuses, result, results)

        monkeypatch.setattr(tasks, "write_end_states", write_after_the_answer)
        assert tasks.complete_many({task["task_id"]: ANSWER}, {task["task_id"]: task}) == 1
        [(event, status_then)] = seen
        assert event["name"] == COMPLETION and status_then == "queued"
        assert event["payload"]["result"] == ANSWER and event["payload"]["status"] == "succeeded"
        db.session.expire_all()
        row = db.session.get(Task, task["task_id"])
        assert row.status == "succeeded" and json.loads(row.result) == ANSWER
        # One completion on the bus: the task-end listener did not publish it again.
        entries = services().redis.xrange(bus.topic + bus.instance_id)
        events = [fields.get("event", fields.get(b"event")) for _, fields in entries]
        completions = [e for e in events if COMPLETION in (e.decode() if isinstance(e, bytes) else e)]
        assert len(completions) == 1
        assert services().engine.recorded_results("chat", [task["task_id"]]) == {}
        bus.unregister(task["task_id"], waiter)
