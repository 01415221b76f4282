"""Completions written to the event bus end their task, as ``POST /v1/queue/{id}/complete`` does.

Two readers hand them here: the listener of the web process whose stream received the event
(at once), and beat's :func:`sweep`, which reads the streams nobody reads any more (their web
process is gone) and claims entries a reader took but never acknowledged. Both go through the
consumer group ``bellaq`` of each stream, so an entry is handled by one of them; should both
handle it, the engine's arbitration ends the task once.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, current_app

from bellaq.errors import ApiError
from bellaq.eventbus import COMPLETION, GROUP, STREAM_TTL_S, EventBus, lease_token_of
from bellaq.extensions import db
from bellaq.models import Task
from bellaq.services import services
from bellaq.tasks import complete_task

log = logging.getLogger(__name__)

SWEEPER = "sweeper"
# An entry nobody took, or took and never acknowledged, for this long is the sweep's.
IDLE_MS = 10_000


def _result_of(payload: dict[str, Any]) -> dict[str, Any] | None:
    result = payload.get("result")
    if not isinstance(result, dict):
        return None
    status = result.get("status_code")
    request_id = result.get("request_id", "")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        return None
    if not isinstance(request_id, str):
        return None
    return {"status_code": status, "request_id": request_id, "body": result.get("body")}


def complete_from_event(bus: EventBus, event: dict[str, Any]) -> str:
    """End the task of a worker's completion event if its lease token is the current lease's.
    Returns what happened: 'completed', 'already', or why it was dropped."""
    payload = event.get("payload") or {}
    task_id = payload.get("taskId")
    if event.get("name") != COMPLETION or not isinstance(task_id, str):
        return "not_a_completion"
    attempt = bus.secret.token_attempt(task_id, lease_token_of(event))
    if attempt is None:
        return "bad_token"
    result = _result_of(payload)
    if result is None:
        log.warning("dropping the completion event of task %s: its result is not {status_code, request_id, body}",
                    task_id)
        return "bad_result"
    task = db.session.get(Task, task_id)
    if task is None or services().engine.attempts_of(task.queue, task.id) != attempt:
        db.session.rollback()  # a lease that ran out and was taken again has a newer attempt
        return "stale_lease"
    try:
        answer = complete_task(task, result)
    except ApiError as err:
        db.session.rollback()
        log.info("completion event of task %s refused: %s", task_id, err.message)
        return err.code or "refused"
    return "completed" if answer["completed"] else "already"


def completer(app: Flask, bus: EventBus):
    """The listener's ``on_completion`` for ``app``: each call in its own app context."""

    def on_completion(event: dict[str, Any]) -> None:
        with app.app_context():
            try:
                complete_from_event(bus, event)
            finally:
                db.session.remove()

    return on_completion


def _handle(bus: EventBus, client: redis.Redis, stream: str, entries: list) -> int:
    ended = 0
    handled = []
    for entry_id, fields in entries:
        if fields is None:  # trimmed away after it was read
            handled.append(entry_id)
            continue
        event, trusted = bus.read(fields)
        if not trusted and isinstance(event, dict) and event.get("name") == COMPLETION:
            ended += complete_from_event(bus, event) == "completed"
        handled.append(entry_id)  # progress nobody waits for any more is dropped
    if handled:
        client.xack(stream, GROUP, *handled)
    return ended


def _attended(client: redis.Redis, stream: str) -> bool:
    """Whether a web process is reading the stream (its listener asks at least every second)."""
    return any(c["name"] != SWEEPER and c["idle"] < IDLE_MS for c in client.xinfo_consumers(stream, GROUP))


def sweep(limit: int = 500) -> int:
    """Handle the completions in streams no web process reads (the web process is gone, or the
    task has no instance: a callback task's worker writes to ``<topic>`` itself), and entries a
    reader took but never acknowledged. Returns the tasks ended."""
    bus: EventBus = current_app.extensions["bellaq.eventbus"]
    client = bus.redis
    ended = 0
    streams = [bus.topic, *sorted(client.smembers(bus.streams_key) - {bus.topic})]
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.exists(stream)
    present = pipe.execute()
    gone = [stream for stream, there in zip(streams, present, strict=True) if not there and stream != bus.topic]
    if gone:
        client.srem(bus.streams_key, *gone)  # expired: its web process has been gone an hour
    for stream in [stream for stream, there in zip(streams, present, strict=True) if there]:
        if not any(g["name"] == GROUP for g in client.xinfo_groups(stream)):
            client.xgroup_create(stream, GROUP, id="0")
        _next, claimed, *_ = client.xautoclaim(stream, GROUP, SWEEPER, IDLE_MS, start_id="0-0", count=limit)
        ended += _handle(bus, client, stream, claimed)
        if not _attended(client, stream):
            for _stream, entries in client.xreadgroup(GROUP, SWEEPER, {stream: ">"}, count=limit) or []:
                ended += _handle(bus, client, stream, entries)
        if client.ttl(stream) == -1:
            client.expire(stream, STREAM_TTL_S)
    return ended
