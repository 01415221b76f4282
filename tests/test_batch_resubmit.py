"""``POST /v1/batches/{id}/resubmit``: a new batch of the lines of an ended batch that did not
succeed, on the same endpoint, queue and window, saying ``metadata.resubmit_of``. The two
batches' output files hold every ``custom_id`` of the original exactly once."""

from __future__ import annotations

import itertools
import threading
from collections import Counter

import openai
import pytest
from kombu.exceptions import OperationalError

from tests.batch_fixtures import (  # noqa: F401  (ext_queue is a fixture)
    CHAT,
    QUEUE,
    chat_line,
    complete,
    content,
    create_batch,
    expire_now,
    ext_queue,
    finished,
    get,
    jsonl,
    read_jsonl,
    results,
    sdk,
    take,
    until_status,
    wait_for,
)


def test_resubmit_the_cancelled_lines_with_the_sdk(live_server, user, celery_worker, mock_upstream, settings):
    settings.worker_take_size = 2
    # The first 8 requests are answered; the rest wait until the batch is cancelled, so the cancel
    # finds lines not yet taken however fast the workers are. The cancel's control message waits for
    # a worker slot that draining consumers hold: they must give it back.
    gate, answered = threading.Event(), itertools.count()
    mock_upstream.state.latency = 0.01
    mock_upstream.state.sleep = lambda delay: next(answered) < 8 or gate.wait(30)
    api = sdk(live_server.url, user)
    lines = [chat_line(f"r{i}") for i in range(40)]
    for i in (0, 1):
        lines[i]["body"]["mock_status"] = 400
    source = api.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    original = api.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="2h",
                                  metadata={"run": "first"})
    wait_for(lambda: api.batches.retrieve(original.id).request_counts.completed >= 4, timeout=30)
    api.batches.cancel(original.id)
    gate.set()
    original = finished(api, original.id)
    assert original.status == "cancelled" and original.request_counts.failed > 0
    mock_upstream.state.latency = 0

    again = api.post(f"/batches/{original.id}/resubmit", body={"lines": "cancelled"}, cast_to=openai.types.Batch)
    assert again.status == "validating" and again.id != original.id
    assert again.metadata == {"run": "first", "resubmit_of": original.id}
    assert (again.endpoint, again.completion_window) == (CHAT, "2h")
    again = finished(api, again.id)
    assert again.status == "completed"

    out, err = results(api, original)
    cancelled = {e["custom_id"] for e in err if e["error"] and e["error"]["code"] == "batch_cancelled"}
    asked = read_jsonl(api.files.content(again.input_file_id).content)
    assert {line["custom_id"] for line in asked} == cancelled and len(asked) == len(cancelled)
    assert all(line["method"] == "POST" and line["url"] == CHAT for line in asked)
    assert api.files.retrieve(again.input_file_id).purpose == "batch"
    new_out, new_err = results(api, again)
    answered_400 = {"r0", "r1"}
    seen = Counter(line["custom_id"] for line in out + new_out)
    assert set(seen) == {f"r{i}" for i in range(40)} - answered_400 and set(seen.values()) == {1}
    for line in err + new_err:
        if line["custom_id"] in answered_400 and line["response"]:
            assert line["response"]["status_code"] == 400


def test_resubmit_picks_lines_queue_and_metadata(app, client, user, admin, worker, ext, celery_worker):
    from workers.batches import expire_batches

    client.post("/v1/queue/register", json={"queue": "ext2", "endpoint": CHAT, "builtin": False}, headers=admin)
    original = create_batch(client, user, jsonl([chat_line(f"x{i}") for i in range(6)]), window="3h",
                            extra_headers=QUEUE, metadata={"project": "p"})
    until_status(client, user, original["id"], "in_progress")
    taken = take(client, worker, 3)
    complete(client, worker, taken[0])
    complete(client, worker, taken[1])
    complete(client, worker, taken[2], 429, {"error": {"message": "slow down", "type": "requests"}})
    expire_now(app, original["id"])
    expire_batches.delay()
    original = until_status(client, user, original["id"], "expired")

    every = client.post(f"/v1/batches/{original['id']}/resubmit", headers=user)  # no body: lines "failed"
    assert every.status_code == 200, every.json
    assert every.json["metadata"] == {"project": "p", "resubmit_of": original["id"]}
    assert every.json["completion_window"] == "3h" and every.json["expires_at"] > original["expires_at"]
    asked = [line["custom_id"] for line in content(client, user, every.json["input_file_id"])]
    assert asked == ["x2", "x3", "x4", "x5"]  # the 429 answer and the three expired lines
    until_status(client, user, every.json["id"], "in_progress")
    assert [t["data"]["messages"][0]["content"] for t in take(client, worker, 10)] == [f"say {c}" for c in asked]

    expired = client.post(f"/v1/batches/{original['id']}/resubmit", json={"lines": "expired"},
                          headers={**user, "X-BELLA-QUEUE-NAME": "ext2", "Idempotency-Key": "once"})
    same = client.post(f"/v1/batches/{original['id']}/resubmit", json={"lines": "expired"},
                       headers={**user, "X-BELLA-QUEUE-NAME": "ext2", "Idempotency-Key": "once"})
    assert expired.status_code == same.status_code == 200 and expired.json["id"] == same.json["id"]
    assert [line["custom_id"] for line in content(client, user, expired.json["input_file_id"])] == ["x3", "x4", "x5"]
    until_status(client, user, expired.json["id"], "in_progress")
    assert {t["queue"] for t in take(client, worker, 10, "ext2:1")} == {"ext2"}
    assert len(client.get("/v1/batches", headers=user).json["data"]) == 3


