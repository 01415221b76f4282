"""The Batch API (SPEC 2) with the official SDK in strict mode: create, retrieve, list, cancel,
expiry, routing, idempotency and tenancy. Requests are run by an external worker over HTTP (so
the test decides what finished when); a Celery worker runs ingest and finalisation."""

from __future__ import annotations

import time

import openai
import pytest

from tests.batch_fixtures import (  # noqa: F401  (ext_queue is a fixture)
    BATCH_FIELDS,
    CHAT,
    QUEUE,
    chat_line,
    complete,
    content,
    create_batch,
    expire_now,
    ext_queue,
    get,
    jsonl,
    read_jsonl,
    sdk,
    take,
    until_status,
    upload,
    wait_for,
)


def test_sdk_create_retrieve_list_cancel_strict(live_server, client, user, ext, celery_worker):
    api = sdk(live_server.url, user)
    source = api.files.create(file=("in.jsonl", jsonl([chat_line(f"c{i}") for i in range(5)])), purpose="batch")
    raw = api.batches.with_raw_response.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h",
                                               metadata={"project": "x"}, extra_headers=QUEUE)
    created = raw.parse()
    assert set(raw.http_response.json()) == BATCH_FIELDS
    assert created.status == "validating" and created.id.startswith("batch_")
    assert created.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}
    assert created.metadata == {"project": "x"} and created.completion_window == "24h"
    assert created.expires_at - created.created_at == 86400 and created.created_at < 10**11
    assert created.in_progress_at is None and created.output_file_id is None and created.errors is None

    running = wait_for(lambda: (b := api.batches.retrieve(created.id)).status == "in_progress" and b)
    assert running.request_counts.total == 5 and running.in_progress_at >= created.created_at
    listed = api.batches.list()
    assert [b.id for b in listed.data] == [created.id] and listed.has_more is False

    cancelling = api.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = wait_for(lambda: (b := api.batches.retrieve(created.id)).status == "cancelled" and b)
    assert done.cancelled_at >= done.cancelling_at and done.output_file_id is None
    assert done.request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 5}
    errors = read_jsonl(api.files.content(done.error_file_id).content)
    assert sorted(e["custom_id"] for e in errors) == [f"c{i}" for i in range(5)]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"} and {e["response"] for e in errors} == {None}
    error_file = api.files.retrieve(done.error_file_id)
    assert error_file.purpose == "batch_output" and error_file.status == "processed"
    with pytest.raises(openai.BadRequestError) as info:
        api.batches.cancel(created.id)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.body["code"] == "batch_not_cancellable"


def test_list_auto_pages_newest_first(live_server, client, user, ext, celery_worker):
    ids = [create_batch(client, user, jsonl([chat_line("a")]), extra_headers=QUEUE)["id"] for _ in range(5)]
    api = sdk(live_server.url, user)
    page = api.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more is True
    assert [b.id for b in api.batches.list(limit=2)] == ids[::-1]
    raw = client.get("/v1/batches?limit=5", headers=user).json
    assert raw["has_more"] is False and (raw["first_id"], raw["last_id"]) == (ids[-1], ids[0])
    assert all(set(b) == BATCH_FIELDS for b in raw["data"])
    assert client.get(f"/v1/batches?after={ids[0]}", headers=user).json["data"] == []
    assert client.get("/v1/batches?limit=0", headers=user).status_code == 400


