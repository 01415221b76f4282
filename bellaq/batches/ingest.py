"""Ingest: validate a batch's input file, then make every line a task, chunk by chunk.

Two passes over the file as a stream: validation (every whole-file rule, with line numbers:
:mod:`.validation`), then inserts: one task row per line (ids in line order), each chunk
committed and then enqueued at level 1, so the batch is ``in_progress`` as soon as its first
chunk can run.

It never jams. Whatever the file holds, the batch leaves ``validating`` either running or
``failed`` with errors that name the line. An unexpected error fails it the same way, naming the
line being read; only transient faults (Redis, SQL or the broker unreachable) are retried, a few
times with backoff, and after that left to the sweep. A retry resumes after the rows written.

One ingester at a time: it holds the batch's lease, a Redis lock of ``LEASE_S`` seconds renewed
every second while it reads, so the sweep resumes a dead ingester's batch within seconds. A cancel
or the expiry stops a running validation within a second.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import redis.exceptions
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from sqlalchemy import func, insert, update
from sqlalchemy.exc import InterfaceError, SQLAlchemyError
from sqlalchemy.exc import OperationalError as SQLError
from sqlalchemy.orm.attributes import set_committed_value

from bellaq import files, metrics, open_tasks
from bellaq.batches import progress
from bellaq.batches.ending import end_open_tasks, ended_result
from bellaq.batches.ids import line_index, task_id_for
from bellaq.batches.service import load
from bellaq.batches.validation import read_lines, request_of, validate_input
from bellaq.clock import now_ms, now_s
from bellaq.extensions import db
from bellaq.models import Batch, File, Queue, Task
from bellaq.models.batches import FINAL_STAMPS, BatchStatus
from bellaq.models.tasks import TaskStatus
from bellaq.queues import resolve_queue
from bellaq.services import services
from bellaq.tasks import queue_cost, task_payload

log = logging.getLogger(__name__)

BATCH_LEVEL = 1
PAGE = 1000
FIRST_CHUNK = 250  # the first chunk is small so work starts soon; each next one doubles up to the chunk size
LEASE_S = 10
LOOK_S = 1.0  # how often a reading ingester renews its lease and looks for a cancel
RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)  # about 18 s, then the sweep
# Faults that pass: a dependency is unreachable for a while. Anything else is final for the batch.
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, SQLError, InterfaceError, BrokerError,
             ConnectionError, TimeoutError)
# MySQL errors that look like a lost connection but come back every time: a statement larger than
# max_allowed_packet.
PERMANENT_SQL_ERRNOS = frozenset({1153})


class IngestBusy(Exception):
    """Another ingester holds the batch's lease."""


class _Stopped(Exception):
    """A cancel or the expiry began while the file was being validated."""


def lease_key(batch_id: str) -> str:
    return services().key("batch", batch_id, "ingest")


class Lease:
    """The right to ingest one batch: a Redis lock of ``LEASE_S`` seconds, renewed while held."""

    def __init__(self, batch_id: str) -> None:
        self.lock = services().redis.lock(lease_key(batch_id), timeout=LEASE_S, blocking=False, thread_local=False)

    def hold(self) -> bool:
        """Take the lease, or keep it after a fault; False when another ingester holds it."""
        if self.lock.local.token is not None:
            try:
                return bool(self.lock.reacquire())
            except LockNotOwnedError:  # it ran out meanwhile
                self.lock.local.token = None
        return bool(self.lock.acquire(blocking=False))

    def renew(self) -> None:
        try:
            self.lock.reacquire()
        except LockNotOwnedError:
            raise IngestBusy("the lease ran out and another ingester took it") from None

    def release(self) -> None:
        try:
            self.lock.release()
        except (LockError, RedisError):
            pass  # ran out already, or Redis is down: it runs out by itself


class _Reader:
    """Called with the number of each line read: remembers it (a failure names it), renews the
    lease, and stops a validation that a cancel or the expiry made pointless."""

    def __init__(self, batch_id: str, lease: Lease) -> None:
        self.batch_id = batch_id
        self.lease = lease
        self.line: int | None = None
        self.stop_on_ending = True
        self.looked = time.monotonic()

    def __call__(self, number: int) -> None:
        self.line = number
        now = time.monotonic()
        if now - self.looked >= LOOK_S:
            self.looked = now
            self.lease.renew()
            if self.stop_on_ending and _ending_of(self.batch_id):
                raise _Stopped


