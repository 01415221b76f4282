"""Callback delivery (SPEC 3 and 6): signed, pinned to checked addresses, never redirected,
reported coarsely, first attempts made in the worker process, nothing lost when a worker dies."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from collections.abc import Iterator

import pytest
import requests
from celery import signals

from bellaq.callback_status import CallbackStatus
from bellaq.clock import now_ms
from bellaq.extensions import db
from bellaq.keys import owner_secret
from bellaq.models import Task
from bellaq.services import services
from bellaq.webhooks import message_id, verify
from tests.conftest import ADMIN_KEY, auth, wait_for
from tests.receivers import Receiver
from workers import callbacks

CHAT = "/v1/chat/completions"
OWNER = "owner-callbacks"


def chat(text: str) -> dict:
    return {"model": "mock-1", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def forbidden() -> Iterator[Receiver]:
    """A server that must never be contacted."""
    with Receiver() as r:
        yield r


@pytest.fixture
def bound(app):
    """Celery pointed at this test's broker: retries are published there."""
    from workers.celery_app import bind

    bind(app)
    return app


@pytest.fixture
def published() -> Iterator[list[tuple[str, list]]]:
    """(task name, args) of every Celery message this process publishes."""
    seen: list[tuple[str, list]] = []

    def record(sender: str | None = None, body: object = None, **_: object) -> None:
        seen.append((str(sender), list(body[0]) if isinstance(body, tuple | list) else []))

    signals.before_task_publish.connect(record, weak=False)
    yield seen
    signals.before_task_publish.disconnect(record)


def ended_tasks(app, urls: list[str], status: str = "succeeded", callback_status: str | None = None) -> list[str]:
    """Tasks that ended with these callback URLs, written straight to SQL (as if put earlier)."""
    from bellaq.tasks import new_task_id

    ids = []
    with app.app_context():
        now = now_ms()
        for url in urls:
            task = Task(id=new_task_id(), owner=OWNER, batch_id="", endpoint=CHAT, queue="q", level=0,
                        data=json.dumps(chat("x")), status=status, response_mode="callback", callback_url=url,
                        result=json.dumps({"status_code": 200, "request_id": "r", "body": {"ok": True}}),
                        callback_status=callback_status, timeout=300, instance_id="", start_time=now,
                        expire_time=now + 300_000, completed_time=now, running_time=now, attempts=1)
            db.session.add(task)
            ids.append(task.id)
        db.session.commit()
    return ids


def callback_fields(app, task_id: str) -> dict:
    with app.app_context():
        task = db.session.get(Task, task_id)
        return {k: v for k, v in task.to_dict().items() if k.startswith("callback_") and k != "callback_url"}


def deliver_first_attempts(app, ids: list[str]) -> None:
    with app.app_context():
        callbacks.deliver_many.run(ids)


def put(client, headers, url: str, **fields) -> object:
    return client.post("/v1/queue/put", headers=headers, json={"endpoint": CHAT, "data": chat("x"),
                                                                "callback_url": url, **fields})


def unsafe_forms(port: int) -> tuple[list[str], list[str]]:
    """URLs that reach 127.0.0.1:port if read carelessly: (refused only while private addresses
    are, refused always because parsers read them two ways)."""
    inside = [f"http://127.0.0.1:{port}/hook", f"http://127.0.0.1.:{port}/hook", f"http://localhost:{port}/hook",
              f"http://LOCALHOST.:{port}/hook", f"http://[::1]:{port}/hook", f"http://[::ffff:127.0.0.1]:{port}/hook",
              f"http://[::ffff:7f00:1]:{port}/hook", f"http://[::127.0.0.1]:{port}/hook",
              f"http://[2002:7f00:1::]:{port}/hook", f"http://[64:ff9b::7f00:1]:{port}/hook",
              f"http://0.0.0.0:{port}/hook"]
    ambiguous = [f"http://2130706433:{port}/hook", f"http://0177.0.0.1:{port}/hook", f"http://0x7f.0.0.1:{port}/hook",
                 f"http://0x7f000001:{port}/hook", f"http://127.1:{port}/hook", f"http://127.0.1:{port}/hook",
                 f"http://user@127.0.0.1:{port}/hook", f"http://8.8.8.8@127.0.0.1:{port}/hook",
                 f"http://8.8.8.8:80@127.0.0.1:{port}/hook", f"http://evil.example\\@127.0.0.1:{port}/hook",
                 f"http://127.0.0.1:{port}\\@8.8.8.8/hook", f"http://127.0.0.1\\:{port}/hook",
                 f"http://%31%32%37.0.0.1:{port}/hook", f"http://127.0.0.1:{port}/ho\tok",
                 f"http://127.0.0.1:{port}/\r\nX: 1", f"http://127.0.0.1:{port}/hook\x00",
                 f"http://127.0.0.1..:{port}/hook", f"http://:{port}/hook", f"http:///127.0.0.1:{port}/hook",
                 f"gopher://127.0.0.1:{port}/", f"ftp://127.0.0.1:{port}/", "file:///etc/passwd",
                 f"http://127.0.0.1:{port}/hook#x", f"http://[::1%25lo]:{port}/hook"]
    return inside, ambiguous


