"""Answers lost between the engine and SQL: a task whose complete reached the engine but never
SQL (its completer was killed between the two) is finished from the result the engine recorded,
or, with nothing recorded, run again when nobody can have received its answer. Beat's reaper
calls :func:`end_lost_completions`; ARCHITECTURE.md ("No lost answers") states the rule.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import update

from bellaq.clock import now_ms
from bellaq.extensions import db
from bellaq.models import Queue, Task
from bellaq.models.tasks import OPEN_STATUSES, TaskStatus
from bellaq.services import services
from bellaq.tasks import error_result, task_payload, write_end_state, write_end_states


def end_lost_completions(limit: int = 1000) -> int:
    """Finish tasks whose complete reached the engine but never SQL (the completer was killed
    between the two); returns how many were finished or put back to run again.

    A result the engine recorded is written as the task's result: the completer would have
    written the same one, and the guarded write lets only one of the two end the task. A task
    done in the engine with nothing recorded (older than any lease) is put back to run again
    when nobody can have received its answer (callback tasks, batch lines, blocking requests);
    a streaming task, whose chunks were already sent, fails as ``worker_lost``.
    """
    return _finish_recorded(limit) + _rerun_unrecorded(limit)


def _finish_recorded(limit: int) -> int:
    svc = services()
    engine = svc.engine
    grace_ms = svc.settings.lost_completion_grace * 1000
    cutoff = now_ms() - grace_ms
    count = 0
    for queue in {q for q, _ in engine.known_queues()}:
        pending = engine.results_pending(queue)[:limit]
        if not pending:
            continue
        rows = db.session.execute(db.select(Task).where(Task.id.in_(pending))).scalars().all()
        settled = set(pending) - {t.id for t in rows}
        open_by_level: dict[int, list[Task]] = defaultdict(list)
        for task in rows:
            if task.status in OPEN_STATUSES:
                open_by_level[task.level].append(task)
            else:
                settled.add(task.id)
        lost: list[Task] = []
        for level, tasks in open_by_level.items():
            since = engine.done_since(queue, level, [t.id for t in tasks])
            lost += [t for t in tasks if t.id in since and since[t.id] <= cutoff]
        if lost:
            texts = engine.recorded_results(queue, [t.id for t in lost])
            results = {t.id: json.loads(texts[t.id]) for t in lost if t.id in texts}
            statuses: dict[str, str] = {}
            for task in lost:
                if task.id in results:
                    ok = 200 <= int(results[task.id].get("status_code", 0)) < 300
                    statuses[task.id] = TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED
            recorded = [task for task in lost if task.id in statuses]
            count += len(write_end_states(recorded, statuses, results=results))
            settled.update(results)
        if settled:
            engine.forget_results(queue, sorted(settled))
    return count


def _rerun_unrecorded(limit: int) -> int:
    svc = services()
    cutoff = now_ms() - (svc.settings.default_process_timeout + 60) * 1000
    rows = db.session.execute(
        db.select(Task).where(Task.status == TaskStatus.QUEUED, Task.running_time < cutoff).limit(limit)
    ).scalars().all()
    lost = [t for t in rows if svc.engine.is_known(t.queue, t.level, t.id) == "done"]
    rerun: list[Task] = []
    failed: list[Task] = []
    for task in lost:
        if task.response_mode == "streaming":
            failed.append(task)
        elif svc.engine.rerun(task.queue, task.level, task.id, task_payload(task), task.start_time * 1000,
                              task.attempts):
            rerun.append(task)
    if rerun:
        ids = [t.id for t in rerun]
        db.session.execute(update(Task).where(Task.id.in_(ids), Task.status == TaskStatus.QUEUED)
                           .values(status=TaskStatus.WAITING))
        db.session.commit()
        for (queue, level), n in _count_by_level(rerun).items():
            if _is_builtin(queue):
                svc.work_ready(queue, level, n, lost=True)
    result = error_result(502, "The worker that ran this request stopped before recording its answer.",
                          "worker_lost", "upstream_error")
    return len(rerun) + len(write_end_state(failed, TaskStatus.FAILED, result))


def _count_by_level(tasks: Sequence[Task]) -> dict[tuple[str, int], int]:
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for task in tasks:
        counts[(task.queue, task.level)] += 1
    return counts


def _is_builtin(queue: str) -> bool:
    row = db.session.get(Queue, queue)
    return bool(row and row.builtin)
