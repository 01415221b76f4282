"""The live stream of a batch's changes: ``GET /v1/batches/{id}/events`` (``text/event-stream``).

Each ``data:`` is ``{"id", "status", "request_counts"}``: the current state at once, then one per
change (at most one every ``POLL_S``), a keep-alive comment while nothing changes, and last the
whole Batch object in its final status; then the stream closes.

It follows SQL and Redis, not this process's memory, so it works from any web process on any
host. The watchers of one batch in a process share one reader: every ``POLL_S`` at most one of
them reads the batch's progress version in Redis (:func:`.progress.version`, one small read), and
SQL is read only when that version moved (or every ``RECHECK_S``, for a change nobody announced).
A watcher holds no SQL connection while it waits: each read runs in its own app context.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from redis.exceptions import RedisError

from bellaq.batches import progress
from bellaq.batches.service import batch_object, load
from bellaq.models.batches import FINAL_STATUSES

POLL_S = 0.3  # at most this often an event, a Redis read, a SQL read (per batch and process)
KEEPALIVE_S = 15.0
RECHECK_S = 10.0  # SQL is read this often even when Redis says nothing changed
FALLBACK_S = 2.0  # ... and this often while Redis cannot be read


@dataclass
class _Shared:
    """What the watchers of one batch in this process share: the last state read, and when."""

    lock: threading.Lock = field(default_factory=lambda: threading.Lock())  # gevent's, once patched
    watchers: int = 0
    polled: float = -math.inf
    read: float = -math.inf
    version: Any = None
    state: dict[str, Any] | None = None


_shared: dict[str, _Shared] = {}
_shared_lock = threading.Lock()


def stream(app: Flask, batch_id: str) -> Iterator[str]:
    """The event stream of a batch (the caller checked that it may see it)."""
    with _shared_lock:
        shared = _shared.setdefault(batch_id, _Shared())
        shared.watchers += 1
    try:
        sent: dict[str, Any] | None = None
        wrote = time.monotonic()
        while True:
            batch = _current(app, batch_id, shared)
            if batch is None:
                return
            if batch["status"] in FINAL_STATUSES:
                yield _data(batch)
                return
            view = {"id": batch["id"], "status": batch["status"], "request_counts": batch["request_counts"]}
            now = time.monotonic()
            if view != sent:
                yield _data(view)
                sent, wrote = view, now
            elif now - wrote >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                wrote = now
            time.sleep(POLL_S)
    finally:
        with _shared_lock:
            shared.watchers -= 1
            if not shared.watchers:
                _shared.pop(batch_id, None)


def _current(app: Flask, batch_id: str, shared: _Shared) -> dict[str, Any] | None:
    """The batch's state, read again only when it may have changed (once for all watchers)."""
    with shared.lock:
        now = time.monotonic()
        if now - shared.polled < POLL_S:
            return shared.state
        shared.polled = now
        with app.app_context():
            try:
                version: Any = progress.version(batch_id)
                stale = version != shared.version or now - shared.read >= RECHECK_S
            except RedisError:
                version, stale = None, now - shared.read >= FALLBACK_S
            if stale:
                batch = load(batch_id)
                shared.state = batch_object(batch) if batch is not None else None
                shared.version, shared.read = version, now
        return shared.state


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
