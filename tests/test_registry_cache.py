"""Queue lookups are cached per process, and a registration is seen by every process at once."""

from __future__ import annotations

from tests.conftest import running_app

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"


def _put(client, headers, queue, endpoint=CHAT):
    return client.post("/v1/queue/put", headers=headers, json={
        "endpoint": endpoint, "queue": queue, "callback_url": "http://127.0.0.1:9/cb",
        "data": {"model": "m", "messages": [{"role": "user", "content": "x"}], "input": "x"}})


def test_a_queue_registered_again_through_one_app_is_seen_by_another_at_once(app, settings, admin, user):
    client = app.test_client()
    assert client.post("/v1/queue/register", headers=admin,
                       json={"queue": "moving", "endpoint": CHAT, "builtin": False}).status_code == 200
    with running_app(settings) as other:
        other_client = other.test_client()
        assert _put(other_client, user, "moving").status_code == 200
        assert _put(other_client, user, "moving").status_code == 200  # from the cache
        assert client.post("/v1/queue/register", headers=admin,
                           json={"queue": "moving", "endpoint": EMBED}).status_code == 200
        resp = _put(other_client, user, "moving")
        assert resp.status_code == 400
        assert "serves /v1/embeddings" in resp.json["error"]["message"]


def test_a_queue_registered_after_a_miss_is_found(app, settings, admin, user):
    with running_app(settings) as other:
        other_client = other.test_client()
        assert _put(other_client, user, "later").status_code == 400  # not registered: remembered
        assert app.test_client().post("/v1/queue/register", headers=admin,
                                      json={"queue": "later", "endpoint": CHAT, "builtin": False}).status_code == 200
        assert _put(other_client, user, "later").status_code == 200


def test_a_cached_queue_costs_no_sql(app):
    from sqlalchemy import event

    from bellaq.extensions import db
    from bellaq.queues import register, resolve_queue

    with app.test_request_context():
        register({"queue": "cached", "endpoint": CHAT, "builtin": False})
    seen: list[str] = []
    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", lambda _c, _cur, stmt, *_a: seen.append(stmt))
    with app.test_request_context():
        assert resolve_queue(CHAT, "m", "cached").name == "cached"
    assert seen
    seen.clear()
    with app.test_request_context():
        assert resolve_queue(CHAT, "m", "cached").builtin is False
    assert seen == []
