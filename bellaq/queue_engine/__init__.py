"""The queue engine: waiting sets, leases, delays, limits and counters in Redis, every mutation
one Lua script. It knows no SQL and no HTTP.

Modules: ``engine`` (:class:`QueueEngine`, one method per operation), ``records`` (what the
operations answer), ``arguments`` (argument checks), ``scripts`` (loading ``bellaq/lua/``).

Operations of :class:`QueueEngine` (times are ms on the Redis server's clock; durations, not
instants, are passed in, so hosts with skewed clocks agree; ``now_ms`` overrides the clock):

- ``enqueue(queue, level, task_id, payload, score=None, attempts=0, cost=0) -> bool`` and
  ``enqueue_many(queue, level, items, attempts=None, costs=None) -> int``: ``cost`` is the
  task's estimated tokens, charged by takes under a ``tpm`` limit.
- ``take(queues, size, strategy, process_timeout, max_retries, now_ms, *, lease_ms, holder)
  -> list[TakenTask]``; ``take_with_hint(...)`` (same arguments) ``-> TakeResult`` adds
  ``retry_ms`` and ``limited`` when a limit held waiting work back.
- ``extend(queue, level, task_ids, lease_ms, holder=None) -> Extended`` (one call for many);
  ``extend_many({(queue, level): task_ids}, lease_ms, holder=None) -> {(queue, level): Extended}``
  (a worker's heartbeat: every queue level it holds, one round trip).
- ``delay(queue, level, task_id, delay_ms, holder=None, tokens=None) -> 'delayed' |
  'wrong_holder' | 'not_leased'``.
- ``complete(queue, level, task_id, failed=False, now_ms=None, *, holder, result, tokens) ->
  'completed' | 'already' | 'wrong_holder' | 'not_leased'``; ``complete_many(items) -> list``
  of :class:`Completion` (or ``(queue, level, task_id, failed)`` tuples), one round trip.
- ``recorded_results(queue, task_ids) -> dict``; ``forget_results(queue, task_ids) -> int``;
  ``results_pending(queue) -> ids`` (records not forgotten yet); ``done_since(queue, level,
  task_ids) -> {id: ms}``; ``rerun(queue, level, task_id, payload, score, attempts) -> bool``
  (a done task back to waiting, its record dropped: its answer reached nobody).
- ``cancel(queue, level, task_id) -> 'waiting' | 'leased' | 'delayed' | 'absent'``;
  ``clear(queue, level) -> ids`` (waiting and delayed); ``is_known(queue, level, task_id)``.
  ``lease_holder(queue, task_id) -> str | None`` (the holder a lease names);
  ``attempts_of(queue, task_id) -> int | None`` (times taken, until done).
- ``requeue_expired(queue, level, now_ms=None, limit=1000) -> ExpiredLeases`` (the reaper:
  leases that ran out, due delayed tasks, done trimming); ``requeue_all_expired(now_ms=None)``.
- ``set_limits(queue, rpm=None, tpm=None, max_in_flight=None, burst_ms=1000)``;
  ``pause(queue, pause_ms, throttled=False) -> int`` (when the pause ends);
  ``limit_stats(queue) -> LimitStats``; ``stats(queue, level) -> QueueStats``; ``known_queues()``;
  ``stats_all() -> dict[(queue, level), QueueStats]`` (every known level, two round trips).

Keys (``P`` = prefix, ``Q`` = queue name, ``L`` = level; ``{Q}`` is a hash tag, so every key
of a queue, all levels included, lives in one Redis Cluster slot):

- ``P:{Q}:L:waiting``  zset task id -> enqueue score (microseconds since the epoch)
- ``P:{Q}:L:leased``   zset task id -> lease deadline (ms since the epoch)
- ``P:{Q}:L:delayed``  zset task id -> due time (ms); back to waiting at its enqueue score
- ``P:{Q}:L:done``     zset task id -> completion time (ms); kept 24 h for idempotent completes
- ``P:{Q}:L:counters`` hash ``done``, ``failed``, ``cancelled`` (monotonic)
- ``P:{Q}:tasks``      hash task id -> payload
- ``P:{Q}:attempts``   hash task id -> times taken
- ``P:{Q}:scores``     hash task id -> original enqueue score
- ``P:{Q}:costs``      hash task id -> estimated tokens (only tasks with a cost)
- ``P:{Q}:leaseinfo``  hash task id -> ``"<bound_ms> <max_retries> <charged> <holder>"`` of its
  current lease: hard bound, lease expiries it survives, tokens the take charged, holder. One
  entry per leased task of the queue (every level), so its length is the exact in-flight count
- ``P:{Q}:limits``     hash: ``rpm``, ``tpm``, ``max_in_flight``, ``burst_ms`` (set by
  ``set_limits``), ``paused_until``, bucket and AIMD state, one-minute window counters
  (every field in ``bellaq/lua/limits.lua``)
- ``P:{Q}:results``    hash task id -> result text recorded by a complete, until forgotten
- ``P:queues``         set of full queue names ``"Q:L"`` (maintained from Python: other slot)

Key names are always built here and passed in ``KEYS``; scripts never build them from ``ARGV``.
Single-queue operations are therefore always Redis Cluster safe. A multi-queue ``take`` on
Redis Cluster must list queues that share one hash slot (e.g. levels of one queue, ``q:0`` and
``q:1``); on a single Redis server any mix works.

Leases. A take leases for ``lease_ms`` (default: the whole ``process_timeout``) but never past
its hard bound, taken time + ``process_timeout``. The holder renews with ``extend``, many
tasks in one call, up to that bound; a lease not renewed runs out and the reaper
(``requeue_expired``) puts the task back at its place, so a dead worker's tasks return within
one short lease. A take may name a ``holder``: ``complete``, ``extend`` and ``delay`` given
another holder answer ``'wrong_holder'`` and change nothing (``holder=None`` skips the check;
a lease taken without a holder accepts anyone).

Delays. ``delay`` moves a leased task to its level's delayed set (lease and in-flight slot
freed, attempts kept); takes (up to 100 per level per call) and the reaper move due ones back
to waiting at their original enqueue score, ahead of newer work. A ``sequential`` queue level
with a delayed task gives nothing until that task is back and done, so order holds.

Limits (per queue, every level, every taker on every host), checked and consumed inside each
take script: ``rpm`` and ``tpm`` are token buckets holding ``burst_ms`` of their rate (at least
one request) and refilling continuously; a task needs one request and ``min(cost, capacity)``
tokens and is charged its whole cost, which a complete or delay given ``tokens`` corrects to
the real use (a task bigger than the bucket waits for a full one and leaves a debt, so the rate
holds over time). ``max_in_flight`` counts the queue's leased tasks exactly (the length of
``leaseinfo``; delayed tasks are not leased). ``pause`` stops every take of the queue for a while; a pause never
shortens a longer one. A queue a limit stops gives nothing more in that take (a level behind
cannot take what an earlier level waits for; other queues of the take go on), and
``TakeResult.retry_ms`` says when a rate or pause limit may let work through (None when only
``max_in_flight`` stopped it: a slot frees when a lease ends, which the engine cannot foresee).
AIMD: a ``throttled`` pause (a 429) halves a factor on both rates, at most once per pause
episode, down to 1/16; the factor regains 1 % of the configured rate per second.

Results. ``complete`` can record the task's result in the same atomic step that ends it, so a
completer that dies before its SQL write leaves the answer for the reaper:
``recorded_results`` reads it, ``forget_results`` drops it after the SQL write, and trimming a
done entry trims its result.

Scripts live in ``bellaq/lua/`` (package data), one per operation, each documenting its KEYS,
ARGV and result at the top. Shared Lua is pulled in by textual inclusion at load time: a line
``-- @include NAME.lua`` is replaced by that file's contents (``common.lua``: clock, forgetting a
task, lease records, promotion; ``limits.lua``: the limits; ``take.lua``: what the take scripts
share). They use only commands of Redis 6.2 (no functions, no shebang flags) and read the
server clock with ``TIME`` unless an explicit ``now_ms`` > 0 is passed (tests do).
"""

from bellaq.queue_engine.arguments import (
    MAX_TAKE_QUEUES,
    MAX_TAKE_SIZE,
    QUEUE_NAME_RE,
    STRATEGIES,
    parse_full_queue,
)
from bellaq.queue_engine.engine import DONE_TTL_MS, QueueEngine
from bellaq.queue_engine.records import (
    Completion,
    ExpiredLeases,
    Extended,
    LimitStats,
    QueueStats,
    TakenTask,
    TakeResult,
)
from bellaq.queue_engine.scripts import SCRIPTS, load_lua

__all__ = [
    "DONE_TTL_MS",
    "MAX_TAKE_QUEUES",
    "MAX_TAKE_SIZE",
    "QUEUE_NAME_RE",
    "SCRIPTS",
    "STRATEGIES",
    "Completion",
    "ExpiredLeases",
    "Extended",
    "LimitStats",
    "QueueEngine",
    "QueueStats",
    "TakeResult",
    "TakenTask",
    "load_lua",
    "parse_full_queue",
]
