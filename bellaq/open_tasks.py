"""How many tasks each owner has open (waiting or running), bounded by
``BELLAQ_MAX_OPEN_TASKS_PER_OWNER``.

The counts live in one Redis hash, ``<prefix>:open_tasks`` (owner -> count), so the check costs a
put one round trip: a put adds its task (refused with 429 when that would pass the bound), batch
ingest adds each chunk of lines, and the task-end listener takes ended tasks off. SQL stays the
truth: beat recounts the hash from SQL (one ``GROUP BY``) every engine check, which repairs any
drift (a process killed between its SQL write and its count, a Redis that lost the hash).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from sqlalchemy import func

from bellaq.errors import TooMany
from bellaq.extensions import db
from bellaq.services import services

if TYPE_CHECKING:
    from bellaq.models import Task

log = logging.getLogger(__name__)

RETRY_AFTER_S = 30


def _key() -> str:
    return services().key("open_tasks")


def _refuse(owner: str, limit: int) -> TooMany:
    return TooMany(f"This owner already has {limit} open tasks (waiting or running), the most this service "
                   f"allows (BELLAQ_MAX_OPEN_TASKS_PER_OWNER); retry after {RETRY_AFTER_S} s, once some have "
                   "ended.", code="too_many_open_tasks", headers={"Retry-After": str(RETRY_AFTER_S)})


def admit(owner: str, n: int = 1) -> None:
    """Count ``n`` new tasks of ``owner``, or raise 429 if they would pass the bound."""
    svc = services()
    limit = svc.settings.max_open_tasks_per_owner
    if limit <= 0:
        return
    count = svc.redis.hincrby(_key(), owner, n)
    if count > limit:
        svc.redis.hincrby(_key(), owner, -n)
        raise _refuse(owner, limit)


def check(owner: str) -> None:
    """Raise 429 if ``owner`` is at the bound (a batch create: its lines are counted as ingested)."""
    svc = services()
    limit = svc.settings.max_open_tasks_per_owner
    if limit > 0 and int(svc.redis.hget(_key(), owner) or 0) >= limit:
        raise _refuse(owner, limit)


def added(owner: str, n: int) -> None:
    """Count ``n`` tasks of ``owner`` written without :func:`admit` (batch lines)."""
    services().redis.hincrby(_key(), owner, n)


def tasks_ended(tasks: Iterable[Task]) -> None:
    """Task-end listener: take ended tasks off their owners' counts (the recount repairs a miss)."""
    ended = Counter(task.owner for task in tasks)
    try:
        pipe = services().redis.pipeline(transaction=False)
        for owner, n in ended.items():
            pipe.hincrby(_key(), owner, -n)
        pipe.execute()
    except RedisError as err:
        log.warning("open task counts not updated (%s); beat's recount will repair them", err)


def recount() -> dict[str, int]:
    """Set every owner's count from SQL; returns the counts."""
    from bellaq.models import Task
    from bellaq.models.tasks import OPEN_STATUSES

    rows = db.session.execute(
        db.select(Task.owner, func.count()).where(Task.status.in_(OPEN_STATUSES)).group_by(Task.owner)
    ).all()
    db.session.rollback()
    counts = {owner: n for owner, n in rows}
    pipe = services().redis.pipeline(transaction=True)
    pipe.delete(_key())
    if counts:
        pipe.hset(_key(), mapping=counts)
    pipe.execute()
    return counts


def count(owner: str) -> int:
    return int(services().redis.hget(_key(), owner) or 0)
