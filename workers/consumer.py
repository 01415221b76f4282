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
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import redis

from bellaq import tasks as task_service
from bellaq.clock import now_ms
from bellaq.eventbus import EventBus, progress_event
from bellaq.extensions import db
from bellaq.models import Queue
from bellaq.services import Services, services
from workers import announcements, leases
from workers.celery_app import broker_prefix, celery, get_flask_app, level_queue
from workers.upstream import UpstreamClient, UpstreamResult

log = logging.getLogger(__name__)

QUEUE_CACHE_S = 5.0
# A message drains its queue for at most this long, then re-announces and frees its Celery slot.
DRAIN_BUDGET_S = 5.0

_queue_cache: dict[str, tuple[float, dict | None]] = {}
_clients: dict[tuple[str, str | None], UpstreamClient] = {}
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_broker: redis.Redis | None = None


def announce(queue: str, level: int, count: int = 1) -> None:
    """Send the "work is ready" messages ``count`` new tasks call for (work-ready listener): none
    while the queue level already has enough consumers announced (``workers.announcements``)."""
    svc = services()
    for token in announcements.claim(svc, queue, level, count):
        consume.apply_async((queue, level, token), queue=level_queue(level))


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
                                 svc.settings.default_max_retries, svc.settings.worker_lease, leases.renewer().holder)

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


def _higher_levels_waiting(level: int, svc: Services) -> bool:
    """True when a Celery message of a more urgent level waits: a draining consumer then gives
    its slot back."""
    if level == 0:
        return False
    global _broker
    if _broker is None:
        _broker = redis.Redis.from_url(svc.settings.broker_url)
    pipe = _broker.pipeline(transaction=False)
    for higher in range(level):
        pipe.llen(f"{broker_prefix(svc.settings)}{level_queue(higher)}")
    return any(pipe.execute())


class _Drain:
    """One consume message's run: keeps up to ``slots`` tasks in flight, refilling as they end,
    until the queue is empty, a limit says wait, the time budget is spent, or more urgent work
    waits."""

    def __init__(self, queue: str, level: int, config: dict, svc: Services, token: str) -> None:
        self.queue, self.level, self.config, self.svc, self.token = queue, level, config, svc, token
        self.slots = 1 if config["strategy"] == "sequential" else svc.settings.worker_take_size
        self.client = upstream_for(config, svc)
        self.bus: EventBus = get_flask_app().extensions["bellaq.eventbus"]
        self.inflight: dict[Future, dict] = {}
        self.finished: dict[str, dict] = {}  # non-online results, completed together
        self.taken = 0
        self.again_in: float | None = None  # re-announce after this many seconds
        self.leased: list[str] = []  # renewed by this process's heartbeat until the run ends
        self.recruited = config["strategy"] == "sequential"  # one at a time: nobody to recruit
        self.refreshed = 0.0  # the first take marks this consumer alive

    def refill(self, started: float) -> bool:
        """Take more work into free slots; False once nothing more should be taken."""
        if time.monotonic() - started > DRAIN_BUDGET_S or _higher_levels_waiting(self.level, self.svc):
            self.again_in = 0.0
            return False
        if self.config["strategy"] == "sequential":
            self.flush()  # its slot frees only once the running task is completed
        want, retry_in = _rpm_allows(self.config, self.queue, self.slots - len(self.inflight), self.svc)
        taken = _take(self.config, self.queue, self.level, want, self.svc) if want > 0 else None
        if taken is None:
            self.again_in = retry_in or 0.5
            return False
        if not taken:
            return False
        if self.config.get("rpm"):
            _count_rpm(self.queue, len(taken), self.svc)
        self.taken += len(taken)
        leases.renewer().hold(taken)
        self.leased += [task["task_id"] for task in taken]
        for task in taken:
            future = executor().submit(run_request, task, self.client, self.bus, self.svc.settings.upstream_timeout)
            self.inflight[future] = task
        # The requests run meanwhile: announcements are off their critical path.
        if not self.recruited and len(taken) >= self.slots:
            # A full take: the backlog may be deeper than this drain can keep up with.
            self.recruited = True
            token = announcements.recruit(self.svc, self.queue, self.level)
            if token is not None:
                consume.apply_async((self.queue, self.level, token), queue=level_queue(self.level))
        if time.monotonic() - self.refreshed > announcements.REFRESH_S:
            self.refreshed = time.monotonic()
            announcements.alive(self.svc, self.queue, self.level, self.token)
        return True

    def collect(self) -> None:
        """Wait for at least one request to end; online answers are completed at once."""
        done, _ = wait(list(self.inflight), return_when=FIRST_COMPLETED)
        online: dict[str, dict] = {}
        for future in done:
            task = self.inflight.pop(future)
            try:
                result = future.result()
            except Exception as err:  # noqa: BLE001 - a bug must not strand the task: record it
                log.exception("task %s failed in the worker", task["task_id"])
                result = error_result(500, f"The worker failed: {type(err).__name__}: {err}", "worker_error")
            (online if task["response_mode"] != "callback" else self.finished)[task["task_id"]] = result
        if online:
            task_service.complete_many(online)
        if len(self.finished) >= self.slots:
            self.flush()

    def flush(self) -> None:
        if self.finished:
            task_service.complete_many(self.finished)
            self.finished = {}

    def again(self) -> None:
        """Come back to this queue later: the message keeps this consumer's token."""
        assert self.again_in is not None
        announcements.coming_back(self.svc, self.queue, self.level, self.token, self.again_in)
        consume.apply_async((self.queue, self.level, self.token), queue=level_queue(self.level),
                            countdown=self.again_in)

    def drain(self, started: float) -> None:
        taking = self.refill(started)
        while self.inflight:
            self.collect()
            if taking and len(self.inflight) <= self.slots - max(1, self.slots // 4):
                taking = self.refill(started)
        self.flush()

    def run(self) -> int:
        started = time.monotonic()
        while True:
            self.drain(started)
            if self.again_in is not None:
                self.again()
                return self.taken
            announcements.leave(self.svc, self.queue, self.level, self.token)
            # A put that saw this consumer counted sent nothing: look once more after leaving.
            if not self.refill(started):
                if self.again_in is not None:
                    self.again()
                return self.taken
            announcements.alive(self.svc, self.queue, self.level, self.token)


@celery.task(name="bellaq.consume", ignore_result=True)
def consume(queue: str, level: int, token: str | None = None) -> int:
    """Take work of ``queue:level`` with the queue's strategy, run it, complete it. ``token``
    names the message among the queue level's announced consumers (``workers.announcements``)."""
    svc = services()
    token = token or announcements.new_token()
    config = queue_config(queue)
    if config is None or not config["builtin"]:
        announcements.leave(svc, queue, level, token)
        return 0
    drain = _Drain(queue, level, config, svc, token)
    try:
        return drain.run()
    finally:
        leases.renewer().release(drain.leased)
