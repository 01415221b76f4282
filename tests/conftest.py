"""Shared fixtures: a per-test Redis prefix, a per-test SQL database (SQLite or MariaDB), the app,
keys of each role, and a real HTTP server around the app."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pymysql
import pytest
import redis
from flask import Flask
from werkzeug.serving import make_server

from bellaq import create_app
from bellaq.config import Settings
from bellaq.db import init_db

REDIS_URL = os.environ.get("BELLAQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MYSQL_HOST = os.environ.get("BELLAQ_TEST_MYSQL_HOST", "127.0.0.1")
ADMIN_KEY = "bq-test-admin-key"


def delete_prefix(url: str, prefix: str) -> None:
    """Delete the prefix's keys and the event-bus ACL user a test may have made for it."""
    from bellaq.eventbus_access import username

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
    client.execute_command("ACL", "DELUSER", username(prefix))
    client.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"bqt{uuid.uuid4().hex[:10]}"
    yield prefix
    delete_prefix(REDIS_URL, prefix)


@pytest.fixture
def mysql_url() -> Iterator[str]:
    name = f"bq_test_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host=MYSQL_HOST, user="root", password="", autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    yield f"mysql+pymysql://root@{MYSQL_HOST}:3306/{name}?charset=utf8mb4"
    with conn.cursor() as cur:
        # A connection a stopped worker thread left inside a transaction would hold a metadata
        # lock that makes DROP wait forever: end every session still using the database first.
        cur.execute("SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
                    (name,))
        for (session,) in cur.fetchall():
            try:
                cur.execute(f"KILL {int(session)}")
            except pymysql.err.OperationalError:
                pass  # it ended on its own meanwhile
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def make_settings(tmp_path: Path, prefix: str, database_url: str, **changes: object) -> Settings:
    base = Settings.from_env()
    return base.replace(
        instance_dir=tmp_path,
        database_url=database_url,
        redis_url=REDIS_URL,
        broker_url=REDIS_URL,
        redis_prefix=prefix,
        admin_key=ADMIN_KEY,
        files_dir=str(tmp_path / "files"),
        callback_allow_private=True,
        **changes,
    )


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bellaq.db'}"
    return request.getfixturevalue("mysql_url")


@pytest.fixture
def settings(tmp_path: Path, redis_prefix: str, database_url: str) -> Settings:
    return make_settings(tmp_path, redis_prefix, database_url)


@contextmanager
def running_app(settings: Settings) -> Iterator[Flask]:
    """An app on ``settings`` with its schema; its connections are closed afterwards."""
    from workers.hooks import install

    app = create_app(settings, plugins=(install,))
    app.config["TESTING"] = True
    init_db(app)
    yield app
    app.extensions["bellaq.eventbus"].stop()
    with app.app_context():
        from bellaq.extensions import db

        db.session.remove()
        db.engine.dispose()
        app.extensions["bellaq.autocommit_engine"].dispose()


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    with running_app(settings) as app:
        yield app


@pytest.fixture
def client(app: Flask):
    return app.test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def admin() -> dict[str, str]:
    return auth(ADMIN_KEY)


@pytest.fixture
def make_key(app: Flask):
    """make_key(role, owner=None) -> headers of a new key of that role."""
    from bellaq.keys import create_key

    def make(role: str, owner: str | None = None, name: str = "") -> dict[str, str]:
        with app.app_context():
            _row, raw = create_key(name or role, role, owner)
        return auth(raw)

    return make


@pytest.fixture
def user(make_key) -> dict[str, str]:
    return make_key("user")


@pytest.fixture
def worker(make_key) -> dict[str, str]:
    return make_key("worker")


class LiveServer:
    """The app behind a real threaded WSGI server on a free port."""

    def __init__(self, app: Flask) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(app: Flask) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def ext_url(live_server: LiveServer, admin: dict[str, str]) -> str:
    """The live server's URL, with a queue ``ext`` (for /v1/chat/completions) that only external
    workers serve: nothing runs unless the test takes it."""
    import requests

    resp = requests.post(f"{live_server.url}/v1/queue/register", headers=admin, timeout=10,
                         json={"queue": "ext", "endpoint": "/v1/chat/completions", "builtin": False})
    assert resp.status_code == 200, resp.text
    return live_server.url


@pytest.fixture
def mock_upstream():
    """The project's OpenAI-compatible mock, a real HTTP server in a thread."""
    from bellaq.mock_upstream import MockUpstream

    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def celery_worker(app: Flask, settings: Settings, mock_upstream):
    """A real Celery worker (in this process, thread pool) bound to the test app, calling the mock."""
    from celery.contrib.testing.worker import start_worker

    from workers.celery_app import bind, celery

    settings.upstream_base_url = mock_upstream.base_url
    bind(app)
    with start_worker(celery, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=30) as worker:
        yield worker


def task_of(client, headers, task_id: str) -> dict:
    """The task object, as its owner reads it over the API (a Flask test client)."""
    return client.get(f"/v1/queue/{task_id}", headers=headers).json


def ended(client, headers, task_id: str) -> dict | None:
    """The task object once it is in an end state, else None (for ``wait_for``)."""
    task = task_of(client, headers, task_id)
    return task if task["status"] not in ("waiting", "queued") else None


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def stack(tmp_path: Path, redis_prefix: str, mock_upstream):
    """gunicorn (gevent) and Celery workers in subprocesses, on SQLite, calling the mock upstream."""
    from tests.stack import Stack

    deployment = Stack(tmp_path, redis_prefix, f"sqlite:///{tmp_path / 'stack.db'}", mock_upstream.base_url)
    yield deployment
    deployment.stop()
