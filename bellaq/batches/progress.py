"""The progress record of a running batch in Redis; this module is its only writer.

``<prefix>:batch:<id>`` is a hash: ``total`` (requests, set when ingest ends), ``ended`` (tasks
that reached an end state) and ``v`` (bumped on every status change). ``ended`` reaching
``total`` says the last request ended (SQL then decides: :func:`bellaq.batches.output.claim_finalization`);
``(ended, v)`` is the version a watcher compares to know when to read SQL again. ``recheck``
is set once a task of the batch was put back after its lease ran out: its holder may have died
between writing end states and counting them, so ``ended`` may never reach ``total``; from then
on every end of one of the batch's tasks asks SQL.

All of it is a hint: losing it (Redis down or wiped) delays a batch, never breaks it. The sweep
finalises from SQL, and watchers read SQL every few seconds anyway.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from bellaq.services import services

if TYPE_CHECKING:
    from bellaq.models import Task

log = logging.getLogger(__name__)

TTL_S = 40 * 86400  # longer than any completion window
FINISHED_TTL_S = 3600  # a finished batch's record only serves late watchers


def key(batch_id: str) -> str:
    return services().key("batch", batch_id)


def set_total(batch_id: str, total: int) -> None:
    """Ingest ended: the batch has ``total`` requests."""
    pipe = services().redis.pipeline()
    pipe.hset(key(batch_id), "total", total)
    pipe.hincrby(key(batch_id), "v", 1)
    pipe.expire(key(batch_id), TTL_S)
    pipe.execute()


def add_ended(counts: Mapping[str, int]) -> list[str]:
    """Count tasks that just ended, per batch (one round trip); returns the batches whose every
    request has now ended."""
    if not counts:
        return []
    pipe = services().redis.pipeline(transaction=False)
    for batch_id, n in counts.items():
        pipe.hincrby(key(batch_id), "ended", n)
        pipe.hmget(key(batch_id), ["total", "recheck"])
        pipe.expire(key(batch_id), TTL_S)
    replies = pipe.execute()
    done = []
    for i, batch_id in enumerate(counts):
        ended, (total, recheck) = int(replies[3 * i]), replies[3 * i + 1]
        if total is not None and (ended >= int(total) or recheck is not None):
            done.append(batch_id)
    return done


def recheck(batch_ids: Iterable[str]) -> None:
    """Tasks of these batches were put back after their leases ran out: their count may miss
    tasks a dead worker ended in SQL, so every later end of one of their tasks asks SQL whether the
    batch is done (one indexed read). Best effort: the sweep finalises from SQL anyway."""
    batch_ids = list(batch_ids)
    if not batch_ids:
        return
    try:
        pipe = services().redis.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hset(key(batch_id), "recheck", 1)
            pipe.expire(key(batch_id), TTL_S)
        pipe.execute()
    except RedisError as err:
        log.info("batches %s: recheck not recorded (%s); the sweep finalises them", batch_ids, err)


def tasks_ended(tasks: Iterable[Task]) -> list[str]:
    """Task-end listener body: count the batch tasks among ``tasks``; returns the batches done."""
    return add_ended(Counter(task.batch_id for task in tasks if task.batch_id))


def changed(batch_id: str, ttl_s: int = TTL_S) -> None:
    """The batch's status changed: watchers look again. Best effort (they also recheck SQL)."""
    try:
        pipe = services().redis.pipeline()
        pipe.hincrby(key(batch_id), "v", 1)
        pipe.expire(key(batch_id), ttl_s)
        pipe.execute()
    except RedisError as err:
        log.info("batch %s: change not announced (%s); watchers see it at their next SQL check", batch_id, err)


def finished(batch_id: str) -> None:
    """The batch reached its final status: watchers look one last time; the record soon expires."""
    changed(batch_id, FINISHED_TTL_S)


def version(batch_id: str) -> tuple[str | None, str | None]:
    """What changes whenever the batch does: ``(ended, v)``. Raises RedisError."""
    ended, v = services().redis.hmget(key(batch_id), ["ended", "v"])
    return ended, v