# ---------------------------------------------------------------------------------- the guard

def test_unsafe_urls_are_refused_at_put_and_never_contacted_at_delivery(app, bound, client, user, settings,
                                                                        receiver):
    inside, ambiguous = unsafe_forms(receiver.port)
    settings.callback_allow_private = False
    for url in inside + ambiguous:
        resp = put(client, user, url)
        assert resp.status_code == 400, url
        assert resp.json["error"]["code"] == "unsafe_callback_url" and resp.json["error"]["param"] == "callback_url"
    settings.callback_allow_private = True
    for url in ambiguous:
        assert put(client, user, url).json["error"]["code"] == "unsafe_callback_url", url

    # Rows that got past the put anyway (written before a setting changed): delivery checks again.
    settings.callback_max_attempts = 1
    settings.callback_allow_private = False
    refused = ended_tasks(app, inside + ambiguous)
    deliver_first_attempts(app, refused)
    settings.callback_allow_private = True
    still_refused = ended_tasks(app, ambiguous)
    deliver_first_attempts(app, still_refused)
    assert receiver.calls == []
    for task_id in refused + still_refused:
        assert callback_fields(app, task_id) == {"callback_status": "failed", "callback_attempts": 1,
                                                 "callback_http_status": None}


def test_an_allowlisted_private_address_is_accepted(client, user, settings, receiver):
    settings.callback_allow_private = False
    assert put(client, user, receiver.url).status_code == 400
    settings.callback_allowlist = "10.0.0.0/8, 127.0.0.1"
    assert put(client, user, receiver.url).status_code == 200
    settings.callback_allowlist = f"127.0.0.1:{receiver.port + 1}"
    assert put(client, user, receiver.url).status_code == 400
    settings.callback_allowlist = f"localhost:{receiver.port}"
    assert put(client, user, f"http://localhost:{receiver.port}/hook").status_code == 200


def test_a_name_that_rebinds_after_the_put_is_never_contacted(monkeypatch, client, user, settings, forbidden,
                                                              celery_worker):
    """The name resolves to an allowed address when the put is checked, then to a private one."""
    from tests.test_pinned_http import Rebinding

    with Receiver(host="127.0.0.2", port=forbidden.port) as allowed:
        settings.callback_allow_private = False
        settings.callback_allowlist = "127.0.0.2"
        settings.callback_max_attempts = 1
        monkeypatch.setattr(socket, "getaddrinfo", Rebinding("rebind.test", first="127.0.0.2", later="127.0.0.1"))
        resp = put(client, user, f"http://rebind.test:{forbidden.port}/hook")
        assert resp.status_code == 200
        task_id = resp.json["data"]
        task = wait_for(lambda: (t := client.get(f"/v1/queue/{task_id}", headers=user).json)["callback_status"]
                        and t, message="the delivery to be recorded")
        assert task["status"] == "succeeded"
        assert (task["callback_status"], task["callback_attempts"], task["callback_http_status"]) == ("failed", 1, None)
        assert forbidden.calls == [] and allowed.calls == []


def test_a_redirect_is_a_failed_attempt_and_is_retried_not_followed(client, user, settings, forbidden,
                                                                     celery_worker):
    settings.callback_backoff_base = 0.05
    with Receiver(statuses=[302, 307], location=forbidden.url) as redirecting:
        task_id = put(client, user, redirecting.url).json["data"]
        assert redirecting.delivered.wait(30), "the callback was not retried to success"
        task = wait_for(lambda: (t := client.get(f"/v1/queue/{task_id}", headers=user).json)["callback_status"]
                        == "delivered" and t)
        assert len(redirecting.calls) == 3
        assert (task["callback_attempts"], task["callback_http_status"]) == (3, 200)
    assert forbidden.calls == []


