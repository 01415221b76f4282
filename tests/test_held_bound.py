"""BELLAQ_MAX_HELD_REQUESTS: beyond the bound a blocking or streaming put is answered 503 with
Retry-After at once and nothing is kept; every held request gives its place back when it is
answered, fails, or its client goes away. Real HTTP: the threaded test server and gunicorn (gevent)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import ADMIN_KEY, auth, make_settings, wait_for

CHAT = "/v1/chat/completions"
BOUND = 3


@pytest.fixture
def settings(tmp_path: Path, redis_prefix: str, database_url: str):
    return make_settings(tmp_path, redis_prefix, database_url, max_held_requests=BOUND)


def put_body(text: str, mode: str = "blocking") -> dict:
    return {"endpoint": CHAT, "queue": "ext", "response_mode": mode, "timeout": 60,
            "data": {"model": "m", "messages": [{"role": "user", "content": text}]}}


def take_n(base: str, worker: dict, n: int) -> list[dict]:
    """Poll until ``n`` tasks of queue ext were taken, then check that no other one waits."""
    taken: list[dict] = []

    def more() -> bool:
        got = requests.post(f"{base}/v1/queue/take", headers=worker, timeout=10,
                            json={"queues": ["ext:0"], "size": 10}).json()["ext:0"]
        taken.extend(got)
        return len(taken) >= n

    wait_for(more, timeout=30)
    assert len(taken) == n
    assert requests.post(f"{base}/v1/queue/take", headers=worker, timeout=10,
                         json={"queues": ["ext:0"], "size": 10}).json()["ext:0"] == []
    return taken


def complete(base: str, worker: dict, task: dict) -> None:
    resp = requests.post(f"{base}/v1/queue/{task['task_id']}/complete", headers=worker, timeout=10,
                         json={"status_code": 200, "request_id": "r", "body": {"done": task["task_id"]}})
    assert resp.status_code == 200, resp.text


def assert_shed(resp: requests.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"] == "2" and resp.headers["x-should-retry"] == "true"
    assert "X-Bella-Task-Id" not in resp.headers
    error = resp.json()["error"]
    assert error["code"] == "overloaded" and error["type"] == "server_error"
    assert "BELLAQ_MAX_HELD_REQUESTS" in error["message"]


def fill_shed_and_free(base: str, user: dict, worker: dict) -> None:
    """BOUND blocking puts held, the next one shed (with an Idempotency-Key: not remembered), the
    held ones answered 200, then the shed one retried with its key is accepted."""
    idem = {"Idempotency-Key": uuid.uuid4().hex}
    with ThreadPoolExecutor(BOUND) as pool:
        held = [pool.submit(requests.post, f"{base}/v1/queue/put", headers=user, timeout=60,
                            json=put_body(f"held {i}")) for i in range(BOUND)]
        tasks = take_n(base, worker, BOUND)
        extra = requests.post(f"{base}/v1/queue/put", headers=dict(user, **idem),
                              timeout=10, json=put_body("one too many"))
        assert_shed(extra)
        assert requests.post(f"{base}/v1/queue/take", headers=worker, timeout=10,
                             json={"queues": ["ext:0"], "size": 10}).json()["ext:0"] == []
        for task in tasks:
            complete(base, worker, task)
        answers = [f.result(timeout=30) for f in held]
    assert sorted(a.json()["done"] for a in answers) == sorted(t["task_id"] for t in tasks)
    assert all(a.status_code == 200 for a in answers)
    with ThreadPoolExecutor(1) as pool:
        retried = pool.submit(requests.post, f"{base}/v1/queue/put", timeout=60,
                              headers=dict(user, **idem), json=put_body("one too many"))
        (task,) = take_n(base, worker, 1)
        complete(base, worker, task)
        assert retried.result(timeout=30).status_code == 200


def task_count(app) -> int:
    from bellaq.extensions import db
    from bellaq.models import Task

    with app.app_context():
        n = db.session.query(Task).count()
        db.session.rollback()
        return n


def held_now(app) -> int:
    return app.extensions["bellaq.held_requests"].count


def test_beyond_the_bound_a_put_is_shed_at_once_and_nothing_is_kept(app, ext_url, make_key):
    user, worker = make_key("user"), make_key("worker")
    fill_shed_and_free(ext_url, user, worker)
    assert task_count(app) == BOUND + 1
    wait_for(lambda: held_now(app) == 0)
    # callback puts are not held: the bound does not apply to them
    with ThreadPoolExecutor(BOUND) as pool:
        held = [pool.submit(requests.post, f"{ext_url}/v1/queue/put", headers=user, timeout=60,
                            json=put_body(f"again {i}", "streaming"), stream=True) for i in range(BOUND)]
        tasks = take_n(ext_url, worker, BOUND)
        callback = requests.post(f"{ext_url}/v1/queue/put", headers=user, timeout=10,
                                 json=dict(put_body("cb", "callback"), callback_url="http://127.0.0.1:9/cb"))
        assert callback.status_code == 200
        assert_shed(requests.post(f"{ext_url}/v1/queue/put", headers=user, timeout=10, json=put_body("x")))
        for task in tasks:
            complete(ext_url, worker, task)
        for f in held:
            assert f.result(timeout=30).text.rstrip().endswith("data: [DONE]")
    wait_for(lambda: held_now(app) == 0)


def test_failed_puts_and_gone_clients_give_their_place_back(app, ext_url, make_key):
    user, worker = make_key("user"), make_key("worker")
    for _ in range(BOUND + 2):  # refused after a place was taken: each gives it back
        bad = requests.post(f"{ext_url}/v1/queue/put", headers=user, timeout=10,
                            json=dict(put_body("x"), timeout=10**9))
        assert bad.status_code == 400, bad.text
    assert held_now(app) == 0
    # streaming and blocking clients that go away while held
    streams = []
    for i in range(BOUND - 1):
        resp = requests.post(f"{ext_url}/v1/queue/put", headers=user, timeout=30, stream=True,
                             json=put_body(f"gone {i}", "streaming"))
        assert resp.status_code == 200
        streams.append(resp)
    blocking = ThreadPoolExecutor(1)
    session = requests.Session()
    gone = blocking.submit(session.post, f"{ext_url}/v1/queue/put", headers=user, timeout=60,
                           json=put_body("gone blocking"))
    tasks = take_n(ext_url, worker, BOUND)
    assert held_now(app) == BOUND
    for resp in streams:
        resp.close()
    session.close()  # closes the blocking request's connection while it is held
    for task in tasks:
        complete(ext_url, worker, task)
    gone.result(timeout=30)
    blocking.shutdown()
    wait_for(lambda: held_now(app) == 0)
    fill_shed_and_free(ext_url, user, worker)
    wait_for(lambda: held_now(app) == 0)


@pytest.mark.slow
def test_gunicorn_sheds_beyond_the_bound(tmp_path, redis_prefix, database_url):
    """The same through gunicorn's gevent worker with bellaq's gunicorn config."""
    from tests.stack import Stack

    stack = Stack(tmp_path, redis_prefix, database_url, "http://127.0.0.1:9", BELLAQ_MAX_HELD_REQUESTS=str(BOUND))
    try:
        stack.start_web(workers=1, extra_args=["--config", "python:bellaq.gunicorn_conf"])
        base = stack.url
        assert requests.post(f"{base}/v1/queue/register", headers=auth(ADMIN_KEY), timeout=10, json={
            "queue": "ext", "endpoint": CHAT, "builtin": False}).status_code == 200

        def key(role: str) -> dict:
            return auth(requests.post(f"{base}/v1/keys", headers=auth(ADMIN_KEY), timeout=10,
                                      json={"name": role, "role": role}).json()["key"])

        user, worker = key("user"), key("worker")
        fill_shed_and_free(base, user, worker)
        fill_shed_and_free(base, user, worker)
    finally:
        stack.stop()
