"""The queue engine class: one method per operation, each one Lua call (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from bellaq.queue_engine.arguments import (
    MAX_TAKE_QUEUES,
    MAX_TAKE_SIZE,
    STRATEGIES,
    as_str,
    check_queue,
    check_task_id,
    holder_arg,
    int_arg,
    now_arg,
    opt_float,
    opt_int,
    parse_full_queue,
    score_arg,
)
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

# Commands of another party riding on an engine round trip: called with the pipeline, it adds
# them and returns what to call with their answers.
Rider = Callable[[Pipeline], Callable[[list[Any]], None]]

DONE_TTL_MS = 24 * 3600 * 1000
ENQUEUE_CHUNK = 500
CLEAR_CHUNK = 5_000
RESULTS_CHUNK = 1_000
KEY_CACHE_SIZE = 10_000

_TASK_HASHES = ("tasks", "attempts", "scores", "leaseinfo", "costs")
# The KEYS of each script, in order: "L:x" is key x of the queue level, "x" a key of the queue.
_LAYOUT: dict[str, tuple[str, ...]] = {
    "enqueue": ("L:waiting", "L:leased", "L:delayed", "L:done", *_TASK_HASHES),
    "take": ("L:waiting", "L:leased", "L:delayed", *_TASK_HASHES, "limits"),
    "complete": ("L:leased", "L:done", "L:counters", *_TASK_HASHES, "limits", "results"),
    "cancel": ("L:waiting", "L:leased", "L:delayed", "L:counters", *_TASK_HASHES),
    "delay": ("L:leased", "L:delayed", "leaseinfo", "limits"),
    "extend": ("L:leased", "leaseinfo"),
    "rerun": ("L:waiting", "L:done", "tasks", "attempts", "scores", "results"),
    "requeue_expired": ("L:waiting", "L:leased", "L:delayed", "L:done", "L:counters", *_TASK_HASHES,
                        "results", "limits"),
    "clear": ("L:waiting", "L:delayed", "L:counters", *_TASK_HASHES),
    "stats": ("L:waiting", "L:leased", "L:delayed", "L:counters"),
    "set_limits": ("limits",),
    "pause": ("limits", "leaseinfo"),
    "limit_stats": ("limits", "leaseinfo"),
}


class QueueEngine:
    """Waiting, leased, delayed and done tasks per (queue, level), limits per queue; see the
    package docstring for the operations and keys."""

    def __init__(self, redis: redis.Redis, prefix: str = "bq") -> None:
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        self.redis = redis
        self.prefix = prefix
        self.queues_key = f"{prefix}:queues"
        self._scripts: dict[str, Script] = {
            name: redis.register_script(load_lua(f"{name}.lua")) for name in SCRIPTS
        }
        self._key_cache: dict[tuple[str, str, int], list[str]] = {}

    # ----------------------------------------------------------------- keys
    def _qkey(self, queue: str, level: int, kind: str) -> str:
        return f"{self.prefix}:{{{queue}}}:{level}:{kind}"

    def _hkey(self, queue: str, kind: str) -> str:
        return f"{self.prefix}:{{{queue}}}:{kind}"

    def _keys(self, layout: str, queue: str, level: int = 0) -> list[str]:
        """The KEYS of a script (see ``_LAYOUT``) for queue:level, checked and built once."""
        check_queue(queue, level)
        keys = self._key_cache.get((layout, queue, level))
        if keys is None:
            if len(self._key_cache) >= KEY_CACHE_SIZE:
                self._key_cache.clear()
            keys = self._build_keys(layout, queue, level)
            self._key_cache[(layout, queue, level)] = keys
        return keys

    def _build_keys(self, layout: str, queue: str, level: int) -> list[str]:
        return [self._qkey(queue, level, kind[2:]) if kind.startswith("L:") else self._hkey(queue, kind)
                for kind in _LAYOUT[layout]]

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[name](keys=keys, args=args)

    def _run_pipelined(
        self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]], register: str | None = None,
        rider: Rider | None = None,
    ) -> list[Any]:
        """Run script ``name`` once per ``(keys, args)`` in one round trip (after SADD of
        ``register`` to the queue registry, if given). Calls that met a Redis that had forgotten
        the script are run again after it is reloaded; the others ran exactly once. ``rider``
        adds commands of its own after the first pass's, and what it returns is called with their
        answers (with none if the round trip failed), whatever happens to the script calls."""
        finish: Callable[[list[Any]], None] | None = None
        rode: list[Any] = []
        try:
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
                riding = 0
                if rider is not None:
                    before = len(pipe)
                    finish, rider = rider(pipe), None
                    riding = len(pipe) - before
                answers = pipe.execute(raise_on_error=False)
                if riding:
                    rode += answers[-riding:]
                    del answers[-riding:]
                if register is not None:
                    registered, *answers = answers
                    if isinstance(registered, Exception):
                        raise registered
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
        finally:
            if finish is not None:
                finish(rode)

    # -------------------------------------------------------------- enqueue
    @staticmethod
    def _item_args(task_id: str, payload: str, score: float | None, attempts: int, cost: int) -> list[Any]:
        check_task_id(task_id)
        if not isinstance(payload, str):
            raise ValueError(f"payload of task {task_id!r} must be a string (JSON text)")
        for name, value in (("attempts", attempts), ("cost", cost)):
            if type(value) is not int or value < 0:  # the message is built only for a bad value
                int_arg(f"{name} of task {task_id!r}", value, 0)
        return [task_id, payload, score_arg(score), attempts, cost]

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
        rider: Rider | None = None,
    ) -> int:
        """Add ``(task_id, payload, score)`` items in chunks; returns how many were new.
        ``rider``'s commands go in the same round trip, after the items (see ``_run_pipelined``)."""
        keys = self._keys("enqueue", queue, level)
        attempts = attempts or {}
        costs = costs or {}
        calls = []
        for start in range(0, len(items), ENQUEUE_CHUNK):
            args: list[Any] = []
            for task_id, payload, score in items[start : start + ENQUEUE_CHUNK]:
                args += self._item_args(task_id, payload, score, attempts.get(task_id, 0), costs.get(task_id, 0))
            calls.append((keys, args))
        if not calls:
            return 0
        return sum(int(n) for n in self._run_pipelined("enqueue", calls, register=f"{queue}:{level}", rider=rider))

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
        lease = timeout_ms if lease_ms is None else int(int_arg("lease_ms", lease_ms, 1))
        for queue, level in queues:
            check_queue(queue, level)
        listed = list(dict.fromkeys((queue, level) for queue, level in queues))
        if not listed:
            raise ValueError("queues must list at least one (queue, level)")
        if len(listed) > MAX_TAKE_QUEUES:
            raise ValueError(f"at most {MAX_TAKE_QUEUES} queues per take, got {len(listed)}")
        keys: list[str] = []
        for queue, level in listed:
            keys += self._keys("take", queue, level)
        args = [now_arg(now_ms), lease, timeout_ms, max_retries, size, len(listed), holder_arg(holder),
                *(level for _, level in listed)]
        flat = self._run(f"take_{strategy}", keys, args)
        taken = []
        for i in range(2, len(flat), 4):
            queue, level = listed[int(flat[i]) - 1]
            taken.append(TakenTask(queue, level, as_str(flat[i + 1]), as_str(flat[i + 2]), int(flat[i + 3])))
        retry = int(flat[0])
        limited = tuple(as_str(flat[1]).split(",")) if as_str(flat[1]) else ()
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
        keys = self._keys("extend", queue, level)
        if isinstance(task_ids, str) or len(task_ids) > MAX_TAKE_SIZE:
            raise ValueError(f"task_ids must be a list of at most {MAX_TAKE_SIZE} task ids")
        for task_id in task_ids:
            check_task_id(task_id)
        args = [now_arg(now_ms), int_arg("lease_ms", lease_ms, 1), holder_arg(holder), *task_ids]
        renewed, not_leased, wrong = self._run("extend", keys, args)
        return Extended({as_str(renewed[i]): int(renewed[i + 1]) for i in range(0, len(renewed), 2)},
                        [as_str(x) for x in not_leased], [as_str(x) for x in wrong])

    def extend_many(
        self,
        held: Mapping[tuple[str, int], Sequence[str]],
        lease_ms: int,
        holder: str | None = None,
        now_ms: int | None = None,
    ) -> dict[tuple[str, int], Extended]:
        """:meth:`extend` for the leases of many queue levels in one round trip (a worker's
        heartbeat): ``held`` maps ``(queue, level)`` to task ids."""
        calls: list[tuple[list[str], list[Any]]] = []
        owners: list[tuple[str, int]] = []
        lease = int_arg("lease_ms", lease_ms, 1)
        for (queue, level), task_ids in held.items():
            keys = self._keys("extend", queue, level)
            ids = list(task_ids)
            for task_id in ids:
                check_task_id(task_id)
            for start in range(0, len(ids), MAX_TAKE_SIZE):
                calls.append((keys, [now_arg(now_ms), lease, holder_arg(holder), *ids[start:start + MAX_TAKE_SIZE]]))
                owners.append((queue, level))
        out: dict[tuple[str, int], Extended] = {}
        for pair, (renewed, not_leased, wrong) in zip(owners, self._run_pipelined("extend", calls) if calls else [],
                                                      strict=True):
            got = out.setdefault(pair, Extended({}, [], []))
            got.renewed.update({as_str(renewed[i]): int(renewed[i + 1]) for i in range(0, len(renewed), 2)})
            got.not_leased += [as_str(x) for x in not_leased]
            got.wrong_holder += [as_str(x) for x in wrong]
        return out

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
        keys = self._keys("delay", queue, level)
        check_task_id(task_id)
        args = [task_id, int_arg("delay_ms", delay_ms, 0), holder_arg(holder),
                int_arg("tokens", tokens, 0, optional=True), now_arg(now_ms), level]
        return as_str(self._run("delay", keys, args))

    def requeue_expired(
        self, queue: str, level: int, now_ms: int | None = None, limit: int = 1000
    ) -> ExpiredLeases:
        """Reap up to ``limit`` leases with deadline <= now (back to waiting, or failed), promote
        up to ``limit`` due delayed tasks, and trim done entries older than 24 h."""
        keys = self._keys("requeue_expired", queue, level)
        int_arg("limit", limit, 1)
        out = self._run("requeue_expired", keys, [now_arg(now_ms), limit, DONE_TTL_MS, level])
        return ExpiredLeases(*([as_str(x) for x in part] for part in out))

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
        keys, args = self._complete_call(Completion(queue, level, task_id, failed, result, tokens, holder), now_ms)
        return as_str(self._run("complete", keys, args))

    def complete_many(
        self, items: Sequence[Completion | tuple[str, int, str, bool]], now_ms: int | None = None
    ) -> list[str]:
        """:meth:`complete` for many :class:`Completion` (or ``(queue, level, task_id, failed)``)
        in one round trip."""
        calls = [self._complete_call(item if isinstance(item, Completion) else Completion(*item), now_ms)
                 for item in items]
        return [as_str(out) for out in self._run_pipelined("complete", calls)]

    def _complete_call(self, c: Completion, now_ms: int | None) -> tuple[list[str], list[Any]]:
        keys = self._keys("complete", c.queue, c.level)
        check_task_id(c.task_id)
        if c.result is not None and not isinstance(c.result, str):
            raise ValueError(f"result of task {c.task_id!r} must be a string or None")
        return keys, [c.task_id, 1 if c.failed else 0, now_arg(now_ms), holder_arg(c.holder),
                      int_arg("tokens", c.tokens, 0, optional=True), 0 if c.result is None else 1, c.result or ""]

    def cancel(self, queue: str, level: int, task_id: str) -> str:
        """'waiting', 'leased' or 'delayed' (where it was removed from), or 'absent'."""
        keys = self._keys("cancel", queue, level)
        check_task_id(task_id)
        return as_str(self._run("cancel", keys, [task_id]))

    def rerun(self, queue: str, level: int, task_id: str, payload: str, score: float, attempts: int = 0) -> bool:
        """Put a task that is done in the engine back to waiting at ``score``, its recorded result
        dropped; False (nothing changed) if it was not done."""
        keys = self._keys("rerun", queue, level)
        return bool(self._run("rerun", keys, self._item_args(task_id, payload, score, attempts, 0)[:4]))

    # -------------------------------------------------------------- results
    def recorded_results(self, queue: str, task_ids: Sequence[str]) -> dict[str, str]:
        """The results recorded by ``complete`` for ``task_ids`` (ids without one are left out)."""
        check_queue(queue)
        found: dict[str, str] = {}
        for start in range(0, len(task_ids), RESULTS_CHUNK):
            chunk = list(task_ids[start : start + RESULTS_CHUNK])
            for task_id, value in zip(chunk, self.redis.hmget(self._hkey(queue, "results"), chunk), strict=True):
                if value is not None:
                    found[task_id] = as_str(value)
        return found

    def done_since(self, queue: str, level: int, task_ids: Sequence[str]) -> dict[str, int]:
        """When (ms) each of ``task_ids`` entered the done set; ids not done are left out."""
        check_queue(queue, level)
        if not task_ids:
            return {}
        scores = self.redis.zmscore(self._qkey(queue, level, "done"), list(task_ids))
        return {t: int(s) for t, s in zip(task_ids, scores, strict=True) if s is not None}

    def results_pending(self, queue: str) -> list[str]:
        """Ids whose recorded result has not been forgotten yet (normally: completes on their way
        to SQL)."""
        check_queue(queue)
        return [as_str(x) for x in self.redis.hkeys(self._hkey(queue, "results"))]

    def forget_results(self, queue: str, task_ids: Sequence[str]) -> int:
        """Drop recorded results (once they are safe in SQL); returns how many there were."""
        check_queue(queue)
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
        keys = self._keys("set_limits", queue)
        args = [int_arg("rpm", rpm, 1, optional=True), int_arg("tpm", tpm, 1, optional=True),
                int_arg("max_in_flight", max_in_flight, 1, optional=True), int_arg("burst_ms", burst_ms, 1)]
        self._run("set_limits", keys, args)

    def pause(self, queue: str, pause_ms: int, throttled: bool = False, now_ms: int | None = None) -> int:
        """No take leases a task of ``queue`` for ``pause_ms`` (a longer pause in force stays);
        ``throttled`` (a 429) also slows its rates down (AIMD). Returns when the pause ends (ms)."""
        keys = self._keys("pause", queue)
        args = [now_arg(now_ms), int_arg("pause_ms", pause_ms, 0), 1 if throttled else 0]
        return int(self._run("pause", keys, args))

    def limit_stats(self, queue: str, now_ms: int | None = None) -> LimitStats:
        """The limits of ``queue`` and how much of each is in use."""
        v = self._run("limit_stats", self._keys("limit_stats", queue), [now_arg(now_ms)])
        return LimitStats(opt_int(v[0]), opt_int(v[1]), opt_int(v[2]), opt_int(v[3]), int(v[4]), int(v[5]),
                          float(v[6]), opt_float(v[7]), opt_float(v[8]), int(v[9]), int(v[10]), int(v[11]))

    # ------------------------------------------------------------ the rest
    def clear(self, queue: str, level: int) -> list[str]:
        """Remove every WAITING or DELAYED task of Q:L (leased ones stay); returns their ids."""
        keys = self._keys("clear", queue, level)
        removed: list[str] = []
        while True:
            ids = [as_str(x) for x in self._run("clear", keys, [CLEAR_CHUNK])]
            removed += ids
            if len(ids) < CLEAR_CHUNK:
                return removed

    def stats(self, queue: str, level: int, now_ms: int | None = None) -> QueueStats:
        """Waiting, running, done, failed, cancelled, the oldest waiting task's age, delayed."""
        return _queue_stats(self._run("stats", self._keys("stats", queue, level), [now_arg(now_ms)]))

    def stats_all(self, now_ms: int | None = None) -> dict[tuple[str, int], QueueStats]:
        """:meth:`stats` of every known (queue, level), in two round trips however many there are:
        the registry, then one pipeline of the stats script per level."""
        known = self.known_queues()
        # Keys built outside the cache: a scrape of many queues must not evict the hot paths' keys.
        calls = [(self._build_keys("stats", queue, level), [now_arg(now_ms)]) for queue, level in known]
        answers = self._run_pipelined("stats", calls) if calls else []
        return {pair: _queue_stats(answer) for pair, answer in zip(known, answers, strict=True)}

    def known_queues(self) -> list[tuple[str, int]]:
        """Every (queue, level) ever enqueued to, sorted."""
        found = []
        for raw in self.redis.smembers(self.queues_key):
            try:
                found.append(parse_full_queue(as_str(raw)))
            except ValueError:
                continue
        return sorted(found)

    def is_known(self, queue: str, level: int, task_id: str) -> str:
        """'waiting', 'leased', 'delayed', 'done' or 'absent'."""
        check_queue(queue, level)
        check_task_id(task_id)
        kinds = ("waiting", "leased", "delayed", "done")
        pipe = self.redis.pipeline(transaction=True)
        for kind in kinds:
            pipe.zscore(self._qkey(queue, level, kind), task_id)
        for kind, score in zip(kinds, pipe.execute(), strict=True):
            if score is not None:
                return kind
        return "absent"

    def lease_holder(self, queue: str, task_id: str) -> str | None:
        """The holder named by the task's current lease: None when not leased, '' when the take
        named nobody."""
        check_task_id(task_id)
        record = self.redis.hget(self._hkey(queue, "leaseinfo"), task_id)
        if record is None:
            return None
        parts = as_str(record).split(" ", 3)
        return parts[3] if len(parts) == 4 else ""

    def attempts_of(self, queue: str, task_id: str) -> int | None:
        """How many times the task was taken (its current lease's attempt); None once it is done."""
        check_task_id(task_id)
        value = self.redis.hget(self._hkey(queue, "attempts"), task_id)
        return None if value is None else int(value)


def _queue_stats(answer: Sequence[Any]) -> QueueStats:
    *counts, due = (int(x) for x in answer)
    return QueueStats(*counts, next_due_in_ms=None if due < 0 else due)
