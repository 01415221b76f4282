"""The online response modes: ``blocking`` (a held request) and ``streaming`` (SSE)."""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Response, current_app, jsonify, stream_with_context

from bellaq.errors import Unavailable, error_body
from bellaq.eventbus import COMPLETION, PROGRESS, EventBus, completion_event, watch_event
from bellaq.extensions import db
from bellaq.idempotency import PENDING, fingerprint, header_key, in_progress, release, reserve
from bellaq.keys import Principal
from bellaq.models import Task
from bellaq.models.tasks import END_STATUSES, TaskStatus
from bellaq.services import services
from bellaq.tasks import end_as_timeout, new_task_id, put, recorded_end

# How often a held request also looks at SQL, in case an event was missed (with jitter, so
# thousands of held requests do not look at once).
RECHECK_S = 30.0
# A retried put attached to a task another process holds looks at SQL this often.
ATTACHED_RECHECK_S = 1.0
PUT_ROUTE = "queue.put"
# What a put refused because this process holds as many requests as it may tells the client.
SHED_RETRY_AFTER_S = 2


class HeldRequests:
    """How many online requests this process holds now, and the bound on them. A lock held for a
    compare-and-add (never across I/O) keeps the count exact under threads and under gevent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def acquire(self, limit: int) -> bool:
        with self._lock:
            if 0 < limit <= self.count:
                return False
            self.count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.count -= 1


class _Slot:
    """One held request's place in :class:`HeldRequests`; releasing it twice releases it once."""

    def __init__(self, held: HeldRequests) -> None:
        self._held: HeldRequests | None = held

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()


def held_requests() -> HeldRequests:
    return current_app.extensions.setdefault("bellaq.held_requests", HeldRequests())


def _take_slot() -> _Slot:
    """A place among the requests this process holds, or 503 at once (nothing written yet)."""
    held = held_requests()
    limit = services().settings.max_held_requests
    if not held.acquire(limit):
        raise Unavailable(f"This server process already holds {limit} blocking or streaming requests, the most it "
                          f"may (BELLAQ_MAX_HELD_REQUESTS); nothing was kept. Retry after {SHED_RETRY_AFTER_S} s, "
                          "or use response_mode callback.", code="overloaded",
                          headers={"Retry-After": str(SHED_RETRY_AFTER_S)})
    return _Slot(held)


def bus() -> EventBus:
    return current_app.extensions["bellaq.eventbus"]


def _final_of(task_id: str) -> dict[str, Any] | None:
    """The task's end as a completion payload, straight from SQL, if it has ended."""
    db.session.expire_all()
    row = db.session.execute(db.select(Task.status, Task.result, Task.queue).where(Task.id == task_id)).first()
    db.session.rollback()  # hand the connection back: a held request must not pin one
    if row is None:
        return None
    if row.status not in END_STATUSES:
        recorded = recorded_end(task_id, row.queue)  # completed in the engine, SQL not written yet
        return None if recorded is None else {"taskId": task_id, "status": recorded[0].value, "result": recorded[1]}
    return {"taskId": task_id, "status": row.status, "result": json.loads(row.result) if row.result else None}


def _events(task_id: str, timeout: float, waiter: queue.Queue, recheck_s: float = RECHECK_S
            ) -> Iterator[dict[str, Any]]:
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
            deadline = time.monotonic() + recheck_s
            continue
        try:
            event = waiter.get(timeout=min(remaining, recheck_s * random.uniform(0.5, 1.0)))
        except queue.Empty:
            final = _final_of(task_id)
            if final is not None:
                yield {"name": COMPLETION, "payload": final}
                return
            continue
        yield event
        if event.get("name") == COMPLETION:
            return


def _wait_and_put(principal: Principal, body: dict[str, Any], task_id: str, record_id: int) -> tuple[queue.Queue, int]:
    """Wait for the task's events, then accept it and hand the SQL connection back; returns the
    waiter and the task's timeout. A failed put frees the Idempotency-Key it reserved."""
    waiter = bus().register(task_id)
    try:
        timeout = put(principal, body, task_id=task_id).timeout
    except Exception:
        bus().unregister(task_id, waiter)
        if record_id:
            release(record_id)
        raise
    db.session.rollback()
    return waiter, timeout


def _error_body(status: str, result: dict | None) -> tuple[int, dict]:
    if result is not None:
        return result.get("status_code", 500), result.get("body")
    if status == TaskStatus.CANCELLED:
        return 409, error_body("The task was cancelled before it finished.", code="task_cancelled")
    return 500, error_body(f"The task ended as {status} without a result.", "server_error", code="no_result")


def respond(principal: Principal, body: dict[str, Any], mode: str) -> Response:
    """A blocking or streaming put, held in one of the process's ``BELLAQ_MAX_HELD_REQUESTS``
    places until it is answered (a stream: until it is closed); without a place, 503 before
    anything is written."""
    slot = _take_slot()
    try:
        response = _respond(principal, body, mode)
    except BaseException:
        slot.release()
        raise
    if response.is_streamed:
        response.call_on_close(slot.release)
    else:
        slot.release()
    return response


