"""The batch service behind ``/v1/batches``: create, read, list, cancel, and the Batch object.

A new batch is recorded ``validating`` and handed to the workers in one step that either fully
happens or leaves nothing behind (:func:`hand_off`); a recorded cancel is never answered with an
error, even when the workers cannot be told at once (the sweep then ends the batch).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy import func, update

from bellaq import files, open_tasks
from bellaq.batches import progress
from bellaq.batches.ids import new_batch_id
from bellaq.batches.validation import check_metadata, parse_window
from bellaq.clock import now_s
from bellaq.errors import BadRequest, NotFound, Unavailable
from bellaq.extensions import db
from bellaq.keys import Principal
from bellaq.models import Batch, File, Queue, Task
from bellaq.models.batches import FINAL_STATUSES, BatchStatus
from bellaq.models.tasks import TaskStatus
from bellaq.queues import check_endpoint, resolve_queue
from bellaq.services import services
from bellaq.upstream_rules import BUILTIN_ENDPOINTS
from bellaq.validation import field as body_field

log = logging.getLogger(__name__)

QUEUE_HEADER = "X-BELLA-QUEUE-NAME"
# What handing work to the workers raises when Redis or the broker is down.
HANDOFF_ERRORS = (RedisError, KombuError, OSError)
FAILED_TASK_STATUSES = (TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELLED)


# ---------------------------------------------------------------------------------------- create

def create(principal: Principal, body: dict[str, Any], queue_header: str | None) -> Batch:
    """Check a create request, record the batch as ``validating`` and hand it to the workers."""
    input_file_id = body_field(body, "input_file_id", str)
    endpoint = check_endpoint(body_field(body, "endpoint", str))
    window = body_field(body, "completion_window", str)
    parse_window(window)  # a bad window is a 400 before anything is looked up
    metadata = check_metadata(body_field(body, "metadata", dict, None))
    source = files.find(principal.owner, input_file_id)
    if source is None:
        raise NotFound(f"No file with id '{input_file_id}'.", param="input_file_id", code="file_not_found")
    if source.purpose != "batch":
        raise BadRequest(f"File '{input_file_id}' has purpose '{source.purpose}'; a batch reads a file uploaded "
                         "with purpose 'batch'.", param="input_file_id", code="invalid_file")
    queue_name = ""
    if queue_header is not None:
        queue_name = named_queue(endpoint, queue_header)
    elif endpoint not in BUILTIN_ENDPOINTS and not db.session.execute(
            db.select(Queue.name).where(Queue.endpoint == endpoint).limit(1)).first():
        raise BadRequest(f"Endpoint {endpoint} is not served here: use one of {', '.join(BUILTIN_ENDPOINTS)} or the "
                         "endpoint of a registered queue.", param="endpoint", code="invalid_endpoint")
    open_tasks.check(principal.owner)
    batch = new_batch(principal.owner, endpoint, input_file_id, window, metadata, queue_name)
    hand_off(batch)
    return batch


def named_queue(endpoint: str, header: str) -> str:
    """The registered queue an ``X-BELLA-QUEUE-NAME`` header names (it must serve ``endpoint``)."""
    return resolve_queue(endpoint, None, header.strip(), param=QUEUE_HEADER).name


def new_batch(owner: str, endpoint: str, input_file_id: str, window: str, metadata: dict | None,
              queue: str) -> Batch:
    """A ``validating`` batch, not recorded yet (:func:`hand_off` does that)."""
    now = now_s()
    return Batch(
        id=new_batch_id(), owner=owner, endpoint=endpoint, input_file_id=input_file_id,
        completion_window=window, status=BatchStatus.VALIDATING, queue=queue,
        metadata_json=json.dumps(metadata) if metadata is not None else None,
        total=0, completed=0, failed=0, created_at=now, expires_at=now + parse_window(window),
    )


def hand_off(batch: Batch, *made_with: File) -> None:
    """Record a new batch (and the files made for it), then hand it to the workers: both or neither.

    When the hand-off fails (Redis or the broker is down) the rows and bytes are removed again and
    the client gets a 503 that says nothing was kept, so a retry cannot make two batches.
    """
    db.session.add_all([*made_with, batch])
    try:
        db.session.commit()
    except Exception:
        db.session.rollback()
        _forget_bytes(made_with)
        raise
    try:
        services().batch_created(batch.id)
    except HANDOFF_ERRORS as err:
        log.warning("batch %s could not be handed to the workers (%s); it was not kept", batch.id, err)
        db.session.rollback()
        db.session.execute(db.delete(Batch).where(Batch.id == batch.id))
        for row in made_with:
            db.session.execute(db.delete(File).where(File.id == row.id))
        db.session.commit()
        _forget_bytes(made_with)
        raise Unavailable("The task broker (Redis) is unavailable; the batch was not created. Retry shortly.") \
            from None


def _forget_bytes(rows: tuple[File, ...]) -> None:
    for row in rows:
        services().storage.delete(row.storage_key)


# ------------------------------------------------------------------------------------------ read

def load(batch_id: str) -> Batch | None:
    """The batch as SQL holds it now (not as this session last saw it)."""
    return db.session.execute(
        db.select(Batch).where(Batch.id == batch_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def owned(principal: Principal, batch_id: str) -> Batch:
    """The caller's batch; another owner's batch is simply not found."""
    batch = db.session.get(Batch, batch_id)
    if batch is None or batch.owner != principal.owner:
        raise NotFound(f"No batch with id '{batch_id}'.", param="batch_id", code="batch_not_found")
    return batch


def request_counts(batch: Batch) -> dict[str, int]:
    """``request_counts`` of a batch: stored once final, counted from its tasks before that."""
    if batch.status in FINAL_STATUSES:
        return {"total": batch.total, "completed": batch.completed, "failed": batch.failed}
    rows = db.session.execute(
        db.select(Task.status, func.count()).where(Task.batch_id == batch.id).group_by(Task.status)
    ).all()
    by_status = {status: n for status, n in rows}
    return {
        "total": batch.total,
        "completed": by_status.get(TaskStatus.SUCCEEDED, 0),
        "failed": sum(by_status.get(s, 0) for s in FAILED_TASK_STATUSES),
    }


def batch_object(batch: Batch) -> dict[str, Any]:
    """The Batch object as the API shows it, with live request counts."""
    return batch.to_dict(request_counts(batch))


def list_batches(principal: Principal, limit: int, after: str | None) -> tuple[list[Batch], bool]:
    """A page of the caller's batches, newest first, and whether more follow."""
    query = db.select(Batch).where(Batch.owner == principal.owner)
    if after:
        query = query.where(Batch.id < after)
    rows = list(db.session.execute(query.order_by(Batch.id.desc()).limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


# ---------------------------------------------------------------------------------------- cancel

def cancel(principal: Principal, batch_id: str) -> Batch:
    """Mark the batch ``cancelling`` (once) and tell the workers to end its unfinished tasks.

    Cancelling a ``cancelling`` batch changes nothing; a finished or finalising batch is a 400. A
    cancel once recorded is answered even when the workers cannot be told: the sweep ends it.
    """
    batch = owned(principal, batch_id)
    claimed = db.session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.ending.is_(None), Batch.final_status.is_(None),
               Batch.status.in_((BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)))
        .values(status=BatchStatus.CANCELLING, cancelling_at=now_s(), ending=BatchStatus.CANCELLED)
    ).rowcount
    db.session.commit()
    db.session.refresh(batch)
    if not claimed and batch.status != BatchStatus.CANCELLING:
        if batch.status in FINAL_STATUSES:
            state = f"already ended as {batch.status}"
        else:
            state = {BatchStatus.EXPIRED: "is expiring", BatchStatus.FAILED: "is failing"}.get(
                batch.ending or "", "is being finalised")
        raise BadRequest(f"Batch '{batch.id}' {state}; only a validating or in_progress batch can be cancelled.",
                         param="batch_id", code="batch_not_cancellable")
    progress.changed(batch.id)
    try:
        services().batch_ending(batch.id)
    except HANDOFF_ERRORS as err:
        log.warning("the cancel of batch %s could not be handed to the workers (%s); the sweep ends it", batch.id, err)
    return batch
