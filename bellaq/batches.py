"""The batch service (OpenAI Batch API): create, read, cancel, validate and ingest, end, finalise.

How a batch moves (the Celery side in ``workers/batches.py`` calls the functions here):

1. :func:`create` records it as ``validating`` and answers at once.
2. :func:`ingest` reads the input file twice as a stream: a validation pass (every whole-file
   rule, with line numbers) and an insert pass that writes one task row per line (ids
   ``batch_req_<batch hex><line index base 36>``, so a batch's tasks are one primary-key range)
   and enqueues them at level 1 in chunks. ``in_progress`` once the first chunk is takeable.
3. Tasks end through :func:`bellaq.tasks.finish` (built-in workers, external workers, reaping);
   a Redis counter per batch (see ``workers.batches.on_tasks_ended``) notices the last one.
4. A cancel or the expiry of the window sets ``ending`` once, and :func:`end_open_tasks` ends the
   unfinished tasks (``cancelled`` / ``timeout`` with code ``batch_expired``).
5. :func:`claim_finalization` claims the batch in SQL (once), then a chord of
   :func:`write_shard` tasks and :func:`join_shards` writes the output and error files.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, BinaryIO

from redis.exceptions import RedisError
from sqlalchemy import func, insert, update

from bellaq import files
from bellaq.clock import now_ms, now_s
from bellaq.errors import BadRequest, NotFound
from bellaq.extensions import db
from bellaq.keys import Principal
from bellaq.models import Batch, File, Queue, Task
from bellaq.models.batches import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINAL_STATUSES,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
)
from bellaq.models.files import BATCH_OUTPUT
from bellaq.models.tasks import CANCELLED as TASK_CANCELLED
from bellaq.models.tasks import FAILED as TASK_FAILED
from bellaq.models.tasks import OPEN_STATUSES, SUCCEEDED, TIMEOUT, WAITING
from bellaq.queues import check_endpoint, resolve_queue
from bellaq.services import services
from bellaq.tasks import error_result, finish, task_payload
from bellaq.validation import field as body_field

OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses")
BATCH_LEVEL = 1
MAX_ERRORS = 100  # entries of errors.data; one more says how many were left out
MAX_CUSTOM_ID = 512
MAX_METADATA = 16
WINDOW_RE = re.compile(r"^([1-9][0-9]{0,6})([mhd])$")
WINDOW_UNITS = {"m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 30 * 86400
SHARD_LINES = 5000
MAX_SHARDS = 32
PAGE = 1000
ID_DIGITS = 6  # base 36: up to 2,176,782,335 lines
PROGRESS_TTL_S = 40 * 86400
INGEST_LOCK_S = 60
STALE_ENDING_MS = 60_000
STALE_CLAIM_MS = 10 * 60_000
FAILED_TASK_STATUSES = (TASK_FAILED, TIMEOUT, TASK_CANCELLED)
# Codes of results bellaq writes itself when no upstream answered (error file: "response": null).
NO_ANSWER_CODES = frozenset({"upstream_unavailable", "lease_expired", "timeout", "no_upstream", "worker_error",
                             "worker_lost", "batch_expired", "batch_cancelled"})
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


# ------------------------------------------------------------------------------------------- ids

def new_batch_id() -> str:
    return files.time_ordered_id("batch_")


def _b36(n: int) -> str:
    out = ""
    for _ in range(ID_DIGITS):
        n, r = divmod(n, 36)
        out = _B36[r] + out
    return out


def task_id_for(batch_id: str, index: int) -> str:
    """The task id of the ``index``-th request (0-based) of a batch: ids sort in line order."""
    return f"batch_req_{batch_id.removeprefix('batch_')}{_b36(index)}"


def progress_key(batch_id: str) -> str:
    """The Redis hash of a running batch: ``total`` (set when ingested) and ``ended`` tasks."""
    return services().key("batch", batch_id)


def _ingest_lock_key(batch_id: str) -> str:
    return services().key("batch", batch_id, "ingest")


def _shard_key(batch_id: str, kind: str, index: int) -> str:
    return f"batches/{batch_id}/{kind}.{index:04d}"


# ---------------------------------------------------------------------------------------- create

def parse_window(window: str) -> int:
    """Seconds of a completion window: ``24h``, ``<n>m``, ``<n>h`` or ``<n>d`` (at most 30 days)."""
    match = WINDOW_RE.match(window)
    if match:
        seconds = int(match.group(1)) * WINDOW_UNITS[match.group(2)]
        if seconds <= MAX_WINDOW_S:
            return seconds
    raise BadRequest(f"completion_window '{window[:32]}' is not valid; use 24h, or <n>m, <n>h, <n>d "
                     "(up to 30 days).", param="completion_window", code="invalid_completion_window")


def check_metadata(metadata: dict | None) -> dict | None:
    """OpenAI metadata: up to 16 pairs, keys up to 64 and values up to 512 characters, all strings."""
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA:
        raise BadRequest(f"metadata may hold at most {MAX_METADATA} pairs; got {len(metadata)}.", param="metadata",
                         code="invalid_metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise BadRequest(f"metadata['{key[:64]}'] is not valid: keys are strings of up to 64 characters, values "
                             "strings of up to 512.", param="metadata", code="invalid_metadata")
    return metadata


def create(principal: Principal, body: dict[str, Any], queue_header: str | None) -> Batch:
    """Check a create request and record the batch as ``validating`` (ingest runs later)."""
    input_file_id = body_field(body, "input_file_id", str)
    endpoint = check_endpoint(body_field(body, "endpoint", str))
    window = body_field(body, "completion_window", str)
    seconds = parse_window(window)
    metadata = check_metadata(body_field(body, "metadata", dict, None))
    source = files.find(principal.owner, input_file_id)
    if source is None:
        raise NotFound(f"No file with id '{input_file_id}'.", param="input_file_id", code="file_not_found")
    if source.purpose != "batch":
        raise BadRequest(f"File '{input_file_id}' has purpose '{source.purpose}'; a batch reads a file uploaded "
                         "with purpose 'batch'.", param="input_file_id", code="invalid_file")
    queue_name = ""
    if queue_header is not None:
        queue_name = resolve_queue(endpoint, None, queue_header.strip(), param="X-BELLA-QUEUE-NAME").name
    elif endpoint not in OPENAI_ENDPOINTS and not db.session.execute(
            db.select(Queue.name).where(Queue.endpoint == endpoint).limit(1)).first():
        raise BadRequest(f"Endpoint {endpoint} is not served here: use one of {', '.join(OPENAI_ENDPOINTS)} or the "
                         "endpoint of a registered queue.", param="endpoint", code="invalid_endpoint")
    now = now_s()
    batch = Batch(
        id=new_batch_id(), owner=principal.owner, endpoint=endpoint, input_file_id=input_file_id,
        completion_window=window, status=VALIDATING, queue=queue_name,
        metadata_json=json.dumps(metadata) if metadata is not None else None,
        total=0, completed=0, failed=0, created_at=now, expires_at=now + seconds,
    )
    db.session.add(batch)
    db.session.commit()
    return batch


def discard(batch_id: str) -> None:
    """Remove a batch that was never handed on (its ingest could not be queued)."""
    db.session.execute(db.delete(Batch).where(Batch.id == batch_id))
    db.session.commit()


# ------------------------------------------------------------------------------------------ read

def owned(principal: Principal, batch_id: str) -> Batch:
    """The caller's batch; another owner's batch is simply not found."""
    batch = db.session.get(Batch, batch_id)
    if batch is None or batch.owner != principal.owner:
        raise NotFound(f"No batch with id '{batch_id}'.", param="batch_id", code="batch_not_found")
    return batch


def live_counts(batch: Batch) -> dict[str, int]:
    """``request_counts`` of a batch: stored once final, counted from its tasks before that."""
    if batch.status in FINAL_STATUSES:
        return {"total": batch.total, "completed": batch.completed, "failed": batch.failed}
    rows = db.session.execute(
        db.select(Task.status, func.count()).where(Task.batch_id == batch.id).group_by(Task.status)
    ).all()
    by_status = {status: n for status, n in rows}
    return {
        "total": batch.total,
        "completed": by_status.get(SUCCEEDED, 0),
        "failed": sum(by_status.get(s, 0) for s in FAILED_TASK_STATUSES),
    }


def public(batch: Batch) -> dict[str, Any]:
    """The Batch object as the API shows it, with live request counts."""
    return batch.to_dict(live_counts(batch))


def list_batches(principal: Principal, limit: int, after: str | None) -> tuple[list[Batch], bool]:
    """A page of the caller's batches, newest first, and whether more follow."""
    query = db.select(Batch).where(Batch.owner == principal.owner)
    if after:
        query = query.where(Batch.id < after)
    rows = list(db.session.execute(query.order_by(Batch.id.desc()).limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


# ---------------------------------------------------------------------------------------- cancel

def cancel(principal: Principal, batch_id: str) -> Batch:
    """Mark the batch ``cancelling`` (once); its unfinished tasks are ended by :func:`end_open_tasks`.

    Cancelling a ``cancelling`` batch changes nothing; a finished or finalising batch is a 400.
    """
    batch = owned(principal, batch_id)
    now = now_s()
    claimed = db.session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.ending.is_(None), Batch.final_status.is_(None),
               Batch.status.in_((VALIDATING, IN_PROGRESS)))
        .values(status=CANCELLING, cancelling_at=now, ending=CANCELLED)
    ).rowcount
    db.session.commit()
    db.session.refresh(batch)
    if not claimed and batch.status != CANCELLING:
        state = "is being finalised" if batch.status not in FINAL_STATUSES else f"already ended as {batch.status}"
        if batch.ending == EXPIRED and batch.status not in FINAL_STATUSES:
            state = "is expiring"
        raise BadRequest(f"Batch '{batch.id}' {state}; only a validating or in_progress batch can be cancelled.",
                         param="batch_id", code="batch_not_cancellable")
    return batch


