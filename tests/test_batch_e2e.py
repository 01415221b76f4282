"""Batches end to end with built-in workers and the mock upstream: the SDK in strict mode, a cancel
under load, and a worker killed with ``kill -9`` mid-batch."""

from __future__ import annotations

import time

import pytest

from bellaq.batches import output
from tests.batch_fixtures import (
    CHAT,
    assert_each_custom_id_once,
    chat_line,
    finished,
    jsonl,
    results,
    sdk,
    wait_for,
)


def test_a_100_line_batch_completes_with_builtin_workers(live_server, user, celery_worker, monkeypatch):
    monkeypatch.setattr(output, "SHARD_LINES", 17)  # several shards in the chord
    api = sdk(live_server.url, user)
    lines = [chat_line(f"req-{i}") for i in range(100)]
    for i in range(0, 100, 10):
        lines[i]["body"]["mock_status"] = 400
    source = api.files.create(file=("chat.jsonl", jsonl(lines)), purpose="batch")
    created = api.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
    assert created.status == "validating"
    batch = finished(api, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 100, "completed": 90, "failed": 10}
    assert batch.finalizing_at is not None and batch.completed_at >= batch.finalizing_at >= batch.in_progress_at
    assert batch.model == "mock-model" and batch.errors is None
    out, err = results(api, batch)
    assert_each_custom_id_once(out, err, {f"req-{i}" for i in range(100)})
    assert len(out) == 90 and len(err) == 10
    first = out[0]
    assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
    assert first["id"].startswith("batch_req_")
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
    body = first["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == f"echo: say {first['custom_id']}"
    for line in err:
        assert line["error"] is None and line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["message"] and line["response"]["request_id"]
    for file_id, name in ((batch.output_file_id, "output"), (batch.error_file_id, "error")):
        meta = api.files.retrieve(file_id)
        assert meta.purpose == "batch_output" and meta.filename == f"{batch.id}_{name}.jsonl"
    assert {f.id for f in api.files.list(purpose="batch_output")} == {batch.output_file_id, batch.error_file_id}


def test_a_batch_whose_every_line_fails_is_completed_without_output(live_server, user, celery_worker):
    api = sdk(live_server.url, user)
    lines = [chat_line(f"bad-{i}") for i in range(5)]
    for line in lines:
        line["body"]["mock_status"] = 422
    source = api.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
    batch = finished(api, api.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h").id)
    assert batch.status == "completed" and batch.output_file_id is None and batch.error_file_id
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 5}
    out, err = results(api, batch)
    assert_each_custom_id_once(out, err, {f"bad-{i}" for i in range(5)})
    assert {line["response"]["status_code"] for line in err} == {422}


def test_cancel_under_load_keeps_finished_results(live_server, user, celery_worker, mock_upstream, settings):
    settings.worker_take_size = 2
    mock_upstream.state.latency = 0.2
    api = sdk(live_server.url, user)
    source = api.files.create(file=("slow.jsonl", jsonl([chat_line(f"s{i}") for i in range(200)])),
                              purpose="batch")
    created = api.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
    wait_for(lambda: api.batches.retrieve(created.id).request_counts.completed >= 10, timeout=30)
    asked = time.monotonic()
    assert api.batches.cancel(created.id).status in ("cancelling", "cancelled")
    batch = finished(api, created.id, timeout=30)
    assert batch.status == "cancelled" and time.monotonic() - asked < 15
    out, err = results(api, batch)
    assert_each_custom_id_once(out, err, {f"s{i}" for i in range(200)})
    assert len(out) == batch.request_counts.completed >= 10 and batch.request_counts.total == 200
    assert batch.request_counts.failed == 200 - len(out)
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
    asked_upstream = mock_upstream.state.request_count
    time.sleep(1.0)
    assert mock_upstream.state.request_count - asked_upstream <= 8  # at most what was in flight


@pytest.mark.slow
def test_a_killed_worker_does_not_lose_or_duplicate_lines(tmp_path, redis_prefix, database_url, mock_upstream):
    """Two worker processes; one is killed with SIGKILL mid-batch. Its leases (3 s, renewed every
    second while it lived) run out, the tasks run again elsewhere, and the batch completes with
    every custom_id exactly once. process_timeout stays at its default: under load a request may
    take seconds without its lease running out."""
    from tests.conftest import ADMIN_KEY
    from tests.stack import Stack

    mock_upstream.state.latency = 0.05
    stack = Stack(tmp_path, redis_prefix, database_url, mock_upstream.base_url,
                  BELLAQ_WORKER_LEASE="3", BELLAQ_WORKER_LEASE_RENEW="1", BELLAQ_WORKER_TAKE_SIZE="4")
    try:
        stack.start_web()
        victim = stack.start_worker(concurrency=16)
        stack.start_worker(concurrency=16)
        stack.start_beat()
        import requests

        key = requests.post(f"{stack.url}/v1/keys", json={"name": "u", "role": "user"},
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()["key"]
        api = sdk(stack.url, {"Authorization": f"Bearer {key}"}, timeout=30)
        n = 400
        source = api.files.create(file=("k.jsonl", jsonl([chat_line(f"k{i}") for i in range(n)])), purpose="batch")
        created = api.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
        wait_for(lambda: api.batches.retrieve(created.id).request_counts.completed >= 100, timeout=120)
        stack.kill(victim)
        # Generous: on SQLite a gevent worker process can sit out the 30 s busy timeout under
        # write contention; what this test checks is that nothing is lost or doubled.
        batch = finished(api, created.id, timeout=300)
        assert batch.status == "completed", stack.logs()
        out, err = results(api, batch)
        assert_each_custom_id_once(out, err, {f"k{i}" for i in range(n)})
        assert batch.request_counts.total == n
        assert batch.request_counts.completed == len(out) and batch.request_counts.failed == len(err)
        assert len(out) + len(err) == n
    finally:
        stack.stop()
