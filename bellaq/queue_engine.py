"""The queue engine: waiting sets, leases, delays, limits and counters in Redis, every mutation
one Lua script.

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
  current lease: hard bound, retries left to the reaper, tokens the take charged, holder
- ``P:{Q}:inflight``   set of the queue's leased task ids, every level (``max_in_flight``)
- ``P:{Q}:limits``     hash: ``rpm``, ``tpm``, ``max_in_flight``, ``burst_ms`` (set by
  :meth:`QueueEngine.set_limits`), ``paused_until``, token bucket and AIMD state, window counters
- ``P:{Q}:results``    hash task id -> result text recorded by a complete, until forgotten
- ``P:queues``         set of full queue names ``"Q:L"`` (maintained from Python: other slot)

Key names are always built here and passed in ``KEYS``; scripts never build them from ``ARGV``.
Single-queue operations are therefore always Redis Cluster safe. A multi-queue ``take`` on
Redis Cluster must list queues that share one hash slot (e.g. levels of one queue, ``q:0`` and
``q:1``); on a single Redis server any mix works.

Leases. A take leases for ``lease_ms`` (default: the whole ``process_timeout``) but never past
its hard bound, taken time + ``process_timeout``. The holder renews with :meth:`extend`, many
tasks in one call, up to that bound; a lease not renewed runs out and the reaper
(:meth:`requeue_expired`) puts the task back at its place, so a dead worker's tasks return
within one short lease. A take may name a ``holder``: ``complete``, ``extend`` and ``delay``
given another holder answer ``'wrong_holder'`` and change nothing (``holder=None`` skips the
check; a lease taken without a holder accepts anyone).

Delays. :meth:`delay` moves a leased task to its level's delayed set (lease and in-flight slot
freed, attempts kept); takes (up to 100 per level per call) and the reaper move due ones back
to waiting at their original enqueue score, ahead of newer work.

Limits (per queue, every level, every taker on every host), checked and consumed inside each
take script: ``rpm`` and ``tpm`` are token buckets holding ``burst_ms`` of their rate and
refilling continuously; a task needs one request and ``min(cost, capacity)`` tokens and is
charged its cost (given at enqueue), which a complete or delay given ``tokens`` corrects to the
real use. ``max_in_flight`` counts the queue's leased tasks exactly (a set; delayed tasks are
not leased). :meth:`pause` stops every take of the queue for a time. A take that a limit stops
says so in :class:`TakeResult` (``retry_ms``: when to ask again). AIMD: a ``throttled`` pause
(a 429) halves a factor on both rates, at most once per pause episode, down to 1/16; the
factor regains 1 % of the configured rate per second.

Results. ``complete`` can record the task's result in the same atomic step that ends it, so a
completer that dies before its SQL write leaves the answer for the reaper:
:meth:`recorded_results` reads it, :meth:`forget_results` drops it after the SQL write, and
trimming a done entry trims its result.

Scripts live in ``bellaq/lua/`` (package data), one per operation, each documenting its KEYS,
ARGV and result at the top. Shared Lua is pulled in by textual inclusion at load time: a line
``-- @include NAME.lua`` is replaced by that file's contents (``common.lua``: clock, forgetting a
task, lease records, promotion; ``limits.lua``: the limits; ``take.lua``: what the take scripts
share). They use only commands of Redis 6.2 (no functions, no shebang flags) and read the
server clock with ``TIME`` unless an explicit ``now_ms`` > 0 is passed (tests do).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STRATEGIES = ("fifo", "round_robin", "active_passive", "sequential")
MAX_TAKE_SIZE = 10_000
MAX_TAKE_QUEUES = 1_000
MAX_HOLDER_LEN = 256
DONE_TTL_MS = 24 * 3600 * 1000
ENQUEUE_CHUNK = 500
CLEAR_CHUNK = 5_000
RESULTS_CHUNK = 1_000

SCRIPTS = (
    "enqueue",
    "take_fifo",
    "take_round_robin",
    "take_active_passive",
    "take_sequential",
    "complete",
    "cancel",
    "delay",
    "extend",
    "requeue_expired",
    "clear",
    "stats",
    "set_limits",
    "pause",
    "limit_stats",
)
_INCLUDE_RE = re.compile(r"^--\s*@include\s+([A-Za-z0-9_.-]+\.lua)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class TakenTask:
    """A task leased by ``take``."""

    queue: str
    level: int
    task_id: str
    payload: str
    attempts: int


@dataclass(frozen=True)
class TakeResult:
    """What ``take_with_hint`` leased, and whether a limit held waiting work back."""

    tasks: list[TakenTask]
    retry_ms: int | None  # ms until a rate or pause limit that stopped the take may let work through
    limited: tuple[str, ...]  # 'paused', 'in_flight', 'rpm', 'tpm': the limits that stopped it


@dataclass(frozen=True)
class Completion:
    """One item of ``complete_many``."""

    queue: str
    level: int
    task_id: str
    failed: bool = False
    result: str | None = None  # recorded with the end state (see recorded_results)
    tokens: int | None = None  # tokens really used: corrects the queue's token bucket
    holder: str | None = None  # must match the lease's holder when given


@dataclass
class Extended:
    """What ``extend`` did: only the leases in ``renewed`` changed."""

    renewed: dict[str, int]  # task id -> lease deadline now in force (ms)
    not_leased: list[str]
    wrong_holder: list[str]


@dataclass
class ExpiredLeases:
    """What ``requeue_expired`` did with the leases that ran out and the delays that came due."""

    requeued: list[str]  # put back to waiting (attempts kept)
    failed: list[str]  # retries ran out: removed from the engine (counters.failed += 1)
    promoted: list[str] = field(default_factory=list)  # delayed tasks now due: back to waiting


@dataclass
class QueueStats:
    """Counts of one (queue, level)."""

    waiting: int
    running: int
    done: int
    failed: int
    cancelled: int
    oldest_age_ms: int  # age of the oldest waiting task, 0 if none
    delayed: int = 0
    next_due_in_ms: int | None = None  # until the earliest delayed task is due; None if none


@dataclass(frozen=True)
class LimitStats:
    """A queue's limits (None = not set) and how much of them is in use."""

    rpm: int | None
    tpm: int | None
    max_in_flight: int | None
    burst_ms: int | None
    in_flight: int  # leased tasks of the queue, every level
    paused_until: int  # ms since the epoch; 0 when not paused
    factor: float  # AIMD factor on the rates (1 = the configured rates)
    requests_available: float | None  # bucket levels now (negative: a debt)
    tokens_available: float | None
    window_start: int  # one-minute window (ms since the epoch) the counts below belong to
    window_requests: int
    window_tokens: int


