"""Which consumers of a built-in queue level are announced: "work is ready" messages waiting in
Celery and consumers draining, each a member of one Redis sorted set,
``<prefix>:announced:<queue>:<level>``, scored by when it is presumed lost.

A consumer drains its queue until it is empty, so a put into a queue level that already has a
live member sends nothing: one ZCOUNT. A message is a member from its announcement (for
``WAIT_S``) and then, under the same token, its consumer until the end of the drain (kept
alive every ``REFRESH_S``, for ``LIVE_S``); so a message or a consumer lost with a killed worker
stops counting on its own within seconds, whatever the others do. A drain that found a full take
recruits one more consumer (up to ``CAP``), so a backlog spreads over the worker pool in a few
steps. A drain that ends with its queue empty leaves the set and then looks at the engine once
more, re-joining if a put slipped in between (the put enqueued before it counted, so one of the
two sees the other). Beat's engine check re-announces waiting work as well.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

from redis.client import Pipeline
from redis.exceptions import NoScriptError

from bellaq.services import Services

CAP = 64  # consumers announced per queue level at most
MAX_PER_CALL = 256
WAIT_S = 30.0  # a message not received within this is presumed lost
LIVE_S = 10.0  # a draining consumer not heard of within this is presumed dead ...
REFRESH_S = 3.0  # ... and it says it is alive this often
KEY_TTL_S = 3600


def key(svc: Services, queue: str, level: int) -> str:
    return svc.key("announced", queue, str(level))


def live(svc: Services, queue: str, level: int) -> int:
    """How many consumers are announced and presumed alive."""
    return svc.redis.zcount(key(svc, queue, level), time.time(), "+inf")


def wanted(svc: Services, count: int) -> int:
    """How many consumers ``count`` new tasks call for."""
    return min(max(1, math.ceil(count / svc.settings.worker_take_size)), MAX_PER_CALL, CAP)


def live_s(svc: Services) -> float:
    """How long a draining consumer counts without news: ``LIVE_S``, but at most half a worker
    lease, so a killed worker's consumers stop counting before the reaper puts its tasks back
    and announces them (else that announcement would find the dead still counted)."""
    return min(LIVE_S, svc.settings.worker_lease / 2)


def refresh_s(svc: Services) -> float:
    return min(REFRESH_S, live_s(svc) / 3)


def _add(svc: Services, queue: str, level: int, tokens: list[str], alive_for: float) -> None:
    k = key(svc, queue, level)
    now = time.time()
    pipe = svc.redis.pipeline(transaction=False)
    pipe.zremrangebyscore(k, "-inf", now)
    pipe.zadd(k, {t: now + alive_for for t in tokens})
    pipe.expire(k, KEY_TTL_S)
    pipe.execute()


# KEYS: the set. ARGV: now, seconds a message lives, key TTL, whether to count the live members
# (1) or not (0), then the tokens offered; adds as many of them as bring the live members up to
# the number offered (or all of them), and returns those.
_CLAIM = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = 0
if ARGV[4] == '1' then live = redis.call('ZCARD', KEYS[1]) end
local out = {}
for i = 5 + live, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
  out[#out + 1] = ARGV[i]
end
if #out > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return out
"""
_scripts: dict[int, Any] = {}


def channel(svc: Services, queue: str, level: int) -> str:
    """The Pub/Sub channel on which puts wake the consumers lingering on a queue level."""
    return svc.key("work", queue, str(level))


def claim(svc: Services, queue: str, level: int, count: int, *, lost: bool = False) -> list[str]:
    """Tokens of the messages to send for ``count`` new tasks (already counted): enough that at
    least ``wanted(count)`` consumers are announced; consumers lingering on the level are woken.
    One round trip. With ``lost`` (tasks put back after their holder's lease ran out) the
    ``wanted(count)`` are sent whatever is announced: the dead worker's received messages count
    until their ``WAIT_S`` ends, and would hold the put-back tasks that long."""
    for attempt in (1, 2):
        pipe = svc.redis.pipeline(transaction=False)
        add_claim(svc, pipe, queue, level, count, lost=lost)
        try:
            return claimed(pipe.execute())
        except NoScriptError:  # Redis restarted or flushed its scripts: load it and run again
            if attempt == 2:
                raise
            svc.redis.script_load(_CLAIM)
    raise AssertionError("unreachable")


def add_claim(svc: Services, pipe: Pipeline, queue: str, level: int, count: int, *, lost: bool = False) -> None:
    """Add :func:`claim`'s two commands to ``pipe`` (another's round trip); :func:`claimed` reads
    their answers."""
    script = _scripts.get(id(svc.redis))
    if script is None:
        script = _scripts[id(svc.redis)] = svc.redis.register_script(_CLAIM)
    tokens = [new_token() for _ in range(wanted(svc, count))]
    # EVALSHA itself: a Script run through a pipeline first asks SCRIPT EXISTS, a round trip of
    # its own on every call.
    pipe.evalsha(script.sha, 1, key(svc, queue, level), time.time(), WAIT_S, KEY_TTL_S, 0 if lost else 1, *tokens)
    pipe.publish(channel(svc, queue, level), count)


def claimed(answers: list[Any]) -> list[str]:
    """The tokens a claim added, from the answers of :func:`add_claim`'s commands (raises what the
    claim met, e.g. ``NoScriptError``)."""
    added, published = answers
    for answer in (added, published):
        if isinstance(answer, Exception):
            raise answer
    return [t.decode() if isinstance(t, bytes) else t for t in added]


def recruit(svc: Services, queue: str, level: int) -> str | None:
    """The token of one more consumer's message if fewer than ``CAP`` are announced."""
    if live(svc, queue, level) >= CAP:
        return None
    token = new_token()
    _add(svc, queue, level, [token], WAIT_S)
    return token


def new_token() -> str:
    return secrets.token_hex(8)


def alive(svc: Services, queue: str, level: int, token: str) -> None:
    """The consumer ``token`` drains (received, refreshed, or back after leaving)."""
    k = key(svc, queue, level)
    pipe = svc.redis.pipeline(transaction=False)
    pipe.zadd(k, {token: time.time() + live_s(svc)})
    pipe.expire(k, KEY_TTL_S)
    pipe.execute()


def coming_back(svc: Services, queue: str, level: int, token: str, countdown: float) -> None:
    """The consumer ``token`` sent itself a message due in ``countdown`` seconds."""
    svc.redis.zadd(key(svc, queue, level), {token: time.time() + countdown + WAIT_S})


def leave(svc: Services, queue: str, level: int, token: str) -> None:
    """The consumer ``token`` ended its drain."""
    svc.redis.zrem(key(svc, queue, level), token)
