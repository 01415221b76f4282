"""Blocking and streaming modes end to end (SPEC 3): real servers, real workers (callbacks:
``test_callbacks.py``)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import ADMIN_KEY, auth, wait_for

CHAT = "/v1/chat/completions"


def chat(text: str, **extra) -> dict:
    return dict({"model": "mock-1", "messages": [{"role": "user", "content": text}]}, **extra)


def test_blocking_answers_with_the_upstreams_status_and_body(live_server, make_key, celery_worker):
    user = make_key("user")
    resp = requests.post(f"{live_server.url}/v1/queue/put", headers=user, timeout=30, json={
        "endpoint": CHAT, "data": chat("hold on"), "response_mode": "blocking"})
    assert resp.status_code == 200
    assert resp.json()["object"] == "chat.completion"
    assert resp.json()["choices"][0]["message"]["content"] == "echo: hold on"
    bad = requests.post(f"{live_server.url}/v1/queue/put", headers=user, timeout=30, json={
        "endpoint": CHAT, "data": chat("no", mock_status=400), "response_mode": "blocking"})
    assert bad.status_code == 400 and "error" in bad.json()


def test_blocking_times_out_with_408_and_the_task_ends_timeout(live_server, make_key):
    requests.post(f"{live_server.url}/v1/queue/register", headers=auth(ADMIN_KEY), timeout=10,
                  json={"queue": "nobody", "endpoint": CHAT, "builtin": False})
    user = make_key("user")
    started = time.monotonic()
    resp = requests.post(f"{live_server.url}/v1/queue/put", headers=user, timeout=30, json={
        "endpoint": CHAT, "queue": "nobody", "data": chat("x"), "response_mode": "blocking", "timeout": 1})
    assert resp.status_code == 408 and resp.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started >= 1
    task_id = resp.headers["X-Bella-Task-Id"]
    task = requests.get(f"{live_server.url}/v1/queue/{task_id}", headers=user, timeout=10).json()
    assert task["status"] == "timeout"


def test_an_external_worker_answers_a_blocking_request(live_server, make_key):
    base = live_server.url
    requests.post(f"{base}/v1/queue/register", headers=auth(ADMIN_KEY), timeout=10,
                  json={"queue": "ext", "endpoint": CHAT, "builtin": False})
    user, worker = make_key("user"), make_key("worker")
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(requests.post, f"{base}/v1/queue/put", headers=user, timeout=30, json={
            "endpoint": CHAT, "queue": "ext", "data": chat("x"), "response_mode": "blocking", "timeout": 20})
        task = wait_for(lambda: requests.post(f"{base}/v1/queue/take", headers=worker, timeout=10,
                                              json={"queues": ["ext:0"]}).json()["ext:0"])[0]
        assert task["instance_id"]
        requests.post(f"{base}/v1/queue/{task['task_id']}/complete", headers=worker, timeout=10,
                      json={"status_code": 201, "request_id": "x", "body": {"external": True}})
        resp = held.result(timeout=30)
    assert resp.status_code == 201 and resp.json() == {"external": True}


def read_sse(resp) -> list[tuple[float, str]]:
    events = []
    for line in resp.iter_lines(chunk_size=1, decode_unicode=True):
        if line.startswith("data: "):
            events.append((time.monotonic(), line[len("data: "):]))
    return events


def test_streaming_forwards_chunks_as_they_arrive_then_done(live_server, make_key, celery_worker, mock_upstream):
    mock_upstream.stream_chunk_delay = 0.15
    user = make_key("user")
    resp = requests.post(f"{live_server.url}/v1/queue/put", headers=user, stream=True, timeout=30, json={
        "endpoint": CHAT, "data": chat("one two three four", stream=True), "response_mode": "streaming"})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = read_sse(resp)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: one two three four"
    # the first chunk reached the client well before the upstream finished streaming
    assert events[-1][0] - events[0][0] >= 0.15 * (len(chunks) - 2)


def test_streaming_from_an_external_worker_over_http(live_server, make_key):
    base = live_server.url
    requests.post(f"{base}/v1/queue/register", headers=auth(ADMIN_KEY), timeout=10,
                  json={"queue": "ext", "endpoint": CHAT, "builtin": False})
    user, worker = make_key("user"), make_key("worker")
    resp = requests.post(f"{base}/v1/queue/put", headers=user, stream=True, timeout=30, json={
        "endpoint": CHAT, "queue": "ext", "data": chat("x"), "response_mode": "streaming"})
    task = wait_for(lambda: requests.post(f"{base}/v1/queue/take", headers=worker, timeout=10,
                                          json={"queues": ["ext:0"]}).json()["ext:0"])[0]
    for n in range(3):
        requests.post(f"{base}/v1/queue/{task['task_id']}/progress", headers=worker, timeout=10,
                      json={"event_id": str(n), "event_name": "chunk", "event_data": {"n": n}})
    requests.post(f"{base}/v1/queue/{task['task_id']}/complete", headers=worker, timeout=10,
                  json={"status_code": 200, "body": {}})
    assert [data for _, data in read_sse(resp)] == ['{"n":0}', '{"n":1}', '{"n":2}', "[DONE]"]


def test_events_written_straight_to_the_redis_stream_reach_the_client(live_server, make_key, app):
    """An external worker may write to Redis itself, with the address GET /v1/queue/eventbus gives."""
    import redis

    base = live_server.url
    requests.post(f"{base}/v1/queue/register", headers=auth(ADMIN_KEY), timeout=10,
                  json={"queue": "ext", "endpoint": CHAT, "builtin": False})
    user, worker = make_key("user"), make_key("worker")
    bus = requests.get(f"{base}/v1/queue/eventbus", headers=worker, timeout=10).json()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(requests.post, f"{base}/v1/queue/put", headers=user, timeout=30, json={
            "endpoint": CHAT, "queue": "ext", "data": chat("x"), "response_mode": "blocking", "timeout": 20})
        task = wait_for(lambda: requests.post(f"{base}/v1/queue/take", headers=worker, timeout=10,
                                              json={"queues": ["ext:0"]}).json()["ext:0"])[0]
        r = redis.Redis.from_url(bus["url"])
        event = {"name": "task-completion-event", "from": "", "context": "",
                 "payload": {"taskId": task["task_id"], "leaseToken": task["lease_token"],
                             "result": {"status_code": 200, "request_id": "", "body": {"via": "redis"}}}}
        r.xadd(bus["topic"] + task["instance_id"], {"event": json.dumps(event)})
        resp = held.result(timeout=30)
    assert resp.status_code == 200 and resp.json() == {"via": "redis"}
    ended = requests.get(f"{base}/v1/queue/{task['task_id']}", headers=user, timeout=10).json()
    assert ended["status"] == "succeeded" and ended["result"]["body"] == {"via": "redis"}
