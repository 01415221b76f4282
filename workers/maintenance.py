"""Periodic work (run by beat): lease reaping, checking that the engine still holds its data,
completions left on the event bus, and expired Idempotency-Key records."""

from __future__ import annotations

import logging

from bellaq import event_completions, idempotency, open_tasks
from bellaq import tasks as task_service
from bellaq.extensions import db
from bellaq.models import Queue
from bellaq.services import services
from workers.celery_app import celery

log = logging.getLogger(__name__)


@celery.task(name="bellaq.reap", ignore_result=True)
def reap() -> dict[str, int]:
    """Requeue expired leases (or fail them after their retries); time out overdue waiting tasks."""
    return task_service.reap()


@celery.task(name="bellaq.check_engine", ignore_result=True)
def check_engine() -> int:
    """Re-seed the engine from SQL if Redis lost its data, re-announce waiting built-in work
    (a lost "work is ready" message must not strand a task), and recount open tasks per owner."""
    svc = services()
    recovered = 0
    if not svc.engine_marker_present():
        recovered = task_service.recover()
        svc.set_engine_marker()
        log.warning("the queue engine had lost its data; re-seeded %d tasks from SQL", recovered)
    open_tasks.recount()
    builtin = {name for (name,) in db.session.execute(db.select(Queue.name).where(Queue.builtin.is_(True)))}
    for queue, level in svc.engine.known_queues():
        if queue in builtin:
            waiting = svc.engine.stats(queue, level).waiting
            if waiting:
                svc.work_ready(queue, level, waiting)
    return recovered


@celery.task(name="bellaq.sweep_eventbus", ignore_result=True)
def sweep_eventbus() -> int:
    """End tasks whose completion event sits in a stream no web process reads any more."""
    return event_completions.sweep()


@celery.task(name="bellaq.purge_idempotency", ignore_result=True)
def purge_idempotency() -> int:
    """Delete Idempotency-Key records older than BELLAQ_IDEMPOTENCY_TTL."""
    return idempotency.purge_expired(services().settings.idempotency_ttl)
