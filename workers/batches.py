"""The Celery side of batches: ingest, ending (cancel/expiry), and the finalisation chord.

- ``bellaq.ingest_batch``: validate and ingest the input file (:func:`bellaq.batches.ingest.run`).
- ``bellaq.end_batch``: end the unfinished tasks of a cancelled or expiring batch (a batch still
  validating is closed by its ingest).
- Finalisation, once per batch (claimed in SQL): a chord whose header tasks
  (``bellaq.batch_shard``) each write one shard of output and error lines from SQL, in parallel
  across workers, and whose body (``bellaq.batch_join``) joins them into the Files.
- ``bellaq.expire_batches`` (beat, every few seconds): expiry, plus the sweep that restarts what a
  lost message, a lost Redis record, a failed hand-off or a dead worker left behind.
- :func:`on_tasks_ended`: the task-end listener that notices a batch's last task.

All of them run on the control Celery queue, never behind a backlog of request work.
"""

from __future__ import annotations

import logging

from celery import chord

from bellaq.batches import ending, ingest, output, progress, sweep
from bellaq.models import Task
from workers.celery_app import CONTROL_QUEUE, celery

log = logging.getLogger(__name__)


def on_tasks_ended(tasks: list[Task]) -> None:
    """Task-end listener: count ended tasks per batch; start finalisation after the last one.

    The Redis count is a hint; the claim checks SQL, so a batch is finalised once even when
    several processes see the last count at the same moment.
    """
    try:
        for batch_id in progress.tasks_ended(tasks):
            finalize_if_done(batch_id)
    except Exception:  # noqa: BLE001 - a listener must never break a complete; the sweep catches up
        log.exception("batch progress update failed")


def finalize_if_done(batch_id: str) -> bool:
    """Claim the batch's finalisation if every task ended, and start the chord (once)."""
    if output.claim_finalization(batch_id) is None:
        return False
    start_chord(batch_id)
    return True


def start_chord(batch_id: str) -> None:
    """The finalisation chord: one shard task per line range, then the join."""
    header = [batch_shard.si(batch_id, i, lo, hi).set(queue=CONTROL_QUEUE)
              for i, (lo, hi) in enumerate(output.shard_plan(batch_id))]
    chord(header)(batch_join.s(batch_id).set(queue=CONTROL_QUEUE))


@celery.task(name="bellaq.ingest_batch", ignore_result=True)
def ingest_batch(batch_id: str) -> str:
    """Validate and ingest a batch's input file, then finalise at once if nothing is left to run."""
    outcome = ingest.run(batch_id)
    if outcome == "ingested":
        finalize_if_done(batch_id)
    return outcome


@celery.task(name="bellaq.end_batch", ignore_result=True)
def end_batch(batch_id: str) -> int:
    """End the unfinished tasks of a cancelled or expiring batch, then finalise it."""
    if ingest.run(batch_id) not in ("skipped", "ingested"):
        return 0  # ended before any line became a task, or its running ingest ends it
    ended = ending.end_open_tasks(batch_id)
    finalize_if_done(batch_id)
    return ended


@celery.task(name="bellaq.batch_shard", ignore_result=False)
def batch_shard(batch_id: str, index: int, lo: int, hi: int) -> dict[str, int]:
    """Chord header: write one shard of output and error lines."""
    return output.write_shard(batch_id, index, lo, hi)


@celery.task(name="bellaq.batch_join", ignore_result=True)
def batch_join(results: list[dict[str, int]], batch_id: str) -> str | None:
    """Chord body: join the shards into the Files and set the final status."""
    batch = output.join_shards(batch_id, results)
    return batch.status if batch else None


@celery.task(name="bellaq.expire_batches", ignore_result=True)
def expire_batches() -> dict[str, int]:
    """Beat: expire batches past their window, and restart whatever should be moving but is not."""
    expired = ending.claim_expired()
    for batch_id in expired:
        end_batch.apply_async((batch_id,), queue=CONTROL_QUEUE)
    found = sweep.sweep()
    for batch_id in found.ingest:
        ingest_batch.apply_async((batch_id,), queue=CONTROL_QUEUE)
    finalized = sum(finalize_if_done(batch_id) for batch_id in found.finalize)
    for batch_id in found.relaunch:
        log.warning("restarting the finalisation of batch %s (its chord did not finish)", batch_id)
        start_chord(batch_id)
    return {"expired": len(expired), "ingest": len(found.ingest), "finalized": finalized,
            "relaunched": len(found.relaunch), "ended": found.ended}


def dispatch_ingest(batch_id: str) -> None:
    """Queue the ingest of a new batch (the service's batch-created listener)."""
    ingest_batch.apply_async((batch_id,), queue=CONTROL_QUEUE)


def dispatch_end(batch_id: str) -> None:
    """Queue the ending of a cancelled batch's unfinished tasks (the batch-ending listener)."""
    end_batch.apply_async((batch_id,), queue=CONTROL_QUEUE)