def run(batch_id: str, sleep: Callable[[float], Any] = time.sleep) -> str:
    """Validate and ingest a batch, retrying transient faults. Returns what happened: ``ingested``
    (every line is a task), ``failed`` / ``cancelled`` / ``expired`` (it ended before any line
    became a task), ``skipped`` (nothing to do), ``busy`` (another ingester holds it) or
    ``deferred`` (the faults outlasted the retries: the sweep tries again)."""
    lease = Lease(batch_id)
    try:
        for attempt in range(len(RETRY_DELAYS_S) + 1):
            try:
                batch = load(batch_id)
                if batch is None or batch.final_status is not None or batch.ingested_at is not None:
                    return "skipped"
                if not lease.hold():
                    return "busy"
                return _guarded(batch_id, _Reader(batch_id, lease))
            except IngestBusy:
                _reset_session()
                return "busy"
            except TRANSIENT as err:
                _reset_session()
                if attempt == len(RETRY_DELAYS_S):
                    log.warning("batch %s: ingest deferred to the sweep after %d attempts (%s)", batch_id,
                                attempt + 1, err)
                    break
                log.info("batch %s: ingest hit a transient fault (%s); retrying", batch_id, err)
                sleep(RETRY_DELAYS_S[attempt])
        return "deferred"
    finally:
        lease.release()


def _guarded(batch_id: str, reader: _Reader) -> str:
    """Ingest; whatever goes wrong, except a transient fault, ends the batch with a reason."""
    try:
        return _ingest(batch_id, reader)
    except IngestBusy:
        raise
    except _Stopped:
        _reset_session()
        return _close(batch_id, None)
    except FileNotFoundError:
        _reset_session()
        where = f"while the batch read it (at line {reader.line})" if reader.line else "before the batch read it"
        return _close(batch_id, _error(reader.line, "file_not_found", f"The input file was deleted {where}.",
                                       "input_file_id"))
    except Exception as err:
        if transient(err):
            raise
        log.exception("batch %s: ingest failed at line %s", batch_id, reader.line)
        _reset_session()
        reader.lease.renew()  # a takeover is not a failure of the batch
        if reader.line is None:
            message = "The batch could not be set up: an unexpected error stopped it. Tell the operator."
        else:
            message = (f"The batch stopped at line {reader.line}: an unexpected error occurred while reading it. "
                       "Check that line; if it looks right, tell the operator.")
        return _close(batch_id, _error(reader.line, "ingest_error", message))


def transient(err: BaseException) -> bool:
    """Whether ``err`` is a dependency being away for a while (worth trying again)."""
    errno = getattr(err, "orig", None) and getattr(err.orig, "args", (None,))[0]  # type: ignore[attr-defined]
    return isinstance(err, TRANSIENT) and errno not in PERMANENT_SQL_ERRNOS


def _reset_session() -> None:
    """Drop the session's transaction after a fault; its connection may be dead (then the pool
    replaces it, and saying so again here changes nothing)."""
    for step in (db.session.rollback, db.session.remove):
        try:
            step()
        except SQLAlchemyError:
            pass


