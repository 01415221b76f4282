"""Fault drills as tests, on real processes (gunicorn, Celery workers, beat): a worker killed with
leases in hand, a worker killed between the engine's complete and the SQL write, Redis stopped
under a batch create and under an ingest. Tests that stop Redis run their own ``redis-server``."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from scripts.benchlib import Stack
from scripts.private_redis import PrivateRedis
from tests.batch_fixtures import CHAT, assert_each_custom_id_once, chat_line, finished, jsonl, results, sdk
from tests.conftest import ADMIN_KEY, REDIS_URL, wait_for

pytestmark = pytest.mark.slow


def user_key(stack: Stack) -> str:
    resp = requests.post(f"{stack.url}/v1/keys", json={"name": "u", "role": "user"},
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


def redis_client(url: str):  # noqa: ANN201
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


def leases_of(url: str, prefix: str, pid: int) -> int:
    """How many leases the worker process ``pid`` holds (its holder names its pid)."""
    client = redis_client(url)
    try:
        return sum(1 for key in client.scan_iter(match=f"{prefix}:{{*}}:leaseinfo")
                   for holder in client.hvals(key) if f":{pid}:" in holder)
    finally:
        client.close()


def recorded_results(url: str, prefix: str) -> dict[str, dict]:
    client = redis_client(url)
    try:
        found: dict[str, dict] = {}
        for key in client.scan_iter(match=f"{prefix}:{{*}}:results"):
            found.update({task_id: json.loads(text) for task_id, text in client.hgetall(key).items()})
        return found
    finally:
        client.close()


def batch_tasks(database_url: str, batch_id: str) -> int:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT COUNT(*) FROM tasks WHERE batch_id = :b"), {"b": batch_id}).scalar()
    finally:
        engine.dispose()


def test_a_killed_workers_leases_return_within_one_lease(tmp_path, redis_prefix, database_url, mock_upstream):
    """kill -9 of a worker holding leases, another alive: the batch ends within two lease periods
    of the kill (process_timeout is 300 s), every line in the output, none ``worker_lost``."""
    lease = 10
    mock_upstream.state.latency = 0.2
    stack = Stack(tmp_path, redis_prefix, database_url, mock_upstream.base_url, redis_url=REDIS_URL,
                  admin_key=ADMIN_KEY, BELLAQ_WORKER_LEASE=str(lease), BELLAQ_WORKER_LEASE_RENEW="1",
                  BELLAQ_WORKER_TAKE_SIZE="4")
    try:
        stack.start_web(workers=1)
        victim = stack.start_worker(concurrency=8)
        stack.start_worker(concurrency=8)
        stack.start_beat()
        api = sdk(stack.url, {"Authorization": f"Bearer {user_key(stack)}"}, timeout=30)
        n = 300
        source = api.files.create(file=("k.jsonl", jsonl([chat_line(f"k{i}") for i in range(n)])), purpose="batch")
        created = api.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
        wait_for(lambda: api.batches.retrieve(created.id).request_counts.completed >= 30
                 and leases_of(REDIS_URL, redis_prefix, victim.pid) >= 4, timeout=60, interval=0.02,
                 message="the victim to hold leases mid-batch")
        stack.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        batch = finished(api, created.id, timeout=120)
        took = time.monotonic() - killed
        assert batch.status == "completed", stack.logs()
        out, err = results(api, batch)
        assert_each_custom_id_once(out, err, {f"k{i}" for i in range(n)})
        assert err == [] and len(out) == n
        if database_url.startswith("mysql"):
            # On SQLite a gevent worker can stand still for the whole 30 s busy timeout (a known
            # stall, in ARCHITECTURE.md), so there the test holds to no loss and no duplicate only.
            assert took <= 2 * lease, f"the batch ended {took:.1f} s after the kill"
    finally:
        stack.stop()


def test_an_answer_recorded_before_a_worker_died_is_kept_and_not_asked_again(tmp_path, redis_prefix, database_url,
                                                                               mock_upstream):
    """A worker exits right after the engine's complete, before the SQL write: the recorded
    answers end in the output file, exactly those answers, and the upstream was not asked again."""
    mock_upstream.state.latency = 0.05
    mock_upstream.state.record = True
    stack = Stack(tmp_path, redis_prefix, database_url, mock_upstream.base_url, redis_url=REDIS_URL,
                  admin_key=ADMIN_KEY, BELLAQ_WORKER_LEASE="3", BELLAQ_WORKER_LEASE_RENEW="1",
                  BELLAQ_WORKER_TAKE_SIZE="4", BELLAQ_LOST_COMPLETION_GRACE="1")
    try:
        stack.start_web(workers=1)
        stack.env["BELLAQ_FAULT_EXIT_AT"] = "after_engine_complete"
        victim = stack.start_worker(concurrency=2)
        del stack.env["BELLAQ_FAULT_EXIT_AT"]
        stack.start_beat()
        api = sdk(stack.url, {"Authorization": f"Bearer {user_key(stack)}"}, timeout=30)
        n = 60
        source = api.files.create(file=("k.jsonl", jsonl([chat_line(f"k{i}") for i in range(n)])), purpose="batch")
        created = api.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
        victim.wait(timeout=60)
        assert victim.returncode == 70, stack.logs()
        recorded = recorded_results(REDIS_URL, redis_prefix)
        assert recorded, "the victim died before recording anything"
        stack.start_worker(concurrency=4)
        batch = finished(api, created.id, timeout=90)
        assert batch.status == "completed", stack.logs()
        out, err = results(api, batch)
        assert_each_custom_id_once(out, err, {f"k{i}" for i in range(n)})
        assert err == []
        by_task = {line["id"]: line for line in out}
        for task_id, result in recorded.items():
            assert by_task[task_id]["response"]["body"] == result["body"]
        asked = Counter(r.body["messages"][0]["content"] for r in mock_upstream.requests)
        kept = {by_task[task_id]["custom_id"] for task_id in recorded}
        assert all(asked[f"say {custom_id}"] == 1 for custom_id in kept), asked
        assert recorded_results(REDIS_URL, redis_prefix) == {}  # forgotten once in SQL
    finally:
        stack.stop()


def _private_stack(tmp_path: Path, private: PrivateRedis, prefix: str, database_url: str, upstream: str,
                   **env: str) -> Stack:
    return Stack(tmp_path, prefix, database_url, upstream, redis_url=private.url, admin_key=ADMIN_KEY,
                 BELLAQ_BROKER_URL=private.url, **env)


def test_a_batch_created_while_redis_is_down_is_refused_or_kept_once(tmp_path, redis_prefix, database_url,
                                                                      mock_upstream):
    with PrivateRedis(tmp_path) as private:
        stack = _private_stack(tmp_path, private, redis_prefix, database_url, mock_upstream.base_url)
        try:
            stack.start_web(workers=1)
            stack.start_worker(concurrency=4)
            stack.start_beat()
            user = {"Authorization": f"Bearer {user_key(stack)}"}
            api = sdk(stack.url, user, timeout=30)
            source = api.files.create(file=("k.jsonl", jsonl([chat_line(f"k{i}") for i in range(20)])),
                                      purpose="batch")
            private.stop()
            resp = requests.post(f"{stack.url}/v1/batches", headers=user, timeout=60, json={
                "input_file_id": source.id, "endpoint": CHAT, "completion_window": "24h"})
            assert resp.status_code in (200, 503), resp.text
            if resp.status_code == 503:
                assert resp.json()["error"]["code"] == "service_unavailable"
                assert resp.json()["error"]["type"] in ("server_error", "service_unavailable")
            private.start()
            listed = wait_for(lambda: _list_batches(stack.url, user), timeout=30, message="the API to answer")
            if resp.status_code == 503:
                assert listed["data"] == []
            else:
                assert [b["id"] for b in listed["data"]] == [resp.json()["id"]]
                batch = finished(api, resp.json()["id"], timeout=90)
                assert batch.status == "completed", stack.logs()
        finally:
            stack.stop()


def _list_batches(url: str, user: dict[str, str]) -> dict | None:
    try:
        resp = requests.get(f"{url}/v1/batches", headers=user, timeout=10)
    except requests.RequestException:
        return None
    return resp.json() if resp.status_code == 200 else None


def test_an_ingest_cut_by_redis_resumes_within_seconds_of_its_return(tmp_path, redis_prefix, database_url,
                                                                      mock_upstream):
    n = 3000
    with PrivateRedis(tmp_path) as private:
        stack = _private_stack(tmp_path, private, redis_prefix, database_url, mock_upstream.base_url,
                               BELLAQ_BATCH_CHUNK_SIZE="20")
        try:
            stack.start_web(workers=1)
            stack.start_worker(concurrency=8)
            stack.start_worker(concurrency=8)
            stack.start_beat()
            api = sdk(stack.url, {"Authorization": f"Bearer {user_key(stack)}"}, timeout=30)
            source = api.files.create(file=("k.jsonl", jsonl([chat_line(f"k{i}") for i in range(n)])),
                                      purpose="batch")
            created = api.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
            wait_for(lambda: 0 < batch_tasks(stack.env["BELLAQ_DATABASE_URL"], created.id), timeout=60,
                     interval=0.02, message="ingest to start")
            private.stop()
            assert batch_tasks(stack.env["BELLAQ_DATABASE_URL"], created.id) < n, "ingest ended before the cut"
            time.sleep(5)  # the outage itself, not a synchronisation
            before = batch_tasks(stack.env["BELLAQ_DATABASE_URL"], created.id)
            private.start()
            back = time.monotonic()
            wait_for(lambda: batch_tasks(stack.env["BELLAQ_DATABASE_URL"], created.id) > before, timeout=30,
                     interval=0.05, message="ingest to resume")
            assert time.monotonic() - back <= 10
            batch = finished(api, created.id, timeout=240)
            assert batch.status == "completed", stack.logs()
            out, err = results(api, batch)
            assert_each_custom_id_once(out, err, {f"k{i}" for i in range(n)})
            assert batch.request_counts.total == n and len(out) == n
        finally:
            stack.stop()