def parse_full_queue(name: str) -> tuple[str, int]:
    """``"q:1"`` -> ``("q", 1)``; ``"q"`` -> ``("q", 0)``. ValueError on a bad name."""
    if not isinstance(name, str):
        raise ValueError(f"full queue name must be a string like 'name:0', got {type(name).__name__}")
    queue, sep, level_text = name.rpartition(":")
    if not sep:
        queue, level_text = name, "0"
    if not QUEUE_NAME_RE.match(queue):
        raise ValueError(
            f"bad queue name {queue!r} in {name!r}: use 1 to 64 of A-Z a-z 0-9 _ - "
            "optionally followed by ':level' (e.g. 'chat:0')"
        )
    if not level_text.isdigit() or not level_text.isascii():
        raise ValueError(
            f"bad level {level_text!r} in {name!r}: the level is an integer >= 0 (e.g. 'chat:1')"
        )
    return queue, int(level_text)


def _check_queue(queue: str, level: int = 0) -> None:
    if not isinstance(queue, str) or not QUEUE_NAME_RE.match(queue):
        raise ValueError(f"bad queue name {queue!r}: use 1 to 64 of A-Z a-z 0-9 _ -")
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"bad level {level!r} for queue {queue!r}: the level is an integer >= 0")


def _check_task_id(task_id: str) -> None:
    if not isinstance(task_id, str) or not task_id:
        raise ValueError(f"task id must be a non-empty string, got {task_id!r}")


