"""A per-process cache of registry lookups (API keys, queues), checked against a version in Redis.

A request reads ``<prefix>:registry:version`` once (one GET, kept on ``flask.g`` for the rest of
the request) and uses a cached answer only if it was stored under that same version. Creating or
deleting a key and registering a queue bump the version, so every process sees the change from
its next request on (a deleted key fails at once) while an unchanged key or queue costs no SQL.
The version starts at a random value whenever Redis lacks it (a restart, a wipe), so a cache never
matches a version from before. While Redis cannot be read, every lookup goes to SQL. An entry is
also dropped after ``MAX_AGE_S``: the bound for a bump lost to a Redis fault after a commit.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import redis
from flask import current_app, g, has_request_context
from redis.exceptions import RedisError

MAX_AGE_S = 30.0
MAX_ENTRIES = 20_000
EXTENSION = "bellaq.registry_cache"

log = logging.getLogger(__name__)

V = TypeVar("V")


class RegistryCache:
    """Answers of loaders per hashable key, valid while the Redis version stays the same."""

    def __init__(self, client: redis.Redis, version_key: str) -> None:
        self.client = client
        self.version_key = version_key
        self._entries: dict[Hashable, tuple[str, float, Any]] = {}
        self._lock = threading.Lock()

    def version(self) -> str | None:
        """The current version (read once per request), created if Redis has none; None when
        Redis is unreachable."""
        if has_request_context() and "registry_version" in g:
            return g.registry_version
        try:
            value = self.client.get(self.version_key)
            if value is None:
                self.client.set(self.version_key, secrets.randbelow(2**62), nx=True)
                value = self.client.get(self.version_key)
        except RedisError:
            value = None
        if isinstance(value, bytes):
            value = value.decode()
        if has_request_context() and value is not None:
            g.registry_version = value
        return value

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        version = self.version()
        if version is None:
            return load()
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] == version and hit[1] > now:
            return hit[2]
        value = load()
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = (version, now + MAX_AGE_S, value)
        return value

    def bump(self) -> None:
        """Invalidate every process's cache; raises RedisError when Redis is unreachable."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.version_key, secrets.randbelow(2**62), nx=True)
        pipe.incr(self.version_key)
        pipe.execute()
        if has_request_context():
            g.pop("registry_version", None)


def registry_cache() -> RegistryCache:
    """This app's cache (one per process and app)."""
    cache = current_app.extensions.get(EXTENSION)
    if cache is None:
        svc = current_app.extensions["bellaq"]
        cache = current_app.extensions[EXTENSION] = RegistryCache(svc.redis, svc.key("registry", "version"))
    return cache


def bump_quietly() -> None:
    """Bump after a commit; when Redis is unreachable, say so (cached lookups expire anyway)."""
    try:
        registry_cache().bump()
    except RedisError:
        log.warning("could not bump the registry cache version; cached lookups expire within %s s", MAX_AGE_S)
