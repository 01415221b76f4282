"""Who holds a lease, and how a worker writing to the event bus proves it.

Every worker writes to the event bus as one Redis user, so the bus cannot tell workers apart.
A take over HTTP therefore hands each task a ``lease_token``: ``<attempt>.<mac>``, an HMAC of
the task id and the take's attempt number under the deployment's secret. A progress event must
carry a token of the task; a completion event must carry the token of its current lease. Events
bellaq writes itself are signed under the same secret, so a worker cannot forge them either.

The secret is generated once and kept in Redis under ``<prefix>:eventbus:secret`` (the event-bus
user cannot read it). If Redis loses it, a new one is made: outstanding tokens stop working,
their leases run out and the tasks run again, as after any loss of Redis.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

import redis

BUILTIN_HOLDER = "bellaq"
RELOAD_AFTER_S = 2.0


def holder_of(owner: str) -> str:
    """The lease holder of an owner's workers: they may complete each other's tasks."""
    return "owner:" + hashlib.sha256(owner.encode()).hexdigest()[:32]


class BusSecret:
    """The deployment's event-bus secret, read from Redis once and kept."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.key = f"{prefix}:eventbus:secret"
        self._secret: bytes | None = None
        self._loaded = 0.0
        self._lock = threading.Lock()

    def _load(self) -> bytes:
        self.redis.set(self.key, secrets.token_hex(32), nx=True)
        value = self.redis.get(self.key)
        return value.encode() if isinstance(value, str) else value

    def secret(self) -> bytes:
        if self._secret is None:
            with self._lock:
                if self._secret is None:
                    self._secret = self._load()
                    self._loaded = time.monotonic()
        return self._secret

    def _reload(self) -> bool:
        """After a failed check: read the secret again (at most every few seconds), in case Redis
        lost it and another process made a new one. True if it changed."""
        with self._lock:
            if time.monotonic() - self._loaded < RELOAD_AFTER_S:
                return False
            old, self._secret, self._loaded = self._secret, self._load(), time.monotonic()
            return old != self._secret

    def _mac(self, text: str) -> str:
        return hmac.new(self.secret(), text.encode(), hashlib.sha256).hexdigest()[:32]

    def _check(self, text: str, mac: str) -> bool:
        if hmac.compare_digest(self._mac(text), mac):
            return True
        return self._reload() and hmac.compare_digest(self._mac(text), mac)

    # ------------------------------------------------------------------ lease tokens
    def lease_token(self, task_id: str, attempt: int) -> str:
        return f"{attempt}.{self._mac(f'lease|{task_id}|{attempt}')}"

    def token_attempt(self, task_id: str, token: object) -> int | None:
        """The attempt a token was handed out for, or None if it is not a token of this task."""
        if not isinstance(token, str) or len(token) > 64:
            return None
        attempt, _, mac = token.partition(".")
        if not attempt.isdigit() or not mac:
            return None
        return int(attempt) if self._check(f"lease|{task_id}|{int(attempt)}", mac) else None

    # ------------------------------------------------------------------ bellaq's own events
    def sign(self, text: str) -> str:
        return self._mac(f"event|{text}")

    def signed(self, text: str, signature: object) -> bool:
        return isinstance(signature, str) and self._check(f"event|{text}", signature)