def _error(line: int | None, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _ending_of(batch_id: str) -> str | None:
    """The batch's ending as committed now: read outside the session, whose transaction may hold
    an older snapshot (MySQL's repeatable read)."""
    with db.engine.connect() as conn:
        return conn.execute(db.select(Batch.ending).where(Batch.id == batch_id)).scalar_one_or_none()


def _ingest(batch_id: str, reader: _Reader) -> str:
    settings = services().settings
    batch = load(batch_id)
    if batch is None or batch.final_status is not None or batch.ingested_at is not None:
        return "skipped"
    if batch.ending and batch.total == 0:
        raise _Stopped
    source = db.session.get(File, batch.input_file_id)
    if source is None or source.deleted_at is not None:
        raise FileNotFoundError(batch.input_file_id)
    max_line = settings.max_json_bytes
    if batch.total == 0:
        with files.open_file(source) as stream:
            check = validate_input(stream, batch.endpoint, settings.batch_max_lines, settings.batch_max_bytes,
                                   max_line, reader)
        if not check.ok:
            return end_unrun(batch_id, check.errors_object())
        reader.line = None
        queue = batch.queue or resolve_queue(batch.endpoint, check.model, None).name
        db.session.execute(update(Batch).where(Batch.id == batch.id).values(
            total=check.count, queue=queue, model=check.model if isinstance(check.model, str) else None))
        db.session.commit()
        batch = load(batch_id)
        assert batch is not None
    # From here a cancel ends the batch row by row: every line must reach the result files.
    reader.stop_on_ending = False
    _insert_tasks(batch, source, max_line, reader)
    progress.set_total(batch.id, batch.total)
    db.session.execute(update(Batch).where(Batch.id == batch.id).values(ingested_at=now_ms()))
    db.session.commit()
    if _ending_of(batch.id):
        end_open_tasks(batch.id)
    return "ingested"


def end_unrun(batch_id: str, errors: dict[str, Any] | None) -> str:
    """End a batch before any line became a task: ``failed`` with ``errors``, or the cancel or
    expiry that stopped it (which wins its status). Returns the status."""
    batch = load(batch_id)
    ending = batch.ending if batch is not None else None
    status = BatchStatus(ending) if ending else BatchStatus.FAILED
    values: dict[str, Any] = {"status": status, "errors": json.dumps(errors) if errors else None,
                              "final_status": status, "claimed_at": now_ms(), "total": 0, "completed": 0,
                              "failed": 0, FINAL_STAMPS[status]: now_s()}
    db.session.execute(update(Batch).where(Batch.id == batch_id, Batch.final_status.is_(None)).values(**values))
    db.session.commit()
    progress.finished(batch_id)
    return str(status)


def _close(batch_id: str, error: dict[str, Any] | None) -> str:
    """End an ingest that cannot go on (a cancel or the expiry during validation, or a failure)."""
    errors = {"object": "list", "data": [error]} if error else None
    written = db.session.execute(db.select(func.count()).where(Task.batch_id == batch_id)).scalar_one()
    if not written:
        return end_unrun(batch_id, errors)
    # Some lines are tasks already, and may have run: the batch ends through the usual ending,
    # so their results reach the files, and it counts what became a task.
    db.session.execute(update(Batch).where(Batch.id == batch_id, Batch.final_status.is_(None)).values(
        ending=func.coalesce(Batch.ending, BatchStatus.FAILED.value), errors=json.dumps(errors) if errors else None,
        total=written, ingested_at=now_ms()))
    db.session.commit()
    progress.set_total(batch_id, written)
    end_open_tasks(batch_id)
    return "ingested"


def _insert_tasks(batch: Batch, source: File, max_line: int, reader: _Reader) -> None:
    """The insert pass: one task row per request, in chunks, each chunk enqueued once committed."""
    svc = services()
    queue = db.session.get(Queue, batch.queue)
    builtin = bool(queue and queue.builtin)
    chunk = max(1, svc.settings.batch_chunk_size)
    done = db.session.execute(db.select(func.count()).where(Task.batch_id == batch.id)).scalar_one()
    if done:
        _reenqueue_waiting(batch, builtin)
    start = now_ms()
    base_score = time.time_ns() // 1000
    common = {"owner": batch.owner, "batch_id": batch.id, "endpoint": batch.endpoint, "queue": batch.queue,
              "level": BATCH_LEVEL, "status": TaskStatus.WAITING, "response_mode": "callback", "callback_url": "",
              "timeout": svc.settings.default_task_timeout, "instance_id": "", "start_time": start,
              "expire_time": (batch.expires_at or now_s()) * 1000, "attempts": 0, "result": None,
              "completed_time": None}
    pending: list[dict[str, Any]] = []
    bodies: list[Any] = []  # the parsed bodies of ``pending``: token estimates reuse them
    size = min(chunk, FIRST_CHUNK)
    index = 0
    with files.open_file(source) as stream:
        for number, raw, _size in read_lines(stream, max_line):
            reader(number)
            if raw is None or not raw.strip():
                continue
            if index >= done:
                obj, problem = request_of(raw, number)
                if obj is None:
                    raise ValueError(f"line {number} no longer reads as it did when validated: {problem}")
                # Not ASCII-escaped: stored no larger than the line it came from, so a row always
                # fits in a statement that MySQL accepts (max_allowed_packet).
                body = json.dumps(obj["body"], separators=(",", ":"), ensure_ascii=False)
                pending.append({**common, "id": task_id_for(batch.id, index), "custom_id": obj["custom_id"],
                                "data": body})
                bodies.append(obj["body"])
            index += 1
            if len(pending) >= size:
                _flush(batch, pending, bodies, base_score, builtin, queue)
                pending, bodies = [], []
                size = min(chunk, size * 2)
    if pending:
        _flush(batch, pending, bodies, base_score, builtin, queue)


def _flush(batch: Batch, rows: list[dict[str, Any]], bodies: list[Any], base_score: int, builtin: bool,
           queue: Queue | None) -> None:
    """Write one chunk of task rows, then make them takeable (or, once the batch ends, end them)."""
    svc = services()
    ending = _ending_of(batch.id)
    if ending:
        status, result = ended_result(ending, batch)
        now = now_ms()
        for row in rows:
            row.update(status=status, completed_time=now, result=json.dumps(result) if result else None)
    db.session.execute(insert(Task.__table__), rows)  # Core: no ORM object per row
    db.session.commit()
    if ending:
        progress.add_ended({batch.id: len(rows)})
        metrics.batch_lines_processed(batch.queue, status, len(rows))
        return
    open_tasks.added(batch.owner, len(rows))
    first_index = line_index(rows[0]["id"])
    # task_payload only reads attributes: a plain namespace per row is enough (and much cheaper).
    items = [(row["id"], task_payload(SimpleNamespace(**row)), base_score + first_index + i)  # type: ignore[arg-type]
             for i, row in enumerate(rows)]
    costs = {row["id"]: queue_cost(queue, batch.endpoint, body) for row, body in zip(rows, bodies, strict=True)}
    added = svc.engine.enqueue_many(batch.queue, BATCH_LEVEL, items, costs=costs)
    metrics.tasks_put(batch.queue, BATCH_LEVEL, added)
    if builtin:
        svc.work_ready(batch.queue, BATCH_LEVEL, len(items))
    _mark_running(batch)


def _mark_running(batch: Batch) -> None:
    """``in_progress`` once some of the batch's tasks can run."""
    if batch.status == BatchStatus.VALIDATING:
        batch_id, at = batch.id, now_s()
        db.session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == BatchStatus.VALIDATING)
                           .values(status=BatchStatus.IN_PROGRESS, in_progress_at=at))
        db.session.commit()
        # Not ``batch.status = ...``: the next flush would write the row again and hold the write
        # lock (SQLite: the whole database) across the Redis calls until the next commit.
        set_committed_value(batch, "status", BatchStatus.IN_PROGRESS)
        set_committed_value(batch, "in_progress_at", at)
        progress.changed(batch_id)


