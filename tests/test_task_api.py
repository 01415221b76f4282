"""The Task API for external workers (SPEC 3 and 4), on SQLite and MariaDB."""

from __future__ import annotations

import pytest

CHAT = "/v1/chat/completions"


def put(client, headers, **fields):
    body = {"endpoint": CHAT, "queue": "chat", "data": {"model": "m", "messages": []},
            "callback_url": "http://127.0.0.1:9/cb"}
    body.update(fields)
    return client.post("/v1/queue/put", json=body, headers=headers)


def take(client, headers, queues=("chat:0",), size=10, **fields):
    body = {"queues": list(queues), "size": size}
    body.update(fields)
    resp = client.post("/v1/queue/take", json=body, headers=headers)
    assert resp.status_code == 200, resp.json
    return resp.json


@pytest.fixture
def chat(client, admin):
    resp = client.post("/v1/queue/register", json={"queue": "chat", "endpoint": CHAT, "builtin": False},
                       headers=admin)
    assert resp.status_code == 200, resp.json
    return resp.json


def test_register_then_metadata_returns_the_fields(client, admin, user):
    body = {"queue": "q-1", "endpoint": "/v1/embeddings", "builtin": False, "strategy": "round_robin",
            "upstream": {"base_url": "http://vllm:8000", "api_key_env": "VLLM_API_KEY"}, "max_in_flight": 4,
            "rpm": 600}
    assert client.post("/v1/queue/register", json=body, headers=admin).status_code == 200
    meta = client.get("/v1/queue/q-1/metadata", headers=user).json
    assert meta["queue"] == "q-1" and meta["endpoint"] == "/v1/embeddings"
    assert meta["builtin"] is False and meta["strategy"] == "round_robin"
    assert (meta["max_in_flight"], meta["rpm"]) == (4, 600)
    assert "upstream" not in meta  # the operator's business (SPEC 6)
    meta = client.get("/v1/queue/q-1/metadata", headers=admin).json
    assert meta["upstream"] == {"base_url": "http://vllm:8000", "api_key_env": "VLLM_API_KEY"}


def test_registering_again_updates_the_queue(client, admin, chat):
    resp = client.post("/v1/queue/register", json={"queue": "chat", "strategy": "sequential"}, headers=admin)
    assert resp.json["strategy"] == "sequential" and resp.json["endpoint"] == CHAT


def test_put_answers_task_id_and_the_task_is_waiting(client, user, chat):
    resp = put(client, user, level=1, timeout=60)
    assert resp.status_code == 200
    assert resp.json["code"] == 200
    task = client.get(f"/v1/queue/{resp.json['data']}", headers=user).json
    assert task["status"] == "waiting"
    assert (task["queue"], task["level"], task["endpoint"]) == ("chat", 1, CHAT)
    assert task["callback_url"] == "http://127.0.0.1:9/cb" and task["result"] is None
    assert task["expire_time"] - task["start_time"] == 60_000
    assert task["batch_id"] == "" and task["attempts"] == 0


def test_take_leases_and_complete_records_the_result(client, user, worker, chat):
    task_id = put(client, user).json["data"]
    taken = take(client, worker, size=5)
    assert [t["task_id"] for t in taken["chat:0"]] == [task_id]
    assert taken["chat:0"][0]["data"] == {"model": "m", "messages": []}
    assert client.get(f"/v1/queue/{task_id}", headers=user).json["status"] == "queued"
    resp = client.post(f"/v1/queue/{task_id}/complete", headers=worker,
                       json={"status_code": 200, "request_id": "r1", "body": {"ok": True}})
    assert resp.status_code == 200 and resp.json["completed"] is True
    task = client.get(f"/v1/queue/{task_id}", headers=user).json
    assert task["status"] == "succeeded" and task["attempts"] == 1
    assert task["result"] == {"status_code": 200, "request_id": "r1", "body": {"ok": True}}
    assert task["completed_time"] >= task["running_time"] >= task["start_time"]


def test_second_complete_changes_nothing_and_says_so(client, user, worker, chat):
    task_id = put(client, user).json["data"]
    take(client, worker)
    client.post(f"/v1/queue/{task_id}/complete", headers=worker, json={"status_code": 200, "body": {"n": 1}})
    again = client.post(f"/v1/queue/{task_id}/complete", headers=worker, json={"status_code": 500, "body": {}})
    assert again.status_code == 200 and again.json["completed"] is False
    task = client.get(f"/v1/queue/{task_id}", headers=user).json
    assert task["status"] == "succeeded" and task["result"]["body"] == {"n": 1}


def test_non_2xx_complete_ends_the_task_failed_with_that_status(client, user, worker, chat):
    task_id = put(client, user).json["data"]
    take(client, worker)
    client.post(f"/v1/queue/{task_id}/complete", headers=worker,
                json={"status_code": 400, "body": {"error": {"message": "bad"}}})
    task = client.get(f"/v1/queue/{task_id}", headers=user).json
    assert task["status"] == "failed" and task["result"]["status_code"] == 400


def test_cancel_of_a_waiting_task_means_it_never_runs(client, user, worker, chat):
    task_id = put(client, user).json["data"]
    resp = client.post(f"/v1/queue/{task_id}/cancel", headers=user)
    assert resp.status_code == 202 and resp.json["data"] == task_id
    assert take(client, worker)["chat:0"] == []
    assert client.get(f"/v1/queue/{task_id}", headers=user).json["status"] == "cancelled"


