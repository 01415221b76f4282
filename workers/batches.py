"""The Celery side of batches: ingest, ending (cancel/expiry), and the finalisation chord.

- ``bellaq.ingest_batch``: validate and ingest the input file (``bellaq.batches.ingest``).
- ``bellaq.end_batch``: end the unfinished tasks of a cancelled or expiring batch.
- Finalisation, once per batch (claimed in SQL): a chord whose header tasks
  (``bellaq.batch_shard``) each write one shard of output and error lines from SQL, in parallel
  across workers, and whose body (``bellaq.batch_join``) joins them into the Files.
- ``bellaq.expire_batches`` (beat, every few seconds): expiry, plus a sweep that restarts what a
  lost message, a lost Redis counter or a dead worker left behind.
- :func:`on_tasks_ended`: the task-end listener that notices a batch's last task.

All of them run on the control Celery queue, never behind a backlog of request work.
"""

from __future__ import annotations

import logging
from collections import Counter

from celery import chord

from bellaq import batches
from bellaq.models import Task
from bellaq.services import services
from workers.celery_app import CONTROL_QUEUE, celery

log = logging.getLogger(__name__)


def on_tasks_ended(tasks: list[Task]) -> None:
    """Task-end listener: count ended tasks per batch; start finalisation after the last one.

    The Redis counter is a hint (one pipeline per call); the claim checks SQL, so a batch is
    finalised once even when several processes see the last count at the same moment.
    """
    per_batch = Counter(task.batch_id for task in tasks if task.batch_id)
    if not per_batch:
        return
    try:
        svc = services()
        pipe = svc.redis.pipeline(transaction=False)
        for batch_id, n in per_batch.items():
            key = batches.progress_key(batch_id)
            pipe.hincrby(key, "ended", n)
            pipe.hget(key, "total")
            pipe.expire(key, batches.PROGRESS_TTL_S)
        replies = pipe.execute()
        for i, batch_id in enumerate(per_batch):
            ended, total = int(replies[3 * i]), replies[3 * i + 1]
            if total is not None and ended >= int(total):
                finalize_if_done(batch_id)
    except Exception:  # noqa: BLE001 - a listener must never break a complete; the sweep catches up
        log.exception("batch progress update failed for %s", list(per_batch))


def finalize_if_done(batch_id: str) -> bool:
    """Claim the batch's finalisation if every task ended, and start the chord (once)."""
    if batches.claim_finalization(batch_id) is None:
        return False
    start_chord(batch_id)
    return True


def start_chord(batch_id: str) -> None:
    """The finalisation chord: one shard task per line range, then the join."""
    header = [batch_shard.si(batch_id, i, lo, hi).set(queue=CONTROL_QUEUE)
              for i, (lo, hi) in enumerate(batches.shard_plan(batch_id))]
    chord(header)(batch_join.s(batch_id).set(queue=CONTROL_QUEUE))


@celery.task(name="bellaq.ingest_batch", ignore_result=True)
def ingest_batch(batch_id: str) -> str:
    """Validate and ingest a batch's input file, then finalise at once if nothing is left to run."""
    try:
        outcome = batches.ingest(batch_id)
    except batches.IngestBusy:
        return "busy"
    if outcome == "ingested":
        finalize_if_done(batch_id)
    return outcome


@celery.task(name="bellaq.end_batch", ignore_result=True)
def end_batch(batch_id: str) -> int:
    """End the unfinished tasks of a cancelled or expiring batch, then finalise it."""
    ended = batches.end_open_tasks(batch_id)
    finalize_if_done(batch_id)
    return ended


@celery.task(name="bellaq.batch_shard", ignore_result=False)
def batch_shard(batch_id: str, index: int, lo: int, hi: int) -> dict[str, int]:
    """Chord header: write one shard of output and error lines."""
    return batches.write_shard(batch_id, index, lo, hi)


@celery.task(name="bellaq.batch_join", ignore_result=True)
def batch_join(results: list[dict[str, int]], batch_id: str) -> str | None:
    """Chord body: join the shards into the Files and set the final status."""
    batch = batches.join_shards(batch_id, results)
    return batch.status if batch else None


@celery.task(name="bellaq.expire_batches", ignore_result=True)
def expire_batches() -> dict[str, int]:
    """Beat: expire batches past their window, and restart whatever should be moving but is not."""
    expired = batches.claim_expired()
    for batch_id in expired:
        end_batch.apply_async((batch_id,), queue=CONTROL_QUEUE)
    found = batches.sweep()
    for batch_id in found.ingest:
        ingest_batch.apply_async((batch_id,), queue=CONTROL_QUEUE)
    finalized = sum(finalize_if_done(batch_id) for batch_id in found.finalize)
    for batch_id in found.relaunch:
        log.warning("restarting the finalisation of batch %s (its chord did not finish)", batch_id)
        start_chord(batch_id)
    return {"expired": len(expired), "ingest": len(found.ingest), "finalized": finalized,
            "relaunched": len(found.relaunch), "forced": found.forced}


def dispatch_ingest(batch_id: str) -> None:
    """Queue the ingest of a new batch."""
    ingest_batch.apply_async((batch_id,), queue=CONTROL_QUEUE)


def dispatch_end(batch_id: str) -> None:
    """Queue the ending of a cancelled batch's unfinished tasks."""
    end_batch.apply_async((batch_id,), queue=CONTROL_QUEUE)
