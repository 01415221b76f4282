"""The built-in consumer: a Celery message says "work is ready on queue Q at level L"; the
consumer takes from the engine with the queue's strategy (the Lua script decides which tasks
run), calls the upstream for each taken task at once, and completes them.

One message may lease several tasks (``BELLAQ_WORKER_TAKE_SIZE``); they run concurrently on
threads (greenlets under the gevent pool), so a worker process keeps
``concurrency x take size`` upstream requests in flight. Online tasks (blocking, streaming) are
completed the moment their answer arrives; the others are completed together in one bulk write.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from bellaq import tasks as task_service
from bellaq.clock import now_ms
from bellaq.eventbus import EventBus, progress_event
from bellaq.extensions import db
from bellaq.models import Queue
from bellaq.services import Services, services
from workers.celery_app import celery, get_flask_app, level_queue
from workers.upstream import UpstreamClient, UpstreamResult

log = logging.getLogger(__name__)

QUEUE_CACHE_S = 5.0
MAX_MESSAGES_PER_ANNOUNCE = 256

_queue_cache: dict[str, tuple[float, dict | None]] = {}
_clients: dict[tuple[str, str | None], UpstreamClient] = {}
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def announce(queue: str, level: int, count: int = 1) -> None:
    """Send enough "work is ready" messages for ``count`` new tasks (work-ready listener)."""
    size = services().settings.worker_take_size
    messages = min(max(1, math.ceil(count / size)), MAX_MESSAGES_PER_ANNOUNCE)
    for _ in range(messages):
        consume.apply_async((queue, level), queue=level_queue(level))


def queue_config(name: str) -> dict | None:
    """The queue's registration, cached for a few seconds per process."""
    hit = _queue_cache.get(name)
    if hit and hit[0] > time.monotonic():
        return hit[1]
    row = db.session.get(Queue, name)
    config = row.to_dict() if row else None
    _queue_cache[name] = (time.monotonic() + QUEUE_CACHE_S, config)
    return config


def upstream_for(config: dict, svc: Services) -> UpstreamClient | None:
    upstream = config.get("upstream") or {}
    base_url = upstream.get("base_url") or svc.settings.upstream_base_url
    if not base_url:
        return None
    key_env = upstream.get("api_key_env") or svc.settings.upstream_api_key_env
    api_key = os.environ.get(key_env) if key_env else None
    with _lock:
        client = _clients.get((base_url, api_key))
        if client is None:
            client = _clients[(base_url, api_key)] = UpstreamClient(
                base_url, api_key, timeout=svc.settings.upstream_timeout)
    return client


def executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=512, thread_name_prefix="bellaq-upstream")
    return _executor


def _rpm_allows(config: dict, queue: str, size: int, svc: Services) -> tuple[int, float]:
    """How many tasks the queue's requests-per-minute limit lets us take, and when to look again."""
    if not config.get("rpm"):
        return size, 0.0
    used = int(svc.redis.get(svc.key("rpm", queue, str(int(time.time() // 60)))) or 0)
    size = min(size, config["rpm"] - used)
    if size <= 0:
        return 0, 60 - time.time() % 60 + 0.05
    return size, 0.0


def _take(config: dict, queue: str, level: int, size: int, svc: Services) -> list[dict] | None:
    """Lease up to ``size`` tasks; None when ``max_in_flight`` tasks already run."""

    def take(n: int) -> list[dict]:
        return task_service.take([(queue, level)], n, config["strategy"], svc.settings.default_process_timeout,
                                 svc.settings.default_max_retries)

    limit = config.get("max_in_flight")
    if not limit:
        return take(size)
    # Counting the running tasks and leasing more must be one step across all consumers.
    with svc.redis.lock(svc.key("inflight", queue, str(level)), timeout=10, blocking_timeout=10):
        free = limit - svc.engine.stats(queue, level).running
        return take(min(size, free)) if free > 0 else None


def _count_rpm(queue: str, n: int, svc: Services) -> None:
    key = svc.key("rpm", queue, str(int(time.time() // 60)))
    pipe = svc.redis.pipeline()
    pipe.incrby(key, n)
    pipe.expire(key, 120)
    pipe.execute()


def error_result(status_code: int, message: str, code: str) -> dict[str, Any]:
    return task_service.error_result(status_code, message, code, "upstream_error")


def run_request(task: dict, client: UpstreamClient | None, bus: EventBus, upstream_timeout: float) -> dict:
    """Call the upstream for one task; streaming tasks forward each chunk as a progress event."""
    if client is None:
        return error_result(502, f"No upstream is configured for queue '{task['queue']}': register it with "
                                 "upstream.base_url or set BELLAQ_UPSTREAM_BASE_URL.", "no_upstream")
    deadline = time.monotonic() + upstream_timeout
    if task.get("expire_time") and not task.get("batch_id"):
        deadline = min(deadline, time.monotonic() + max(0.0, (task["expire_time"] - now_ms()) / 1000))
    data = task["data"]
    streaming = task["response_mode"] == "streaming" or data.get("stream") is True
    if not streaming:
        return _as_result(client.call(task["endpoint"], data, deadline))
    if task["response_mode"] == "streaming" and data.get("stream") is not True:
        data = dict(data, stream=True)
    final: UpstreamResult | None = None
    for n, event in enumerate(client.stream(task["endpoint"], data, deadline)):
        if event.kind == "chunk" and task.get("instance_id"):
            bus.publish(task["instance_id"], [progress_event(task["task_id"], str(n), "chunk", event.data)])
        elif event.kind == "done":
            final = event.result
    assert final is not None
    return _as_result(final)


def _as_result(result: UpstreamResult) -> dict:
    return {"status_code": result.status_code, "request_id": result.request_id, "body": result.body}


@celery.task(name="bellaq.consume", ignore_result=True)
def consume(queue: str, level: int) -> int:
    """Take work of ``queue:level`` with the queue's strategy, run it, complete it."""
    svc = services()
    config = queue_config(queue)
    if config is None or not config["builtin"]:
        return 0
    size = 1 if config["strategy"] == "sequential" else svc.settings.worker_take_size
    size, retry_in = _rpm_allows(config, queue, size, svc)
    taken = _take(config, queue, level, size, svc) if size > 0 else None
    if taken is None:
        consume.apply_async((queue, level), queue=level_queue(level), countdown=retry_in or 0.5)
        return 0
    if not taken:
        return 0
    if config.get("rpm"):
        _count_rpm(queue, len(taken), svc)
    client = upstream_for(config, svc)
    bus: EventBus = get_flask_app().extensions["bellaq.eventbus"]
    futures: dict[Future, dict] = {
        executor().submit(run_request, task, client, bus, svc.settings.upstream_timeout): task for task in taken
    }
    later: dict[str, dict] = {}
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        now: dict[str, dict] = {}
        for future in finished:
            task = futures[future]
            try:
                result = future.result()
            except Exception as err:  # noqa: BLE001 - a bug must not strand the task: record it
                log.exception("task %s failed in the worker", task["task_id"])
                result = error_result(500, f"The worker failed: {type(err).__name__}: {err}", "worker_error")
            (now if task["response_mode"] != "callback" else later)[task["task_id"]] = result
        if now:
            task_service.complete_many(now)
    if later:
        task_service.complete_many(later)
    if len(taken) == size:
        consume.apply_async((queue, level), queue=level_queue(level))  # there may be more
    return len(taken)