# ------------------------------------------------------------------------------------ validation

@dataclass
class Validation:
    """What the validation pass found: the request count, the model, and the errors."""

    count: int = 0
    model: Any = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    more_errors: int = 0

    def add(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})
        else:
            self.more_errors += 1

    @property
    def ok(self) -> bool:
        return not self.errors

    def errors_object(self) -> dict[str, Any]:
        data = list(self.errors)
        if self.more_errors:
            data.append({"code": "too_many_errors", "param": None, "line": None,
                         "message": f"{self.more_errors} more errors are not listed; fix the ones above first."})
        return {"object": "list", "data": data}


def _lines(stream: BinaryIO, max_line: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(1-based line number, line or None when longer than ``max_line``, bytes read) of a stream."""
    number = 0
    while True:
        raw = stream.readline(max_line + 1)
        if not raw:
            return
        number += 1
        size = len(raw)
        if len(raw) > max_line and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                raw = stream.readline(1 << 20)
                size += len(raw)
            yield number, None, size
            continue
        yield number, raw, size


def _parse(raw: bytes, number: int) -> tuple[dict | None, tuple[str, str, str | None] | None]:
    """A request line as an object, or (code, message, param) of what is wrong with it."""
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        obj = json.loads(raw)
    except ValueError as err:
        return None, ("invalid_json_line", f"Line {number} is not valid JSON ({err}); each line must be one JSON "
                      "object.", None)
    if not isinstance(obj, dict):
        return None, ("invalid_json_line", f"Line {number} is not a JSON object.", None)
    return obj, None


def validate_input(stream: BinaryIO, endpoint: str, max_lines: int, max_bytes: int,
                   max_line_bytes: int, on_progress: Callable[[], Any] | None = None) -> Validation:
    """Check a whole input file as a stream, without keeping it: every rule of SPEC 2 with its line.

    Rules: JSONL (one object a line, blank lines ignored), ``custom_id`` present, unique and at
    most 512 characters, ``method`` POST, ``url`` equal to ``endpoint``, ``body`` an object, one
    ``model`` for all lines, at most ``max_lines`` requests and ``max_bytes`` bytes.
    """
    result = Validation()
    seen: dict[bytes, int] = {}
    read = 0
    model_line = 0
    for number, raw, size in _lines(stream, max_line_bytes):
        read += size
        if read > max_bytes:
            result.add(number, "file_too_large", f"The file is larger than the limit of {max_bytes} bytes "
                       f"(passed at line {number}).")
            break
        if raw is None:
            result.add(number, "line_too_large", f"Line {number} is longer than {max_line_bytes} bytes.")
            continue
        if not raw.strip():
            continue
        result.count += 1
        if result.count > max_lines:
            result.add(number, "too_many_lines", f"The file has more than {max_lines} requests; split it into "
                       "several batches.")
            break
        if on_progress is not None and result.count % 5000 == 0:
            on_progress()
        obj, problem = _parse(raw, number)
        if problem is None:
            problem = _check_request(obj, number, endpoint, seen)  # type: ignore[arg-type]
        if problem is None:
            model = obj["body"].get("model")  # type: ignore[index]
            if not model_line:
                result.model, model_line = model, number
            elif model != result.model:
                problem = ("mismatched_model", f"Line {number} uses model {json.dumps(model)} but line {model_line} "
                           f"uses {json.dumps(result.model)}; every request of a batch must use one model.",
                           "body.model")
        if problem is not None:
            result.add(number, *problem)
    if result.count == 0 and result.ok:
        result.add(None, "empty_file", "The input file has no requests; send one JSON request per line.")
    return result


def _check_request(obj: dict, number: int, endpoint: str, seen: dict[bytes, int]) -> tuple[str, str, str] | None:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_custom_id", f"Line {number} has no custom_id (a non-empty string).", "custom_id"
    if len(custom_id) > MAX_CUSTOM_ID:
        return "invalid_custom_id", f"The custom_id on line {number} is longer than {MAX_CUSTOM_ID} characters.", \
            "custom_id"
    digest = hashlib.blake2b(custom_id.encode(), digest_size=16).digest()
    first = seen.setdefault(digest, number)
    if first != number:
        return "duplicate_custom_id", f"The custom_id '{custom_id[:80]}' on line {number} was already used on line " \
            f"{first}; every custom_id must be unique.", "custom_id"
    if obj.get("method") != "POST":
        return "invalid_method", f"Line {number} has method {json.dumps(obj.get('method'))}; only POST is " \
            "supported.", "method"
    if obj.get("url") != endpoint:
        return "invalid_url", f"Line {number} has url {json.dumps(obj.get('url'))[:300]} but the batch's endpoint " \
            f"is {endpoint}; every line's url must equal it.", "url"
    if not isinstance(obj.get("body"), dict):
        return "invalid_body", f"Line {number} has no body object (the request for {endpoint}).", "body"
    return None


# ---------------------------------------------------------------------------------------- ingest

def _fresh(batch_id: str) -> Batch | None:
    return db.session.execute(
        db.select(Batch).where(Batch.id == batch_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def _ending_of(batch_id: str) -> str | None:
    return db.session.execute(db.select(Batch.ending).where(Batch.id == batch_id)).scalar_one_or_none()


def _ended_result(ending: str, batch: Batch) -> tuple[str, dict | None]:
    """The end status and result of a task the batch's cancel or expiry ends."""
    if ending == EXPIRED:
        return TIMEOUT, error_result(
            408, f"The batch's completion window of {batch.completion_window} ended before this request finished.",
            "batch_expired", "timeout")
    return TASK_CANCELLED, None


def _fail_validation(batch: Batch, errors: dict[str, Any]) -> None:
    now = now_s()
    status = batch.ending or FAILED  # a cancel (or expiry) asked for during validation still wins its state
    values: dict[str, Any] = {"status": status, "errors": json.dumps(errors), "final_status": status,
                              "claimed_at": now_ms(), "total": 0, "completed": 0, "failed": 0}
    values[{FAILED: "failed_at", CANCELLED: "cancelled_at", EXPIRED: "expired_at"}[status]] = now
    db.session.execute(update(Batch).where(Batch.id == batch.id, Batch.final_status.is_(None)).values(**values))
    db.session.commit()


class IngestBusy(Exception):
    """Another process is ingesting this batch right now."""


def ingest(batch_id: str) -> str:
    """Validate the input file, then write and enqueue the batch's tasks in chunks.

    Returns ``failed`` (rejected as a whole), ``ingested``, or ``skipped`` (nothing left to do).
    Safe to run again after a crash: it resumes after the tasks already written. Raises
    :class:`IngestBusy` when another process holds the batch's ingest lock.
    """
    svc = services()
    lock = _ingest_lock_key(batch_id)
    token = f"{svc.instance_id}:{time.monotonic_ns()}"
    if not svc.redis.set(lock, token, nx=True, ex=INGEST_LOCK_S):
        raise IngestBusy(batch_id)
    try:
        return _ingest(batch_id, lambda: svc.redis.expire(lock, INGEST_LOCK_S))
    finally:
        try:
            if svc.redis.get(lock) == token:
                svc.redis.delete(lock)
        except RedisError:
            pass


def _ingest(batch_id: str, keep_lock: Callable[[], Any]) -> str:
    svc = services()
    settings = svc.settings
    batch = _fresh(batch_id)
    if batch is None or batch.final_status is not None or batch.ingested_at is not None:
        return "skipped"
    source = db.session.get(File, batch.input_file_id)
    if source is None or source.deleted_at is not None:
        _fail_validation(batch, {"object": "list", "data": [{
            "code": "file_not_found", "param": "input_file_id", "line": None,
            "message": f"The input file '{batch.input_file_id}' was deleted before the batch read it."}]})
        return "failed"
    max_line = settings.max_json_bytes
    if batch.total == 0:
        try:
            with files.open_file(source) as stream:
                check = validate_input(stream, batch.endpoint, settings.batch_max_lines, settings.batch_max_bytes,
                                       max_line, keep_lock)
        except FileNotFoundError:
            check = Validation()
            check.add(None, "file_not_found", f"The bytes of input file '{source.id}' are gone from storage.")
        if not check.ok:
            _fail_validation(batch, check.errors_object())
            return "failed"
        queue = batch.queue or resolve_queue(batch.endpoint, check.model, None).name
        db.session.execute(update(Batch).where(Batch.id == batch.id).values(
            total=check.count, queue=queue, model=check.model if isinstance(check.model, str) else None))
        db.session.commit()
        db.session.refresh(batch)
    _insert_tasks(batch, source, max_line, keep_lock)
    db.session.execute(update(Batch).where(Batch.id == batch.id).values(ingested_at=now_ms()))
    db.session.commit()
    pipe = svc.redis.pipeline()
    pipe.hset(progress_key(batch.id), "total", batch.total)
    pipe.expire(progress_key(batch.id), PROGRESS_TTL_S)
    pipe.execute()
    if _ending_of(batch.id):
        end_open_tasks(batch.id)
    return "ingested"


def _insert_tasks(batch: Batch, source: File, max_line: int, keep_lock: Callable[[], Any]) -> None:
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
    expire = (batch.expires_at or now_s()) * 1000
    pending: list[dict[str, Any]] = []
    index = 0
    common = {"owner": batch.owner, "batch_id": batch.id, "endpoint": batch.endpoint, "queue": batch.queue,
              "level": BATCH_LEVEL, "status": WAITING, "response_mode": "callback", "callback_url": "",
              "timeout": svc.settings.default_task_timeout, "instance_id": "", "start_time": start,
              "expire_time": expire, "attempts": 0, "result": None, "completed_time": None}
    batch_id = batch.id
    with files.open_file(source) as stream:
        for number, raw, _size in _lines(stream, max_line):
            if raw is None or not raw.strip():
                continue
            if index >= done:
                obj, _problem = _parse(raw, number)
                assert obj is not None  # validated
                pending.append({**common, "id": task_id_for(batch_id, index), "custom_id": obj["custom_id"],
                                "data": json.dumps(obj["body"], separators=(",", ":"))})
            index += 1
            if len(pending) >= chunk:
                _flush(batch, pending, base_score, builtin)
                keep_lock()
                pending = []
    if pending:
        _flush(batch, pending, base_score, builtin)


def _flush(batch: Batch, rows: list[dict[str, Any]], base_score: int, builtin: bool) -> None:
    """Write one chunk of task rows, then make them takeable (or, once the batch ends, end them)."""
    svc = services()
    ending = _ending_of(batch.id)
    if ending:
        status, result = _ended_result(ending, batch)
        now = now_ms()
        for row in rows:
            row.update(status=status, completed_time=now, result=json.dumps(result) if result else None)
    db.session.execute(insert(Task.__table__), rows)  # Core: no ORM object per row
    db.session.commit()
    if ending:
        pipe = svc.redis.pipeline()
        pipe.hincrby(progress_key(batch.id), "ended", len(rows))
        pipe.expire(progress_key(batch.id), PROGRESS_TTL_S)
        pipe.execute()
        return
    first_index = int(rows[0]["id"][-ID_DIGITS:], 36)
    # task_payload only reads attributes: a plain namespace per row is enough (and much cheaper).
    items = [(row["id"], task_payload(SimpleNamespace(**row)), base_score + first_index + i)  # type: ignore[arg-type]
             for i, row in enumerate(rows)]
    svc.engine.enqueue_many(batch.queue, BATCH_LEVEL, items)
    if builtin:
        svc.work_ready(batch.queue, BATCH_LEVEL, len(items))
    if batch.status == VALIDATING:
        db.session.execute(update(Batch).where(Batch.id == batch.id, Batch.status == VALIDATING)
                           .values(status=IN_PROGRESS, in_progress_at=now_s()))
        db.session.commit()
        batch.status = IN_PROGRESS


def _reenqueue_waiting(batch: Batch, builtin: bool) -> None:
    """After a crashed ingest: the engine may not have seen the last chunk written (it skips known ids)."""
    svc = services()
    last = ""
    while True:
        rows = db.session.execute(
            db.select(Task).where(Task.batch_id == batch.id, Task.status == WAITING, Task.id > last)
            .order_by(Task.id).limit(PAGE)).scalars().all()
        if not rows:
            return
        added = svc.engine.enqueue_many(batch.queue, BATCH_LEVEL,
                                        [(t.id, task_payload(t), t.start_time * 1000) for t in rows])
        if added and builtin:
            svc.work_ready(batch.queue, BATCH_LEVEL, added)
        last = rows[-1].id
        db.session.expunge_all()


# ------------------------------------------------------------------------------------ cancel/expire

def end_open_tasks(batch_id: str, force: bool = False) -> int:
    """End the unfinished tasks of a cancelled or expiring batch; returns how many it ended.

    Each task is claimed in the engine first (a waiting one never runs, a running one's late
    result is dropped); one the engine no longer holds is left to whoever is ending it, unless
    ``force`` (used by the sweeper long after the ending began, e.g. after Redis lost data).
    """
    svc = services()
    batch = _fresh(batch_id)
    if batch is None or not batch.ending:
        return 0
    status, result = _ended_result(batch.ending, batch)
    ended = 0
    last = ""
    while True:
        rows = db.session.execute(
            db.select(Task).where(Task.batch_id == batch_id, Task.status.in_(OPEN_STATUSES), Task.id > last)
            .order_by(Task.id).limit(PAGE)).scalars().all()
        if not rows:
            return ended
        claimed = [t for t in rows if svc.engine.cancel(t.queue, t.level, t.id) != "absent" or force]
        ended += len(finish(claimed, status, result))
        last = rows[-1].id


def claim_expired(limit: int = 100) -> list[str]:
    """Mark batches whose window has ended as expiring (once each); returns their ids."""
    now = now_s()
    ids = db.session.execute(
        db.select(Batch.id).where(Batch.status.in_((VALIDATING, IN_PROGRESS)), Batch.ending.is_(None),
                                  Batch.final_status.is_(None), Batch.expires_at <= now).limit(limit)
    ).scalars().all()
    claimed = []
    for batch_id in ids:
        n = db.session.execute(update(Batch).where(Batch.id == batch_id, Batch.ending.is_(None),
                                                   Batch.final_status.is_(None)).values(ending=EXPIRED)).rowcount
        db.session.commit()
        if n:
            claimed.append(batch_id)
    return claimed


@dataclass
class Sweep:
    """What the periodic sweep found to do (the Celery side acts on it)."""

    finalize: list[str] = field(default_factory=list)
    ingest: list[str] = field(default_factory=list)
    relaunch: list[str] = field(default_factory=list)
    forced: int = 0


def sweep() -> Sweep:
    """Find batches that should move but might not (a lost message, a lost Redis counter, a dead
    worker): ready to finalise, ingest not running, a chord that never finished. Ends the tasks of
    long-ending batches that the engine no longer holds."""
    svc = services()
    out = Sweep()
    now = now_ms()
    running = db.session.execute(
        db.select(Batch).where(Batch.final_status.is_(None), Batch.status.in_((VALIDATING, IN_PROGRESS, CANCELLING)))
    ).scalars().all()
    for batch in running:
        if batch.ingested_at is None:
            if batch.created_at * 1000 < now - INGEST_LOCK_S * 1000 and not svc.redis.exists(
                    _ingest_lock_key(batch.id)):
                out.ingest.append(batch.id)
            continue
        if batch.ending:
            since = (batch.cancelling_at or batch.expires_at or 0) * 1000
            if since < now - STALE_ENDING_MS:
                out.forced += end_open_tasks(batch.id, force=True)
        if not _has_open_tasks(batch.id):
            out.finalize.append(batch.id)
    stuck = db.session.execute(
        db.select(Batch.id).where(Batch.final_status.is_not(None), Batch.status.not_in(FINAL_STATUSES),
                                  Batch.claimed_at < now - STALE_CLAIM_MS)
    ).scalars().all()
    for batch_id in stuck:  # claimed again now, so a relaunched chord gets its own time to finish
        db.session.execute(update(Batch).where(Batch.id == batch_id).values(claimed_at=now))
        db.session.commit()
        out.relaunch.append(batch_id)
    return out


# ------------------------------------------------------------------------------------ finalisation

def _has_open_tasks(batch_id: str) -> bool:
    return db.session.execute(
        db.select(Task.id).where(Task.batch_id == batch_id, Task.status.in_(OPEN_STATUSES)).limit(1)
    ).first() is not None


def claim_finalization(batch_id: str) -> str | None:
    """Claim the finalisation of a batch whose every task ended: returns its target status, or
    None when it is not ready or someone else claimed it. Runs once per batch."""
    for _ in range(3):
        batch = _fresh(batch_id)
        if batch is None or batch.final_status is not None or batch.ingested_at is None:
            return None
        if _has_open_tasks(batch_id):
            return None
        target = batch.ending or COMPLETED
        values: dict[str, Any] = {"final_status": target, "claimed_at": now_ms()}
        if target == COMPLETED:
            values.update(status=FINALIZING, finalizing_at=now_s())
        same_ending = Batch.ending.is_(None) if batch.ending is None else Batch.ending == batch.ending
        n = db.session.execute(update(Batch).where(Batch.id == batch_id, Batch.final_status.is_(None), same_ending)
                               .values(**values)).rowcount
        db.session.commit()
        if n:
            return target
    return None


def shard_plan(batch_id: str) -> list[tuple[int, int]]:
    """Line ranges ``[lo, hi)`` of the shards that write a batch's results."""
    batch = db.session.get(Batch, batch_id)
    total = batch.total if batch else 0
    shards = min(MAX_SHARDS, max(1, math.ceil(total / SHARD_LINES)))
    size = max(1, math.ceil(total / shards))
    return [(lo, min(total, lo + size)) for lo in range(0, max(total, 1), size)]


def _error_line(task_id: str, custom_id: str, code: str, message: str) -> str:
    return json.dumps({"id": task_id, "custom_id": custom_id, "response": None,
                       "error": {"code": code, "message": message}}) + "\n"


def result_line(task_id: str, custom_id: str, status: str, result_text: str | None,
                target: str) -> tuple[bool, str]:
    """(goes to the output file, the JSONL line) of one task of a batch being finalised."""
    if status == SUCCEEDED and result_text:
        return True, f'{{"id":{json.dumps(task_id)},"custom_id":{json.dumps(custom_id)},' \
                     f'"response":{result_text},"error":null}}\n'
    result = json.loads(result_text) if result_text else None
    if result is not None:
        body = result.get("body")
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        if status == TASK_FAILED and result.get("request_id") and code not in NO_ANSWER_CODES:
            response = {"status_code": result.get("status_code"), "request_id": result.get("request_id"),
                        "body": body}
            return False, json.dumps({"id": task_id, "custom_id": custom_id, "response": response,
                                      "error": None}) + "\n"
        if isinstance(error, dict):
            return False, _error_line(task_id, custom_id, str(code or status),
                                      str(error.get("message") or f"The request ended as {status}."))
    if status in OPEN_STATUSES or status == TASK_CANCELLED:
        if target == EXPIRED:
            return False, _error_line(task_id, custom_id, "batch_expired",
                                      "The batch's completion window ended before this request finished.")
        if target == CANCELLED or status in OPEN_STATUSES:
            return False, _error_line(task_id, custom_id, "batch_cancelled",
                                      "The batch was cancelled before this request finished.")
        return False, _error_line(task_id, custom_id, "request_cancelled", "This request was cancelled.")
    return False, _error_line(task_id, custom_id, status, f"The request ended as {status} without an answer.")


def write_shard(batch_id: str, index: int, lo: int, hi: int) -> dict[str, int]:
    """Write the output and error lines of requests ``[lo, hi)`` to two shard objects (streamed
    from SQL a page at a time); returns the counts of lines written."""
    batch = db.session.get(Batch, batch_id)
    if batch is None:
        return {"index": index, "out": 0, "err": 0}
    target = batch.final_status or COMPLETED
    storage = services().storage
    counts = {"index": index, "out": 0, "err": 0}
    last, hi_id = task_id_for(batch_id, lo), task_id_for(batch_id, hi)
    first = True
    with storage.open_writer(_shard_key(batch_id, "out", index)) as out, \
            storage.open_writer(_shard_key(batch_id, "err", index)) as err:
        while True:
            lower = Task.id >= last if first else Task.id > last
            rows = db.session.execute(
                db.select(Task.id, Task.custom_id, Task.status, Task.result)
                .where(Task.batch_id == batch_id, lower, Task.id < hi_id).order_by(Task.id).limit(PAGE)
            ).all()
            if not rows:
                break
            first = False
            for task_id, custom_id, status, result_text in rows:
                to_output, line = result_line(task_id, custom_id or "", status, result_text, target)
                if to_output:
                    out.write(line.encode())
                    counts["out"] += 1
                else:
                    err.write(line.encode())
                    counts["err"] += 1
            last = rows[-1][0]
    return counts


def join_shards(batch_id: str, results: list[dict[str, int]]) -> Batch | None:
    """Join the shards into the output and error Files, and set the final status, time and counts."""
    svc = services()
    storage = svc.storage
    batch = _fresh(batch_id)
    if batch is None:
        return None
    shards = sorted(results, key=lambda r: r["index"])
    keys = {kind: [_shard_key(batch_id, kind, r["index"]) for r in shards] for kind in ("out", "err")}
    if batch.status not in FINAL_STATUSES:
        target = batch.final_status or COMPLETED
        written: dict[str, tuple[str, str, int]] = {}  # kind -> (file id, storage key, size)
        for kind in ("out", "err"):
            if sum(r[kind] for r in shards):
                file_id = files.new_file_id()
                key = files.storage_key(file_id)
                written[kind] = (file_id, key, storage.concat(key, keys[kind]))
        completed = sum(r["out"] for r in shards)
        stamp = {COMPLETED: "completed_at", CANCELLED: "cancelled_at", EXPIRED: "expired_at"}[target]
        ended = db.session.execute(update(Batch).where(Batch.id == batch_id, Batch.status.not_in(FINAL_STATUSES))
                                   .values(status=target, completed=completed, failed=batch.total - completed,
                                           output_file_id=written["out"][0] if "out" in written else None,
                                           error_file_id=written["err"][0] if "err" in written else None,
                                           **{stamp: now_s()})).rowcount
        if ended:
            for kind, (file_id, key, size) in written.items():
                name = "output" if kind == "out" else "error"
                files.create_from_storage(batch.owner, BATCH_OUTPUT, f"{batch_id}_{name}.jsonl", key, size, file_id)
            db.session.commit()
        else:  # another join finished first: keep its files, drop these
            db.session.rollback()
            for _file_id, key, _size in written.values():
                storage.delete(key)
    for key in keys["out"] + keys["err"]:
        storage.delete(key)
    try:
        svc.redis.delete(progress_key(batch_id))
    except RedisError:
        pass
    return _fresh(batch_id)
