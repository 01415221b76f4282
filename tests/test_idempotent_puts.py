"""Idempotency-Key on every put (SPEC 6): a retried blocking or streaming put attaches to the first
task instead of running a second; the same key with another body is 400; beat purges expired
records. Real HTTP (two web apps for a retry that lands elsewhere), real Redis, SQLite and MariaDB."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bellaq.clock import now_ms
from bellaq.extensions import db
from bellaq.models import IdempotencyRecord, Task
from tests.conftest import LiveServer, running_app, wait_for
from workers.celery_app import beat_schedule
from workers.maintenance import purge_idempotency

CHAT = "/v1/chat/completions"


@pytest.fixture
def base(ext_url):
    return ext_url


def put(base: str, user: dict, key: str, stream: bool = False, text: str = "x", **fields) -> requests.Response:
    return requests.post(f"{base}/v1/queue/put", headers={**user, "Idempotency-Key": key}, stream=stream,
                         timeout=30, json={"endpoint": CHAT, "queue": "ext", "timeout": 30,
                                           "data": {"model": "m", "messages": [{"role": "user", "content": text}]},
                                           **fields})


def take(base: str, worker: dict) -> dict:
    return wait_for(lambda: requests.post(f"{base}/v1/queue/take", headers=worker, timeout=10,
                                          json={"queues": ["ext:0"]}).json()["ext:0"])[0]


def send(base: str, worker: dict, task_id: str, action: str, body: dict) -> None:
    resp = requests.post(f"{base}/v1/queue/{task_id}/{action}", headers=worker, timeout=10, json=body)
    assert resp.status_code == 200, resp.text


def tasks_of(app) -> int:
    with app.app_context():
        return db.session.execute(db.select(db.func.count()).select_from(Task)).scalar_one()


def data_lines(resp: requests.Response):
    return (line[len("data: "):] for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: "))


def test_a_retried_blocking_put_gets_the_first_tasks_answer(app, base, make_key):
    user, worker = make_key("user"), make_key("worker")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(put, base, user, "k-1", response_mode="blocking")
        task = take(base, worker)
        retry = pool.submit(put, base, user, "k-1", response_mode="blocking")
        wait_for(lambda: app.extensions["bellaq.eventbus"].waiters_of(task["task_id"]) == 2,
                 message="the retry to attach")
        send(base, worker, task["task_id"], "complete", {"status_code": 201, "body": {"answer": 42}})
        answers = [first.result(30), retry.result(30)]
    assert [(r.status_code, r.json()) for r in answers] == [(201, {"answer": 42})] * 2
    assert {r.headers["X-Bella-Task-Id"] for r in answers} == {task["task_id"]}
    late = put(base, user, "k-1", response_mode="blocking")  # after the end: the answer at once
    assert (late.status_code, late.json()) == (201, {"answer": 42})
    assert tasks_of(app) == 1


def test_a_retried_stream_follows_the_task_from_where_it_is(app, base, make_key):
    user, worker = make_key("user"), make_key("worker")
    first = put(base, user, "k-s", stream=True, response_mode="streaming")
    task = take(base, worker)
    send(base, worker, task["task_id"], "progress", {"event_id": "1", "event_data": {"n": 1}})
    first_lines = data_lines(first)
    assert next(first_lines) == '{"n":1}'
    retry = put(base, user, "k-s", stream=True, response_mode="streaming")
    assert retry.headers["X-Bella-Task-Id"] == task["task_id"]
    send(base, worker, task["task_id"], "progress", {"event_id": "2", "event_data": {"n": 2}})
    send(base, worker, task["task_id"], "complete", {"status_code": 200, "body": {"whole": True}})
    assert list(first_lines) == ['{"n":2}', "[DONE]"]
    assert list(data_lines(retry)) == ['{"n":2}', "[DONE]"]
    ended = put(base, user, "k-s", stream=True, response_mode="streaming")
    assert list(data_lines(ended)) == ['{"whole":true}', "[DONE]"]
    assert tasks_of(app) == 1


def test_a_retry_that_lands_on_another_web_process_gets_the_stream(app, settings, base, make_key):
    user, worker = make_key("user"), make_key("worker")
    with running_app(settings) as other_app, LiveServer(other_app) as other:
        first = put(base, user, "k-x", stream=True, response_mode="streaming")
        task = take(base, worker)
        retry = put(other.url, user, "k-x", stream=True, response_mode="streaming")
        other_bus = other_app.extensions["bellaq.eventbus"]
        first_bus = app.extensions["bellaq.eventbus"]
        wait_for(lambda: first_bus.forwarding(task["task_id"]) == {other_bus.instance_id},
                 message="the first web process to forward the task's events")
        send(base, worker, task["task_id"], "progress", {"event_id": "1", "event_data": "chunk"})
        send(base, worker, task["task_id"], "complete", {"status_code": 200, "body": {}})
        assert list(data_lines(retry)) == ["chunk", "[DONE]"]
        assert list(data_lines(first)) == ["chunk", "[DONE]"]
    assert tasks_of(app) == 1


@pytest.mark.parametrize("mode", ["callback", "blocking", "streaming"])
def test_the_same_key_with_another_body_is_400_and_creates_nothing(app, base, make_key, mode):
    user = make_key("user")
    extra = {"callback_url": "http://127.0.0.1:9/cb"} if mode == "callback" else {"timeout": 1}
    first = put(base, user, "k-b", text="first", response_mode=mode, **extra)
    first.close()
    tasks_before = tasks_of(app)
    for changed in ({"text": "second"}, {"response_mode": "callback" if mode != "callback" else "blocking"}):
        fields = {"response_mode": mode, **extra, **changed}
        if fields["response_mode"] == "callback":
            fields["callback_url"] = "http://127.0.0.1:9/cb"
        resp = put(base, user, "k-b", **fields)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "idempotency_key_reused"
        assert resp.json()["error"]["param"] == "Idempotency-Key"
    assert tasks_of(app) == tasks_before
    # Another owner's key space is its own.
    other = put(base, make_key("user"), "k-b", text="second", response_mode="callback",
                callback_url="http://127.0.0.1:9/cb")
    assert other.status_code == 200


def test_a_put_refused_for_bad_input_frees_its_key(app, base, make_key):
    user = make_key("user")
    assert put(base, user, "k-f", response_mode="blocking", level=99).status_code == 400
    with app.app_context():
        assert db.session.execute(db.select(db.func.count()).select_from(IdempotencyRecord)).scalar_one() == 0


def test_beat_purges_expired_records(app, base, make_key, settings):
    user = make_key("user")
    for key in ("old", "new"):
        put(base, user, key, response_mode="callback", callback_url="http://127.0.0.1:9/cb")
    with app.app_context():
        db.session.execute(db.update(IdempotencyRecord).where(IdempotencyRecord.key == "old")
                           .values(created_at=now_ms() - (settings.idempotency_ttl + 5) * 1000))
        db.session.commit()
        assert beat_schedule()["purge-idempotency"]["task"] == purge_idempotency.name
        assert purge_idempotency.run() == 1
        assert db.session.execute(db.select(IdempotencyRecord.key)).scalars().all() == ["new"]
    again = put(base, user, "old", response_mode="callback", callback_url="http://127.0.0.1:9/cb")
    assert json.loads(again.text)["data"] != ""  # the purged key runs a new put
    assert tasks_of(app) == 3
