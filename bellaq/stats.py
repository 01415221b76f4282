"""Queue statistics for workers and the console: counts read from the engine."""

from __future__ import annotations

from typing import Any

from bellaq.extensions import db
from bellaq.models import Queue
from bellaq.services import services


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
    }


def all_level_counts() -> list[dict[str, Any]]:
    """Every level the engine has seen, plus level 0 of every registered queue."""
    known = set(services().engine.known_queues())
    known |= {(name, 0) for (name,) in db.session.execute(db.select(Queue.name))}
    return [level_counts(queue, level) for queue, level in sorted(known)]
