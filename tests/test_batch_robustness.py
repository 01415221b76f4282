"""A batch never jams, and a fault costs seconds, not batches: hostile input files end validating
(``failed`` naming the line, or running), an unexpected error fails the batch instead of being
retried forever, transient faults are retried a bounded number of times and resume where they
stopped, a cancel ends a validating batch at once, and create and cancel with the broker down
either keep nothing (503) or answer for what they kept."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from kombu.exceptions import OperationalError
from sqlalchemy import update
from sqlalchemy.exc import OperationalError as SQLError

from bellaq.batches import ingest, progress, service, sweep, validation
from bellaq.extensions import db
from bellaq.models import Batch, Task
from tests.batch_fixtures import (  # noqa: F401  (bound_app and ext_queue are fixtures)
    CHAT,
    QUEUE,
    bound_app,
    chat_line,
    complete,
    create_batch,
    ext_queue,
    jsonl,
    read_jsonl,
    take,
    upload,
    wait_for,
)


def state(app, batch_id: str) -> dict:
    """The Batch object and the number of its tasks, read in SQL."""
    with app.app_context():
        batch = db.session.get(Batch, batch_id)
        tasks = db.session.execute(db.select(db.func.count()).where(Task.batch_id == batch_id)).scalar_one()
        return {**service.batch_object(batch), "tasks": tasks, "ingested": batch.ingested_at is not None}


def line(custom_id: object = "a", body: str = '{"model": "m"}', method: str = '"POST"') -> str:
    return f'{{"custom_id": {json.dumps(custom_id)}, "method": {method}, "url": "{CHAT}", "body": {body}}}'


RUNS, ENDS = "runs", "runs or fails"
# name -> (file bytes, what must happen: RUNS, ENDS (either, as the JSON reader decides), or the
# acceptable codes of the first error and its line).
HOSTILE = {
    "binary junk": (b"\x00\x01\xff\xfe\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\n", ({"invalid_json_line"}, 1)),
    "invalid UTF-8 in a string": (line("X").encode().replace(b'"X"', b'"a\xff"') + b"\n", ({"invalid_json_line"}, 1)),
    "a UTF-16 file": (("\ufeff" + line() + "\n").encode("utf-16-le"), ({"invalid_json_line"}, 1)),
    "JSON nested a million deep": (b"[" * 1_000_000 + b"\n", ({"invalid_json_line"}, 1)),
    "NaN as the model": ((line("a", '{"model": NaN}') + "\n" + line("b", '{"model": NaN}') + "\n").encode(), ENDS),
    "a lone surrogate in a custom_id": ((line("X").replace('"X"', '"\\ud800"') + "\n").encode(),
                                        ({"invalid_json_line", "invalid_custom_id"}, 1)),
    "a line longer than the limit": (jsonl([chat_line("a"), chat_line("b", pad="x" * 5000)]), ({"line_too_large"}, 2)),
    "a method of a megabyte": (jsonl([chat_line("a", method="M" * 1_000_000)]), ({"invalid_method"}, 1)),
    "a model too long for its column": (jsonl([chat_line("a", model="m" * 300)]), ({"invalid_model"}, 1)),
    "a JSON string as a line": (b'"just a string"\n', ({"invalid_json_line"}, 1)),
    "null as a line": (jsonl([chat_line("a")]) + b"null\n", ({"invalid_json_line"}, 2)),
    "a number as custom_id": (jsonl([chat_line(5)]), ({"missing_custom_id"}, 1)),
    "no body": ((line(body="null") + "\n").encode(), ({"invalid_body"}, 1)),
    "only blank lines": (b"\n  \n\t\n", ({"empty_file"}, None)),
    "CRLF and no final newline": ((line("a") + "\r\n" + line("b")).encode(), RUNS),
    "NUL and emoji in custom_ids": (jsonl([chat_line("a\u0000b"), chat_line("\U0001f600")]), RUNS),
    # 6 MB of UTF-8 that ASCII escapes would make 18 MB, more than a MariaDB statement may hold.
    "a body of 3 million accents": (jsonl([chat_line("a")]) + json.dumps(
        chat_line("b", body={"model": "mock-model", "prompt": "\u00e9" * 3_000_000}), ensure_ascii=False).encode(),
        RUNS),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_ends_validating(bound, client, user, settings, name):
    if name == "a line longer than the limit":
        settings.max_json_bytes = 4096
    data, expected = HOSTILE[name]
    created = create_batch(client, user, data)
    with bound.app_context():
        outcome = ingest.run(created["id"])
    batch = state(bound, created["id"])
    if expected == ENDS:
        assert (outcome, batch["status"]) in {("ingested", "in_progress"), ("failed", "failed")}, batch
        return
    if expected == RUNS:
        assert outcome == "ingested" and batch["status"] == "in_progress", batch
        assert batch["tasks"] == batch["request_counts"]["total"] == 2
        return
    codes, number = expected
    assert outcome == "failed" and batch["status"] == "failed" and batch["tasks"] == 0, batch
    first = batch["errors"]["data"][0]
    assert first["code"] in codes and first["line"] == number, first
    assert len(json.dumps(batch["errors"])) < 4000  # a hostile line cannot bloat the batch object
    assert client.get(f"/v1/batches/{created['id']}", headers=user).status_code == 200


def test_an_unexpected_error_while_validating_fails_the_batch_naming_the_line(bound, client, user, monkeypatch):
    real = validation.parse_line

    def parse(raw: bytes):
        if b'"c3"' in raw:
            raise KeyError("a bug in the parser")
        return real(raw)

    monkeypatch.setattr(validation, "parse_line", parse)
    created = create_batch(client, user, jsonl([chat_line(f"c{i}") for i in range(1, 6)]))
    with bound.app_context():
        assert ingest.run(created["id"]) == "failed"
        assert ingest.run(created["id"]) == "skipped"  # ended: not tried again
    batch = state(bound, created["id"])
    assert batch["status"] == "failed" and batch["failed_at"] and batch["tasks"] == 0
    [error] = batch["errors"]["data"]
    assert error["code"] == "ingest_error" and error["line"] == 3 and "line 3" in error["message"]
    assert "a bug" not in error["message"]  # generic: no internals


def test_an_unexpected_error_after_some_lines_ran_keeps_their_results(app, client, user, worker, settings, ext,
                                                                       celery_worker, monkeypatch):
    """Lines 1-4 are tasks (two chunks), two of them answered, when line 5 breaks the insert pass:
    the batch ends ``failed`` through the usual ending, with files for what became a task."""
    settings.batch_chunk_size = 2
    real = validation.parse_line
    seen = {"c5": 0}
    answered = threading.Event()

    def parse(raw: bytes):
        if b'"c5"' in raw:
            seen["c5"] += 1
            if seen["c5"] == 2:  # the insert pass
                answered.wait(30)
                raise RuntimeError("a bug in the parser")
        return real(raw)

    monkeypatch.setattr(validation, "parse_line", parse)
    created = create_batch(client, user, jsonl([chat_line(f"c{i}") for i in range(1, 7)]), extra_headers=QUEUE)
    taken = wait_for(lambda: take(client, worker, 2))
    complete(client, worker, taken[0])
    complete(client, worker, taken[1], 400, {"error": {"message": "no", "type": "invalid_request_error"}})
    answered.set()
    batch = wait_for(lambda: (b := state(app, created["id"]))["status"] == "failed" and b, timeout=30)
    assert batch["failed_at"] and batch["errors"]["data"][0]["code"] == "ingest_error"
    assert batch["errors"]["data"][0]["line"] == 5
    assert batch["request_counts"] == {"total": 4, "completed": 1, "failed": 3}
    out = read_jsonl(client.get(f"/v1/files/{batch['output_file_id']}/content", headers=user).data)
    err = read_jsonl(client.get(f"/v1/files/{batch['error_file_id']}/content", headers=user).data)
    assert [o["custom_id"] for o in out] == ["c1"]
    assert sorted(e["custom_id"] for e in err) == ["c2", "c3", "c4"]
    assert sorted(e["error"]["code"] for e in err if e["error"]) == ["batch_failed", "batch_failed"]


def test_an_input_file_deleted_mid_ingest_fails_the_batch(bound, client, user, monkeypatch):
    created = create_batch(client, user, jsonl([chat_line(f"d{i}") for i in range(3)]))
    real = ingest.validate_input

    def validate_then_delete(*args, **kwargs):
        result = real(*args, **kwargs)
        assert client.delete(f"/v1/files/{created['input_file_id']}", headers=user).status_code == 200
        return result

    monkeypatch.setattr(ingest, "validate_input", validate_then_delete)
    with bound.app_context():
        assert ingest.run(created["id"]) == "failed"
    batch = state(bound, created["id"])
    assert batch["status"] == "failed" and batch["tasks"] == 0
    assert batch["errors"]["data"][0]["code"] == "file_not_found"


def test_cancel_while_validating_ends_the_batch_at_once(app, client, user, celery_worker, monkeypatch):
    started = threading.Event()
    real = validation.parse_line

    def slow(raw: bytes):
        started.set()
        time.sleep(0.01)  # a 3,000-line file now validates for 30 s
        return real(raw)

    monkeypatch.setattr(validation, "parse_line", slow)
    created = create_batch(client, user, jsonl([chat_line(f"v{i}") for i in range(3000)]))
    assert started.wait(20)
    asked = time.monotonic()
    resp = client.post(f"/v1/batches/{created['id']}/cancel", headers=user)
    assert resp.status_code == 200 and resp.json["status"] == "cancelling"
    batch = wait_for(lambda: (b := state(app, created["id"]))["status"] == "cancelled" and b, timeout=15)
    assert time.monotonic() - asked < 5
    assert batch["tasks"] == 0 and batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["cancelled_at"] and batch["output_file_id"] is None and batch["error_file_id"] is None


def test_cancel_of_a_validating_batch_whose_ingest_never_started(app, client, user, celery_worker, monkeypatch):
    monkeypatch.setattr(app.extensions["bellaq"], "on_batch_created", [])  # the ingest message was lost
    created = create_batch(client, user, jsonl([chat_line("a")]))
    assert client.post(f"/v1/batches/{created['id']}/cancel", headers=user).status_code == 200
    batch = wait_for(lambda: (b := state(app, created["id"]))["status"] == "cancelled" and b, timeout=15)
    assert batch["tasks"] == 0


def test_an_ingest_interrupted_by_redis_resumes_within_seconds(app, client, user, settings, ext, celery_worker,
                                                               monkeypatch):
    """Redis fails after the first chunk; the ingest retries with backoff and, once Redis answers
    again, finishes within a retry delay, without a duplicate."""
    settings.batch_chunk_size = 5
    engine = app.extensions["bellaq"].engine
    real = engine.enqueue_many
    down = threading.Event()
    down.set()
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1 and down.is_set():
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "enqueue_many", flaky)
    created = create_batch(client, user, jsonl([chat_line(f"r{i}") for i in range(20)]), extra_headers=QUEUE)
    wait_for(lambda: calls["n"] >= 4, timeout=20)  # three failed attempts: the ingest is retrying
    assert state(app, created["id"])["ingested"] is False
    down.clear()
    back = time.monotonic()
    wait_for(lambda: state(app, created["id"])["ingested"], timeout=10)
    assert time.monotonic() - back < 4
    batch = state(app, created["id"])
    assert batch["status"] == "in_progress" and batch["tasks"] == batch["request_counts"]["total"] == 20
    with app.app_context():
        assert engine.stats("ext", 1).waiting == 20


def test_transient_faults_are_retried_a_bounded_number_of_times_then_left_to_the_sweep(bound, client, user,
                                                                                        monkeypatch):
    created = create_batch(client, user, jsonl([chat_line(f"s{i}") for i in range(3)]))
    with bound.app_context():
        from bellaq.services import services

        engine = services().engine
        real = engine.enqueue_many

        def down(*args, **kwargs):
            raise redis.exceptions.ConnectionError("Connection refused.")

        monkeypatch.setattr(engine, "enqueue_many", down)
        slept: list[float] = []
        assert ingest.run(created["id"], sleep=slept.append) == "deferred"
        assert slept == list(ingest.RETRY_DELAYS_S)
        assert not services().redis.exists(ingest.lease_key(created["id"]))
        monkeypatch.setattr(engine, "enqueue_many", real)
    assert state(bound, created["id"])["status"] == "validating"  # not failed: the fault was transient
    with bound.app_context():
        db.session.execute(db.update(Batch).where(Batch.id == created["id"]).values(created_at=Batch.created_at - 60))
        db.session.commit()
        assert sweep.sweep().ingest == [created["id"]]
        assert sweep.sweep().ingest == []  # asked once, not on every sweep
        assert ingest.run(created["id"]) == "ingested"
    assert state(bound, created["id"])["status"] == "in_progress"


def test_a_batch_whose_end_count_a_dead_worker_missed_ends_with_its_last_task(app, client, user, worker, ext,
                                                                              celery_worker):
    """A worker dies after writing one task's end state in SQL but before counting it, holding
    the other task's lease. Once the reaper has put that task back, its end finalises the batch at
    once, not at the sweep's next pass (no beat runs here: without the recheck it never would)."""
    from bellaq.batches import progress
    from bellaq.clock import now_ms
    from bellaq.services import services
    from bellaq.tasks import reap

    created = create_batch(client, user, jsonl([chat_line("a"), chat_line("b")]), extra_headers=QUEUE)
    wait_for(lambda: state(app, created["id"])["status"] == "in_progress", timeout=20)
    first, second = take(client, worker, 2)
    assert complete(client, worker, first).status_code == 200
    with app.app_context():
        services().redis.hincrby(progress.key(created["id"]), "ended", -1)  # the count the dead worker missed
        assert reap(now_ms() + 601_000)["requeued"] == 1  # its other lease ran out
    [again] = take(client, worker, 1)
    assert again["task_id"] == second["task_id"]
    assert complete(client, worker, again).status_code == 200
    wait_for(lambda: state(app, created["id"])["status"] == "completed", timeout=20,
             message="the batch to finalise after its last task")
    assert state(app, created["id"])["request_counts"] == {"total": 2, "completed": 2, "failed": 0}


