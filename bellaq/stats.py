"""Queue statistics for workers and the console, and clearing a queue."""

from __future__ import annotations

from typing import Any

from bellaq.extensions import db
from bellaq.models import Queue, Task
from bellaq.models.tasks import CANCELLED
from bellaq.services import services


def one(queue: str, level: int) -> dict[str, Any]:
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


def every() -> list[dict[str, Any]]:
    """Every level the engine has seen, plus level 0 of every registered queue."""
    known = set(services().engine.known_queues())
    known |= {(name, 0) for (name,) in db.session.execute(db.select(Queue.name))}
    return [one(queue, level) for queue, level in sorted(known)]


def clear(queue: str, level: int) -> int:
    """Cancel every waiting task of ``queue:level`` (running ones go on)."""
    from bellaq.tasks import finish

    ids = services().engine.clear(queue, level)
    for start in range(0, len(ids), 1000):
        tasks = db.session.execute(db.select(Task).where(Task.id.in_(ids[start:start + 1000]))).scalars().all()
        finish(tasks, CANCELLED)
    return len(ids)
