"""Heartbeat leases (renewed by the worker that holds them, extended over HTTP by external
workers) and completions that reached the engine but not SQL."""

from __future__ import annotations

import json
import threading

import pytest

from bellaq import tasks as task_service
from bellaq.extensions import db
from bellaq.models import Task
from bellaq.services import services
from tests.batch_fixtures import CHAT, ext_queue  # noqa: F401 - fixture
from tests.conftest import make_settings, wait_for
from workers.leases import LeaseRenewer

pytest_plugins = ("tests.engine_fixtures",)


@pytest.fixture
def settings(tmp_path, redis_prefix, database_url):
    return make_settings(tmp_path, redis_prefix, database_url, worker_lease=1.0, worker_lease_renew=0.2,
                         lost_completion_grace=0.0)


def put_ext(client, user, text: str = "hello") -> str:
    body = {"endpoint": CHAT, "queue": "ext", "level": 1, "callback_url": "http://127.0.0.1:9/cb",
            "data": {"model": "m", "messages": [{"role": "user", "content": text}]}}
    resp = client.post("/v1/queue/put", json=body, headers=user)
    assert resp.status_code == 200, resp.json
    return resp.json["data"]


def take_ext(client, worker, **fields) -> list[dict]:
    resp = client.post("/v1/queue/take", json={"queues": ["ext:1"], "size": 10, **fields}, headers=worker)
    assert resp.status_code == 200, resp.json
    return resp.json["ext:1"]


# ------------------------------------------------------------------------------------------ engine

def test_extend_many_renews_every_queue_level_in_one_call(engine):
    engine.enqueue("a", 0, "t1", "{}")
    engine.enqueue("b", 2, "t2", "{}")
    engine.take([("a", 0)], 1, now_ms=1_000, lease_ms=500, holder="h")
    engine.take([("b", 2)], 1, now_ms=1_000, lease_ms=500, holder="other")
    got = engine.extend_many({("a", 0): ["t1", "gone"], ("b", 2): ["t2"]}, 2_000, holder="h", now_ms=1_200)
    assert got[("a", 0)].renewed == {"t1": 3_200} and got[("a", 0)].not_leased == ["gone"]
    assert got[("b", 2)].renewed == {} and got[("b", 2)].wrong_holder == ["t2"]


def test_rerun_puts_a_done_task_back_without_its_record(engine):
    engine.enqueue("a", 0, "t1", '{"x": 1}', score=5)
    engine.take([("a", 0)], 1)
    assert engine.complete("a", 0, "t1", result='{"status_code": 200}') == "completed"
    assert engine.rerun("a", 0, "t1", '{"x": 1}', 5, attempts=1)
    assert engine.is_known("a", 0, "t1") == "waiting"
    assert engine.recorded_results("a", ["t1"]) == {}
    assert not engine.rerun("a", 0, "t1", '{"x": 1}', 5)  # only a done task
    taken = engine.take([("a", 0)], 1)
    assert [(t.task_id, t.payload, t.attempts) for t in taken] == [("t1", '{"x": 1}', 2)]


def test_a_renewer_keeps_its_leases_and_drops_what_it_no_longer_holds(engine):
    for n in range(3):
        engine.enqueue("a", 0, f"t{n}", "{}")
    renewer = LeaseRenewer(engine, lease_s=0.3, every_s=0.05, holder="me")
    taken = engine.take([("a", 0)], 3, lease_ms=300, holder="me")
    renewer.hold([{"task_id": t.task_id, "queue": "a", "level": 0} for t in taken])
    try:
        engine.complete("a", 0, "t0")
        # Four lease lengths later the reaper still finds nothing to put back.
        stop = threading.Event()
        stop.wait(1.2)
        assert engine.requeue_expired("a", 0).requeued == []
        assert renewer.held() == {("a", 0): ["t1", "t2"]}
        renewer.release(["t1"])
        wait_for(lambda: engine.requeue_expired("a", 0).requeued == ["t1"], timeout=5,
                 message="the released lease to run out")
        assert engine.is_known("a", 0, "t2") == "leased"
    finally:
        renewer.stop()


