"""The event bus: Redis streams that carry workers' progress and completion events to the web
process holding a blocking or streaming request.

Each web process has an instance id and one listener (a greenlet under gevent, a thread
otherwise) reading the stream ``<topic><instance_id>``; a waiting request parks on a queue
keyed by its task id. An event is one stream entry with a field ``event`` holding the JSON
object ``{"name", "from", "payload", "context"}``; entries written with those four keys as
separate fields (``payload`` as JSON text) are read as well.

The listener reads through the consumer group ``bellaq`` and acknowledges what it handled, so
entries of a stream whose web process is gone are left for ``bellaq.event_completions.sweep``.
Events bellaq writes carry a signature (field ``sig``) and are delivered as they are. Events a
worker writes must prove the lease with ``payload.leaseToken`` (see ``bellaq.lease_tokens``): a
progress event is then delivered; a completion is handed to ``on_completion``, which ends the
task, and the held request hears of it from the signed completion that ending publishes.
Anything else is dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from bellaq.lease_tokens import BusSecret

log = logging.getLogger(__name__)

PROGRESS = "task-progress-event"
COMPLETION = "task-completion-event"
WATCH = "bellaq-watch-event"
MAX_FORWARDS = 10_000
DROP_LOG_EVERY_S = 10.0
STREAM_TTL_S = 3600
STREAM_MAXLEN = 100_000
GROUP = "bellaq"


def topic(prefix: str) -> str:
    return f"{prefix}:events:"


def progress_event(task_id: str, event_id: str, event_name: str, event_data: Any) -> dict[str, Any]:
    return {"name": PROGRESS, "from": "", "context": "",
            "payload": {"taskId": task_id, "eventId": event_id, "eventName": event_name,
                        "eventData": event_data}}


def completion_event(task_id: str, result: dict[str, Any] | None, status: str) -> dict[str, Any]:
    return {"name": COMPLETION, "from": "", "context": "",
            "payload": {"taskId": task_id, "result": result, "status": status}}


def watch_event(task_id: str, instance_id: str) -> dict[str, Any]:
    """Asks the instance holding a task to forward its events to ``instance_id`` too."""
    return {"name": WATCH, "from": "", "context": "", "payload": {"taskId": task_id, "instanceId": instance_id}}


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


def lease_token_of(event: dict[str, Any]) -> Any:
    payload = event.get("payload")
    return payload.get("leaseToken") if isinstance(payload, dict) else None


class EventBus:
    """Publishing to any instance's stream, and listening on this instance's own."""

    def __init__(self, client: redis.Redis, prefix: str, instance_id: str) -> None:
        self.redis = client
        self.topic = topic(prefix)
        # The streams web processes read (or read once): what the sweep looks at besides ``topic``.
        self.streams_key = f"{prefix}:eventbus:streams"
        self.instance_id = instance_id
        self._waiters: dict[str, list[queue.Queue]] = {}
        # Instances a retried request attached to a task from (see ``watch_event``): this
        # process forwards the task's events there.
        self._forwards: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self.secret = BusSecret(client, prefix)
        self._drops, self._drops_logged = 0, float("-inf")
        # Called with a worker's completion event whose lease token checked out.
        self.on_completion: Callable[[dict[str, Any]], None] | None = None

    # ------------------------------------------------------------------ publishing
    def publish(self, instance_id: str, events: Iterable[dict[str, Any]]) -> None:
        stream = self.topic + instance_id
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            text = json.dumps(event)
            pipe.xadd(stream, {"event": text, "sig": self.secret.sign(text)}, maxlen=STREAM_MAXLEN,
                      approximate=True)
        pipe.expire(stream, STREAM_TTL_S)
        pipe.execute()

    def ensure_group(self, stream: str) -> None:
        """The consumer group of ``stream`` (made with the stream if need be), from its first
        entry; the stream is listed for the sweep."""
        try:
            self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(stream, STREAM_TTL_S)
        pipe.sadd(self.streams_key, stream)
        pipe.execute()

    # ------------------------------------------------------------------ waiting
    def register(self, task_id: str) -> queue.Queue:
        """A queue that receives the task's events; call before the task can run."""
        self._ensure_listener()
        waiter: queue.Queue = queue.Queue()
        with self._lock:
            self._waiters.setdefault(task_id, []).append(waiter)
        return waiter

    def unregister(self, task_id: str, waiter: queue.Queue) -> None:
        with self._lock:
            waiters = self._waiters.get(task_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(task_id, None)

    def waiting(self) -> int:
        return len(self._waiters)

    def waiters_of(self, task_id: str) -> int:
        """Requests of this process waiting for the task."""
        return len(self._waiters.get(task_id, ()))

    def forwarding(self, task_id: str) -> set[str]:
        """Instances this process forwards the task's events to."""
        return set(self._forwards.get(task_id, ()))

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

    def read(self, fields: dict[str, str]) -> tuple[dict[str, Any] | None, bool]:
        """An entry's event and whether bellaq wrote it (a valid signature)."""
        signature = fields.get("sig")
        if signature is not None and "event" in fields and self.secret.signed(fields["event"], signature):
            return parse_entry({"event": fields["event"]}), True
        return parse_entry(fields), False

    def _dropped(self, task_id: str) -> None:
        """Log events dropped for want of a valid lease token, at most once every few seconds."""
        self._drops += 1
        now = time.monotonic()
        if now - self._drops_logged >= DROP_LOG_EVERY_S:
            log.warning("dropped %d event(s) without a valid lease token (the last for task %s)", self._drops,
                        task_id)
            self._drops, self._drops_logged = 0, now

    def dispatch(self, fields: dict[str, str]) -> None:
        event, trusted = self.read(fields)
        if not isinstance(event, dict) or not isinstance(event.get("payload"), dict):
            return
        task_id = event["payload"].get("taskId")
        if not isinstance(task_id, str):
            return
        if not trusted:
            if self.secret.token_attempt(task_id, lease_token_of(event)) is None:
                self._dropped(task_id)
                return
            if event.get("name") == COMPLETION:
                if self.on_completion is not None:
                    self.on_completion(event)
                return
            if event.get("name") != PROGRESS:
                return
        elif event.get("name") == WATCH:
            instance = event["payload"].get("instanceId")
            if isinstance(instance, str) and len(self._forwards) < MAX_FORWARDS:
                self._forwards.setdefault(task_id, set()).add(instance)
            return
        for waiter in list(self._waiters.get(task_id, ())):
            waiter.put(event)
        if task_id in self._forwards:
            targets = self._forwards.pop(task_id) if event.get("name") == COMPLETION else self._forwards[task_id]
            for instance in targets:
                self.publish(instance, [event])

    def _listen(self) -> None:
        stream = self.topic + self.instance_id
        client = self.redis
        grouped = False
        while not self._stop.is_set():
            try:
                if not grouped:
                    self.ensure_group(stream)
                    grouped = True
                batches = client.xreadgroup(GROUP, self.instance_id, {stream: ">"}, count=500, block=1000)
            except redis.ResponseError as err:
                grouped = False  # NOGROUP: the stream expired or Redis lost it
                log.warning("event bus read failed (%s); retrying", err)
                self._stop.wait(0.2)
                continue
            except redis.RedisError as err:
                log.warning("event bus read failed (%s); retrying", err)
                self._stop.wait(0.5)
                continue
            for _stream, entries in batches or []:
                handled = []
                for entry_id, fields in entries:
                    try:
                        self.dispatch(fields)
                        handled.append(entry_id)
                    except Exception:
                        # Left pending: the sweep claims it again.
                        log.exception("event bus: handling an event failed")
                try:
                    if handled:
                        client.xack(stream, GROUP, *handled)
                except redis.RedisError as err:
                    log.warning("event bus ack failed (%s)", err)
