"""Built-in Celery workers running tasks against the mock upstream (SPEC 5)."""

from __future__ import annotations

import pytest

from tests.conftest import ended, task_of, wait_for

CHAT = "/v1/chat/completions"


def put(client, headers, **fields):
    body = {"endpoint": CHAT, "data": {"model": "mock-1", "messages": [{"role": "user", "content": "hi there"}]},
            "callback_url": "http://127.0.0.1:9/cb"}
    body.update(fields)
    resp = client.post("/v1/queue/put", json=body, headers=headers)
    assert resp.status_code == 200, resp.json
    return resp.json["data"]




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


def test_a_task_cancelled_while_running_drops_its_late_result(client, user, celery_worker, mock_upstream):
    mock_upstream.latency = 1.0
    task_id = put(client, user)
    wait_for(lambda: mock_upstream.request_count >= 1, message="the worker to call the upstream")
    assert client.post(f"/v1/queue/{task_id}/cancel", headers=user).status_code == 202
    # the upstream answers after the cancel; the consumer's late complete must change nothing
    from celery.worker import state

    wait_for(lambda: not state.active_requests, message="the consumer to finish with the late answer")
    task = task_of(client, user, task_id)
    assert task["status"] == "cancelled" and task["result"] is None


def test_a_streaming_client_that_disconnects_leaks_no_waiter(app, live_server, make_key, celery_worker,
                                                             mock_upstream):
    import requests

    mock_upstream.stream_chunk_delay = 0.2
    user = make_key("user")
    resp = requests.post(f"{live_server.url}/v1/queue/put", headers=user, stream=True, timeout=30, json={
        "endpoint": CHAT, "response_mode": "streaming",
        "data": {"model": "mock-1", "stream": True, "messages": [{"role": "user", "content": "a b c d e f"}]}})
    task_id = resp.headers["X-Bella-Task-Id"]
    lines = resp.iter_lines(decode_unicode=True)
    assert any(line.startswith("data: ") for line in lines)  # the first chunk arrived
    resp.close()  # the client goes away mid-stream
    task = wait_for(lambda: ended(client=app.test_client(), headers=user, task_id=task_id))
    assert task["status"] == "succeeded"  # the work it started still finishes
    bus = app.extensions["bellaq.eventbus"]
    wait_for(lambda: bus.waiting() == 0, message="the held request's waiter to be released")


def test_max_in_flight_bounds_running_tasks(client, admin, user, celery_worker, mock_upstream):
    client.post("/v1/queue/register", headers=admin, json={"queue": "narrow", "endpoint": CHAT, "max_in_flight": 1})
    mock_upstream.latency = 0.2
    ids = [put(client, user, queue="narrow") for _ in range(4)]
    peak = 0

    def all_done():
        nonlocal peak
        peak = max(peak, client.get("/v1/queue/narrow:0/stats", headers=user).json["running"])
        return all(ended(client, user, t) for t in ids)

    wait_for(all_done, timeout=30, interval=0.02)
    assert peak == 1
