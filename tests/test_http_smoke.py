"""The Task API over real HTTP: a real WSGI server on a free port, requests as the client."""

from __future__ import annotations

import requests

from tests.conftest import ADMIN_KEY, auth

CHAT = "/v1/chat/completions"


def test_put_take_complete_over_http(live_server, make_key):
    base = live_server.url
    user, worker = make_key("user"), make_key("worker")
    reg = requests.post(f"{base}/v1/queue/register", headers=auth(ADMIN_KEY),
                        json={"queue": "ext", "endpoint": CHAT, "builtin": False}, timeout=10)
    assert reg.status_code == 200
    put = requests.post(f"{base}/v1/queue/put", headers=user, timeout=10, json={
        "endpoint": CHAT, "queue": "ext", "data": {"model": "m"}, "callback_url": "http://127.0.0.1:9/cb"})
    task_id = put.json()["data"]
    taken = requests.post(f"{base}/v1/queue/take", headers=worker, json={"queues": ["ext:0"], "size": 3},
                          timeout=10).json()
    assert [t["task_id"] for t in taken["ext:0"]] == [task_id]
    done = requests.post(f"{base}/v1/queue/{task_id}/complete", headers=worker, timeout=10,
                         json={"status_code": 200, "request_id": "r", "body": {"answer": 42}})
    assert done.json()["completed"] is True
    task = requests.get(f"{base}/v1/queue/{task_id}", headers=user, timeout=10).json()
    assert task["status"] == "succeeded" and task["result"]["body"] == {"answer": 42}


def test_errors_over_http_are_json_envelopes(live_server):
    base = live_server.url
    resp = requests.post(f"{base}/v1/queue/put", data="not json", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.headers["Content-Type"].startswith("application/json")
    assert resp.json()["error"]["code"] == "invalid_json"
    assert requests.get(f"{base}/nope", timeout=10).json()["error"]["code"] == "not_found"
    assert requests.get(f"{base}/healthz", timeout=10).json()["status"] == "ok"
