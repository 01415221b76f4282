"""Ending a batch before all its requests ran: a cancel, the expiry of its window, or a failure
after some lines became tasks. The batch's ``ending`` column is set once (by whichever comes
first); then its unfinished tasks are ended here and the batch is finalised as usual.
"""

from __future__ import annotations

from sqlalchemy import update

from bellaq.batches.service import load
from bellaq.clock import now_s
from bellaq.extensions import db
from bellaq.models import Batch, Task
from bellaq.models.batches import BatchStatus
from bellaq.models.tasks import OPEN_STATUSES, TaskStatus
from bellaq.services import services
from bellaq.tasks import error_result, write_end_state

PAGE = 1000


def ended_result(ending: str, batch: Batch) -> tuple[str, dict | None]:
    """The end status and result of a task that the batch's ``ending`` ends."""
    if ending == BatchStatus.EXPIRED:
        return TaskStatus.TIMEOUT, error_result(
            408, f"The batch's completion window of {batch.completion_window} ended before this request finished.",
            "batch_expired", "timeout")
    if ending == BatchStatus.FAILED:
        return TaskStatus.FAILED, error_result(
            500, "The batch failed before this request finished; its errors say why.", "batch_failed", "server_error")
    return TaskStatus.CANCELLED, None


def end_open_tasks(batch_id: str, force: bool = False) -> int:
    """End the unfinished tasks of an ending batch; returns how many it ended.

    Each task is claimed in the engine first (a waiting one never runs, a running one's late
    result is dropped); one the engine no longer holds is left to whoever is ending it, unless
    ``force`` (used by the sweep long after the ending began, e.g. after Redis lost data).
    """
    engine = services().engine
    batch = load(batch_id)
    if batch is None or not batch.ending:
        return 0
    status, result = ended_result(batch.ending, batch)
    ended = 0
    last = ""
    while True:
        rows = db.session.execute(
            db.select(Task).where(Task.batch_id == batch_id, Task.status.in_(OPEN_STATUSES), Task.id > last)
            .order_by(Task.id).limit(PAGE)).scalars().all()
        if not rows:
            return ended
        claimed = [t for t in rows if force or engine.cancel(t.queue, t.level, t.id) != "absent"]
        ended += len(write_end_state(claimed, status, result))
        last = rows[-1].id


def claim_expired(limit: int = 100) -> list[str]:
    """Mark batches whose window has ended as expiring (once each); returns their ids."""
    ids = db.session.execute(
        db.select(Batch.id).where(Batch.status.in_((BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)),
                                  Batch.ending.is_(None), Batch.final_status.is_(None),
                                  Batch.expires_at <= now_s()).limit(limit)
    ).scalars().all()
    claimed = []
    for batch_id in ids:
        n = db.session.execute(update(Batch).where(Batch.id == batch_id, Batch.ending.is_(None),
                                                   Batch.final_status.is_(None))
                               .values(ending=BatchStatus.EXPIRED)).rowcount
        db.session.commit()
        if n:
            claimed.append(batch_id)
    return claimed
