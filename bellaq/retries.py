"""Answers that ask to try again: a taken task goes back to the engine as delayed (holding no
worker), and the upstream's own signals pause its queue for every taker.

A 408, 409, 429, any 5xx, and no answer at all (reported as 504) are transient: the task is
delayed by the upstream's ``Retry-After`` (else an exponential backoff with jitter on its
attempts) and keeps its place ahead of newer work. It is retried for as long as its deadline
allows: a batch line until the batch's window ends (the expiry then ends it as
``batch_expired``), an online task until its ``timeout`` (when the next try would come too
late, it ends with the last answer). Any other answer is final.

A 429 or 503 also pauses the queue (every level, every host) for the same wait; a 429 with
``rpm``/``tpm`` in force also halves the rates (the engine's AIMD). An answer whose
``x-ratelimit-remaining-requests`` or ``-tokens`` reached 0 pauses the queue until one more
request's worth is back. A queue without its own ``rpm`` / ``tpm`` is paced at the limits its
upstream announces in ``x-ratelimit-limit-requests`` / ``-tokens``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, or_, update

from bellaq import token_cost
from bellaq.clock import now_ms
from bellaq.extensions import db
from bellaq.models import Task
from bellaq.models.tasks import OPEN_STATUSES, TaskStatus
from bellaq.services import services

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
MAX_PAUSE_S = 300.0
PAUSING = (429, 503)
FOLLOW_EVERY_S = 30.0

_followed: dict[tuple[str, str], tuple[tuple[int | None, int | None, int | None], float]] = {}


def is_transient(status_code: int) -> bool:
    """True for an answer worth trying again later."""
    return status_code in (408, 409, 429) or status_code >= 500


def backoff_s(attempts: int) -> float:
    """Wait before retry number ``attempts`` when the upstream named none: exponential, jittered."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Retry:
    """A taken task whose answer was transient: ``result`` is that answer, ``wait_s`` the wait the
    upstream asked for (None: none)."""

    task: dict[str, Any]
    result: dict[str, Any]
    wait_s: float | None = None


def pause_for_signals(queue: str, status_code: int, retry_after: float | None, limit_wait: float | None,
                      attempts: int = 1) -> float | None:
    """Pause ``queue`` as its upstream's answer asks; returns the pause in seconds (None: none)."""
    pause: float | None = None
    throttled = status_code == 429
    if status_code in PAUSING:
        pause = retry_after if retry_after is not None else (limit_wait or backoff_s(attempts))
    elif limit_wait:
        pause = limit_wait
    if not pause:
        return None
    pause = min(pause, MAX_PAUSE_S)
    services().engine.pause(queue, max(1, round(pause * 1000)), throttled=throttled)
    return pause


def follow_announced_limits(queue: str, config: dict[str, Any], rpm: int | None, tpm: int | None) -> None:
    """Where the queue sets no ``rpm`` / ``tpm`` of its own, pace it at the limits its upstream
    announces (``x-ratelimit-limit-*``). Pushed when they change, and again every
    ``FOLLOW_EVERY_S`` (a registration puts the configured limits back in force)."""
    wanted = (config.get("rpm") or rpm, config.get("tpm") or tpm, config.get("max_in_flight"))
    if wanted[:2] == (config.get("rpm"), config.get("tpm")):
        return  # nothing announced beyond what is configured
    engine = services().engine
    now = time.monotonic()
    last = _followed.get((engine.prefix, queue))
    if last is not None and last[0] == wanted and now - last[1] < FOLLOW_EVERY_S:
        return
    _followed[(engine.prefix, queue)] = (wanted, now)
    engine.set_limits(queue, rpm=wanted[0], tpm=wanted[1], max_in_flight=wanted[2])


def retry_later(retries: Sequence[Retry]) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """Delay each task in the engine until its retry is due, and record its attempt in SQL.

    Returns the seconds until the first delayed task is due (None: none was delayed) and the
    tasks whose deadline allows no further try, with the answer they end with (the caller
    completes them). A task nobody holds any more (cancelled, timed out) is left alone.
    """
    now = now_ms()
    ending: dict[str, dict[str, Any]] = {}
    delays: list[tuple[Retry, int]] = []
    for r in retries:
        wait_s = r.wait_s if r.wait_s is not None else backoff_s(int(r.task.get("attempts") or 1))
        delay_ms = max(1, round(wait_s * 1000))
        expire = r.task.get("expire_time")
        if expire and not r.task.get("batch_id") and now + delay_ms >= expire:
            ending[r.task["task_id"]] = r.result
            continue
        if expire and r.task.get("batch_id"):
            # due at the window's end at the latest: the batch's expiry ends it there
            delay_ms = max(1, min(delay_ms, expire - now))
        delays.append((r, delay_ms))
    if delays:
        table = Task.__table__
        db.session.execute(
            update(table).where(table.c.id == bindparam("tid"),
                                or_(*(table.c.status == status for status in OPEN_STATUSES)))
            .values(status=TaskStatus.WAITING, last_status_code=bindparam("code")),
            [{"tid": r.task["task_id"], "code": r.result["status_code"]} for r, _ in delays])
        db.session.commit()
        engine = services().engine
        for r, delay_ms in delays:
            engine.delay(r.task["queue"], r.task["level"], r.task["task_id"], delay_ms,
                         tokens=token_cost.used(r.result))
    return (min(d for _, d in delays) / 1000 if delays else None), ending
