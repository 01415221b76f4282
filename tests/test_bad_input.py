"""Bad input on every route: always a 4xx in the envelope, never a 5xx, and the service stays healthy."""

from __future__ import annotations

import pytest

CHAT = "/v1/chat/completions"
GOOD_PUT = {"endpoint": CHAT, "queue": "chat", "data": {"model": "m"}, "callback_url": "http://127.0.0.1:9/cb"}


def with_(base: dict, **changes) -> dict:
    out = dict(base)
    for name, value in changes.items():
        if value is ...:
            out.pop(name, None)
        else:
            out[name] = value
    return out


CASES = [
    # (role, method, path, body, status, param)
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, endpoint=...), 400, "endpoint"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, endpoint=5), 400, "endpoint"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, endpoint="chat"), 400, "endpoint"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, data=...), 400, "data"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, data="text"), 400, "data"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, level=-1), 400, "level"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, level="1"), 400, "level"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, level=True), 400, "level"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, queue="a b"), 400, "queue"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, queue="x" * 65), 400, "queue"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, queue="unregistered"), 400, "queue"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, endpoint="/v1/embeddings"), 400, "endpoint"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, response_mode="email"), 400, "response_mode"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, callback_url=...), 400, "callback_url"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, callback_url="ftp://x/y"), 400, "callback_url"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, timeout=0), 400, "timeout"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, timeout=1.5), 400, "timeout"),
    ("worker", "post", "/v1/queue/take", {}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": "chat:0"}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": []}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": [5]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["a b:0"]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["x" * 65 + ":0"]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:-1"]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:x"]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "size": 0}, 400, "size"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "size": 10**6}, 400, "size"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "strategy": "lifo"}, 400, "strategy"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "process_timeout": 0}, 400, "process_timeout"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "process_max_retries": -2}, 400,
     "process_max_retries"),
    ("worker", "post", "/v1/queue/task_nope/complete", {"status_code": 200}, 404, "task_id"),
    ("worker", "post", "/v1/queue/{task}/complete", {}, 400, "status_code"),
    ("worker", "post", "/v1/queue/{task}/complete", {"status_code": "200"}, 400, "status_code"),
    ("worker", "post", "/v1/queue/{task}/complete", {"status_code": 99}, 400, "status_code"),
    ("worker", "post", "/v1/queue/{task}/progress", {"event_id": "1"}, 400, "event_data"),
    ("worker", "post", "/v1/queue/task_nope/progress", {"event_data": {}}, 404, "task_id"),
    ("user", "get", "/v1/queue/task_nope", None, 404, "task_id"),
    ("user", "post", "/v1/queue/task_nope/cancel", None, 404, "task_id"),
    ("admin", "post", "/v1/queue/register", {"endpoint": CHAT}, 400, "queue"),
    ("admin", "post", "/v1/queue/register", {"queue": "a b", "endpoint": CHAT}, 400, "queue"),
    ("admin", "post", "/v1/queue/register", {"queue": "x" * 65, "endpoint": CHAT}, 400, "queue"),
    ("admin", "post", "/v1/queue/register", {"queue": "new"}, 400, "endpoint"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "strategy": "x"}, 400, "strategy"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "builtin": "yes"}, 400, "builtin"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "rpm": 0}, 400, "rpm"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "max_in_flight": -1}, 400,
     "max_in_flight"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "upstream": {"base_url": "x"}},
     400, "upstream.base_url"),
    ("user", "get", "/v1/queue/a%20b/metadata", None, 400, "queue"),
    ("user", "get", "/v1/queue/missing/metadata", None, 404, "queue"),
    ("user", "get", "/v1/queue/chat:-1/stats", None, 400, "queue"),
    ("admin", "post", "/v1/console/a%20b:0/clear", None, 400, "queue"),
    ("admin", "post", "/v1/keys", {"role": "root"}, 400, "role"),
    ("admin", "post", "/v1/keys", {}, 400, "role"),
    ("admin", "post", "/v1/keys", {"role": "user", "owner": ""}, 400, "owner"),
    ("admin", "delete", "/v1/keys/key_nope", None, 404, "id"),
]


@pytest.fixture
def setup(client, admin, make_key):
    client.post("/v1/queue/register", json={"queue": "chat", "endpoint": CHAT, "builtin": False}, headers=admin)
    headers = {"admin": admin, "user": make_key("user"), "worker": make_key("worker")}
    task = client.post("/v1/queue/put", json=GOOD_PUT, headers=headers["user"]).json["data"]
    return headers, task


@pytest.mark.parametrize(("role", "method", "path", "body", "status", "param"), CASES)
def test_bad_input_is_a_4xx_in_the_envelope(client, setup, role, method, path, body, status, param):
    headers, task = setup
    resp = getattr(client, method)(path.format(task=task), json=body, headers=headers[role])
    assert resp.status_code == status, resp.json
    error = resp.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert resp.headers.get("x-should-retry") == "false"
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b"null"])
@pytest.mark.parametrize("path", ["/v1/queue/put", "/v1/queue/take", "/v1/queue/register", "/v1/keys"])
def test_non_json_bodies_are_400(client, setup, path, payload):
    headers, _task = setup
    resp = client.post(path, data=payload, headers=dict(headers["admin"], **{"Content-Type": "application/json"}))
    assert resp.status_code == 400 and resp.json["error"]["code"] in {"invalid_json", "missing_body"}


def test_oversized_body_is_413(client, setup, settings):
    headers, _task = setup
    big = b'{"endpoint": "' + b"x" * (settings.max_json_bytes + 10) + b'"}'
    resp = client.post("/v1/queue/put", data=big, headers=dict(headers["user"], **{"Content-Type": "application/json"}))
    assert resp.status_code == 413 and resp.json["error"]["code"] == "too_large"
    assert client.get("/healthz").status_code == 200


def test_unknown_route_is_404_in_the_envelope(client):
    resp = client.get("/v1/nothing/here")
    assert resp.status_code == 404 and resp.json["error"]["code"] == "not_found"


def test_wrong_method_is_405_in_the_envelope(client, setup):
    headers, _task = setup
    resp = client.get("/v1/queue/put", headers=headers["user"])
    assert resp.status_code in (404, 405) and "error" in resp.json


def test_nothing_half_written_when_redis_is_down(app, client, setup, monkeypatch):
    from redis.exceptions import ConnectionError

    from bellaq.extensions import db
    from bellaq.models import Task

    headers, _task = setup
    engine = app.extensions["bellaq"].engine

    def down(*_a, **_k):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(engine, "enqueue", down)
    with app.app_context():
        before = db.session.query(Task).count()
    resp = client.post("/v1/queue/put", json=GOOD_PUT, headers=headers["user"])
    assert resp.status_code == 503 and resp.json["error"]["type"] == "server_error"
    assert resp.headers["x-should-retry"] == "true"  # nothing was kept: a retry is safe
    with app.app_context():
        assert db.session.query(Task).count() == before


def test_an_unexpected_failure_is_a_500_server_error_without_details(client, setup, monkeypatch):
    from bellaq import tasks

    headers, task = setup

    def broken(*_a, **_k):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(tasks, "owned_task", broken)
    resp = client.get(f"/v1/queue/{task}", headers=headers["user"])
    assert resp.status_code == 500
    assert resp.json["error"]["type"] == "server_error" and resp.json["error"]["code"] == "server_error"
    assert "secret" not in resp.get_data(as_text=True)
