"""``GET /v1/batches/{id}/events`` over a real HTTP server: the current state at once, one event per
change, keep-alives while nothing changes, the whole Batch object last, then the stream closes.
Watchers share their reads: SQL only when the batch changed, and no SQL connection held while
they wait."""

from __future__ import annotations

import json
import threading
import time

import requests
from sqlalchemy import event

from bellaq.batches import events
from bellaq.extensions import db
from tests.batch_fixtures import (  # noqa: F401  (ext_queue is a fixture)
    BATCH_FIELDS,
    QUEUE,
    chat_line,
    complete,
    create_batch,
    ext_queue,
    jsonl,
    take,
    wait_for,
)
from tests.conftest import LiveServer, running_app

VIEW_FIELDS = {"id", "status", "request_counts"}


class Watcher(threading.Thread):
    """A client reading a batch's event stream; keeps every event with the time it arrived."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.events: list[tuple[float, dict]] = []
        self.comments: list[str] = []
        self.closed = threading.Event()
        self.content_type = ""

    def run(self) -> None:
        try:
            with requests.get(self.url, headers=self.headers, stream=True, timeout=(5, 30)) as resp:
                self.content_type = resp.headers.get("Content-Type", "")
                for line in resp.iter_lines(decode_unicode=True):
                    if line.startswith("data:"):
                        self.events.append((time.monotonic(), json.loads(line[5:])))
                    elif line.startswith(":"):
                        self.comments.append(line)
        finally:
            self.closed.set()

    @property
    def data(self) -> list[dict]:
        return [e for _, e in self.events]


def watch(live_server, user, batch_id: str) -> Watcher:
    watcher = Watcher(f"{live_server.url}/v1/batches/{batch_id}/events", user)
    watcher.start()
    wait_for(lambda: watcher.events, timeout=10, message="the first event")
    return watcher


def test_a_batch_from_validating_to_completed(app, live_server, client, user, worker, ext, celery_worker,
                                              monkeypatch):
    from workers.batches import ingest_batch

    monkeypatch.setattr(app.extensions["bellaq"], "on_batch_created", [])  # the test starts the ingest
    batch = create_batch(client, user, jsonl([chat_line(f"e{i}") for i in range(4)]), extra_headers=QUEUE)
    opened = time.monotonic()
    watcher = watch(live_server, user, batch["id"])
    assert watcher.content_type.startswith("text/event-stream")
    assert watcher.data[0] == {"id": batch["id"], "status": "validating",
                               "request_counts": {"total": 0, "completed": 0, "failed": 0}}
    ingest_batch.delay(batch["id"])
    wait_for(lambda: watcher.data[-1]["status"] == "in_progress", message="in_progress")
    taken = take(client, worker, 4)
    for task in taken[:2]:
        complete(client, worker, task)
    wait_for(lambda: watcher.data[-1]["request_counts"]["completed"] == 2, message="two completed")
    complete(client, worker, taken[2])
    complete(client, worker, taken[3], 400, {"error": {"message": "no", "type": "invalid_request_error"}})
    assert watcher.closed.wait(30), watcher.data
    elapsed = time.monotonic() - opened

    last = watcher.data[-1]
    assert set(last) == BATCH_FIELDS and last["status"] == "completed" and last["output_file_id"]
    assert last["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert all(set(e) == VIEW_FIELDS for e in watcher.data[:-1])
    statuses = [e["status"] for e in watcher.data]
    assert statuses[0] == "validating" and statuses.index("in_progress") < len(statuses) - 1
    assert statuses == sorted(statuses, key=["validating", "in_progress", "finalizing", "completed"].index)
    done = [e["request_counts"]["completed"] + e["request_counts"]["failed"] for e in watcher.data]
    assert done == sorted(done)
    assert len({json.dumps(e, sort_keys=True) for e in watcher.data}) == len(watcher.data)  # only changes
    assert len(watcher.data) <= elapsed / events.POLL_S + 2  # a few a second at most


def test_a_cancelled_batch_ends_its_stream_and_an_ended_one_sends_one_event(settings, live_server, client, user,
                                                                           ext, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line(f"c{i}") for i in range(3)]), extra_headers=QUEUE)
    with running_app(settings) as other_app, LiveServer(other_app) as other_web:  # another web process
        watcher = watch(other_web, user, batch["id"])
        wait_for(lambda: watcher.data[-1]["status"] == "in_progress", message="in_progress")
        assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=user).status_code == 200
        assert watcher.closed.wait(30)
    last = watcher.data[-1]
    assert set(last) == BATCH_FIELDS and last["status"] == "cancelled" and last["error_file_id"]
    assert {e["status"] for e in watcher.data[:-1]} <= {"validating", "in_progress", "cancelling"}

    late = Watcher(f"{live_server.url}/v1/batches/{batch['id']}/events", user)
    late.start()
    assert late.closed.wait(10)
    assert late.data == [client.get(f"/v1/batches/{batch['id']}", headers=user).json]


def test_events_of_another_owners_batch_are_404(client, user, make_key, worker, ext, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line("a")]), extra_headers=QUEUE)
    resp = client.get(f"/v1/batches/{batch['id']}/events", headers=make_key("user"))
    assert resp.status_code == 404 and resp.json["error"]["code"] == "batch_not_found"
    assert client.get("/v1/batches/batch_nope/events", headers=user).status_code == 404
    assert client.get(f"/v1/batches/{batch['id']}/events", headers=worker).status_code == 403
    assert client.get(f"/v1/batches/{batch['id']}/events").status_code == 401


def test_watchers_share_reads_hold_no_connection_and_keep_alive(app, live_server, client, user, worker, ext,
                                                                celery_worker, monkeypatch):
    monkeypatch.setattr(events, "KEEPALIVE_S", 0.5)
    batch = create_batch(client, user, jsonl([chat_line(f"w{i}") for i in range(3)]), extra_headers=QUEUE)
    wait_for(lambda: client.get(f"/v1/batches/{batch['id']}", headers=user).json["status"] == "in_progress")
    watchers = [watch(live_server, user, batch["id"]) for _ in range(20)]
    counts: list[str] = []

    def count_counts(conn, cursor, statement, *args):
        if "GROUP BY" in statement and "tasks" in statement:
            counts.append(statement)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", count_counts)
    try:
        time.sleep(1.5)  # nothing changes
        assert counts == []
        assert engine.pool.checkedout() == 0
        assert all(w.comments and w.comments[0] == ": keep-alive" for w in watchers)
        complete(client, worker, take(client, worker, 1)[0])
        for w in watchers:
            wait_for(lambda w=w: w.data[-1]["request_counts"]["completed"] == 1, timeout=10)
        assert 1 <= len(counts) <= 2  # one read for the twenty watchers (two if a poll split the change)
    finally:
        event.remove(engine, "before_cursor_execute", count_counts)
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=user).status_code == 200
    for w in watchers:
        assert w.closed.wait(30) and w.data[-1]["status"] == "cancelled"
