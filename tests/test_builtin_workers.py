"""Built-in Celery workers running tasks against the mock upstream (SPEC 5)."""

from __future__ import annotations

import pytest

from tests.conftest import wait_for

CHAT = "/v1/chat/completions"


def put(client, headers, **fields):
    body = {"endpoint": CHAT, "data": {"model": "mock-1", "messages": [{"role": "user", "content": "hi there"}]},
            "callback_url": "http://127.0.0.1:9/cb"}
    body.update(fields)
    resp = client.post("/v1/queue/put", json=body, headers=headers)
    assert resp.status_code == 200, resp.json
    return resp.json["data"]


def status_of(client, headers, task_id):
    return client.get(f"/v1/queue/{task_id}", headers=headers).json


def ended(client, headers, task_id):
    task = status_of(client, headers, task_id)
    return task if task["status"] not in ("waiting", "queued") else None


def test_a_put_is_run_by_a_builtin_worker(client, user, celery_worker, mock_upstream):
    task_id = put(client, user)
    task = wait_for(lambda: ended(client, user, task_id), message="the task to end")
    assert task["status"] == "succeeded"
    assert task["result"]["status_code"] == 200
    assert task["result"]["body"]["choices"][0]["message"]["content"] == "echo: hi there"
    assert task["attempts"] == 1


def test_an_upstream_400_is_the_final_answer(client, user, celery_worker, mock_upstream):
    task_id = put(client, user, data={"model": "mock-1", "messages": [], "mock_status": 400})
    task = wait_for(lambda: ended(client, user, task_id))
    assert task["status"] == "failed" and task["result"]["status_code"] == 400
    assert "error" in task["result"]["body"]
    assert mock_upstream.request_count == 1


@pytest.mark.parametrize(("script", "calls"), [([429, 200], 2), ([500, 500, 200], 3)])
def test_429_and_5xx_are_retried(client, user, celery_worker, mock_upstream, script, calls):
    mock_upstream.script(script, retry_after=0.1)
    task_id = put(client, user)
    task = wait_for(lambda: ended(client, user, task_id))
    assert task["status"] == "succeeded"
    assert mock_upstream.request_count == calls
