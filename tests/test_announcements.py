""""Work is ready" messages: one per queue level while a consumer is announced, more for a backlog."""

from __future__ import annotations

import pytest

from tests.conftest import wait_for

CHAT = "/v1/chat/completions"


@pytest.fixture
def broker(app, settings):
    """The Redis list of Celery queue bellaq.l0, with Celery bound to this app."""
    from workers.celery_app import bind, broker_prefix, level_queue

    bind(app)
    svc = app.extensions["bellaq"]
    return lambda: svc.redis.llen(f"{broker_prefix(settings)}{level_queue(0)}")


def _register(client, admin, queue):
    resp = client.post("/v1/queue/register", json={"queue": queue, "endpoint": CHAT, "builtin": True},
                       headers=admin)
    assert resp.status_code == 200, resp.json


def _put(client, user, queue, n):
    for i in range(n):
        resp = client.post("/v1/queue/put", headers=user, json={
            "endpoint": CHAT, "queue": queue, "callback_url": "http://127.0.0.1:9/cb",
            "data": {"model": "mock-1", "messages": [{"role": "user", "content": f"t{i}"}]}})
        assert resp.status_code == 200, resp.json


def test_puts_into_an_announced_queue_send_one_message(app, client, admin, user, broker):
    _register(client, admin, "ann")
    _put(client, user, "ann", 40)
    assert broker() == 1


def test_a_backlog_announced_at_once_gets_a_consumer_per_take(app, broker):
    from workers.consumer import announce

    with app.app_context():
        announce("big", 0, 100)  # 100 tasks, takes of 32
        assert broker() == 4
        announce("big", 0, 100)  # already enough consumers announced
        assert broker() == 4


def test_an_announcement_after_redis_forgot_its_scripts_still_counts_and_sends(app, broker):
    """The claim runs by EVALSHA alone; after SCRIPT FLUSH it loads the script and runs once."""
    from workers import announcements
    from workers.consumer import announce

    with app.app_context():
        svc = app.extensions["bellaq"]
        announce("flushed", 0, 1)
        assert broker() == 1
        svc.redis.script_flush()
        announce("flushed", 0, 100)  # 100 tasks: three more consumers, as takes are of 32
        assert broker() == 4
        assert svc.redis.zcard(announcements.key(svc, "flushed", 0)) == 4


def test_a_put_after_redis_forgot_its_scripts_is_enqueued_and_announced(app, client, admin, user, broker):
    """A put's announcement rides on its enqueue's round trip: after SCRIPT FLUSH both scripts
    are missing there; the enqueue runs again and the claim on a round trip of its own, once each."""
    from workers import announcements

    _register(client, admin, "flushed_put")
    svc = app.extensions["bellaq"]
    svc.redis.script_flush()
    _put(client, user, "flushed_put", 1)
    assert broker() == 1
    assert announcements.live(svc, "flushed_put", 0) == 1
    assert client.get("/v1/queue/flushed_put:0/stats", headers=admin).json["waiting"] == 1


def test_a_lost_announcement_stops_counting_on_its_own(app, client, admin, user, broker):
    import time

    from workers import announcements

    _register(client, admin, "lost")
    _put(client, user, "lost", 1)
    svc = app.extensions["bellaq"]
    key = announcements.key(svc, "lost", 0)
    [(token, score)] = svc.redis.zrange(key, 0, -1, withscores=True)
    assert time.time() < score <= time.time() + announcements.WAIT_S
    svc.redis.delete(svc.key("celery", "bellaq.l0"))  # the message is lost with its worker
    _put(client, user, "lost", 1)
    assert broker() == 0  # still presumed on its way
    svc.redis.zadd(key, {token: time.time() - 1})  # ... until WAIT_S has passed
    _put(client, user, "lost", 1)
    assert broker() == 1


def test_tasks_reaped_from_a_killed_worker_are_announced_past_its_lost_messages(app, client, admin, user,
                                                                                broker):
    """A killed worker takes with it the messages it had received and not started, and their
    announcements count for WAIT_S. The reaper, putting its tasks back, sends a message at once
    rather than when those announcements run out."""
    from bellaq import tasks as task_service
    from bellaq.clock import now_ms
    from workers import announcements

    _register(client, admin, "killed")
    _put(client, user, "killed", 1)
    svc = app.extensions["bellaq"]
    assert broker() == 1 and announcements.live(svc, "killed", 0) == 1
    svc.redis.delete(svc.key("celery", "bellaq.l0"))  # the killed worker had received the message
    with app.app_context():
        assert len(svc.engine.take([("killed", 0)], 1, lease_ms=1000, holder="killed-worker")) == 1
        assert task_service.reap(now_ms() + 5000)["requeued"] == 1
    assert announcements.live(svc, "killed", 0) >= 1  # the lost message still counts ...
    assert broker() == 1  # ... and the put-back task has a message of its own


def test_a_dead_consumer_stops_counting_while_others_drain(app, broker):
    """Each consumer keeps only itself alive: one killed mid-drain is presumed dead within LIVE_S."""
    import time

    from workers import announcements
    from workers.consumer import announce

    svc = app.extensions["bellaq"]
    with app.app_context():
        announcements.alive(svc, "two", 0, "survivor")
        announcements.alive(svc, "two", 0, "victim")
        svc.redis.zadd(announcements.key(svc, "two", 0), {"victim": time.time() - 1})  # LIVE_S passed
        announcements.alive(svc, "two", 0, "survivor")  # the survivor's refresh keeps only itself
        assert announcements.live(svc, "two", 0) == 1
        announcements.leave(svc, "two", 0, "survivor")
        announce("two", 0, 1)
        assert broker() == 1


def test_a_backlog_is_drained_by_recruited_consumers(app, client, admin, user, broker, celery_worker):
    """40 puts send one message; its drain recruits helpers; every task ends and the count goes."""
    _register(client, admin, "drain")
    _put(client, user, "drain", 40)
    svc = app.extensions["bellaq"]

    def all_done():
        stats = client.get("/v1/queue/drain:0/stats", headers=admin).json
        return stats["done"] + stats["failed"] == 40

    wait_for(all_done, message="40 tasks to end")
    from workers import announcements

    wait_for(lambda: announcements.live(svc, "drain", 0) == 0, message="every consumer to leave")
    _put(client, user, "drain", 1)  # an idle queue is announced again at once
    wait_for(lambda: client.get("/v1/queue/drain:0/stats", headers=admin).json["done"] == 41,
             message="the next put to run")


def test_a_lingering_consumer_takes_the_next_put_without_a_message(app, client, admin, user, settings,
                                                                   celery_worker, monkeypatch):
    """A consumer that emptied its queue level waits a moment on the level's channel: a put then
    sends no Celery message, wakes it, and is run by it."""
    from workers import announcements, consumer

    settings.worker_linger = 3.0
    _register(client, admin, "linger")
    svc = app.extensions["bellaq"]

    def done() -> int:
        return client.get("/v1/queue/linger:0/stats", headers=admin).json["done"]

    _put(client, user, "linger", 1)
    wait_for(lambda: done() == 1, message="the first put to run")
    assert announcements.live(svc, "linger", 0) == 1  # the consumer lingers, still announced
    sent = []
    real = consumer.consume.apply_async
    monkeypatch.setattr(consumer.consume, "apply_async", lambda *a, **k: sent.append(a) or real(*a, **k))
    _put(client, user, "linger", 1)
    wait_for(lambda: done() == 2, message="the second put to run")
    assert sent == []
    wait_for(lambda: announcements.live(svc, "linger", 0) == 0, message="the consumer to leave")