def _int_arg(name: str, value: Any, minimum: int, optional: bool = False) -> str:
    """``value`` as a script argument; '' for None when ``optional``."""
    if value is None and optional:
        return ""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")
    return str(value)


def _holder_arg(holder: str | None) -> str:
    if holder is None:
        return ""
    if not isinstance(holder, str) or not 1 <= len(holder) <= MAX_HOLDER_LEN:
        raise ValueError(f"holder must be None or a string of 1 to {MAX_HOLDER_LEN} characters, got {holder!r}")
    return holder


def _s(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _score_arg(score: float | None) -> str:
    if score is None:
        return str(time.time_ns() // 1000)
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise ValueError(f"score must be a number (microseconds since the epoch), got {score!r}")
    if isinstance(score, int):
        return str(score)
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {score!r}")
    return repr(score)


def _now_arg(now_ms: int | None) -> int:
    if now_ms is None:
        return 0
    if isinstance(now_ms, bool) or not isinstance(now_ms, int) or now_ms <= 0:
        raise ValueError(f"now_ms must be a positive integer (ms since the epoch) or None, got {now_ms!r}")
    return now_ms


def _opt_int(text: Any) -> int | None:
    return None if _s(text) == "" else int(_s(text))


def _opt_float(text: Any) -> float | None:
    return None if _s(text) == "" else float(_s(text))


def _lua_dir() -> Any:
    try:
        return files("bellaq") / "lua"
    except (TypeError, ModuleNotFoundError):  # pragma: no cover - namespace package fallback
        return Path(__file__).with_name("lua")


@cache
def load_lua(name: str) -> str:
    """Text of ``bellaq/lua/<name>`` with its ``-- @include X.lua`` lines expanded."""
    text = (_lua_dir() / name).read_text(encoding="utf-8")
    return _INCLUDE_RE.sub(lambda m: load_lua(m.group(1)), text)


class QueueEngine:
    """Per (queue, level) waiting set, leases and counters; see the module docstring for keys."""

    def __init__(self, redis: redis.Redis, prefix: str = "bq") -> None:
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        self.redis = redis
        self.prefix = prefix
        self.queues_key = f"{prefix}:queues"
        self._scripts: dict[str, Script] = {
            name: redis.register_script(load_lua(f"{name}.lua")) for name in SCRIPTS
        }

    # ----------------------------------------------------------------- keys
    def _qkey(self, queue: str, level: int, kind: str) -> str:
        return f"{self.prefix}:{{{queue}}}:{level}:{kind}"

    def _hkey(self, queue: str, kind: str) -> str:
        return f"{self.prefix}:{{{queue}}}:{kind}"

    def _task_keys(self, queue: str) -> list[str]:
        """The per-task hashes, in the order every script expects them."""
        return [self._hkey(queue, k) for k in ("tasks", "attempts", "scores", "leaseinfo", "costs")]

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args))

    def _run_pipelined(
        self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]], register: str | None = None
    ) -> list[Any]:
        """Run script ``name`` once per ``(keys, args)`` in one round trip (after SADD of
        ``register`` to the queue registry, if given). Calls that met a Redis that had forgotten
        the script are run again after it is reloaded; the others ran exactly once."""
        script = self._scripts[name]
        out: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            if register is not None:
                pipe.sadd(self.queues_key, register)
            for i in pending:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            answers = pipe.execute(raise_on_error=False)[1 if register is not None else 0 :]
            missing = []
            for i, answer in zip(pending, answers, strict=True):
                if isinstance(answer, NoScriptError):
                    missing.append(i)
                elif isinstance(answer, Exception):
                    raise answer
                else:
                    out[i] = answer
            if not missing:
                return out
            script.sha = self.redis.script_load(script.script)
            pending, register = missing, None
        raise RuntimeError(f"could not load Lua script {name}")  # pragma: no cover

    # -------------------------------------------------------------- enqueue
    def _enqueue_keys(self, queue: str, level: int) -> list[str]:
        return [*(self._qkey(queue, level, k) for k in ("waiting", "leased", "delayed", "done")),
                *self._task_keys(queue)]

    @staticmethod
    def _item_args(task_id: str, payload: str, score: float | None, attempts: int, cost: int) -> list[Any]:
        _check_task_id(task_id)
        if not isinstance(payload, str):
            raise ValueError(f"payload of task {task_id!r} must be a string (JSON text)")
        return [task_id, payload, _score_arg(score), _int_arg(f"attempts of task {task_id!r}", attempts, 0),
                _int_arg(f"cost of task {task_id!r}", cost, 0)]

    def enqueue(
        self,
        queue: str,
        level: int,
        task_id: str,
        payload: str,
        score: float | None = None,
        attempts: int = 0,
        cost: int = 0,
    ) -> bool:
        """Add a task to waiting; False if the id is already waiting, leased, delayed or done.
        ``cost``: its estimated tokens, charged by takes under a ``tpm`` limit."""
        return self.enqueue_many(queue, level, [(task_id, payload, score)], {task_id: attempts},
                                 {task_id: cost}) == 1

    def enqueue_many(
        self,
        queue: str,
        level: int,
        items: Sequence[tuple[str, str, float | None]],
        attempts: Mapping[str, int] | None = None,
        costs: Mapping[str, int] | None = None,
    ) -> int:
        """Add ``(task_id, payload, score)`` items in chunks; returns how many were new."""
        _check_queue(queue, level)
        attempts = attempts or {}
        costs = costs or {}
        keys = self._enqueue_keys(queue, level)
        calls = []
        for start in range(0, len(items), ENQUEUE_CHUNK):
            args: list[Any] = []
            for task_id, payload, score in items[start : start + ENQUEUE_CHUNK]:
                args += self._item_args(task_id, payload, score, attempts.get(task_id, 0), costs.get(task_id, 0))
            calls.append((keys, args))
        return sum(int(n) for n in self._run_pipelined("enqueue", calls, register=f"{queue}:{level}"))

    # ----------------------------------------------------------------- take
    def take(
        self,
        queues: Sequence[tuple[str, int]],
        size: int,
        strategy: str = "fifo",
        process_timeout: float = 300,
        max_retries: int = 3,
        now_ms: int | None = None,
        *,
        lease_ms: int | None = None,
        holder: str | None = None,
    ) -> list[TakenTask]:
        """Lease up to ``size`` tasks from ``queues`` by ``strategy``, in one Lua call; see
        :meth:`take_with_hint`."""
        return self.take_with_hint(queues, size, strategy, process_timeout, max_retries, now_ms,
                                   lease_ms=lease_ms, holder=holder).tasks

    def take_with_hint(
        self,
        queues: Sequence[tuple[str, int]],
        size: int,
        strategy: str = "fifo",
        process_timeout: float = 300,
        max_retries: int = 3,
        now_ms: int | None = None,
        *,
        lease_ms: int | None = None,
        holder: str | None = None,
    ) -> TakeResult:
        """Lease up to ``size`` tasks from ``queues`` by ``strategy``, in one Lua call, within each
        queue's limits. Each lease runs ``lease_ms`` (default the whole ``process_timeout``, in
        seconds), renewable up to ``process_timeout`` after the take; ``holder`` names its holder.
        ``max_retries``: lease expiries the task survives (-1 = unlimited)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_TAKE_SIZE:
            raise ValueError(f"size must be an integer from 1 to {MAX_TAKE_SIZE}, got {size!r}")
        if (
            isinstance(process_timeout, bool)
            or not isinstance(process_timeout, (int, float))
            or not math.isfinite(process_timeout)
            or process_timeout < 0
        ):
            raise ValueError(f"process_timeout must be a number of seconds >= 0, got {process_timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < -1:
            raise ValueError(f"max_retries must be an integer >= -1 (-1 = unlimited), got {max_retries!r}")
        timeout_ms = round(process_timeout * 1000)
        lease = timeout_ms if lease_ms is None else int(_int_arg("lease_ms", lease_ms, 1))
        listed: list[tuple[str, int]] = []
        for queue, level in queues:
            _check_queue(queue, level)
            if (queue, level) not in listed:
                listed.append((queue, level))
        if not listed:
            raise ValueError("queues must list at least one (queue, level)")
        if len(listed) > MAX_TAKE_QUEUES:
            raise ValueError(f"at most {MAX_TAKE_QUEUES} queues per take, got {len(listed)}")
        keys: list[str] = []
        for queue, level in listed:
            keys += [*(self._qkey(queue, level, k) for k in ("waiting", "leased", "delayed")),
                     *self._task_keys(queue), self._hkey(queue, "inflight"), self._hkey(queue, "limits")]
        args = [_now_arg(now_ms), lease, timeout_ms, max_retries, size, len(listed), _holder_arg(holder)]
        flat = self._run(f"take_{strategy}", keys, args)
        taken = []
        for i in range(2, len(flat), 4):
            queue, level = listed[int(flat[i]) - 1]
            taken.append(TakenTask(queue, level, _s(flat[i + 1]), _s(flat[i + 2]), int(flat[i + 3])))
        retry = int(flat[0])
        limited = tuple(_s(flat[1]).split(",")) if _s(flat[1]) else ()
        return TakeResult(taken, None if retry < 0 else retry, limited)

    # --------------------------------------------------------------- leases
    def extend(
        self,
        queue: str,
        level: int,
        task_ids: Sequence[str],
        lease_ms: int,
        holder: str | None = None,
        now_ms: int | None = None,
    ) -> Extended:
        """Renew leases of ``queue:level`` in one call: each runs out at now + ``lease_ms``, never
        past the hard bound of its take nor earlier than before. Ids not leased, or leased by
        another holder, are reported and left alone."""
        _check_queue(queue, level)
        if isinstance(task_ids, str) or len(task_ids) > MAX_TAKE_SIZE:
            raise ValueError(f"task_ids must be a list of at most {MAX_TAKE_SIZE} task ids")
        for task_id in task_ids:
            _check_task_id(task_id)
        keys = [self._qkey(queue, level, "leased"), self._hkey(queue, "leaseinfo")]
        args = [_now_arg(now_ms), _int_arg("lease_ms", lease_ms, 1), _holder_arg(holder), *task_ids]
        renewed, not_leased, wrong = self._run("extend", keys, args)
        return Extended({_s(renewed[i]): int(renewed[i + 1]) for i in range(0, len(renewed), 2)},
                        [_s(x) for x in not_leased], [_s(x) for x in wrong])

    def delay(
        self,
        queue: str,
        level: int,
        task_id: str,
        delay_ms: int,
        holder: str | None = None,
        tokens: int | None = None,
        now_ms: int | None = None,
    ) -> str:
        """Set a leased task aside for ``delay_ms`` (its lease and in-flight slot are freed, its
        attempts and place kept): 'delayed', 'wrong_holder' or 'not_leased'. ``tokens``: what the
        attempt really used (e.g. 0 after a 429), corrects the token bucket."""
        _check_queue(queue, level)
        _check_task_id(task_id)
        keys = [self._qkey(queue, level, "leased"), self._qkey(queue, level, "delayed"),
                self._hkey(queue, "leaseinfo"), self._hkey(queue, "inflight"), self._hkey(queue, "limits")]
        args = [task_id, _int_arg("delay_ms", delay_ms, 0), _holder_arg(holder),
                _int_arg("tokens", tokens, 0, optional=True), _now_arg(now_ms)]
        return _s(self._run("delay", keys, args))

    def requeue_expired(
        self, queue: str, level: int, now_ms: int | None = None, limit: int = 1000
    ) -> ExpiredLeases:
        """Reap up to ``limit`` leases with deadline <= now (back to waiting, or failed), promote
        up to ``limit`` due delayed tasks, and trim done entries older than 24 h."""
        _check_queue(queue, level)
        _int_arg("limit", limit, 1)
        keys = [*(self._qkey(queue, level, k) for k in ("waiting", "leased", "delayed", "done", "counters")),
                *self._task_keys(queue), self._hkey(queue, "inflight"), self._hkey(queue, "results")]
        out = self._run("requeue_expired", keys, [_now_arg(now_ms), limit, DONE_TTL_MS])
        return ExpiredLeases(*([_s(x) for x in part] for part in out))

    def requeue_all_expired(self, now_ms: int | None = None) -> dict[tuple[str, int], ExpiredLeases]:
        """``requeue_expired`` over every known queue; only queues where something expired or came
        due are listed."""
        out: dict[tuple[str, int], ExpiredLeases] = {}
        limit = 1000
        for queue, level in self.known_queues():
            total = ExpiredLeases([], [])
            while True:
                got = self.requeue_expired(queue, level, now_ms=now_ms, limit=limit)
                total.requeued += got.requeued
                total.failed += got.failed
                total.promoted += got.promoted
                if max(len(got.requeued) + len(got.failed), len(got.promoted)) < limit:
                    break
            if total.requeued or total.failed or total.promoted:
                out[(queue, level)] = total
        return out

    # ------------------------------------------------------ complete/cancel
    def complete(
        self,
        queue: str,
        level: int,
        task_id: str,
        failed: bool = False,
        now_ms: int | None = None,
        *,
        holder: str | None = None,
        result: str | None = None,
        tokens: int | None = None,
    ) -> str:
        """'completed' (first complete of a leased task), 'already' (done before), 'wrong_holder'
        (leased by another holder; nothing changed) or 'not_leased'. See :class:`Completion`."""
        return self.complete_many([Completion(queue, level, task_id, failed, result, tokens, holder)], now_ms)[0]

    def complete_many(
        self, items: Sequence[Completion | tuple[str, int, str, bool]], now_ms: int | None = None
    ) -> list[str]:
        """:meth:`complete` for many :class:`Completion` (or ``(queue, level, task_id, failed)``)
        in one round trip."""
        calls = []
        for item in items:
            c = item if isinstance(item, Completion) else Completion(*item)
            _check_queue(c.queue, c.level)
            _check_task_id(c.task_id)
            if c.result is not None and not isinstance(c.result, str):
                raise ValueError(f"result of task {c.task_id!r} must be a string or None")
            keys = [*(self._qkey(c.queue, c.level, k) for k in ("leased", "done", "counters")),
                    *self._task_keys(c.queue),
                    *(self._hkey(c.queue, k) for k in ("inflight", "limits", "results"))]
            args = [c.task_id, 1 if c.failed else 0, _now_arg(now_ms), _holder_arg(c.holder),
                    _int_arg("tokens", c.tokens, 0, optional=True), 0 if c.result is None else 1, c.result or ""]
            calls.append((keys, args))
        return [_s(out) for out in self._run_pipelined("complete", calls)]

    def cancel(self, queue: str, level: int, task_id: str) -> str:
        """'waiting', 'leased' or 'delayed' (where it was removed from), or 'absent'."""
        _check_queue(queue, level)
        _check_task_id(task_id)
        keys = [*(self._qkey(queue, level, k) for k in ("waiting", "leased", "delayed", "counters")),
                *self._task_keys(queue), self._hkey(queue, "inflight")]
        return _s(self._run("cancel", keys, [task_id]))

    # -------------------------------------------------------------- results
    def recorded_results(self, queue: str, task_ids: Sequence[str]) -> dict[str, str]:
        """The results recorded by ``complete`` for ``task_ids`` (ids without one are left out)."""
        _check_queue(queue)
        found: dict[str, str] = {}
        for start in range(0, len(task_ids), RESULTS_CHUNK):
            chunk = list(task_ids[start : start + RESULTS_CHUNK])
            for task_id, value in zip(chunk, self.redis.hmget(self._hkey(queue, "results"), chunk), strict=True):
                if value is not None:
                    found[task_id] = _s(value)
        return found

    def forget_results(self, queue: str, task_ids: Sequence[str]) -> int:
        """Drop recorded results (once they are safe in SQL); returns how many there were."""
        _check_queue(queue)
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(task_ids), RESULTS_CHUNK):
            pipe.hdel(self._hkey(queue, "results"), *task_ids[start : start + RESULTS_CHUNK])
        return sum(pipe.execute())

    # --------------------------------------------------------------- limits
    def set_limits(
        self,
        queue: str,
        rpm: int | None = None,
        tpm: int | None = None,
        max_in_flight: int | None = None,
        burst_ms: int = 1000,
    ) -> None:
        """Replace the limits of ``queue`` (all levels; None = no such limit). Each bucket holds
        ``burst_ms`` worth of its rate."""
        _check_queue(queue)
        args = [_int_arg("rpm", rpm, 1, optional=True), _int_arg("tpm", tpm, 1, optional=True),
                _int_arg("max_in_flight", max_in_flight, 1, optional=True), _int_arg("burst_ms", burst_ms, 1)]
        self._run("set_limits", [self._hkey(queue, "limits")], args)

    def pause(self, queue: str, pause_ms: int, throttled: bool = False, now_ms: int | None = None) -> int:
        """No take leases a task of ``queue`` for ``pause_ms`` (a longer pause in force stays);
        ``throttled`` (a 429) also slows its rates down (AIMD). Returns when the pause ends (ms)."""
        _check_queue(queue)
        keys = [self._hkey(queue, "limits"), self._hkey(queue, "inflight")]
        args = [_now_arg(now_ms), _int_arg("pause_ms", pause_ms, 0), 1 if throttled else 0]
        return int(self._run("pause", keys, args))

    def limit_stats(self, queue: str, now_ms: int | None = None) -> LimitStats:
        """The limits of ``queue`` and how much of each is in use."""
        _check_queue(queue)
        keys = [self._hkey(queue, "limits"), self._hkey(queue, "inflight")]
        v = self._run("limit_stats", keys, [_now_arg(now_ms)])
        return LimitStats(_opt_int(v[0]), _opt_int(v[1]), _opt_int(v[2]), _opt_int(v[3]), int(v[4]), int(v[5]),
                          float(v[6]), _opt_float(v[7]), _opt_float(v[8]), int(v[9]), int(v[10]), int(v[11]))

    # ------------------------------------------------------------ the rest
    def clear(self, queue: str, level: int) -> list[str]:
        """Remove every WAITING or DELAYED task of Q:L (leased ones stay); returns their ids."""
        _check_queue(queue, level)
        keys = [*(self._qkey(queue, level, k) for k in ("waiting", "delayed", "counters")),
                *self._task_keys(queue)]
        removed: list[str] = []
        while True:
            ids = [_s(x) for x in self._run("clear", keys, [CLEAR_CHUNK])]
            removed += ids
            if len(ids) < CLEAR_CHUNK:
                return removed

    def stats(self, queue: str, level: int, now_ms: int | None = None) -> QueueStats:
        """Waiting, running, done, failed, cancelled, the oldest waiting task's age, delayed."""
        _check_queue(queue, level)
        keys = [self._qkey(queue, level, k) for k in ("waiting", "leased", "delayed", "counters")]
        *counts, due = (int(x) for x in self._run("stats", keys, [_now_arg(now_ms)]))
        return QueueStats(*counts, next_due_in_ms=None if due < 0 else due)

    def known_queues(self) -> list[tuple[str, int]]:
        """Every (queue, level) ever enqueued to, sorted."""
        found = []
        for raw in self.redis.smembers(self.queues_key):
            try:
                found.append(parse_full_queue(_s(raw)))
            except ValueError:
                continue
        return sorted(found)

    def is_known(self, queue: str, level: int, task_id: str) -> str:
        """'waiting', 'leased', 'delayed', 'done' or 'absent'."""
        _check_queue(queue, level)
        _check_task_id(task_id)
        kinds = ("waiting", "leased", "delayed", "done")
        pipe = self.redis.pipeline(transaction=True)
        for kind in kinds:
            pipe.zscore(self._qkey(queue, level, kind), task_id)
        for kind, score in zip(kinds, pipe.execute(), strict=True):
            if score is not None:
                return kind
        return "absent"
