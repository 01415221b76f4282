"""The online response modes: ``blocking`` (a held request) and ``streaming`` (SSE)."""

from __future__ import annotations

import json
import queue
import random
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, jsonify, stream_with_context

from bellaq.errors import error_body
from bellaq.eventbus import COMPLETION, PROGRESS, EventBus
from bellaq.extensions import db
from bellaq.keys import Principal
from bellaq.models import Task
from bellaq.models.tasks import CANCELLED, END_STATUSES
from bellaq.tasks import end_as_timeout, new_task_id, put

# How often a held request also looks at SQL, in case an event was missed (with jitter, so
# thousands of held requests do not look at once).
RECHECK_S = 30.0


def bus() -> EventBus:
    return current_app.extensions["bellaq.eventbus"]


def _final_of(task_id: str) -> dict[str, Any] | None:
    """The task's end as a completion payload, straight from SQL, if it has ended."""
    db.session.expire_all()
    row = db.session.execute(db.select(Task.status, Task.result).where(Task.id == task_id)).first()
    db.session.rollback()  # hand the connection back: a held request must not pin one
    if row is None or row.status not in END_STATUSES:
        return None
    return {"taskId": task_id, "status": row.status, "result": json.loads(row.result) if row.result else None}


def _events(task_id: str, timeout: int, waiter: queue.Queue) -> Iterator[dict[str, Any]]:
    """Every event of the task until its completion; a timeout ends the task as ``timeout``.

    Nothing here holds a SQL connection while waiting: thousands of requests may be held at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            task = db.session.get(Task, task_id)
            if task is not None and end_as_timeout(task):
                result = json.loads(task.result) if task.result else None
                db.session.rollback()
                yield {"name": COMPLETION, "payload": {"taskId": task_id, "status": "timeout", "result": result}}
                return
            final = _final_of(task_id)
            if final is not None:
                yield {"name": COMPLETION, "payload": final}
                return
            deadline = time.monotonic() + RECHECK_S
            continue
        try:
            event = waiter.get(timeout=min(remaining, RECHECK_S * random.uniform(0.5, 1.0)))
        except queue.Empty:
            final = _final_of(task_id)
            if final is not None:
                yield {"name": COMPLETION, "payload": final}
                return
            continue
        yield event
        if event.get("name") == COMPLETION:
            return


def _put_and_release(principal: Principal, body: dict[str, Any], task_id: str) -> int:
    """Accept the task, then hand the SQL connection back; returns the task's timeout."""
    timeout = put(principal, body, task_id=task_id).timeout
    db.session.rollback()
    return timeout


def _error_body(status: str, result: dict | None) -> tuple[int, dict]:
    if result is not None:
        return result.get("status_code", 500), result.get("body")
    if status == CANCELLED:
        return 409, error_body("The task was cancelled before it finished.", code="task_cancelled")
    return 500, error_body(f"The task ended as {status} without a result.", "server_error", code="no_result")


def blocking(principal: Principal, body: dict[str, Any]) -> Response:
    """Hold the request until the task ends; answer with the upstream's status and body."""
    task_id = new_task_id()
    waiter = bus().register(task_id)
    try:
        timeout = _put_and_release(principal, body, task_id)
        for event in _events(task_id, timeout, waiter):
            if event.get("name") == COMPLETION:
                payload = event.get("payload") or {}
                status_code, out = _error_body(payload.get("status", ""), payload.get("result"))
                response = jsonify(out)
                response.status_code = status_code
                response.headers["X-Bella-Task-Id"] = task_id
                return response
        raise AssertionError("unreachable: events always end with a completion")
    finally:
        bus().unregister(task_id)


def _sse(data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


def streaming(principal: Principal, body: dict[str, Any]) -> Response:
    """Answer ``text/event-stream``: each progress event's data as it comes, then ``[DONE]``."""
    task_id = new_task_id()
    event_bus = bus()
    waiter = event_bus.register(task_id)
    try:
        timeout = _put_and_release(principal, body, task_id)
    except Exception:
        event_bus.unregister(task_id)
        raise

    def generate() -> Iterator[str]:
        try:
            # An SSE comment sends the headers now: the client knows the task is accepted.
            yield ": accepted\n\n"
            for event in _events(task_id, timeout, waiter):
                payload = event.get("payload") or {}
                if event.get("name") == PROGRESS:
                    yield _sse(payload.get("eventData"))
                elif event.get("name") == COMPLETION:
                    result = payload.get("result")
                    status = payload.get("status", "")
                    if result is None or not 200 <= result.get("status_code", 0) < 300:
                        yield _sse(_error_body(status, result)[1])
                    yield _sse("[DONE]")
                    return
        finally:
            event_bus.unregister(task_id)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Bella-Task-Id": task_id}
    return Response(stream_with_context(generate()), mimetype="text/event-stream", headers=headers)


def publish_completions(tasks: list[Task]) -> None:
    """Task-end listener: tell the web process holding an online task that it ended."""
    from bellaq.eventbus import completion_event

    by_instance: dict[str, list[dict]] = {}
    for task in tasks:
        if task.instance_id and task.response_mode != "callback":
            result = json.loads(task.result) if task.result else None
            by_instance.setdefault(task.instance_id, []).append(completion_event(task.id, result, task.status))
    for instance_id, events in by_instance.items():
        bus().publish(instance_id, events)