def test_a_redirect_is_recorded_with_its_status_and_a_retry_is_scheduled(app, bound, settings, forbidden,
                                                                          published):
    settings.callback_max_attempts = 3
    with Receiver(statuses=[307], location=forbidden.url) as redirecting:
        [task_id] = ended_tasks(app, [redirecting.url])
        deliver_first_attempts(app, [task_id])
    assert callback_fields(app, task_id) == {"callback_status": "retrying", "callback_attempts": 1,
                                             "callback_http_status": 307}
    assert ("bellaq.deliver_callback", [task_id, 2]) in published
    assert forbidden.calls == []


# ------------------------------------------------------------------------ what the user sees

def test_the_task_tells_how_delivery_went_only_coarsely(app, client, user, settings, celery_worker):
    settings.callback_backoff_base = 0.05
    settings.callback_max_attempts = 2
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every attempt is refused by the kernel
    task_id = put(client, user, f"http://127.0.0.1:{port}/hook").json["data"]
    task = wait_for(lambda: (t := client.get(f"/v1/queue/{task_id}", headers=user).json)["callback_status"]
                    == "failed" and t, message="the delivery to fail")
    assert (task["callback_attempts"], task["callback_http_status"]) == (2, None)
    shown = json.dumps({k: v for k, v in task.items() if k.startswith("callback_") and k != "callback_url"})
    for leak in ("refused", "rror", "onnect", "127.0.0.1", str(port), "Errno"):
        assert leak not in shown
    with app.app_context():
        assert db.session.get(Task, task_id).callback_status == "failed:2:"


@pytest.mark.parametrize(("raw", "shown"), [
    (None, (None, 0, None)),
    ("delivered:3:200", ("delivered", 3, 200)),
    ("retrying:1:503", ("retrying", 1, 503)),
    ("failed:8:", ("failed", 8, None)),
    # written by earlier versions: only the state survives, never the text
    ("delivered (HTTP 200) after 1 attempt(s)", ("delivered", 0, None)),
    ("retrying: attempt 1 got ConnectionError", ("retrying", 0, None)),
    ("failed after 8 attempt(s): ConnectTimeout", ("failed", 0, None)),
    ("refused: callback_url host '10.0.0.1' is a private address", ("failed", 0, None)),
    ("garbage:1:2", (None, 0, None)),
])
def test_stored_statuses_are_shown_coarsely(raw, shown):
    status = CallbackStatus.parse(raw)
    assert (status.state, status.attempts, status.http_status) == shown
    assert set(status.fields()) == {"callback_status", "callback_attempts", "callback_http_status"}


# ---------------------------------------------------------------------------- delivery