def _respond(principal: Principal, body: dict[str, Any], mode: str) -> Response:
    """With an ``Idempotency-Key`` a retry attaches to the first request's task instead of
    running a second one."""
    task_id = new_task_id()
    key = header_key()
    record_id = 0
    if key is not None:
        answer = json.dumps({"code": 200, "data": task_id})
        record_id, first = reserve(PUT_ROUTE, principal.owner, key, services().settings.idempotency_ttl,
                                   fingerprint(body), answer)
        if first is not None:
            if first.response == PENDING:
                raise in_progress()
            return attach(json.loads(first.response)["data"], mode)
    if mode == "blocking":
        return blocking(principal, body, task_id, record_id)
    return streaming(principal, body, task_id, record_id)


def _answer(task_id: str, payload: dict[str, Any]) -> Response:
    status_code, out = _error_body(payload.get("status", ""), payload.get("result"))
    response = jsonify(out)
    response.status_code = status_code
    response.headers["X-Bella-Task-Id"] = task_id
    return response


def _hold(task_id: str, timeout: float, waiter: queue.Queue, recheck_s: float = RECHECK_S) -> Response:
    try:
        for event in _events(task_id, timeout, waiter, recheck_s):
            if event.get("name") == COMPLETION:
                return _answer(task_id, event.get("payload") or {})
        raise AssertionError("unreachable: events always end with a completion")
    finally:
        bus().unregister(task_id, waiter)


def blocking(principal: Principal, body: dict[str, Any], task_id: str, record_id: int = 0) -> Response:
    """Hold the request until the task ends; answer with the upstream's status and body."""
    waiter, timeout = _wait_and_put(principal, body, task_id, record_id)
    return _hold(task_id, timeout, waiter)


def _sse(data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


def _stream(task_id: str, timeout: float, waiter: queue.Queue, recheck_s: float = RECHECK_S,
            replay: dict[str, Any] | None = None) -> Response:
    """``text/event-stream``: each progress event's data as it comes, then ``[DONE]``. ``replay``
    is the end of a task that had already ended: its result is sent whole."""
    event_bus = bus()

    def generate() -> Iterator[str]:
        try:
            # An SSE comment sends the headers now: the client knows the task is accepted.
            yield ": accepted\n\n"
            if replay is not None:
                yield _sse(_error_body(replay.get("status", ""), replay.get("result"))[1])
                yield _sse("[DONE]")
                return
            for event in _events(task_id, timeout, waiter, recheck_s):
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
            event_bus.unregister(task_id, waiter)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Bella-Task-Id": task_id}
    return Response(stream_with_context(generate()), mimetype="text/event-stream", headers=headers)


def streaming(principal: Principal, body: dict[str, Any], task_id: str, record_id: int = 0) -> Response:
    """Answer ``text/event-stream`` for a new task."""
    waiter, timeout = _wait_and_put(principal, body, task_id, record_id)
    return _stream(task_id, timeout, waiter)


def attach(task_id: str, mode: str) -> Response:
    """A retried put: follow the first request's task from where it is. Events reach this process
    through the one holding the task (asked to forward them), and SQL is looked at every
    ``ATTACHED_RECHECK_S`` in case that process is gone."""
    event_bus = bus()
    waiter = event_bus.register(task_id)
    try:
        task = db.session.get(Task, task_id)
        if task is None:  # the first put has not committed yet
            raise in_progress()
        instance_id, remaining = task.instance_id, max(0.0, task.expire_time / 1000 - time.time())
        db.session.rollback()
        if instance_id and instance_id != event_bus.instance_id:
            event_bus.publish(instance_id, [watch_event(task_id, event_bus.instance_id)])
        final = _final_of(task_id)
    except Exception:
        event_bus.unregister(task_id, waiter)
        raise
    if mode == "streaming":
        return _stream(task_id, remaining, waiter, ATTACHED_RECHECK_S, replay=final)
    if final is not None:
        event_bus.unregister(task_id, waiter)
        return _answer(task_id, final)
    return _hold(task_id, remaining, waiter, ATTACHED_RECHECK_S)


# Set on a Task whose held request :func:`answer_held` already answered: the task-end listener
# then publishes nothing more for it.
ANSWERED_EARLY = "answered_early"


def answer_held(ended: Iterable[tuple[str, str, str, dict[str, Any] | None, str]]) -> set[str]:
    """Answer the held requests of tasks the engine has just completed, before their SQL write:
    ``(task id, instance id, response mode, result, status)`` each; returns the ids published.
    The engine recorded each result with its claim, so the SQL write that follows (or the
    lost-completion reaper) stores that same result."""
    by_instance: dict[str, list[dict]] = {}
    for task_id, instance_id, mode, result, status in ended:
        if instance_id and mode != "callback":
            by_instance.setdefault(instance_id, []).append(completion_event(task_id, result, status))
    for instance_id, events in by_instance.items():
        bus().publish(instance_id, events)
    return {event["payload"]["taskId"] for events in by_instance.values() for event in events}


def publish_completions(tasks: list[Task]) -> None:
    """Task-end listener: tell the web process holding an online task that it ended."""
    by_instance: dict[str, list[dict]] = {}
    for task in tasks:
        if task.instance_id and task.response_mode != "callback" and not getattr(task, ANSWERED_EARLY, False):
            result = json.loads(task.result) if task.result else None
            by_instance.setdefault(task.instance_id, []).append(completion_event(task.id, result, task.status))
    for instance_id, events in by_instance.items():
        bus().publish(instance_id, events)
