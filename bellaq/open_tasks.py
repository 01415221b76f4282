"""How many tasks each owner has open (waiting or running), bounded by
``BELLAQ_MAX_OPEN_TASKS_PER_OWNER``.

The counts live in one Redis hash, ``<prefix>:open_tasks`` (owner -> count), so the check costs
the puts written together (``bellaq.put_group``) one round trip: a put adds its task (refused
with 429 when that would pass the bound), batch ingest adds each chunk of lines, and the
task-end listener takes ended tasks off. SQL stays the truth: beat recounts the hash from SQL
(one ``GROUP BY``) every engine check, which repairs any drift (a process killed between its SQL
write and its count, a Redis that lost the hash).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
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


def admit_each(owners: Sequence[str]) -> list[TooMany | None]:
    """Count one new task per entry of ``owners``, all in one round trip: for each, None, or the
    429 to answer because it would pass its owner's bound (an owner's last entries are the ones
    refused, and are not counted)."""
    svc = services()
    limit = svc.settings.max_open_tasks_per_owner
    out: list[TooMany | None] = [None] * len(owners)
    if limit <= 0 or not owners:
        return out
    wanted = Counter(owners)
    pipe = svc.redis.pipeline(transaction=False)
    for owner, n in wanted.items():
        pipe.hincrby(_key(), owner, n)
    counts = dict(zip(wanted, pipe.execute(), strict=True))
    over = {owner: min(n, counts[owner] - limit) for owner, n in wanted.items() if counts[owner] > limit}
    if over:
        pipe = svc.redis.pipeline(transaction=False)
        for owner, n in over.items():
            pipe.hincrby(_key(), owner, -n)
        pipe.execute()
        for i in reversed(range(len(owners))):
            if over.get(owners[i], 0) > 0:
                over[owners[i]] -= 1
                out[i] = _refuse(owners[i], limit)
    return out


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
