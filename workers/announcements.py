"""How many consumers of a built-in queue level are announced: "work is ready" messages waiting
in Celery plus consumers draining, counted in one Redis key, ``<prefix>:announced:<queue>:<level>``.

A consumer drains its queue until it is empty, so a put into a queue level that already has a
waiting message or a draining consumer sends nothing: one GET. The count covers a consumer
from its announcement to the end of its drain. A drain that found a full take recruits one more
consumer (up to ``CAP``), so a backlog spreads over the worker pool in a few steps; a drain that
ends with its queue empty takes itself off the count and then looks at the engine once more,
re-announcing if a put slipped in between (the put enqueued before it read the count, so one of
the two sees the other). The key expires ``TTL_S`` after its last refresh (draining consumers
refresh it), so a message lost with a killed worker silences its queue for seconds at most;
beat's engine check re-announces waiting work as well.
"""

from __future__ import annotations

import math

from bellaq.services import Services

CAP = 64  # consumers announced per queue level at most
MAX_PER_CALL = 256
TTL_S = 10
REFRESH_S = 3.0


def key(svc: Services, queue: str, level: int) -> str:
    return svc.key("announced", queue, str(level))


def wanted(svc: Services, count: int) -> int:
    """How many consumers ``count`` new tasks call for."""
    return min(max(1, math.ceil(count / svc.settings.worker_take_size)), MAX_PER_CALL, CAP)


def claim(svc: Services, queue: str, level: int, count: int) -> int:
    """Count the messages to send for ``count`` new tasks, and return how many: enough that at
    least ``wanted(count)`` consumers are announced."""
    target = wanted(svc, count)
    k = key(svc, queue, level)
    current = int(svc.redis.get(k) or 0)
    if current >= target:
        return 0
    send = target - current
    pipe = svc.redis.pipeline(transaction=False)
    pipe.incrby(k, send)
    pipe.expire(k, TTL_S)
    pipe.execute()
    return send


def join(svc: Services, queue: str, level: int) -> int:
    """Count one more consumer; returns how many are counted now."""
    k = key(svc, queue, level)
    pipe = svc.redis.pipeline(transaction=False)
    pipe.incr(k)
    pipe.expire(k, TTL_S)
    return pipe.execute()[0]


def recruit(svc: Services, queue: str, level: int) -> bool:
    """Count one more consumer if fewer than ``CAP`` are; True if its message should be sent."""
    if join(svc, queue, level) <= CAP:
        return True
    svc.redis.decr(key(svc, queue, level))
    return False


def refresh(svc: Services, queue: str, level: int) -> None:
    """A draining consumer is alive: keep the count from expiring."""
    svc.redis.expire(key(svc, queue, level), TTL_S)


def leave(svc: Services, queue: str, level: int) -> None:
    """A consumer ended its drain: one fewer (the key goes when none is left)."""
    k = key(svc, queue, level)
    if svc.redis.decr(k) <= 0:
        svc.redis.delete(k)