# ---------------------------------------------------------------------------------------- HTTP API

def test_an_external_worker_extends_its_lease(app, client, user, worker, make_key, ext):
    task_id = put_ext(client, user)
    [task] = take_ext(client, worker, lease=5, process_timeout=600)
    assert task["task_id"] == task_id
    first = client.post(f"/v1/queue/{task_id}/extend", json={"lease": 60}, headers=worker)
    assert first.status_code == 200, first.json
    with app.app_context():
        deadline = services().redis.zscore(services().engine._qkey("ext", 1, "leased"), task_id)
    assert first.json == {"task_id": task_id, "lease_expires_at": int(deadline)}
    other = make_key("worker")
    refused = client.post(f"/v1/queue/{task_id}/extend", json={"lease": 60}, headers=other)
    assert refused.status_code == 409 and refused.json["error"]["code"] == "leased_by_another_owner"
    stolen = client.post(f"/v1/queue/{task_id}/complete", json={"status_code": 200, "body": {}}, headers=other)
    assert stolen.status_code == 409 and stolen.json["error"]["code"] == "leased_by_another_owner"
    done = client.post(f"/v1/queue/{task_id}/complete", json={"status_code": 200, "body": {"ok": 1}}, headers=worker)
    assert done.status_code == 200 and done.json["completed"] is True
    late = client.post(f"/v1/queue/{task_id}/extend", json={"lease": 60}, headers=worker)
    assert late.status_code == 409 and late.json["error"]["code"] == "not_leased"
    assert client.post("/v1/queue/task_nope/extend", json={}, headers=worker).status_code == 404
    bad = client.post(f"/v1/queue/{task_id}/extend", json={"lease": 0}, headers=worker)
    assert bad.status_code == 400 and bad.json["error"]["type"] == "invalid_request_error"


def test_a_short_lease_not_extended_returns_the_task(app, client, user, worker, ext):
    task_id = put_ext(client, user)
    take_ext(client, worker, lease=1, process_timeout=600)
    with app.app_context():
        wait_for(lambda: task_service.reap()["requeued"] == 1, timeout=10, message="the lease to run out")
        assert db.session.get(Task, task_id).status == "waiting"
    [again] = take_ext(client, worker)
    assert again["task_id"] == task_id and again["attempts"] == 2


# ----------------------------------------------------------------------------- lost completions

def _complete_in_engine_only(app, task_id: str, result: dict | None) -> None:
    """What a worker killed between the engine's complete and the SQL write leaves behind."""
    with app.app_context():
        task = db.session.get(Task, task_id)
        text = json.dumps(result) if result is not None else None
        assert services().engine.complete(task.queue, task.level, task.id, result=text) == "completed"


def test_a_recorded_result_is_written_once_by_the_reaper(app, client, user, worker, ext):
    task_id = put_ext(client, user)
    take_ext(client, worker)
    result = {"status_code": 200, "request_id": "req-1", "body": {"answer": 42}}
    _complete_in_engine_only(app, task_id, result)
    with app.app_context():
        assert task_service.reap()["lost"] == 1
        assert services().engine.recorded_results("ext", [task_id]) == {}
        assert task_service.reap()["lost"] == 0
    task = client.get(f"/v1/queue/{task_id}", headers=user).json
    assert task["status"] == "succeeded" and task["result"] == result
    late = client.post(f"/v1/queue/{task_id}/complete", json={"status_code": 200, "body": {"answer": 7}},
                       headers=worker)
    assert late.status_code == 200 and late.json["completed"] is False
    assert client.get(f"/v1/queue/{task_id}", headers=user).json["result"] == result


