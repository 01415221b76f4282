"""Checks of the queue engine's arguments, and their conversion to and from script values."""

from __future__ import annotations

import math
import re
import time
from typing import Any

QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STRATEGIES = ("fifo", "round_robin", "active_passive", "sequential")
MAX_TAKE_SIZE = 10_000
MAX_TAKE_QUEUES = 1_000
MAX_HOLDER_LEN = 256


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


def check_queue(queue: str, level: int = 0) -> None:
    if not isinstance(queue, str) or not QUEUE_NAME_RE.match(queue):
        raise ValueError(f"bad queue name {queue!r}: use 1 to 64 of A-Z a-z 0-9 _ -")
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"bad level {level!r} for queue {queue!r}: the level is an integer >= 0")


def check_task_id(task_id: str) -> None:
    if not isinstance(task_id, str) or not task_id:
        raise ValueError(f"task id must be a non-empty string, got {task_id!r}")


def int_arg(name: str, value: Any, minimum: int, optional: bool = False) -> str:
    """``value`` as a script argument; '' for None when ``optional``."""
    if value is None and optional:
        return ""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")
    return str(value)


def holder_arg(holder: str | None) -> str:
    if holder is None:
        return ""
    if not isinstance(holder, str) or not 1 <= len(holder) <= MAX_HOLDER_LEN:
        raise ValueError(f"holder must be None or a string of 1 to {MAX_HOLDER_LEN} characters, got {holder!r}")
    return holder


def as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def score_arg(score: float | None) -> str:
    if score is None:
        return str(time.time_ns() // 1000)
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise ValueError(f"score must be a number (microseconds since the epoch), got {score!r}")
    if isinstance(score, int):
        return str(score)
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {score!r}")
    return repr(score)


def now_arg(now_ms: int | None) -> int:
    if now_ms is None:
        return 0
    if isinstance(now_ms, bool) or not isinstance(now_ms, int) or now_ms <= 0:
        raise ValueError(f"now_ms must be a positive integer (ms since the epoch) or None, got {now_ms!r}")
    return now_ms


def opt_int(text: Any) -> int | None:
    return None if as_str(text) == "" else int(as_str(text))


def opt_float(text: Any) -> float | None:
    return None if as_str(text) == "" else float(as_str(text))