def test_the_first_attempt_is_made_in_the_worker_process_signed_with_the_owners_secret(
        client, admin, settings, celery_worker, receiver, published):
    import openai

    key = client.post("/v1/keys", json={"role": "user", "name": "cb"}, headers=admin).json
    task_id = put(client, auth(key["key"]), receiver.url).json["data"]
    assert receiver.delivered.wait(20), "no callback arrived"
    headers, body = receiver.calls[0]
    payload = json.loads(body)
    assert payload["task_id"] == task_id and payload["status"] == "succeeded"
    assert payload["result"]["body"]["choices"][0]["message"]["content"] == "echo: x"
    assert "callback_status" not in payload  # the message is the task, not the state of its delivery
    assert headers["webhook-id"] == message_id(task_id)
    sdk = openai.OpenAI(api_key="unused", webhook_secret=key["webhook_secret"])
    sdk.webhooks.verify_signature(body, headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.verify_signature(body + b" ", headers)
    task = wait_for(lambda: (t := client.get(f"/v1/queue/{task_id}", headers=auth(key["key"])).json)
                    ["callback_status"] and t)
    assert (task["callback_status"], task["callback_attempts"], task["callback_http_status"]) == ("delivered", 1, 200)
    names = [name for name, _ in published]
    assert "bellaq.consume" in names
    assert "bellaq.deliver_callbacks" not in names and "bellaq.deliver_callback" not in names


def test_a_task_ended_in_the_web_is_delivered_through_one_message(client, admin, user, worker, celery_worker,
                                                                  receiver, published):
    client.post("/v1/queue/register", headers=admin, json={"queue": "ext", "endpoint": CHAT, "builtin": False})
    task_id = put(client, user, receiver.url, queue="ext").json["data"]
    [taken] = client.post("/v1/queue/take", headers=worker, json={"queues": ["ext:0"]}).json["ext:0"]
    assert client.post(f"/v1/queue/{task_id}/complete", headers=worker,
                       json={"status_code": 200, "body": {"external": True}}).status_code == 200
    assert receiver.delivered.wait(20)
    assert [args for name, args in published if name == "bellaq.deliver_callbacks"] == [[[taken["task_id"]]]]
    assert json.loads(receiver.calls[0][1])["result"]["body"] == {"external": True}


def test_one_delivery_one_webhook_id_the_same_body_across_retries(app, client, user, settings, celery_worker):
    settings.callback_backoff_base = 0.05
    with Receiver(statuses=[500, 503]) as receiver:
        task_id = put(client, user, receiver.url).json["data"]
        assert receiver.delivered.wait(30), "the callback was not retried to success"
        task = wait_for(lambda: (t := client.get(f"/v1/queue/{task_id}", headers=user).json)["callback_status"]
                        == "delivered" and t)
        assert (task["callback_attempts"], task["callback_http_status"]) == (3, 200)
        assert {h["webhook-id"] for h, _ in receiver.calls} == {message_id(task_id)}
        assert len({body for _, body in receiver.calls}) == 1
        with app.app_context():
            secret = owner_secret(db.session.get(Task, task_id).owner)
            for headers, body in receiver.calls:
                verify(secret, headers, body)
            svc = services()
            # nothing left to sweep (the entry goes right after the SQL write the poll above saw)
            wait_for(lambda: svc.redis.zscore(svc.key("callbacks", "pending"), task_id) is None)
            assert callbacks.sweep.run() == 0
            # a duplicate of an attempt already made sends nothing
            callbacks.deliver.run(task_id, 3)
            callbacks.deliver_many.run([task_id])
        assert len(receiver.calls) == 3


def test_100_concurrent_deliveries_need_no_more_connections_than_the_pool_keeps(app, bound, settings, caplog):
    """All 100 attempts are in flight at once (the receiver holds each until 100 arrived), twice:
    the second round reuses the first round's connections and none is discarded."""
    assert settings.callback_concurrency >= 100
    barrier = threading.Barrier(100, timeout=20)
    with Receiver(before_answer=barrier.wait) as receiver:
        caplog.set_level(logging.WARNING, logger="urllib3")
        for _ in range(2):
            ids = ended_tasks(app, [receiver.url] * 100)
            deliver_first_attempts(app, ids)
            assert {callback_fields(app, tid)["callback_status"] for tid in ids} == {"delivered"}
            barrier.reset()
        assert len(receiver.calls) == 200
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


# --------------------------------------------------------------------------- nothing lost

def test_the_sweep_delivers_what_a_dead_worker_left(app, settings, celery_worker, receiver):
    """A task ended and was tracked, then its worker died before the attempt: once the grace
    period is over, the sweep hands it to Celery."""
    [task_id] = ended_tasks(app, [receiver.url])
    with app.app_context():
        svc = services()
        svc.redis.zadd(svc.key("callbacks", "pending"), {task_id: 0})
        svc.redis.set(svc.key("callbacks", "tracked"), "1")
        assert callbacks.sweep.run() == 1
    assert receiver.delivered.wait(20)
    wait_for(lambda: callback_fields(app, task_id)["callback_status"] == "delivered")
    with app.app_context():
        assert svc.redis.zscore(svc.key("callbacks", "pending"), task_id) is None


def test_after_redis_lost_the_tracking_set_sql_says_what_is_still_owed(app, settings, celery_worker, receiver):
    settings.callback_backoff_base = 0.05
    never = ended_tasks(app, [receiver.url])
    retrying = ended_tasks(app, [receiver.url], callback_status="retrying:1:500")
    done = ended_tasks(app, [receiver.url], callback_status="delivered:1:200")
    open_task = ended_tasks(app, [receiver.url], status="waiting")
    with app.app_context():
        assert callbacks.sweep.run() == 2  # the tracking marker is missing: SQL is scanned once
    wait_for(lambda: len(receiver.calls) == 2, message="both owed callbacks")
    wait_for(lambda: callback_fields(app, retrying[0]) == {
        "callback_status": "delivered", "callback_attempts": 2, "callback_http_status": 200})
    wait_for(lambda: callback_fields(app, never[0])["callback_status"] == "delivered",
             message="the never-tried callback recorded as delivered")
    assert callback_fields(app, done[0])["callback_attempts"] == 1
    assert callback_fields(app, open_task[0])["callback_status"] is None
    with app.app_context():
        assert callbacks.sweep.run() == 0


KILL_BEFORE_FIRST_ATTEMPT = """
import os, sys
from workers import callbacks
callbacks.Deliverer.try_submit = lambda *args, **kwargs: os._exit(9)  # dies right after the task ended
from celery.__main__ import main
sys.argv[0] = "celery"
main()
"""


@pytest.mark.slow
def test_a_worker_killed_before_its_first_attempt_loses_no_callback(tmp_path, redis_prefix, mock_upstream,
                                                                    receiver):
    from tests.stack import Stack

    stack = Stack(tmp_path, redis_prefix, f"sqlite:///{tmp_path / 'stack.db'}", mock_upstream.base_url,
                  BELLAQ_CALLBACK_SWEEP_AFTER="1")
    try:
        stack.start_web(workers=1)
        user = {"Authorization": "Bearer " + requests.post(
            f"{stack.url}/v1/keys", headers=auth(ADMIN_KEY), json={"role": "user"}, timeout=10).json()["key"]}
        dying = stack._spawn("worker", [sys.executable, "-c", KILL_BEFORE_FIRST_ATTEMPT, "-A", "workers.celery_app",
                                        "worker", "-P", "threads", "-c", "2", "--loglevel", "WARNING",
                                        "--without-gossip", "--without-mingle", "-n", f"dying-{redis_prefix}@%h"])
        task_id = requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=10, json={
            "endpoint": CHAT, "data": chat("x"), "callback_url": receiver.url}).json()["data"]
        assert dying.wait(timeout=60) == 9
        task = requests.get(f"{stack.url}/v1/queue/{task_id}", headers=user, timeout=10).json()
        assert task["status"] == "succeeded" and task["callback_status"] is None and receiver.calls == []

        stack.start_worker(concurrency=4)
        stack.start_beat()
        assert receiver.delivered.wait(60), f"the callback was lost\n{stack.logs()}"
        task = wait_for(lambda: (t := requests.get(f"{stack.url}/v1/queue/{task_id}", headers=user,
                                                   timeout=10).json())["callback_status"] and t)
        assert (task["callback_status"], task["callback_attempts"]) == ("delivered", 1)
        assert len(receiver.calls) == 1
    finally:
        stack.stop()