BROKER_DOWN = [OperationalError("[Errno 111] Connection refused"),
               redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379.")]


@pytest.mark.parametrize("error", BROKER_DOWN, ids=["kombu", "redis"])
def test_create_with_the_broker_down_answers_503_and_keeps_nothing(client, user, celery_worker, monkeypatch, error):
    from workers.batches import ingest_batch

    def broker_down(*args, **kwargs):
        raise error

    body = {"input_file_id": upload(client, user, jsonl([chat_line("a"), chat_line("b")]))["id"],
            "endpoint": CHAT, "completion_window": "24h"}
    headers = {**user, "Idempotency-Key": "create-1"}
    monkeypatch.setattr(ingest_batch, "apply_async", broker_down)
    resp = client.post("/v1/batches", json=body, headers=headers)
    assert resp.status_code == 503 and resp.headers["x-should-retry"] == "true"
    assert resp.json["error"]["type"] == "server_error" and resp.json["error"]["code"] == "service_unavailable"
    assert client.get("/v1/batches", headers=user).json["data"] == []
    monkeypatch.undo()
    first = client.post("/v1/batches", json=body, headers=headers)
    again = client.post("/v1/batches", json=body, headers=headers)
    assert first.status_code == again.status_code == 200 and first.json["id"] == again.json["id"]
    assert [b["id"] for b in client.get("/v1/batches", headers=user).json["data"]] == [first.json["id"]]
    done = wait_for(lambda: (b := client.get(f"/v1/batches/{first.json['id']}", headers=user).json)["status"]
                    == "completed" and b, timeout=30)
    assert done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}