def test_counts_move_and_cancel_keeps_finished_results(client, user, worker, ext, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line(f"r{i}") for i in range(10)]), extra_headers=QUEUE)
    until_status(client, user, batch["id"], "in_progress")
    taken = take(client, worker, 5)
    assert [t["batch_id"] for t in taken] == [batch["id"]] * 5
    assert [t["data"]["messages"][0]["content"] for t in taken] == [f"say r{i}" for i in range(5)]
    for task in taken[:3]:
        assert complete(client, worker, task).status_code == 200
    bad = {"error": {"message": "bad model", "type": "invalid_request_error", "param": "model", "code": None}}
    assert complete(client, worker, taken[3], 400, bad).status_code == 200
    counts = get(client, user, batch["id"])["request_counts"]
    assert counts == {"total": 10, "completed": 3, "failed": 1}

    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=user).json["status"] in ("cancelling",
                                                                                              "cancelled")
    again = client.post(f"/v1/batches/{batch['id']}/cancel", headers=user)
    assert again.status_code in (200, 400)  # still cancelling: same answer; already cancelled: finished
    done = until_status(client, user, batch["id"], "cancelled")
    # The running task was dropped: its late result is refused.
    assert complete(client, worker, taken[4]).status_code == 409
    assert done["request_counts"] == {"total": 10, "completed": 3, "failed": 7}
    out, err = content(client, user, done["output_file_id"]), content(client, user, done["error_file_id"])
    assert sorted(o["custom_id"] for o in out) == ["r0", "r1", "r2"]
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
    assert out[0]["response"]["body"]["echo"]["messages"][0]["content"] == "say r0"
    assert out[0]["id"].startswith("batch_req_") and out[0]["response"]["request_id"].startswith("req-")
    by_id = {e["custom_id"]: e for e in err}
    assert sorted(by_id) == ["r3"] + [f"r{i}" for i in range(4, 10)]
    assert by_id["r3"]["response"] == {"status_code": 400, "request_id": by_id["r3"]["response"]["request_id"],
                                       "body": bad}
    assert by_id["r3"]["error"] is None
    for cid in [f"r{i}" for i in range(4, 10)]:
        assert by_id[cid]["response"] is None and by_id[cid]["error"]["code"] == "batch_cancelled"
    assert take(client, worker, 10) == []  # nothing of the batch is left to run


def test_cancel_a_finished_batch_is_400(client, user, worker, ext, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line("only")]), extra_headers=QUEUE)
    until_status(client, user, batch["id"], "in_progress")
    complete(client, worker, take(client, worker, 1)[0])
    done = until_status(client, user, batch["id"], "completed")
    assert done["completed_at"] >= done["finalizing_at"] >= done["in_progress_at"]
    resp = client.post(f"/v1/batches/{batch['id']}/cancel", headers=user)
    assert resp.status_code == 400 and resp.headers["x-should-retry"] == "false"
    assert "completed" in resp.json["error"]["message"]


def test_expiry_keeps_finished_results_and_writes_batch_expired(app, client, user, worker, ext, celery_worker):
    from workers.batches import expire_batches

    batch = create_batch(client, user, jsonl([chat_line(f"e{i}") for i in range(6)]), extra_headers=QUEUE)
    until_status(client, user, batch["id"], "in_progress")
    taken = take(client, worker, 3)
    for task in taken[:2]:
        complete(client, worker, task)
    expire_now(app, batch["id"])
    expire_batches.delay()
    done = until_status(client, user, batch["id"], "expired")
    assert done["expired_at"] is not None and done["cancelled_at"] is None and done["completed_at"] is None
    assert done["request_counts"] == {"total": 6, "completed": 2, "failed": 4}
    assert sorted(o["custom_id"] for o in content(client, user, done["output_file_id"])) == ["e0", "e1"]
    err = content(client, user, done["error_file_id"])
    assert sorted(e["custom_id"] for e in err) == ["e2", "e3", "e4", "e5"]
    assert {e["error"]["code"] for e in err} == {"batch_expired"}
    assert complete(client, worker, taken[2]).status_code == 409
    resp = client.post(f"/v1/batches/{batch['id']}/cancel", headers=user)
    assert resp.status_code == 400


@pytest.mark.slow
def test_a_one_minute_window_expires(client, user, worker, ext, celery_worker):
    from workers.batches import expire_batches

    batch = create_batch(client, user, jsonl([chat_line(f"w{i}") for i in range(3)]), window="1m",
                         extra_headers=QUEUE)
    assert batch["expires_at"] - batch["created_at"] == 60
    until_status(client, user, batch["id"], "in_progress")
    complete(client, worker, take(client, worker, 1)[0])
    time.sleep(max(0.0, batch["expires_at"] - time.time() + 1))

    def expired():
        expire_batches.delay()  # what beat does every 10 s
        return until_status(client, user, batch["id"], "expired", "in_progress")["status"] == "expired"

    wait_for(expired, timeout=30, interval=0.5)
    done = get(client, user, batch["id"])
    assert done["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert {e["error"]["code"] for e in content(client, user, done["error_file_id"])} == {"batch_expired"}


def test_queue_header_routes_the_batch(client, user, worker, ext, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line("q1"), chat_line("q2")]), extra_headers=QUEUE)
    until_status(client, user, batch["id"], "in_progress")
    taken = take(client, worker, 5)
    assert [t["queue"] for t in taken] == ["ext", "ext"] and {t["level"] for t in taken} == {1}
    task = client.get(f"/v1/queue/{taken[0]['task_id']}", headers=user).json
    assert task["batch_id"] == batch["id"] and task["status"] == "queued"


