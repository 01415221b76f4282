"""Queue statistics for workers and the console: counts read from the engine."""

from __future__ import annotations

from typing import Any

from bellaq.extensions import db
from bellaq.models import Queue
from bellaq.services import services


def limit_use(queue: str) -> dict[str, Any]:
    """The queue's limits and how much of each is in use (every level together)."""
    u = services().engine.limit_stats(queue)
    limited = u.rpm is not None or u.tpm is not None or u.max_in_flight is not None
    return {
        "rpm": u.rpm,
        "tpm": u.tpm,
        "max_in_flight": u.max_in_flight,
        "in_flight": u.in_flight,
        "window_start": u.window_start if limited and u.window_start else None,
        "window_requests": u.window_requests if limited else 0,
        "window_tokens": u.window_tokens if limited else 0,
        "paused_until": u.paused_until or None,
        "rate_factor": u.factor,
    }


def level_counts(queue: str, level: int) -> dict[str, Any]:
    s = services().engine.stats(queue, level)
    return {
        "queue": f"{queue}:{level}",
        "waiting": s.waiting,
        "running": s.running,
        "done": s.done,
        "failed": s.failed,
        "cancelled": s.cancelled,
        "oldest_age_ms": s.oldest_age_ms,
        "delayed": s.delayed,
        "limits": limit_use(queue),
    }


def all_level_counts() -> list[dict[str, Any]]:
    """Every level the engine has seen, plus level 0 of every registered queue."""
    known = set(services().engine.known_queues())
    known |= {(name, 0) for (name,) in db.session.execute(db.select(Queue.name))}
    return [level_counts(queue, level) for queue, level in sorted(known)]
