"""The queue engine: waiting sets, leases and counters in Redis, every mutation one Lua script.

Keys (``P`` = prefix, ``Q`` = queue name, ``L`` = level; ``{Q}`` is a hash tag, so every key
of a queue, all levels included, lives in one Redis Cluster slot):

- ``P:{Q}:L:waiting``  zset task id -> enqueue score (microseconds since the epoch)
- ``P:{Q}:L:leased``   zset task id -> lease deadline (ms since the epoch)
- ``P:{Q}:L:done``     zset task id -> completion time (ms); kept 24 h for idempotent completes
- ``P:{Q}:L:counters`` hash ``done``, ``failed``, ``cancelled`` (monotonic)
- ``P:{Q}:tasks`` / ``:attempts`` / ``:scores`` / ``:retries``  hashes keyed by task id
  (payload, times taken, original enqueue score, max retries of the current lease)
- ``P:queues``         set of full queue names ``"Q:L"`` (maintained from Python: other slot)

Key names are always built here and passed in ``KEYS``; scripts never build them from ``ARGV``.
Single-queue operations are therefore always Redis Cluster safe. A multi-queue ``take`` on
Redis Cluster must list queues that share one hash slot (e.g. levels of one queue, ``q:0`` and
``q:1``); on a single Redis server any mix works.

Scripts live in ``bellaq/lua/`` (package data), one per operation, each documenting its KEYS,
ARGV and result at the top. Shared Lua is pulled in by textual inclusion at load time: a line
``-- @include NAME.lua`` is replaced by that file's contents. They use only commands of Redis
6.2 (no functions, no shebang flags) and read the server clock with ``TIME`` unless an explicit
``now_ms`` > 0 is passed (tests do).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
DONE_TTL_MS = 24 * 3600 * 1000
ENQUEUE_CHUNK = 500
CLEAR_CHUNK = 5_000

_SCRIPTS = (
    "enqueue",
    "take_fifo",
    "take_round_robin",
    "take_active_passive",
    "take_sequential",
    "complete",
    "cancel",
    "requeue_expired",
    "clear",
    "stats",
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


@dataclass
class ExpiredLeases:
    """What ``requeue_expired`` did with the leases that ran out."""

    requeued: list[str]  # put back to waiting (attempts kept)
    failed: list[str]  # retries ran out: removed from the engine (counters.failed += 1)


@dataclass
class QueueStats:
    """Counts of one (queue, level)."""

    waiting: int
    running: int
    done: int
    failed: int
    cancelled: int
    oldest_age_ms: int  # age of the oldest waiting task, 0 if none


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


def _check_queue(queue: str, level: int) -> None:
    if not isinstance(queue, str) or not QUEUE_NAME_RE.match(queue):
        raise ValueError(f"bad queue name {queue!r}: use 1 to 64 of A-Z a-z 0-9 _ -")
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"bad level {level!r} for queue {queue!r}: the level is an integer >= 0")


def _check_task_id(task_id: str) -> None:
    if not isinstance(task_id, str) or not task_id:
        raise ValueError(f"task id must be a non-empty string, got {task_id!r}")


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
            name: redis.register_script(load_lua(f"{name}.lua")) for name in _SCRIPTS
        }

    # ----------------------------------------------------------------- keys
    def _qkey(self, queue: str, level: int, kind: str) -> str:
        return f"{self.prefix}:{{{queue}}}:{level}:{kind}"

    def _hkey(self, queue: str, kind: str) -> str:
        return f"{self.prefix}:{{{queue}}}:{kind}"

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args))

    def _register(self, queue: str, level: int, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script and SADD the queue to the registry, in one round trip."""
        script = self._scripts[name]
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(self.queues_key, f"{queue}:{level}")
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return pipe.execute()[1]
            except NoScriptError:
                script.sha = self.redis.script_load(script.script)
        raise RuntimeError(f"could not load Lua script {name}")  # pragma: no cover

    # -------------------------------------------------------------- enqueue
    def _enqueue_keys(self, queue: str, level: int) -> list[str]:
        return [
            self._qkey(queue, level, "waiting"),
            self._qkey(queue, level, "leased"),
            self._qkey(queue, level, "done"),
            self._hkey(queue, "tasks"),
            self._hkey(queue, "attempts"),
            self._hkey(queue, "scores"),
            self._hkey(queue, "retries"),
        ]

    @staticmethod
    def _item_args(task_id: str, payload: str, score: float | None, attempts: int) -> list[Any]:
        _check_task_id(task_id)
        if not isinstance(payload, str):
            raise ValueError(f"payload of task {task_id!r} must be a string (JSON text)")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            raise ValueError(f"attempts of task {task_id!r} must be an integer >= 0, got {attempts!r}")
        return [task_id, payload, _score_arg(score), attempts]

    def enqueue(
        self,
        queue: str,
        level: int,
        task_id: str,
        payload: str,
        score: float | None = None,
        attempts: int = 0,
    ) -> bool:
        """Add a task to waiting; False if the id is already waiting, leased or done."""
        _check_queue(queue, level)
        args = self._item_args(task_id, payload, score, attempts)
        return int(self._register(queue, level, "enqueue", self._enqueue_keys(queue, level), args)) == 1

    def enqueue_many(
        self,
        queue: str,
        level: int,
        items: Sequence[tuple[str, str, float]],
        attempts: Mapping[str, int] | None = None,
    ) -> int:
        """Add ``(task_id, payload, score)`` items in chunks; returns how many were new."""
        _check_queue(queue, level)
        attempts = attempts or {}
        keys = self._enqueue_keys(queue, level)
        added = 0
        registered = False
        for start in range(0, len(items), ENQUEUE_CHUNK):
            args: list[Any] = []
            for task_id, payload, score in items[start : start + ENQUEUE_CHUNK]:
                args.extend(self._item_args(task_id, payload, score, attempts.get(task_id, 0)))
            if registered:
                added += int(self._run("enqueue", keys, args))
            else:
                added += int(self._register(queue, level, "enqueue", keys, args))
                registered = True
        return added

    # ----------------------------------------------------------------- take
    def take(
        self,
        queues: Sequence[tuple[str, int]],
        size: int,
        strategy: str = "fifo",
        process_timeout: float = 300,
        max_retries: int = 3,
        now_ms: int | None = None,
    ) -> list[TakenTask]:
        """Lease up to ``size`` tasks from ``queues`` by ``strategy``, in one Lua call."""
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
            keys += [
                self._qkey(queue, level, "waiting"),
                self._qkey(queue, level, "leased"),
                self._hkey(queue, "tasks"),
                self._hkey(queue, "attempts"),
                self._hkey(queue, "retries"),
            ]
        args = [_now_arg(now_ms), round(process_timeout * 1000), max_retries, size, len(listed)]
        flat = self._run(f"take_{strategy}", keys, args)
        taken = []
        for i in range(0, len(flat), 4):
            queue, level = listed[int(flat[i]) - 1]
            taken.append(TakenTask(queue, level, _s(flat[i + 1]), _s(flat[i + 2]), int(flat[i + 3])))
        return taken

    # ------------------------------------------------------ complete/cancel
    def _task_keys(self, queue: str) -> list[str]:
        return [self._hkey(queue, k) for k in ("tasks", "attempts", "scores", "retries")]

    def complete(
        self, queue: str, level: int, task_id: str, failed: bool = False, now_ms: int | None = None
    ) -> str:
        """'completed' (first complete of a leased task), 'already' (done before) or 'not_leased'."""
        return self.complete_many([(queue, level, task_id, failed)], now_ms)[0]

    def complete_many(self, items: Sequence[tuple[str, int, str, bool]], now_ms: int | None = None) -> list[str]:
        """:meth:`complete` for many ``(queue, level, task_id, failed)`` in one round trip."""
        script = self._scripts["complete"]
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for queue, level, task_id, failed in items:
                _check_queue(queue, level)
                _check_task_id(task_id)
                keys = [self._qkey(queue, level, "leased"), self._qkey(queue, level, "done"),
                        self._qkey(queue, level, "counters"), *self._task_keys(queue)]
                pipe.evalsha(script.sha, len(keys), *keys, task_id, 1 if failed else 0, _now_arg(now_ms))
            try:
                return [_s(out) for out in pipe.execute()]
            except NoScriptError:
                script.sha = self.redis.script_load(script.script)
        raise RuntimeError("could not load Lua script complete")  # pragma: no cover

    def cancel(self, queue: str, level: int, task_id: str) -> str:
        """'waiting' or 'leased' (where it was removed from), or 'absent'."""
        _check_queue(queue, level)
        _check_task_id(task_id)
        keys = [
            self._qkey(queue, level, "waiting"),
            self._qkey(queue, level, "leased"),
            self._qkey(queue, level, "counters"),
            *self._task_keys(queue),
        ]
        return _s(self._run("cancel", keys, [task_id]))

    # --------------------------------------------------------------- leases
    def requeue_expired(
        self, queue: str, level: int, now_ms: int | None = None, limit: int = 1000
    ) -> ExpiredLeases:
        """Reap up to ``limit`` leases with deadline <= now: back to waiting, or failed."""
        _check_queue(queue, level)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
        keys = [
            self._qkey(queue, level, "waiting"),
            self._qkey(queue, level, "leased"),
            self._qkey(queue, level, "done"),
            self._qkey(queue, level, "counters"),
            *self._task_keys(queue),
        ]
        requeued, failed = self._run("requeue_expired", keys, [_now_arg(now_ms), limit, DONE_TTL_MS])
        return ExpiredLeases([_s(x) for x in requeued], [_s(x) for x in failed])

    def requeue_all_expired(self, now_ms: int | None = None) -> dict[tuple[str, int], ExpiredLeases]:
        """``requeue_expired`` over every known queue; only queues where something expired are listed."""
        out: dict[tuple[str, int], ExpiredLeases] = {}
        limit = 1000
        for queue, level in self.known_queues():
            total = ExpiredLeases([], [])
            while True:
                got = self.requeue_expired(queue, level, now_ms=now_ms, limit=limit)
                total.requeued += got.requeued
                total.failed += got.failed
                if len(got.requeued) + len(got.failed) < limit:
                    break
            if total.requeued or total.failed:
                out[(queue, level)] = total
        return out

    # ------------------------------------------------------------ the rest
    def clear(self, queue: str, level: int) -> list[str]:
        """Remove every WAITING task of Q:L (leased ones stay); returns their ids."""
        _check_queue(queue, level)
        keys = [
            self._qkey(queue, level, "waiting"),
            self._qkey(queue, level, "counters"),
            *self._task_keys(queue),
        ]
        removed: list[str] = []
        while True:
            ids = [_s(x) for x in self._run("clear", keys, [CLEAR_CHUNK])]
            removed += ids
            if len(ids) < CLEAR_CHUNK:
                return removed

    def stats(self, queue: str, level: int, now_ms: int | None = None) -> QueueStats:
        """Waiting, running, done, failed, cancelled and the oldest waiting task's age."""
        _check_queue(queue, level)
        keys = [
            self._qkey(queue, level, "waiting"),
            self._qkey(queue, level, "leased"),
            self._qkey(queue, level, "counters"),
        ]
        return QueueStats(*(int(x) for x in self._run("stats", keys, [_now_arg(now_ms)])))

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
        """'waiting', 'leased', 'done' or 'absent'."""
        _check_queue(queue, level)
        _check_task_id(task_id)
        pipe = self.redis.pipeline(transaction=True)
        for kind in ("waiting", "leased", "done"):
            pipe.zscore(self._qkey(queue, level, kind), task_id)
        for kind, score in zip(("waiting", "leased", "done"), pipe.execute(), strict=True):
            if score is not None:
                return kind
        return "absent"