@pytest.mark.parametrize(("change", "param"), [
    ({"completion_window": "2x"}, "completion_window"),
    ({"completion_window": "0h"}, "completion_window"),
    ({"completion_window": "31d"}, "completion_window"),
    ({"endpoint": "/v1/unknown"}, "endpoint"),
    ({"endpoint": "chat"}, "endpoint"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"input_file_id": None}, "input_file_id"),
])
def test_bad_create_requests_are_400(client, user, change, param):
    file_id = upload(client, user, jsonl([chat_line("a")]))["id"]
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **change}
    resp = client.post("/v1/batches", json=body, headers=user)
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["param"] == param and resp.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("window", ["24h", "30m", "2h", "7d"])
def test_completion_windows(client, user, ext, celery_worker, window):
    batch = create_batch(client, user, jsonl([chat_line("a")]), window=window, extra_headers=QUEUE)
    seconds = {"24h": 86400, "30m": 1800, "2h": 7200, "7d": 7 * 86400}[window]
    assert batch["expires_at"] - batch["created_at"] == seconds


def test_bad_queue_headers_are_400(client, user, admin):
    file_id = upload(client, user, jsonl([chat_line("a")]))["id"]
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    resp = client.post("/v1/batches", json=body, headers={**user, "X-BELLA-QUEUE-NAME": "nope"})
    assert resp.status_code == 400 and resp.json["error"]["param"] == "X-BELLA-QUEUE-NAME"
    client.post("/v1/queue/register", json={"queue": "emb", "endpoint": "/v1/embeddings"}, headers=admin)
    resp = client.post("/v1/batches", json=body, headers={**user, "X-BELLA-QUEUE-NAME": "emb"})
    assert resp.status_code == 400 and "/v1/embeddings" in resp.json["error"]["message"]


def test_an_endpoint_of_a_registered_queue_is_accepted(client, user, admin, celery_worker):
    client.post("/v1/queue/register", json={"queue": "rr", "endpoint": "/v1/rerank", "builtin": False},
                headers=admin)
    data = jsonl([chat_line("a", url="/v1/rerank")])
    batch = create_batch(client, user, data, endpoint="/v1/rerank", extra_headers={"X-BELLA-QUEUE-NAME": "rr"})
    assert until_status(client, user, batch["id"], "in_progress")["endpoint"] == "/v1/rerank"


def test_idempotency_key_returns_the_first_batch(live_server, client, user, ext, celery_worker):
    api = sdk(live_server.url, user)
    source = api.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
    kwargs = {"input_file_id": source.id, "endpoint": CHAT, "completion_window": "24h"}
    first = api.batches.create(**kwargs, extra_headers={**QUEUE, "Idempotency-Key": "same"})
    again = api.batches.create(**kwargs, extra_headers={**QUEUE, "Idempotency-Key": "same"})
    assert again.id == first.id
    assert len(api.batches.list().data) == 1


def test_tenancy_another_owners_batch_and_file_are_404(client, user, make_key, ext, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line("a")]), extra_headers=QUEUE)
    other = make_key("user")
    assert client.get(f"/v1/batches/{batch['id']}", headers=other).status_code == 404
    resp = client.post(f"/v1/batches/{batch['id']}/cancel", headers=other)
    assert resp.status_code == 404 and resp.json["error"]["code"] == "batch_not_found"
    assert client.get("/v1/batches", headers=other).json["data"] == []
    body = {"input_file_id": batch["input_file_id"], "endpoint": CHAT, "completion_window": "24h"}
    resp = client.post("/v1/batches", json=body, headers=other)
    assert resp.status_code == 404 and resp.json["error"]["param"] == "input_file_id"
    assert get(client, user, batch["id"])["status"] in ("validating", "in_progress")


def test_roles(client, worker):
    assert client.get("/v1/batches").status_code == 401
    assert client.get("/v1/batches", headers=worker).status_code == 403
    assert client.get("/v1/batches/batch_nope", headers=worker).status_code == 403
