"""Results cannot be forged (SPEC 6): a completion written to the event bus ends its task exactly
as ``complete`` does, and only when it carries the lease token of the take; a lease belongs to
its owner's workers. Attacks come from a hostile worker with its own key and the event-bus user,
over real HTTP and real Redis, on SQLite and MariaDB."""

from __future__ import annotations

import json

import pytest
import redis
import requests

from bellaq import event_completions
from bellaq.extensions import db
from bellaq.models import Task
from tests.batch_fixtures import QUEUE, chat_line, create_batch, jsonl, until_status
from tests.conftest import wait_for
from tests.receivers import Receiver
from tests.test_eventbus_access import redis62  # noqa: F401  (a fixture)

CHAT = "/v1/chat/completions"


def chat(text: str) -> dict:
    return {"model": "mock-1", "messages": [{"role": "user", "content": text}]}


def completion(task_id: str, token: str | None, body: object, status_code: int = 200) -> dict:
    payload = {"taskId": task_id, "result": {"status_code": status_code, "request_id": "req-1", "body": body}}
    if token is not None:
        payload["leaseToken"] = token
    return {"name": "task-completion-event", "from": "", "payload": payload, "context": ""}


def progress(task_id: str, token: str | None, data: object) -> dict:
    payload = {"taskId": task_id, "eventId": "1", "eventName": "chunk", "eventData": data}
    if token is not None:
        payload["leaseToken"] = token
    return {"name": "task-progress-event", "from": "", "payload": payload, "context": ""}


