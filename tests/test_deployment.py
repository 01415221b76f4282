"""A real deployment: gunicorn with gevent workers and Celery worker processes (subprocesses),
configured only from the environment, against the mock upstream."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import ADMIN_KEY, auth, wait_for

CHAT = "/v1/chat/completions"
ADMIN = auth(ADMIN_KEY)


def chat(text: str, **extra) -> dict:
    return dict({"model": "mock-1", "messages": [{"role": "user", "content": text}]}, **extra)


def new_key(stack, role: str) -> dict:
    return auth(requests.post(f"{stack.url}/v1/keys", headers=ADMIN, json={"role": role}, timeout=10).json()["key"])


def get_task(stack, headers, task_id) -> dict:
    return requests.get(f"{stack.url}/v1/queue/{task_id}", headers=headers, timeout=10).json()


@pytest.mark.slow
def test_blocking_and_streaming_through_gunicorn_and_a_celery_worker(stack):
    stack.start_web(workers=2)
    stack.start_worker(concurrency=20)
    user = new_key(stack, "user")
    resp = requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=60, json={
        "endpoint": CHAT, "data": chat("via gunicorn"), "response_mode": "blocking"})
    assert resp.status_code == 200, stack.logs()
    assert resp.json()["choices"][0]["message"]["content"] == "echo: via gunicorn"
    resp = requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=60, stream=True, json={
        "endpoint": CHAT, "data": chat("a b c", stream=True), "response_mode": "streaming"})
    lines = [ln[6:] for ln in resp.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(x)["choices"][0]["delta"].get("content") or "" for x in lines[:-1]
                   if json.loads(x)["choices"]) == "echo: a b c"


@pytest.mark.slow
def test_500_concurrent_blocking_requests_are_all_answered(stack, mock_upstream):
    mock_upstream.latency = 0.2
    stack.start_web(workers=2)
    stack.start_worker(concurrency=100)
    user = new_key(stack, "user")

    def one(n: int) -> tuple[int, str]:
        resp = requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=120, json={
            "endpoint": CHAT, "data": chat(f"request {n}"), "response_mode": "blocking", "timeout": 100})
        return resp.status_code, resp.json()["choices"][0]["message"]["content"] if resp.ok else resp.text

    with ThreadPoolExecutor(500) as pool:
        answers = list(pool.map(one, range(500)))
    assert answers == [(200, f"echo: request {n}") for n in range(500)]


@pytest.mark.slow
def test_a_worker_killed_mid_task_loses_nothing(stack, mock_upstream):
    mock_upstream.latency = 3.0
    stack.env["BELLAQ_PROCESS_TIMEOUT"] = "2"
    stack.start_web(workers=1)
    doomed = stack.start_worker(concurrency=4)
    stack.start_beat()
    user = new_key(stack, "user")
    task_id = requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=10, json={
        "endpoint": CHAT, "data": chat("survive"), "callback_url": "http://127.0.0.1:9/cb"}).json()["data"]
    wait_for(lambda: mock_upstream.request_count >= 1, message="the worker to call the upstream")
    stack.kill(doomed, signal.SIGKILL)
    mock_upstream.latency = 0.0
    stack.start_worker(concurrency=4)
    task = wait_for(lambda: (t := get_task(stack, user, task_id))["status"] not in ("waiting", "queued") and t,
                    timeout=60, message="the task to end after the kill")
    assert task["status"] == "succeeded", stack.logs()
    assert task["attempts"] == 2
    assert task["result"]["body"]["choices"][0]["message"]["content"] == "echo: survive"


@pytest.mark.slow
def test_level_0_work_starts_before_queued_level_1_work(stack, mock_upstream):
    mock_upstream.latency = 0.3
    stack.env["BELLAQ_WORKER_TAKE_SIZE"] = "1"
    stack.start_web(workers=1)
    user = new_key(stack, "user")
    batch = [requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=10, json={
        "endpoint": CHAT, "level": 1, "data": chat(f"offline {n}"), "callback_url": "http://127.0.0.1:9/cb"}
    ).json()["data"] for n in range(6)]
    stack.start_worker(concurrency=1, pool="solo")
    wait_for(lambda: get_task(stack, user, batch[0])["status"] != "waiting", message="offline work to start")
    urgent = requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=10, json={
        "endpoint": CHAT, "level": 0, "data": chat("online"), "callback_url": "http://127.0.0.1:9/cb"}
    ).json()["data"]
    done = wait_for(lambda: (t := get_task(stack, user, urgent))["status"] == "succeeded" and t, timeout=30)
    started_before = [get_task(stack, user, t)["running_time"] for t in batch]
    earlier = [rt for rt in started_before if rt is not None and rt < done["running_time"]]
    assert len(earlier) <= 2, f"{len(earlier)} offline tasks started before the online one"


@pytest.mark.slow
def test_external_and_builtin_workers_serve_one_queue_together(stack):
    stack.start_web(workers=1)
    requests.post(f"{stack.url}/v1/queue/register", headers=ADMIN, timeout=10,
                  json={"queue": "shared", "endpoint": CHAT})
    user, worker = new_key(stack, "user"), new_key(stack, "worker")
    ids = [requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=10, json={
        "endpoint": CHAT, "queue": "shared", "data": chat(f"n{n}"), "callback_url": "http://127.0.0.1:9/cb"}
    ).json()["data"] for n in range(200)]
    external: set[str] = set()

    def take_and_complete(size: int) -> int:
        got = requests.post(f"{stack.url}/v1/queue/take", headers=worker, timeout=10,
                            json={"queues": ["shared:0"], "size": size}).json()["shared:0"]
        for task in got:
            requests.post(f"{stack.url}/v1/queue/{task['task_id']}/complete", headers=worker, timeout=10,
                          json={"status_code": 200, "body": {"by": "external"}})
            external.add(task["task_id"])
        return len(got)

    take_and_complete(20)  # the external worker alone first
    stack.start_worker(concurrency=4)
    wait_for(lambda: requests.get(f"{stack.url}/v1/queue/shared:0/stats", headers=worker, timeout=10).json()["done"]
             > len(external), timeout=30, message="the built-in worker to complete a task")
    while take_and_complete(2):  # now both take from the queue until it is empty
        pass
    wait_for(lambda: all(get_task(stack, user, t)["status"] == "succeeded" for t in ids), timeout=60)
    tasks = [get_task(stack, user, t) for t in ids]
    assert all(t["status"] == "succeeded" for t in tasks)
    by_external = {t["task_id"] for t in tasks if t["result"]["body"] == {"by": "external"}}
    assert by_external == external and 0 < len(external) < len(ids)
    assert all(t["attempts"] == 1 for t in tasks)
