"""The sweep (beat, every few seconds): find batches that should move but might not, because a
message was lost, the Redis progress record was lost, a hand-off failed, or a worker died."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import update

from bellaq.batches import ingest
from bellaq.batches.ending import end_open_tasks
from bellaq.batches.output import has_open_tasks
from bellaq.clock import now_ms
from bellaq.extensions import db
from bellaq.models import Batch
from bellaq.models.batches import FINAL_STATUSES, BatchStatus

LATE_ENDING_MS = 10_000  # an ending this old whose tasks are open was not handed off, or is slow
STALE_ENDING_MS = 60_000  # an ending this old ends tasks the engine no longer holds, too
STALE_CLAIM_MS = 10 * 60_000  # a finalisation claimed this long ago is started again


@dataclass
class Sweep:
    """What the sweep found to do (the Celery side acts on it)."""

    finalize: list[str] = field(default_factory=list)
    ingest: list[str] = field(default_factory=list)
    relaunch: list[str] = field(default_factory=list)
    ended: int = 0


def sweep() -> Sweep:
    """Ingests that no one holds (never started, or their ingester died), endings whose tasks are
    still open, batches ready to finalise, and finalisations that never finished."""
    out = Sweep()
    now = now_ms()
    running = db.session.execute(
        db.select(Batch).where(Batch.final_status.is_(None), Batch.status.in_(
            (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)))
    ).scalars().all()
    for batch in running:
        if batch.ingested_at is None:
            if batch.created_at * 1000 < now - ingest.LEASE_S * 1000 and ingest.should_restart(batch.id):
                out.ingest.append(batch.id)
            continue
        since = _ending_since(batch)
        if batch.ending and since < now - LATE_ENDING_MS:
            out.ended += end_open_tasks(batch.id, force=since < now - STALE_ENDING_MS)
        if not has_open_tasks(batch.id):
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


def _ending_since(batch: Batch) -> int:
    """When (ms) the batch's ending began: its cancel, the end of its window, or its failure."""
    if batch.ending == BatchStatus.CANCELLED:
        return (batch.cancelling_at or 0) * 1000
    if batch.ending == BatchStatus.EXPIRED:
        return (batch.expires_at or 0) * 1000
    return batch.ingested_at or 0