class Worker:
    """An external worker: its key, and the event-bus connection GET /v1/queue/eventbus hands it."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        self.base, self.headers = base, headers
        bus = requests.get(f"{base}/v1/queue/eventbus", headers=headers, timeout=10).json()
        self.topic = bus["topic"]
        self.redis = redis.Redis.from_url(bus["url"])

    def take(self, queue: str = "ext:0", **fields) -> dict:
        def one():
            resp = requests.post(f"{self.base}/v1/queue/take", headers=self.headers, timeout=10,
                                 json={"queues": [queue], **fields})
            assert resp.status_code == 200, resp.text
            return resp.json()[queue]
        return wait_for(one)[0]

    def write(self, instance_id: str, event: dict, **fields: str) -> None:
        self.redis.xadd(self.topic + instance_id, {"event": json.dumps(event), **fields})

    def complete(self, task_id: str, body: object) -> requests.Response:
        return requests.post(f"{self.base}/v1/queue/{task_id}/complete", headers=self.headers, timeout=10,
                             json={"status_code": 200, "request_id": "r", "body": body})


@pytest.fixture
def base(ext_url):
    return ext_url


def put(base: str, user: dict, **fields) -> requests.Response:
    return requests.post(f"{base}/v1/queue/put", headers=user, timeout=30,
                         json={"endpoint": CHAT, "queue": "ext", "data": chat("x"), **fields})


def task_row(app, task_id: str) -> Task:
    with app.app_context():
        task = db.session.get(Task, task_id)
        db.session.expunge(task)
        return task


def sweep(app) -> int:
    """What beat runs every few seconds."""
    from workers.celery_app import beat_schedule
    from workers.maintenance import sweep_eventbus

    assert beat_schedule()["sweep-eventbus"]["task"] == sweep_eventbus.name
    with app.app_context():
        return sweep_eventbus.run()


def test_a_completion_event_ends_a_callback_task_nobody_waits_for(app, base, make_key, celery_worker):
    with Receiver() as receiver:
        user, worker = make_key("user"), Worker(base, make_key("worker"))
        task_id = put(base, user, callback_url=receiver.url).json()["data"]
        task = worker.take()
        assert task["task_id"] == task_id and task["instance_id"] == ""
        worker.write("", completion(task_id, task["lease_token"], {"via": "bus"}))
        assert sweep(app) == 1
        ended = task_row(app, task_id)
        assert ended.status == "succeeded" and json.loads(ended.result)["body"] == {"via": "bus"}
        assert receiver.delivered.wait(20)
        assert json.loads(receiver.calls[0][1])["result"]["body"] == {"via": "bus"}
        # Once: the same event again, and an HTTP complete, change nothing.
        worker.write("", completion(task_id, task["lease_token"], {"second": True}))
        assert sweep(app) == 0
        assert worker.complete(task_id, {"third": True}).json()["completed"] is False
        assert json.loads(task_row(app, task_id).result)["body"] == {"via": "bus"}
        assert len(receiver.calls) == 1


def test_a_completion_event_counts_a_batch_line(app, client, user, make_key, base, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line("a"), chat_line("b")]), extra_headers=QUEUE)
    until_status(client, user, batch["id"], "in_progress")
    worker = Worker(base, make_key("worker"))
    lines = [worker.take("ext:1"), worker.take("ext:1")]
    for line in lines:
        worker.write("", completion(line["task_id"], line["lease_token"], {"line": line["task_id"]}))
    assert wait_for(lambda: sweep(app)) >= 1
    wait_for(lambda: sweep(app) == 0 and all(task_row(app, t["task_id"]).status == "succeeded" for t in lines))
    done = until_status(client, user, batch["id"], "completed")
    assert done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}


def test_a_completion_event_answers_a_held_stream_through_the_listener(app, base, make_key):
    user, worker = make_key("user"), Worker(base, make_key("worker"))
    resp = requests.post(f"{base}/v1/queue/put", headers=user, stream=True, timeout=30, json={
        "endpoint": CHAT, "queue": "ext", "data": chat("x"), "response_mode": "streaming"})
    task = worker.take()
    worker.write(task["instance_id"], progress(task["task_id"], task["lease_token"], {"n": 1}))
    worker.write(task["instance_id"], completion(task["task_id"], task["lease_token"], {"done": True}))
    lines = [line for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert lines == ['data: {"n":1}', "data: [DONE]"]
    assert task_row(app, task["task_id"]).status == "succeeded"


def test_forged_events_neither_end_the_task_nor_reach_the_client(app, base, make_key):
    user, owner = make_key("user"), Worker(base, make_key("worker", owner="fleet-a"))
    attacker = Worker(base, make_key("worker", owner="mallory"))
    resp = requests.post(f"{base}/v1/queue/put", headers=user, stream=True, timeout=30, json={
        "endpoint": CHAT, "queue": "ext", "data": chat("victim"), "response_mode": "streaming"})
    victim = owner.take()
    assert put(base, user, callback_url="http://127.0.0.1:9/cb").status_code == 200
    own = attacker.take()  # a task of its own: a real token, for another task
    task_id, stream = victim["task_id"], victim["instance_id"]
    attempt, mac = victim["lease_token"].split(".")
    forged = [
        completion(task_id, None, "forged: no token"),
        completion(task_id, own["lease_token"], "forged: another task's token"),
        completion(task_id, f"{attempt}.{'0' * len(mac)}", "forged: made-up mac"),
        completion(task_id, f"{int(attempt) + 1}.{mac}", "forged: next attempt"),
        progress(task_id, None, "forged progress"),
        progress(task_id, own["lease_token"], "forged progress with another token"),
    ]
    for event in forged:
        attacker.write(stream, event)
    # Looking like bellaq's own (signed) completion does not help either.
    attacker.write(stream, {**completion(task_id, None, "forged: fake signature"), "status": "succeeded"},
                   sig="0" * 32)
    attacker.redis.xadd(attacker.topic + stream, {
        "name": "task-completion-event", "from": "", "context": "",
        "payload": json.dumps(completion(task_id, None, "forged: separate fields")["payload"])})
    # A genuine progress event after them: once the client has it, the forged ones were read.
    owner.write(stream, progress(task_id, victim["lease_token"], "genuine"))
    lines = resp.iter_lines(decode_unicode=True)
    first = next(line for line in lines if line.startswith("data: "))
    assert first == "data: genuine"
    assert sweep(app) == 0
    assert task_row(app, task_id).status == "queued"
    assert attacker.complete(task_id, "forged over HTTP").status_code == 409
    assert owner.complete(task_id, {"genuine": True}).status_code == 200
    rest = [line for line in lines if line.startswith("data: ")]
    assert rest == ["data: [DONE]"]
    assert json.loads(task_row(app, task_id).result)["body"] == {"genuine": True}


def test_the_token_of_an_expired_lease_ends_nothing(app, base, make_key):
    user, worker = make_key("user"), Worker(base, make_key("worker"))
    task_id = put(base, user, callback_url="http://127.0.0.1:9/cb").json()["data"]
    first = worker.take(process_timeout=1)

    def reaped() -> bool:
        with app.app_context():
            from bellaq.tasks import reap

            return reap()["requeued"] == 1
    wait_for(reaped, message="the first lease to run out")
    second = worker.take()
    assert second["attempts"] == first["attempts"] + 1
    worker.write("", completion(task_id, first["lease_token"], "stale"))
    assert sweep(app) == 0
    assert task_row(app, task_id).status == "queued"
    worker.write("", completion(task_id, second["lease_token"], "current"))
    assert sweep(app) == 1
    assert json.loads(task_row(app, task_id).result)["body"] == "current"


@pytest.mark.parametrize("server", ["redis7", "redis6.2"])
def test_a_stream_whose_web_process_died_is_swept(request, settings, admin, monkeypatch, server):
    """A web process read one completion and died before acknowledging it; a second arrived after."""
    from bellaq.eventbus import GROUP
    from bellaq.keys import create_key
    from tests.conftest import LiveServer, auth, running_app

    if server == "redis6.2":
        url = request.getfixturevalue("redis62")
        settings = settings.replace(redis_url=url, broker_url=url)
    monkeypatch.setattr(event_completions, "IDLE_MS", 300)
    with running_app(settings) as app, LiveServer(app) as live:
        base = live.url
        requests.post(f"{base}/v1/queue/register", headers=admin, timeout=10,
                      json={"queue": "ext", "endpoint": CHAT, "builtin": False})
        with app.app_context():
            user, worker_key = (auth(create_key(role, role)[1]) for role in ("user", "worker"))
        worker = Worker(base, worker_key)
        for _ in range(2):
            put(base, user, callback_url="http://127.0.0.1:9/cb")
        first, second = worker.take(), worker.take()
        main = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        assert main.info("server")["redis_version"].startswith(server[len("redis"):])
        stream = worker.topic + "web-that-died"
        app.extensions["bellaq.eventbus"].ensure_group(stream)  # as its listener did
        worker.write("web-that-died", completion(first["task_id"], first["lease_token"], "first"))
        assert main.xreadgroup(GROUP, "web-that-died", {stream: ">"}, count=10)  # read, never acknowledged
        worker.write("web-that-died", completion(second["task_id"], second["lease_token"], "second"))
        ended = []
        wait_for(lambda: ended.append(sweep(app)) or sum(ended) == 2, message="the sweep to end both tasks")
        bodies = [json.loads(task_row(app, t["task_id"]).result)["body"] for t in (first, second)]
        assert bodies == ["first", "second"]
        assert main.xpending(stream, GROUP)["pending"] == 0


def test_a_lease_belongs_to_the_workers_of_its_owner(app, base, make_key):
    user = make_key("user")
    fleet = [Worker(base, make_key("worker", owner="fleet-a")) for _ in range(2)]
    other = Worker(base, make_key("worker", owner="fleet-b"))
    task_id = put(base, user, callback_url="http://127.0.0.1:9/cb").json()["data"]
    fleet[0].take()
    refused = other.complete(task_id, "other owner")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "leased_by_another_owner"
    sent = requests.post(f"{base}/v1/queue/{task_id}/progress", headers=other.headers, timeout=10,
                         json={"event_id": "1", "event_data": "x"})
    assert sent.status_code == 409 and sent.json()["error"]["code"] == "leased_by_another_owner"
    assert task_row(app, task_id).status == "queued"
    sent = requests.post(f"{base}/v1/queue/{task_id}/progress", headers=fleet[1].headers, timeout=10,
                         json={"event_id": "1", "event_data": "x"})
    assert sent.status_code == 200
    assert fleet[1].complete(task_id, "same owner").json()["completed"] is True
    # Once it has ended, nobody holds it: no more progress for it.
    late = requests.post(f"{base}/v1/queue/{task_id}/progress", headers=fleet[0].headers, timeout=10,
                         json={"event_id": "2", "event_data": "x"})
    assert late.status_code == 409 and late.json()["error"]["code"] == "not_leased"


def test_a_task_a_builtin_worker_holds_cannot_be_completed_over_http(app, base, make_key):
    user, worker = make_key("user"), Worker(base, make_key("worker"))
    task_id = put(base, user, callback_url="http://127.0.0.1:9/cb").json()["data"]
    with app.app_context():
        from bellaq.tasks import take

        [taken] = take([("ext", 0)], 1)
    assert taken["task_id"] == task_id
    assert worker.complete(task_id, "hijack").status_code == 409
    assert task_row(app, task_id).status == "queued"
