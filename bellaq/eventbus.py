"""The event bus: Redis streams that carry workers' progress and completion events to the web
process holding a blocking or streaming request.

Each web process has an instance id and one listener (a greenlet under gevent, a thread
otherwise) reading the stream ``<topic><instance_id>``; a waiting request parks on a queue
keyed by its task id. An event is one stream entry with a field ``event`` holding the JSON
object ``{"name", "from", "payload", "context"}``; entries written with those four keys as
separate fields (``payload`` as JSON text) are read as well.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterable
from typing import Any

import redis

from bellaq.clock import now_ms

log = logging.getLogger(__name__)

PROGRESS = "task-progress-event"
COMPLETION = "task-completion-event"
STREAM_TTL_S = 3600
STREAM_MAXLEN = 100_000


def topic(prefix: str) -> str:
    return f"{prefix}:events:"


def progress_event(task_id: str, event_id: str, event_name: str, event_data: Any) -> dict[str, Any]:
    return {"name": PROGRESS, "from": "", "context": "",
            "payload": {"taskId": task_id, "eventId": event_id, "eventName": event_name,
                        "eventData": event_data}}


def completion_event(task_id: str, result: dict[str, Any] | None, status: str) -> dict[str, Any]:
    return {"name": COMPLETION, "from": "", "context": "",
            "payload": {"taskId": task_id, "result": result, "status": status}}


def parse_entry(fields: dict[str, str]) -> dict[str, Any] | None:
    try:
        if "event" in fields:
            return json.loads(fields["event"])
        payload = fields.get("payload", "{}")
        return {"name": fields.get("name", ""), "from": fields.get("from", ""),
                "payload": json.loads(payload) if isinstance(payload, str) else payload,
                "context": fields.get("context", "")}
    except ValueError:
        log.warning("dropping an event bus entry that is not JSON: %r", fields)
        return None


class EventBus:
    """Publishing to any instance's stream, and listening on this instance's own."""

    def __init__(self, client: redis.Redis, prefix: str, instance_id: str) -> None:
        self.redis = client
        self.topic = topic(prefix)
        self.instance_id = instance_id
        self._waiters: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ publishing
    def publish(self, instance_id: str, events: Iterable[dict[str, Any]]) -> None:
        stream = self.topic + instance_id
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.xadd(stream, {"event": json.dumps(event)}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(stream, STREAM_TTL_S)
        pipe.execute()

    # ------------------------------------------------------------------ waiting
    def register(self, task_id: str) -> queue.Queue:
        """A queue that receives the task's events; call before the task can run."""
        self._ensure_listener()
        waiter: queue.Queue = queue.Queue()
        with self._lock:
            self._waiters[task_id] = waiter
        return waiter

    def unregister(self, task_id: str) -> None:
        with self._lock:
            self._waiters.pop(task_id, None)

    def waiting(self) -> int:
        return len(self._waiters)

    def _ensure_listener(self) -> None:
        if self._listener is not None and self._listener.is_alive():
            return
        with self._lock:
            if self._listener is not None and self._listener.is_alive():
                return
            self._listener = threading.Thread(target=self._listen, name="bellaq-eventbus", daemon=True)
            self._listener.start()

    def stop(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        stream = self.topic + self.instance_id
        last = f"{now_ms() - 1000}-0"
        client = self.redis
        while not self._stop.is_set():
            try:
                batches = client.xread({stream: last}, count=500, block=1000)
            except redis.RedisError as err:
                log.warning("event bus read failed (%s); retrying", err)
                self._stop.wait(0.5)
                continue
            for _stream, entries in batches or []:
                for entry_id, fields in entries:
                    last = entry_id
                    event = parse_entry(fields)
                    if event is None:
                        continue
                    task_id = (event.get("payload") or {}).get("taskId")
                    waiter = self._waiters.get(task_id)
                    if waiter is not None:
                        waiter.put(event)
