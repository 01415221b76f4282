"""Finalisation: once every request of a batch has ended, its output and error files are written.

:func:`claim_finalization` claims the batch in SQL (once); then a chord of :func:`write_shard`
tasks (one line range each, streamed from SQL, in parallel across workers) and
:func:`join_shards` make the two Files and set the final status, time and counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from sqlalchemy import update

from bellaq import files
from bellaq.batches import progress
from bellaq.batches.ids import task_id_for
from bellaq.batches.service import load
from bellaq.clock import now_ms, now_s
from bellaq.extensions import db
from bellaq.models import Batch, Task
from bellaq.models.batches import FINAL_STAMPS, FINAL_STATUSES, BatchStatus
from bellaq.models.files import BATCH_OUTPUT
from bellaq.models.tasks import OPEN_STATUSES, TaskStatus
from bellaq.services import services

SHARD_LINES = 5000
MAX_SHARDS = 32
PAGE = 1000
# Codes of results bellaq writes itself when no upstream answered (error file: "response": null).
NO_ANSWER_CODES = frozenset({"upstream_unavailable", "lease_expired", "timeout", "no_upstream", "worker_error",
                             "worker_lost", "batch_expired", "batch_cancelled", "batch_failed"})


def _shard_key(batch_id: str, kind: str, index: int) -> str:
    return f"batches/{batch_id}/{kind}.{index:04d}"


def has_open_tasks(batch_id: str) -> bool:
    """Whether a task of the batch is open, as committed now: read on a connection of its own, as
    the session's transaction may hold an older snapshot (MySQL's repeatable read), which would
    still show open a task that another process ended a moment ago."""
    with db.engine.connect() as conn:
        return conn.execute(
            db.select(Task.id).where(Task.batch_id == batch_id, Task.status.in_(OPEN_STATUSES)).limit(1)
        ).first() is not None


def claim_finalization(batch_id: str) -> str | None:
    """Claim the finalisation of a batch whose every task ended: returns its target status, or
    None when it is not ready or someone else claimed it. Runs once per batch.

    Called by whoever ended what may be the batch's last task, right after committing it: the
    session's transaction is ended first, so the batch and its tasks are read as committed now,
    not as an older snapshot saw them (two completers ending the last two tasks at once must not
    both see the other's task open)."""
    db.session.commit()
    for _ in range(3):
        batch = load(batch_id)
        if batch is None or batch.final_status is not None or batch.ingested_at is None:
            db.session.commit()
            return None
        if has_open_tasks(batch_id):
            db.session.commit()
            return None
        target = batch.ending or BatchStatus.COMPLETED
        values: dict[str, Any] = {"final_status": target, "claimed_at": now_ms()}
        if target == BatchStatus.COMPLETED:
            values.update(status=BatchStatus.FINALIZING, finalizing_at=now_s())
        same_ending = Batch.ending.is_(None) if batch.ending is None else Batch.ending == batch.ending
        n = db.session.execute(update(Batch).where(Batch.id == batch_id, Batch.final_status.is_(None), same_ending)
                               .values(**values)).rowcount
        db.session.commit()
        if n:
            progress.changed(batch_id)
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
    """(goes to the output file, the JSONL line) of one task of a batch that ends as ``target``."""
    if status == TaskStatus.SUCCEEDED and result_text:
        return True, f'{{"id":{json.dumps(task_id)},"custom_id":{json.dumps(custom_id)},' \
                     f'"response":{result_text},"error":null}}\n'
    result = json.loads(result_text) if result_text else None
    if result is not None:
        body = result.get("body")
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        if status == TaskStatus.FAILED and result.get("request_id") and code not in NO_ANSWER_CODES:
            response = {"status_code": result.get("status_code"), "request_id": result.get("request_id"),
                        "body": body}
            return False, json.dumps({"id": task_id, "custom_id": custom_id, "response": response,
                                      "error": None}) + "\n"
        if isinstance(error, dict):
            return False, _error_line(task_id, custom_id, str(code or status),
                                      str(error.get("message") or f"The request ended as {status}."))
    if status in OPEN_STATUSES or status == TaskStatus.CANCELLED:
        if target == BatchStatus.EXPIRED:
            return False, _error_line(task_id, custom_id, "batch_expired",
                                      "The batch's completion window ended before this request finished.")
        if target == BatchStatus.CANCELLED or status in OPEN_STATUSES:
            return False, _error_line(task_id, custom_id, "batch_cancelled",
                                      "The batch was cancelled before this request finished.")
        return False, _error_line(task_id, custom_id, "request_cancelled", "This request was cancelled.")
    return False, _error_line(task_id, custom_id, status, f"The request ended as {status} without an answer.")


def result_lines(batch: Batch, lo: int = 0, hi: int | None = None,
                 with_body: bool = False) -> Iterator[tuple[Any, bool, str]]:
    """(task row, goes to the output file, line) of requests ``[lo, hi)`` in line order, read from
    SQL a page at a time; the rows hold ``id``, ``custom_id``, ``status``, ``result`` (and ``data``
    with ``with_body``)."""
    target = batch.final_status or BatchStatus.COMPLETED
    last, first = task_id_for(batch.id, lo), True
    upper = [Task.id < task_id_for(batch.id, hi)] if hi is not None else []
    columns = [Task.id, Task.custom_id, Task.status, Task.result] + ([Task.data] if with_body else [])
    while True:
        lower = Task.id >= last if first else Task.id > last
        rows = db.session.execute(
            db.select(*columns).where(Task.batch_id == batch.id, lower, *upper).order_by(Task.id).limit(PAGE)
        ).all()
        if not rows:
            return
        first = False
        for row in rows:
            to_output, line = result_line(row.id, row.custom_id or "", row.status, row.result, target)
            yield row, to_output, line
        last = rows[-1].id


def write_shard(batch_id: str, index: int, lo: int, hi: int) -> dict[str, int]:
    """Write the output and error lines of requests ``[lo, hi)`` to two shard objects; returns the
    counts of lines written."""
    counts = {"index": index, "out": 0, "err": 0}
    batch = db.session.get(Batch, batch_id)
    if batch is None:
        return counts
    storage = services().storage
    with storage.open_writer(_shard_key(batch_id, "out", index)) as out, \
            storage.open_writer(_shard_key(batch_id, "err", index)) as err:
        for _row, to_output, line in result_lines(batch, lo, hi):
            (out if to_output else err).write(line.encode())
            counts["out" if to_output else "err"] += 1
    return counts


def join_shards(batch_id: str, results: list[dict[str, int]]) -> Batch | None:
    """Join the shards into the output and error Files, and set the final status, time and counts."""
    storage = services().storage
    batch = load(batch_id)
    if batch is None:
        return None
    shards = sorted(results, key=lambda r: r["index"])
    keys = {kind: [_shard_key(batch_id, kind, r["index"]) for r in shards] for kind in ("out", "err")}
    if batch.status not in FINAL_STATUSES:
        target = batch.final_status or BatchStatus.COMPLETED
        written: dict[str, tuple[str, str, int]] = {}  # kind -> (file id, storage key, size)
        for kind in ("out", "err"):
            if sum(r[kind] for r in shards):
                file_id = files.new_file_id()
                key = files.storage_key(file_id)
                written[kind] = (file_id, key, storage.concat(key, keys[kind]))
        completed = sum(r["out"] for r in shards)
        ended = db.session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.status.not_in(FINAL_STATUSES))
            .values(status=target, completed=completed, failed=batch.total - completed,
                    output_file_id=written["out"][0] if "out" in written else None,
                    error_file_id=written["err"][0] if "err" in written else None,
                    **{FINAL_STAMPS[BatchStatus(target)]: now_s()})).rowcount
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
    progress.finished(batch_id)
    return load(batch_id)
