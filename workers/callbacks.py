"""Callback delivery: the finished task object POSTed to ``callback_url``, signed the Standard
Webhooks way with the owner's secret. A failed attempt (no answer, a non-2xx answer, a redirect)
is retried with exponential backoff and jitter, under the same ``webhook-id``.

Where attempts run (ARCHITECTURE.md, "Callbacks"):

- the first attempt of a task that ended inside a Celery worker (the consumer, the reaper) runs in
  that process, on a bounded pool of threads (greenlets under ``-P gevent``): no Celery message;
- the first attempt of a task that ended elsewhere (an HTTP complete or cancel in the web), or
  when the pool's backlog is full, is one ``bellaq.deliver_callbacks`` message per group;
- each later attempt is one ``bellaq.deliver_callback`` message with a countdown.

The outcomes of a group of attempts are written in one UPDATE. Every ended callback task is
tracked in a Redis sorted set until its delivery ends, scored by when its next attempt should
have been recorded; beat's sweep hands overdue entries to Celery, so a worker killed before an
attempt loses no callback.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from celery import signals
from celery._state import get_current_worker_task
from flask import Flask, current_app
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError
from sqlalchemy import case, or_, update
from sqlalchemy.exc import IntegrityError
from urllib3.exceptions import HTTPError

from bellaq import metrics, urlguard
from bellaq.callback_status import DELIVERED, FAILED, RETRYING, CallbackStatus
from bellaq.clock import now_ms
from bellaq.config import Settings
from bellaq.extensions import db
from bellaq.keys import owner_secret
from bellaq.models import Task
from bellaq.models.tasks import END_STATUSES
from bellaq.services import Services, services
from bellaq.webhooks import headers_for, message_id
from workers.celery_app import CONTROL_QUEUE, celery
from workers.pinned_http import PinnedClient

log = logging.getLogger(__name__)

CALLBACK_TIMEOUT_S = 10.0
BACKOFF_MAX_S = 600.0
BACKLOG_PER_SLOT = 4  # first attempts queued per pool slot before they go to Celery instead
SWEEP_BATCH = 500
WRITE_CHUNK = 500  # delivery states per UPDATE
RESEED_HORIZON_MS = 24 * 3600 * 1000
SECRET_CACHE_S = 60.0
SECRET_CACHE_SIZE = 10_000
_HIDDEN = ("callback_status", "callback_attempts", "callback_http_status")  # not part of the message


@dataclass(frozen=True)
class Delivery:
    """One attempt to make: everything it needs, so it runs without SQL."""

    task_id: str
    queue: str
    url: str
    body: bytes
    secret: str
    attempt: int
    rules: urlguard.Policy


@dataclass(frozen=True)
class Outcome:
    delivery: Delivery
    http_status: int | None  # None: no answer (refused by the guard, connection failed, timed out)

    @property
    def delivered(self) -> bool:
        return self.http_status is not None and 200 <= self.http_status < 300


def backoff(attempt: int, base: float = 1.0) -> float:
    """Seconds before attempt ``attempt + 1``: exponential with full jitter, capped."""
    return random.uniform(0, min(BACKOFF_MAX_S, base * 2 ** attempt))


def attempt(delivery: Delivery, client: PinnedClient) -> Outcome:
    """Make one attempt: check the URL (resolving it now), POST to a checked address."""
    try:
        dest = urlguard.resolve(delivery.url, delivery.rules)
    except urlguard.UnsafeURL as err:
        log.warning("callback of %s refused at attempt %d: %s", delivery.task_id, delivery.attempt, err)
        return Outcome(delivery, None)
    headers = headers_for(delivery.secret, delivery.body, msg_id=message_id(delivery.task_id))
    try:
        status = client.post(dest, delivery.body, headers)
    except (HTTPError, OSError) as err:
        log.info("callback of %s attempt %d got no answer: %r", delivery.task_id, delivery.attempt, err)
        return Outcome(delivery, None)
    return Outcome(delivery, status)


# ------------------------------------------------------------------------------- the pool

class _Group:
    """Attempts that ended together; the last one to finish records them all."""

    def __init__(self, size: int, app: Flask) -> None:
        self.left = size
        self.app = app
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()

    def add(self, outcome: Outcome | None) -> list[Outcome] | None:
        with self.lock:
            if outcome is not None:
                self.outcomes.append(outcome)
            self.left -= 1
            return self.outcomes if self.left == 0 else None


class Deliverer:
    """The process's delivery pool: at most ``size`` attempts at once, on threads (greenlets under
    gevent), over one pinned HTTP client whose pools keep ``size`` connections per receiver."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pid = os.getpid()
        self.client = PinnedClient(maxsize=size, timeout=CALLBACK_TIMEOUT_S)
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="bellaq-callback")
        self._lock = threading.Lock()
        self._queued = 0

    def run(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """Make the attempts side by side and wait for all of them."""
        return list(self._pool.map(lambda d: attempt(d, self.client), deliveries))

    def try_submit(self, deliveries: Sequence[Delivery], app: Flask, stale_after: float) -> bool:
        """Make the attempts in the background and record them together; False, with nothing
        submitted, when the backlog is full. An attempt still queued after ``stale_after``
        seconds is skipped (the sweep hands it to Celery), so a backlog causes no duplicates."""
        with self._lock:
            if self._queued + len(deliveries) > self.size * BACKLOG_PER_SLOT:
                return False
            self._queued += len(deliveries)
        group = _Group(len(deliveries), app)
        deadline = time.monotonic() + stale_after
        for delivery in deliveries:
            self._pool.submit(self._background, delivery, group, deadline)
        return True

    def _background(self, delivery: Delivery, group: _Group, deadline: float) -> None:
        outcome = None
        try:
            if time.monotonic() < deadline:
                outcome = attempt(delivery, self.client)
        except Exception:
            log.exception("callback attempt of %s failed unexpectedly", delivery.task_id)
        finally:
            with self._lock:
                self._queued -= 1
        outcomes = group.add(outcome)
        if outcomes:
            try:
                with group.app.app_context():
                    record(outcomes)
            except Exception:
                log.exception("recording %d callback attempts failed; the sweep retries them", len(outcomes))

    def close(self) -> None:
        """Let running attempts finish; queued ones are dropped (the sweep delivers them)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.clear()


_deliverer: Deliverer | None = None
_deliverer_lock = threading.Lock()


def deliverer(settings: Settings) -> Deliverer:
    """This process's pool (a new one after a fork)."""
    global _deliverer
    with _deliverer_lock:
        if _deliverer is None or _deliverer.pid != os.getpid():
            _deliverer = Deliverer(max(1, settings.callback_concurrency))
        return _deliverer


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_deliverer(**_: object) -> None:
    global _deliverer
    with _deliverer_lock:
        pool, _deliverer = _deliverer, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


# ------------------------------------------------------------------------ building, recording

_secrets: dict[tuple[str, str], tuple[float, str]] = {}


def _secret(owner: str, settings: Settings) -> str:
    """The owner's signing secret, cached a minute per process (keyed by database too)."""
    key = (settings.database_url, owner)
    hit = _secrets.get(key)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    try:
        secret = owner_secret(owner)
        db.session.commit()  # ends the read too: the caller's session must not keep an old snapshot
    except IntegrityError:  # another delivery created the owner's secret at the same moment
        db.session.rollback()
        secret = owner_secret(owner)
        db.session.commit()
    if len(_secrets) >= SECRET_CACHE_SIZE:
        _secrets.clear()
    _secrets[key] = (time.monotonic() + SECRET_CACHE_S, secret)
    return secret


def message_body(task: Task) -> bytes:
    """The webhook body: the ended task object, the same bytes on every attempt."""
    shown = task.to_dict()
    for name in _HIDDEN:
        shown.pop(name, None)
    return json.dumps(shown).encode()


def _deliveries(tasks: Iterable[Task], attempt_no: int, settings: Settings) -> list[Delivery]:
    rules = urlguard.policy(settings.callback_allow_private, settings.callback_allowlist)
    return [Delivery(task.id, task.queue, task.callback_url, message_body(task), _secret(task.owner, settings),
                     attempt_no, rules) for task in tasks]


def _pending_key(svc: Services) -> str:
    return svc.key("callbacks", "pending")


def _write_states(values: dict[str, str]) -> None:
    """Store each task's delivery state, ``UPDATE ... SET callback_status = CASE id ... END``: one
    statement for the whole group (an executemany of UPDATEs is a round trip per row on MySQL).
    A final state is never overwritten (a late duplicate attempt changes nothing)."""
    table = Task.__table__
    still_open = or_(table.c.callback_status.is_(None), table.c.callback_status.like(f"{RETRYING}%"))
    ids = sorted(values)
    for start in range(0, len(ids), WRITE_CHUNK):
        chunk = ids[start:start + WRITE_CHUNK]
        value = values[chunk[0]] if len(chunk) == 1 else case({i: values[i] for i in chunk}, value=table.c.id)
        db.session.execute(update(table).where(table.c.id.in_(chunk), still_open).values(callback_status=value))
    db.session.commit()


def record(outcomes: Sequence[Outcome]) -> None:
    """Write the outcomes (one statement), schedule retries, settle the tracking set."""
    if not outcomes:
        return
    svc = services()
    settings = svc.settings
    values: dict[str, str] = {}  # task id -> encoded CallbackStatus
    ended: list[str] = []
    retries: list[tuple[str, int, float]] = []
    states: list[tuple[str, str]] = []  # (queue, state) of each attempt, counted once written
    for outcome in outcomes:
        task_id, number = outcome.delivery.task_id, outcome.delivery.attempt
        if outcome.delivered:
            state = DELIVERED
        elif number >= settings.callback_max_attempts:
            state = FAILED
        else:
            state = RETRYING
            retries.append((task_id, number + 1, backoff(number, settings.callback_backoff_base)))
        if state != RETRYING:
            ended.append(task_id)
        values[task_id] = CallbackStatus(state, number, outcome.http_status).encode()
        states.append((outcome.delivery.queue, state))
    _write_states(values)
    for queue, state in states:
        metrics.callback_outcome(queue, state)
    now = time.time()
    pipe = svc.redis.pipeline(transaction=False)
    if ended:
        pipe.zrem(_pending_key(svc), *ended)
    if retries:
        pipe.zadd(_pending_key(svc), {tid: now + delay + settings.callback_sweep_after for tid, _, delay in retries})
    pipe.execute()
    # Published last: a retry that runs at once finds this attempt in SQL and its entry re-scored.
    for task_id, number, delay in retries:
        deliver.apply_async((task_id, number), queue=CONTROL_QUEUE, countdown=delay)


def _next_attempt(task: Task) -> int | None:
    status = CallbackStatus.parse(task.callback_status)
    return None if status.final else status.attempts + 1


def _due(task_ids: Sequence[str]) -> list[Task]:
    """The ended callback tasks among ``task_ids``."""
    if not task_ids:
        return []
    return list(db.session.execute(
        db.select(Task).where(Task.id.in_(list(task_ids)), Task.status.in_(END_STATUSES),
                              Task.response_mode == "callback", Task.callback_url != "")
    ).scalars())


def _run(tasks: Sequence[Task], attempt_no: int) -> int:
    settings = services().settings
    outcomes = deliverer(settings).run(_deliveries(tasks, attempt_no, settings))
    record(outcomes)
    return sum(o.delivered for o in outcomes)


# ------------------------------------------------------------------------ entry points

def schedule(tasks: list[Task]) -> None:
    """Task-end listener: track the ended callback tasks and make their first attempt, in this
    process when it is a Celery worker running a task, else through one Celery message."""
    due = [task for task in tasks if task.response_mode == "callback" and task.callback_url]
    if not due:
        return
    svc = services()
    settings = svc.settings
    ids = [task.id for task in due]
    try:
        svc.redis.zadd(_pending_key(svc), dict.fromkeys(ids, time.time() + settings.callback_sweep_after))
        if get_current_worker_task() is not None and deliverer(settings).try_submit(
                _deliveries(due, 1, settings), current_app._get_current_object(), settings.callback_sweep_after / 2):
            return
        deliver_many.apply_async((ids,), queue=CONTROL_QUEUE)
    except (RedisError, OperationalError):
        # The tasks have ended either way; their callbacks must not turn that into an error.
        log.exception("could not hand %d callbacks to delivery", len(ids))


@celery.task(name="bellaq.deliver_callbacks", ignore_result=True)
def deliver_many(task_ids: list[str]) -> int:
    """First attempts of tasks that ended together outside a worker (or that the sweep found)."""
    return _run([task for task in _due(task_ids) if _next_attempt(task) == 1], 1)


@celery.task(name="bellaq.deliver_callback", ignore_result=True)
def deliver(task_id: str, attempt_no: int) -> int:
    """Attempt ``attempt_no`` of one delivery, unless it was already made."""
    return _run([task for task in _due([task_id]) if _next_attempt(task) == attempt_no], attempt_no)


@celery.task(name="bellaq.sweep_callbacks", ignore_result=True)
def sweep() -> int:
    """Hand to Celery every tracked delivery whose next attempt is overdue (its worker died, its
    message was lost); run by beat. Returns how many were handed on."""
    svc = services()
    settings = svc.settings
    _reseed_if_lost(svc)
    key = _pending_key(svc)
    ids = svc.redis.zrangebyscore(key, "-inf", time.time(), start=0, num=SWEEP_BATCH)
    if not ids:
        return 0
    next_attempt = {task.id: _next_attempt(task) for task in _due(ids)}
    first = [tid for tid in ids if next_attempt.get(tid) == 1]
    later = [(tid, n) for tid, n in next_attempt.items() if n is not None and n > 1]
    settled = [tid for tid in ids if next_attempt.get(tid) is None]
    pipe = svc.redis.pipeline(transaction=False)
    if settled:
        pipe.zrem(key, *settled)
    if first or later:
        # Claimed for another grace period: the next sweep leaves them to the messages below.
        pipe.zadd(key, dict.fromkeys(first + [tid for tid, _ in later], time.time() + settings.callback_sweep_after),
                  xx=True)
    pipe.execute()
    for start in range(0, len(first), 100):
        deliver_many.apply_async((first[start:start + 100],), queue=CONTROL_QUEUE)
    for task_id, number in later:
        deliver.apply_async((task_id, number), queue=CONTROL_QUEUE)
    return len(first) + len(later)


def _reseed_if_lost(svc: Services) -> None:
    """After Redis lost its data (or on first start), track again from SQL the deliveries of the
    last day that had not ended: a full scan, rare by design."""
    if not svc.redis.set(svc.key("callbacks", "tracked"), "1", nx=True):
        return
    open_delivery = or_(Task.callback_status.is_(None), Task.callback_status.like(f"{RETRYING}%"))
    ids = list(db.session.execute(
        db.select(Task.id).where(Task.status.in_(END_STATUSES), Task.response_mode == "callback",
                                 Task.callback_url != "", Task.completed_time >= now_ms() - RESEED_HORIZON_MS,
                                 open_delivery)
    ).scalars())
    now = time.time()
    for start in range(0, len(ids), 1000):
        svc.redis.zadd(_pending_key(svc), dict.fromkeys(ids[start:start + 1000], now), nx=True)
    if ids:
        log.warning("tracking %d callback deliveries again after the tracking set was lost", len(ids))