def test_complete_after_cancel_is_refused_409(client, user, worker, chat):
    task_id = put(client, user).json["data"]
    take(client, worker)
    assert client.post(f"/v1/queue/{task_id}/cancel", headers=user).status_code == 202
    late = client.post(f"/v1/queue/{task_id}/complete", headers=worker, json={"status_code": 200, "body": {}})
    assert late.status_code == 409 and late.json["error"]["code"] == "not_leased"
    task = client.get(f"/v1/queue/{task_id}", headers=user).json
    assert task["status"] == "cancelled" and task["result"] is None


def test_cancel_of_an_ended_task_is_409(client, user, worker, chat):
    task_id = put(client, user).json["data"]
    client.post(f"/v1/queue/{task_id}/cancel", headers=user)
    assert client.post(f"/v1/queue/{task_id}/cancel", headers=user).status_code == 409


def test_expired_lease_requeues_with_attempts_then_fails_408(app, client, user, worker, chat):
    from bellaq.clock import now_ms
    from bellaq.tasks import reap

    task_id = put(client, user).json["data"]
    for attempt in (1, 2):
        got = take(client, worker, process_timeout=1, process_max_retries=1)["chat:0"]
        assert [t["task_id"] for t in got] == [task_id] and got[0]["attempts"] == attempt
        with app.app_context():
            reap(now_ms() + 5000)
    task = client.get(f"/v1/queue/{task_id}", headers=user).json
    assert task["status"] == "failed" and task["result"]["status_code"] == 408
    late = client.post(f"/v1/queue/{task_id}/complete", headers=worker, json={"status_code": 200, "body": {}})
    assert late.status_code == 409


def test_requeued_task_is_waiting_again(app, client, user, worker, chat):
    from bellaq.clock import now_ms
    from bellaq.tasks import reap

    task_id = put(client, user).json["data"]
    take(client, worker, process_timeout=1)
    with app.app_context():
        assert reap(now_ms() + 5000)["requeued"] == 1
    assert client.get(f"/v1/queue/{task_id}", headers=user).json["status"] == "waiting"


def test_recover_after_redis_loses_everything(app, client, user, worker, chat, redis_prefix):
    from bellaq.services import services
    from bellaq.tasks import recover

    ids = [put(client, user).json["data"] for _ in range(5)]
    take(client, worker, size=2)  # two are leased when Redis is lost
    with app.app_context():
        r = services().redis
        for key in r.scan_iter(match=f"{redis_prefix}*"):
            r.delete(key)
        assert recover() == 5
        assert recover() == 0  # a second run finds everything in place
    got = take(client, worker, size=100)["chat:0"]
    assert sorted(t["task_id"] for t in got) == sorted(ids)


def test_idempotency_key_returns_the_first_task(client, user, chat):
    headers = dict(user, **{"Idempotency-Key": "abc"})
    first = put(client, headers).json["data"]
    second = put(client, headers).json["data"]
    assert first == second
    other = put(client, dict(user, **{"Idempotency-Key": "def"})).json["data"]
    assert other != first


def test_idempotency_key_is_per_owner(client, make_key, chat):
    a = dict(make_key("user"), **{"Idempotency-Key": "same"})
    b = dict(make_key("user"), **{"Idempotency-Key": "same"})
    assert put(client, a).json["data"] != put(client, b).json["data"]


def test_a_failed_put_frees_its_idempotency_key(client, user, chat):
    headers = dict(user, **{"Idempotency-Key": "k"})
    assert put(client, headers, level=-1).status_code == 400
    assert put(client, headers).status_code == 200


def test_default_queue_comes_from_endpoint_and_model(client, user):
    resp = client.post("/v1/queue/put", headers=user, json={
        "endpoint": "/v1/embeddings", "data": {"model": "text-embed-3", "input": "x"},
        "callback_url": "http://127.0.0.1:9/cb"})
    assert resp.status_code == 200
    task = client.get(f"/v1/queue/{resp.json['data']}", headers=user).json
    assert task["queue"] == "embeddings-text-embed-3"


def test_stats_count_waiting_running_done(client, user, worker, chat, admin):
    ids = [put(client, user).json["data"] for _ in range(3)]
    take(client, worker, size=1)
    client.post(f"/v1/queue/{ids[0]}/complete", headers=worker, json={"status_code": 200, "body": {}})
    take(client, worker, size=1)
    stats = client.get("/v1/queue/chat:0/stats", headers=worker).json
    assert (stats["waiting"], stats["running"], stats["done"]) == (1, 1, 1)
    console = client.get("/v1/console/queue/stats", headers=admin).json["data"]
    assert any(row["queue"] == "chat:0" and row["waiting"] == 1 for row in console)


def test_console_clear_cancels_waiting_tasks(client, user, worker, admin, chat):
    ids = [put(client, user).json["data"] for _ in range(3)]
    take(client, worker, size=1)
    resp = client.post("/v1/console/chat:0/clear", headers=admin)
    assert resp.json["cleared"] == 2
    statuses = sorted(client.get(f"/v1/queue/{i}", headers=user).json["status"] for i in ids)
    assert statuses == ["cancelled", "cancelled", "queued"]


def test_eventbus_names_the_redis_url_and_topic(client, worker, redis_prefix):
    resp = client.get("/v1/queue/eventbus", headers=worker).json
    assert resp["url"].startswith("redis://") and resp["topic"] == f"{redis_prefix}:events:"


def test_healthz_checks_redis_and_sql(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.json["checks"] == {"redis": "ok", "sql": "ok"}