def test_a_completer_and_the_reaper_end_a_task_once(app, client, user, worker, ext):
    """The completer's own SQL write comes after the reaper's: it changes nothing, and the
    task ended (listeners ran) once."""
    task_id = put_ext(client, user)
    take_ext(client, worker)
    result = {"status_code": 200, "request_id": "r", "body": {"n": 1}}
    _complete_in_engine_only(app, task_id, result)
    ended: list[str] = []
    with app.app_context():
        services().on_task_end.append(lambda tasks: ended.extend(t.id for t in tasks))
        task_service.reap()
        task = db.session.get(Task, task_id)
        assert task_service.write_end_state([task], "succeeded", result) == []
    assert ended == [task_id]


def test_a_done_task_with_nothing_recorded_runs_again_when_nobody_saw_its_answer(app, client, user, worker, ext):
    callback_id = put_ext(client, user, "callback task")
    streaming_id = put_ext(client, user, "streaming task")
    with app.app_context():  # a streaming request's task, whose held request is gone
        db.session.execute(db.update(Task).where(Task.id == streaming_id).values(response_mode="streaming"))
        db.session.commit()
    taken = take_ext(client, worker)
    assert {t["task_id"] for t in taken} == {callback_id, streaming_id}
    for task_id in (callback_id, streaming_id):
        _complete_in_engine_only(app, task_id, None)
    with app.app_context():
        old = task_service.now_ms() - (services().settings.default_process_timeout + 120) * 1000
        db.session.execute(db.update(Task).values(running_time=old))
        db.session.commit()
        assert task_service.reap()["lost"] == 2
    assert client.get(f"/v1/queue/{callback_id}", headers=user).json["status"] == "waiting"
    streamed = client.get(f"/v1/queue/{streaming_id}", headers=user).json
    assert streamed["status"] == "failed" and streamed["result"]["body"]["error"]["code"] == "worker_lost"
    [again] = take_ext(client, worker)
    assert again["task_id"] == callback_id and again["attempts"] == 2


# --------------------------------------------------------------------------------- built-in worker

def test_a_builtin_worker_renews_a_lease_shorter_than_its_request(app, client, user, celery_worker, mock_upstream):
    """Lease 1 s, request 2.5 s, the reaper running all along: the heartbeat keeps the task."""
    mock_upstream.latency = 2.5
    resp = client.post("/v1/queue/put", headers=user, json={
        "endpoint": CHAT, "callback_url": "http://127.0.0.1:9/cb",
        "data": {"model": "mock-1", "messages": [{"role": "user", "content": "slow"}]}})
    task_id = resp.json["data"]
    reaped: list[int] = []

    def ended() -> dict | None:
        with app.app_context():
            reaped.append(task_service.reap()["requeued"])
        task = client.get(f"/v1/queue/{task_id}", headers=user).json
        return task if task["status"] not in ("waiting", "queued") else None

    task = wait_for(ended, timeout=30, interval=0.2, message="the slow task to end")
    assert task["status"] == "succeeded" and task["attempts"] == 1
    assert sum(reaped) == 0 and mock_upstream.request_count == 1


def test_a_take_starts_its_tasks_before_their_mark_is_written(app, client, user, ext):
    """A built-in worker's requests go out while the take's SQL mark is written: ``start`` sees
    the task objects as they will be, the rows still waiting; the take returns them marked."""
    task_id = put_ext(client, user)
    seen: list[tuple[list[dict], str]] = []

    def start(tasks: list[dict]) -> None:
        with db.engine.connect() as conn:
            status = conn.execute(db.select(Task.status).where(Task.id == task_id)).scalar_one()
        seen.append((tasks, status))

    with app.app_context():
        got = task_service.take_within_limits([("ext", 1)], 10, start=start)
        row = db.session.get(Task, task_id)
        assert (row.status, row.attempts) == ("queued", 1) and row.running_time is not None
    [(started, status_then)] = seen
    assert status_then == "waiting"
    assert started == got.tasks and [t["task_id"] for t in started] == [task_id]
    assert started[0]["status"] == "queued" and started[0]["running_time"] == row.running_time