@pytest.mark.slow
def test_a_gevent_worker_makes_100_deliveries_at_once_without_discarding_connections(tmp_path, redis_prefix,
                                                                                      mock_upstream):
    """``-P gevent -c 100``: 100 first attempts in flight together (the receiver holds each until
    all 100 arrived), and urllib3 never logs "Connection pool is full"."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.stack import Stack

    barrier = threading.Barrier(100, timeout=30)
    with Receiver(before_answer=barrier.wait) as receiver:
        stack = Stack(tmp_path, redis_prefix, f"sqlite:///{tmp_path / 'stack.db'}", mock_upstream.base_url)
        try:
            stack.start_web(workers=1)
            stack.start_worker(concurrency=100, pool="gevent")
            user = {"Authorization": "Bearer " + requests.post(
                f"{stack.url}/v1/keys", headers=auth(ADMIN_KEY), json={"role": "user"}, timeout=10).json()["key"]}

            def put_one(_: int) -> None:
                requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=30, json={
                    "endpoint": CHAT, "data": chat("x"), "callback_url": receiver.url}).raise_for_status()

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(put_one, range(100)))
            wait_for(lambda: len(receiver.calls) == 100 and not barrier.n_waiting, timeout=60,
                     message="100 deliveries")
            assert not barrier.broken
            logs = "".join(path.read_text(errors="replace") for path in tmp_path.glob("worker-*.log"))
            assert "pool is full" not in logs
        finally:
            stack.stop()