def _reenqueue_waiting(batch: Batch, builtin: bool) -> None:
    """After an interrupted ingest: the engine may not have seen the last chunk written (it skips
    ids it knows, so nothing runs twice)."""
    svc = services()
    last = ""
    while True:
        rows = db.session.execute(
            db.select(Task).where(Task.batch_id == batch.id, Task.status == TaskStatus.WAITING, Task.id > last)
            .order_by(Task.id).limit(PAGE)).scalars().all()
        if not rows:
            return
        queue = db.session.get(Queue, batch.queue)
        costs = {t.id: queue_cost(queue, t.endpoint, json.loads(t.data)) for t in rows}
        added = svc.engine.enqueue_many(batch.queue, BATCH_LEVEL,
                                        [(t.id, task_payload(t), t.start_time * 1000) for t in rows], costs=costs)
        metrics.tasks_put(batch.queue, BATCH_LEVEL, added)
        if added and builtin:
            svc.work_ready(batch.queue, BATCH_LEVEL, added)
        last = rows[-1].id
        db.session.expunge_all()
        _mark_running(batch)


def should_restart(batch_id: str, every_s: int = 30) -> bool:
    """For the sweep: True when no ingester holds the batch and none was asked for lately."""
    redis = services().redis
    if redis.exists(lease_key(batch_id)):
        return False
    return bool(redis.set(services().key("batch", batch_id, "asked"), "1", nx=True, ex=every_s))
