"""A per-process cache of API key lookups, checked against a version in Redis.

Every lookup reads ``<prefix>:keys:version`` (one GET) and uses a cached answer only if it was
stored under that same version; creating or deleting a key bumps the version, so every process
sees a deleted key at once while a valid key costs no SQL. The version starts at a random value
whenever Redis lacks it (a restart, a wipe), so a cache never matches a version from before.
While Redis cannot be read, every lookup goes to SQL. An entry is also dropped after
``MAX_AGE_S``, a bound for a bump lost to a Redis fault between a delete's commit and its
second bump.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import redis
from redis.exceptions import RedisError

MAX_AGE_S = 30.0
MAX_ENTRIES = 10_000

V = TypeVar("V")


class KeyCache(Generic[V]):
    """Answers of ``load(key_hash)`` per key hash, valid while the Redis version stays the same."""

    def __init__(self, client: redis.Redis, version_key: str) -> None:
        self.client = client
        self.version_key = version_key
        self._entries: dict[str, tuple[str, float, V]] = {}
        self._lock = threading.Lock()

    def version(self) -> str | None:
        """The current version, created (random) if Redis has none; None when Redis is unreachable."""
        try:
            value = self.client.get(self.version_key)
            if value is None:
                self.client.set(self.version_key, secrets.randbelow(2**62), nx=True)
                value = self.client.get(self.version_key)
        except RedisError:
            return None
        return value if isinstance(value, str) or value is None else value.decode()

    def get(self, key_hash: str, load: Callable[[str], V]) -> V:
        version = self.version()
        if version is None:
            return load(key_hash)
        now = time.monotonic()
        hit = self._entries.get(key_hash)
        if hit is not None and hit[0] == version and hit[1] > now:
            return hit[2]
        value = load(key_hash)
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key_hash] = (version, now + MAX_AGE_S, value)
        return value

    def bump(self) -> None:
        """Invalidate every process's cache; raises RedisError when Redis is unreachable."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.version_key, secrets.randbelow(2**62), nx=True)
        pipe.incr(self.version_key)
        pipe.execute()