@pytest.mark.parametrize(("body", "code"), [
    ({"lines": "everything"}, "invalid_value"),
    ({"lines": 5}, "invalid_type"),
])
def test_bad_resubmit_requests_are_400(client, user, worker, ext, celery_worker, body, code):
    batch = create_batch(client, user, jsonl([chat_line("a")]), extra_headers=QUEUE)
    until_status(client, user, batch["id"], "in_progress")
    running = client.post(f"/v1/batches/{batch['id']}/resubmit", headers=user)
    assert running.status_code == 400 and running.json["error"]["code"] == "batch_not_ended"
    assert running.headers["x-should-retry"] == "false"
    complete(client, worker, take(client, worker, 1)[0], 500, {"error": {"message": "boom", "type": "server"}})
    until_status(client, user, batch["id"], "completed")
    resp = client.post(f"/v1/batches/{batch['id']}/resubmit", json=body, headers=user)
    assert resp.status_code == 400 and resp.json["error"]["code"] == code and resp.json["error"]["param"] == "lines"
    resp = client.post(f"/v1/batches/{batch['id']}/resubmit", data="{nope", headers=user,
                       content_type="application/json")
    assert resp.status_code == 400


def test_nothing_to_resubmit_other_owners_and_roles(client, user, make_key, worker, ext, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line("ok")]), extra_headers=QUEUE)
    until_status(client, user, batch["id"], "in_progress")
    complete(client, worker, take(client, worker, 1)[0])
    until_status(client, user, batch["id"], "completed")
    files_before = client.get("/v1/files", headers=user).json["data"]
    resp = client.post(f"/v1/batches/{batch['id']}/resubmit", json={"lines": "failed"}, headers=user)
    assert resp.status_code == 400 and resp.json["error"]["code"] == "nothing_to_resubmit"
    assert client.get("/v1/files", headers=user).json["data"] == files_before
    other = client.post(f"/v1/batches/{batch['id']}/resubmit", headers=make_key("user"))
    assert other.status_code == 404 and other.json["error"]["code"] == "batch_not_found"
    assert client.post(f"/v1/batches/{batch['id']}/resubmit", headers=worker).status_code == 403


def test_resubmit_with_the_broker_down_keeps_nothing(client, user, worker, ext, celery_worker, monkeypatch):
    from workers.batches import ingest_batch

    batch = create_batch(client, user, jsonl([chat_line("f")]), extra_headers=QUEUE)
    until_status(client, user, batch["id"], "in_progress")
    complete(client, worker, take(client, worker, 1)[0], 503, {"error": {"message": "busy", "type": "server"}})
    until_status(client, user, batch["id"], "completed")
    files_before = client.get("/v1/files", headers=user).json["data"]

    def broker_down(*args, **kwargs):
        raise OperationalError("[Errno 111] Connection refused")

    monkeypatch.setattr(ingest_batch, "apply_async", broker_down)
    resp = client.post(f"/v1/batches/{batch['id']}/resubmit", headers=user)
    assert resp.status_code == 503 and resp.headers["x-should-retry"] == "true"
    assert [b["id"] for b in client.get("/v1/batches", headers=user).json["data"]] == [batch["id"]]
    assert client.get("/v1/files", headers=user).json["data"] == files_before
    monkeypatch.undo()
    assert client.post(f"/v1/batches/{batch['id']}/resubmit", headers=user).status_code == 200
    assert get(client, user, batch["id"])["status"] == "completed"