def test_a_recorded_cancel_is_answered_with_the_broker_down_and_the_sweep_ends_it(app, client, user, ext,
                                                                                  celery_worker, monkeypatch):
    from workers.batches import end_batch, expire_batches

    created = create_batch(client, user, jsonl([chat_line(f"k{i}") for i in range(3)]), extra_headers=QUEUE)
    wait_for(lambda: state(app, created["id"])["status"] == "in_progress")

    def broker_down(*args, **kwargs):
        raise OperationalError("[Errno 111] Connection refused")

    monkeypatch.setattr(end_batch, "apply_async", broker_down)
    resp = client.post(f"/v1/batches/{created['id']}/cancel", headers=user)
    assert resp.status_code == 200 and resp.json["status"] == "cancelling"
    monkeypatch.undo()
    with app.app_context():  # the cancel is now late enough for the sweep to act on it
        db.session.execute(db.update(Batch).where(Batch.id == created["id"])
                           .values(cancelling_at=Batch.cancelling_at - 30))
        db.session.commit()
    expire_batches.delay()
    batch = wait_for(lambda: (b := state(app, created["id"]))["status"] == "cancelled" and b, timeout=30)
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 3}


def test_an_ingest_waiting_on_redis_holds_no_write_lock(bound, client, user, monkeypatch):
    """Every wait of an ingest on Redis comes after a commit: a writer of the same database (in a
    gevent worker, another greenlet of the same process, whose lock wait would stall them all)
    gets its write through at once. The batch turning ``in_progress`` once wrote the status a
    second time, through the ORM, and held SQLite's write lock across the next Redis calls."""
    created = create_batch(client, user, jsonl([chat_line(f"r{i}") for i in range(3)]))
    writes: list[str] = []
    announce = progress.changed

    def changed(batch_id: str, *args: object, **kwargs: object) -> None:
        with db.engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            no_wait, usual = (("PRAGMA busy_timeout=0", "PRAGMA busy_timeout=30000") if sqlite else
                              ("SET SESSION innodb_lock_wait_timeout=1", "SET SESSION innodb_lock_wait_timeout=50"))
            conn.exec_driver_sql(no_wait)
            try:
                conn.execute(update(Batch).where(Batch.id == batch_id).values(status=Batch.status))
                conn.commit()
                writes.append("written")
            except SQLError as err:
                conn.rollback()
                writes.append(str(err.orig))
            finally:
                conn.exec_driver_sql(usual)
        announce(batch_id, *args, **kwargs)

    monkeypatch.setattr(progress, "changed", changed)
    with bound.app_context():
        assert ingest.run(created["id"]) == "ingested"
    assert writes and set(writes) == {"written"}, writes
    assert state(bound, created["id"])["status"] == "in_progress"
