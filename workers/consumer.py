"""The built-in consumer: a Celery message says "work is ready on queue Q at level L"; the
consumer takes from the engine with the queue's strategy (the Lua script decides which tasks
run), calls the upstream for each taken task at once, and completes them.

One message may lease several tasks (``BELLAQ_WORKER_TAKE_SIZE``); they run concurrently on
threads (greenlets under the gevent pool), so a worker process keeps
``concurrency x take size`` upstream requests in flight. Online tasks (blocking, streaming) are
completed the moment their answer arrives; the others are completed together in one bulk write.

The queue's limits (``rpm``, ``tpm``, ``max_in_flight``, pauses) are the engine's: a take that a
limit holds back says when to ask again, and the consumer comes back then (re-announcing itself
with a countdown when nothing of its own runs). Each request is sent once; a transient answer
goes back to the engine as a delayed task and its signals may pause the queue
(:mod:`bellaq.retries`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline, PubSub
from redis.exceptions import NoScriptError

from bellaq import metrics, retries
from bellaq import tasks as task_service
from bellaq.clock import now_ms
from bellaq.eventbus import EventBus, progress_event
from bellaq.extensions import db
from bellaq.models import Queue
from bellaq.services import Services, services
from workers import announcements, leases
from workers.celery_app import CONTROL_QUEUE, broker_prefix, celery, get_flask_app, level_queue
from workers.upstream import UpstreamClient, UpstreamResult

log = logging.getLogger(__name__)

QUEUE_CACHE_S = 5.0
# A message drains its queue for at most this long, then re-announces and frees its Celery slot.
DRAIN_BUDGET_S = 5.0
# A lingering consumer looks this often whether Celery messages wait for its slot.
LINGER_CHECK_S = 0.1
# With only max_in_flight holding work back (a slot frees when another taker's lease ends), look again after this.
IN_FLIGHT_RECHECK_S = 0.2

_queue_cache: dict[str, tuple[float, dict | None]] = {}
_clients: dict[tuple[str, str | None], UpstreamClient] = {}
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_broker: redis.Redis | None = None
_pubsubs: list[PubSub] = []  # idle Pub/Sub connections of lingering consumers
MAX_IDLE_PUBSUBS = 64


def announce(queue: str, level: int, count: int = 1, lost: bool = False,
             pipe: Pipeline | None = None) -> Callable[[list[Any]], None] | None:
    """Send the "work is ready" messages ``count`` new tasks call for (work-ready listener): none
    while the queue level already has enough consumers announced (``workers.announcements``),
    unless the tasks were put back from a ``lost`` holder. With ``pipe`` the claim rides on the
    caller's round trip: the returned function, given the answers of the commands added, sends."""
    svc = services()
    if pipe is None:
        _send(queue, level, announcements.claim(svc, queue, level, count, lost=lost))
        return None
    announcements.add_claim(svc, pipe, queue, level, count, lost=lost)

    def finish(answers: list[Any]) -> None:
        if not answers:
            return  # the round trip itself failed: its caller fails with it
        try:
            tokens = announcements.claimed(answers)
        except NoScriptError:  # Redis forgot the script: claim on a round trip of its own
            tokens = announcements.claim(svc, queue, level, count, lost=lost)
        _send(queue, level, tokens)

    return finish


def _send(queue: str, level: int, tokens: list[str]) -> None:
    for token in tokens:
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
                base_url, api_key, timeout=svc.settings.upstream_timeout, max_attempts=1)
    return client


def executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=512, thread_name_prefix="bellaq-upstream")
    return _executor


def error_result(status_code: int, message: str, code: str) -> dict[str, Any]:
    return task_service.error_result(status_code, message, code, "upstream_error")


@dataclass
class Outcome:
    """What one upstream call gave: the task's result, the upstream's signals, and whether a
    transient answer may be tried again (not after a stream already reached its client)."""

    result: dict
    retry_after: float | None = None
    limit_wait: float | None = None
    retryable: bool = True
    announced: tuple[int | None, int | None] = (None, None)  # the upstream's own rpm and tpm


def run_request(task: dict, client: UpstreamClient | None, bus: EventBus, upstream_timeout: float) -> Outcome:
    """Call the upstream once for one task; streaming tasks forward each chunk as a progress event.
    Each call is counted in the metrics (duration by status class, 429s)."""
    started = time.monotonic()
    outcome = _call(task, client, bus, upstream_timeout)
    if client is not None:
        metrics.upstream_answer(task["queue"], outcome.result["status_code"], time.monotonic() - started)
    return outcome


def _call(task: dict, client: UpstreamClient | None, bus: EventBus, upstream_timeout: float) -> Outcome:
    if client is None:
        return Outcome(error_result(502, f"No upstream is configured for queue '{task['queue']}': register it "
                                         "with upstream.base_url or set BELLAQ_UPSTREAM_BASE_URL.", "no_upstream"),
                       retryable=False)
    deadline = time.monotonic() + upstream_timeout
    if task.get("expire_time") and not task.get("batch_id"):
        deadline = min(deadline, time.monotonic() + max(0.0, (task["expire_time"] - now_ms()) / 1000))
    data = task["data"]
    streaming = task["response_mode"] == "streaming" or data.get("stream") is True
    if not streaming:
        return _outcome(client.call(task["endpoint"], data, deadline), True)
    if task["response_mode"] == "streaming" and data.get("stream") is not True:
        data = dict(data, stream=True)
    final: UpstreamResult | None = None
    sent = False
    for n, event in enumerate(client.stream(task["endpoint"], data, deadline)):
        if event.kind == "chunk":
            sent = True
            if task.get("instance_id"):
                bus.publish(task["instance_id"], [progress_event(task["task_id"], str(n), "chunk", event.data)])
        elif event.kind == "done":
            final = event.result
    assert final is not None
    return _outcome(final, not sent)


def _outcome(result: UpstreamResult, retryable: bool) -> Outcome:
    return Outcome({"status_code": result.status_code, "request_id": result.request_id, "body": result.body},
                   result.retry_after, result.limit_wait, retryable, (result.announced_rpm, result.announced_tpm))


def _messages_waiting(svc: Services, queues: list[str]) -> bool:
    """True when a Celery message waits for a slot in one of ``queues`` (one round trip)."""
    global _broker
    if _broker is None:
        _broker = redis.Redis.from_url(svc.settings.broker_url)
    pipe = _broker.pipeline(transaction=False)
    for name in queues:
        pipe.llen(f"{broker_prefix(svc.settings)}{name}")
    return any(pipe.execute())


def _yield_to(level: int, lingering: bool) -> list[str]:
    """The Celery queues whose waiting messages make a consumer of ``level`` give its slot back:
    the control queue (a cancel, a finalisation, an ingest chunk) and the more urgent levels, and
    while it lingers its own level too."""
    return [CONTROL_QUEUE] + [level_queue(lvl) for lvl in range(level + 1 if lingering else level)]


def _pubsub(svc: Services) -> PubSub:
    """A Pub/Sub connection for a lingering consumer: kept between lingers, as connecting costs
    more than the wait it serves."""
    with _lock:
        if _pubsubs:
            return _pubsubs.pop()
    return svc.redis.pubsub(ignore_subscribe_messages=True)


def _release_pubsub(pubsub: PubSub, channel: str) -> None:
    try:
        pubsub.unsubscribe(channel)
    except redis.RedisError:
        pubsub.close()
        return
    with _lock:
        if len(_pubsubs) < MAX_IDLE_PUBSUBS:
            _pubsubs.append(pubsub)
            return
    pubsub.close()


class _Drain:
    """One consume message's run: keeps up to ``slots`` tasks in flight, refilling as they end,
    until the queue is empty, a limit says wait while nothing runs, the time budget is spent, or
    a control message or more urgent work waits. Transient answers go back to the engine as
    delayed tasks."""

    def __init__(self, queue: str, level: int, config: dict, svc: Services, token: str) -> None:
        self.queue, self.level, self.config, self.svc, self.token = queue, level, config, svc, token
        self.slots = 1 if config["strategy"] == "sequential" else svc.settings.worker_take_size
        self.client = upstream_for(config, svc)
        self.bus: EventBus = get_flask_app().extensions["bellaq.eventbus"]
        self.inflight: dict[Future, dict] = {}
        self.finished: dict[str, dict] = {}  # non-online results, completed together
        self.taken = 0
        self.taking = True
        self.resume_at: float | None = None  # a limit held work back until then (monotonic)
        self.again_at: float | None = None  # re-announce at this time (monotonic)
        self.again_in: float | None = None  # re-announce after this many seconds
        self.more = False  # work is left that the budget, a control message or more urgent work put off
        self.emptied = False  # a take found nothing waiting
        self.leased: list[str] = []  # renewed by this process's heartbeat until the run ends
        self.recruited = config["strategy"] == "sequential"  # one at a time: nobody to recruit
        self.refreshed = 0.0  # the first take marks this consumer alive
        self.looked = 0.0  # when the Celery queues this consumer yields to were last looked at
        self.pubsub: PubSub | None = None  # subscribed to the level's channel once it lingered
        # Whether this process's SQL waits yield to other greenlets (MariaDB/MySQL; not SQLite,
        # whose write and lock waits hold the whole process). When they do, online tasks' SQL
        # writes run aside, so the next take need not wait for them, and a take's requests go
        # out while its mark is written.
        self.sql_yields = not svc.settings.database_url.startswith("sqlite")
        self.writes: list[Future] = []  # those still running

    def come_back(self, at: float) -> None:
        self.again_at = at if self.again_at is None else min(self.again_at, at)

    def refill(self, started: float) -> None:
        """Take more work into free slots, within the queue's limits (one engine call)."""
        now = time.monotonic()
        self.resume_at = None
        if now - started > DRAIN_BUDGET_S or self.should_yield(now, lingering=False):
            self.more = True
            self.taking = False
            return
        if self.config["strategy"] == "sequential":
            self.flush()  # its slot frees only once the running task is completed
        free = self.slots - len(self.inflight)
        if free <= 0:
            return
        early = self.start if self.sql_yields else None
        got = task_service.take_within_limits([(self.queue, self.level)], free,
                                              self.config["strategy"], self.svc.settings.default_process_timeout,
                                              self.svc.settings.default_max_retries, self.svc.settings.worker_lease,
                                              leases.renewer().holder, early)
        if early is None:
            self.start(got.tasks)
        self.taken += len(got.tasks)
        if got.limited:
            if got.retry_s is not None:
                self.resume_at = now + got.retry_s
            elif self.finished:
                self.flush()  # our own answered tasks still hold in-flight slots
                self.resume_at = now
            elif not self.inflight:
                self.come_back(now + IN_FLIGHT_RECHECK_S)
                self.taking = False
        elif not got.tasks:
            self.emptied = True
            self.taking = False
        if got.tasks:
            self.announce_progress(len(got.tasks))

    def start(self, tasks: list[dict]) -> None:
        """Send the taken tasks' requests (on MariaDB/MySQL before their SQL mark is written,
        see :func:`task_service.mark_taken`)."""
        leases.renewer().hold(tasks)
        self.leased += [task["task_id"] for task in tasks]
        for task in tasks:
            future = executor().submit(run_request, task, self.client, self.bus, self.svc.settings.upstream_timeout)
            self.inflight[future] = task

    def announce_progress(self, taken: int) -> None:
        """The requests run meanwhile: announcements are off their critical path."""
        if not self.recruited and taken >= self.slots:
            # A full take: the backlog may be deeper than this drain can keep up with.
            self.recruited = True
            token = announcements.recruit(self.svc, self.queue, self.level)
            if token is not None:
                consume.apply_async((self.queue, self.level, token), queue=level_queue(self.level))
        self.keep_alive()

    def should_yield(self, now: float, lingering: bool) -> bool:
        """Whether a Celery message waits for this consumer's slot (see :func:`_yield_to`). A
        draining consumer of level 0 has no more urgent level to watch: it looks at the control
        queue at most every ``LINGER_CHECK_S``, so a take costs no extra round trip."""
        if not lingering and self.level == 0 and now - self.looked < LINGER_CHECK_S:
            return False
        self.looked = now
        return _messages_waiting(self.svc, _yield_to(self.level, lingering))

    def keep_alive(self) -> None:
        """Refresh this consumer's announcement, at most every ``refresh_s``."""
        if time.monotonic() - self.refreshed > announcements.refresh_s(self.svc):
            self.refreshed = time.monotonic()
            announcements.alive(self.svc, self.queue, self.level, self.token)

    def collect(self, timeout: float | None) -> None:
        """Wait for at least one request to end (or ``timeout``); online answers are completed at
        once, transient answers are delayed for a retry."""
        done, _ = wait(list(self.inflight), timeout=timeout, return_when=FIRST_COMPLETED)
        online: dict[str, dict] = {}
        taken: dict[str, dict] = {}
        later: list[retries.Retry] = []
        for future in done:
            task = self.inflight.pop(future)
            taken[task["task_id"]] = task
            try:
                outcome = future.result()
            except Exception as err:  # noqa: BLE001 - a bug must not strand the task: record it
                log.exception("task %s failed in the worker", task["task_id"])
                outcome = Outcome(error_result(500, f"The worker failed: {type(err).__name__}: {err}",
                                               "worker_error"), retryable=False)
            status = outcome.result["status_code"]
            if any(outcome.announced):
                retries.follow_announced_limits(self.queue, self.config, *outcome.announced)
            paused = retries.pause_for_signals(self.queue, status, outcome.retry_after, outcome.limit_wait,
                                               int(task.get("attempts") or 1))
            if outcome.retryable and retries.is_transient(status):
                later.append(retries.Retry(task, outcome.result, outcome.retry_after or paused))
                continue
            (online if task["response_mode"] != "callback" else self.finished)[task["task_id"]] = outcome.result
        if later:
            due_s, ending = retries.retry_later(later)
            if due_s is not None:
                self.come_back(time.monotonic() + due_s)
            for task in (r.task for r in later if r.task["task_id"] in ending):
                (online if task["response_mode"] != "callback" else self.finished)[task["task_id"]] = \
                    ending[task["task_id"]]
        if online:
            task_service.complete_many(online, taken, self.write_aside if self.sql_yields else None)
        if len(self.finished) >= self.slots:
            self.flush()

    def write_aside(self, write: Callable[[], int]) -> None:
        """Run an online completion's SQL write in the executor. A write that fails leaves the
        engine's record of the results to the lost-completion reaper."""
        app = get_flask_app()

        def run() -> None:
            with app.app_context():
                try:
                    write()
                except Exception:  # noqa: BLE001 - the reaper writes what the engine recorded
                    log.exception("the SQL write of completed online tasks failed; the reaper writes it")

        self.writes = [future for future in self.writes if not future.done()]
        self.writes.append(executor().submit(run))

    def settle(self) -> None:
        """Wait for the SQL writes run aside: a run ends with its tasks written."""
        if self.writes:
            wait(self.writes)
            self.writes.clear()

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
        """Keep the slots full until nothing more should be taken and nothing runs."""
        low_water = self.slots - max(1, self.slots // 4)
        self.taking, self.emptied = True, False
        if not self.inflight:  # a linger that took work comes back with it running
            self.refill(started)
        while self.inflight or self.taking:
            if not self.inflight:
                if self.resume_at is None:
                    self.refill(started)  # the limit freed a slot or the take was cut short
                    if not self.inflight:
                        continue
                else:
                    self.come_back(self.resume_at)  # only a limit holds us: free the slot meanwhile
                    break
            wait_s = None if self.resume_at is None else max(0.0, self.resume_at - time.monotonic())
            self.collect(wait_s if self.taking else None)
            ready = self.resume_at is None or time.monotonic() >= self.resume_at
            if self.taking and ready and (self.resume_at is not None or len(self.inflight) <= low_water):
                self.refill(started)
        self.flush()

    def linger(self, started: float) -> bool:
        """With its queue level empty, stay announced a moment (``BELLAQ_WORKER_LINGER``, within
        the drain's budget) and take what a put adds meanwhile, without a Celery message: a put
        that finds this consumer announced sends none and wakes it on the level's channel. True
        when something was taken (or a limit answered); False when the wait ended, or Celery
        messages wait for the slot."""
        now = time.monotonic()
        until = min(now + self.svc.settings.worker_linger, now + announcements.refresh_s(self.svc),
                    started + DRAIN_BUDGET_S)
        if until <= now or self.should_yield(now, lingering=True):
            return False
        if self.pubsub is None:  # subscribed until the run ends: a linger costs no round trip of its own
            self.pubsub = _pubsub(self.svc)
            self.pubsub.subscribe(announcements.channel(self.svc, self.queue, self.level))
        self.keep_alive()
        woken = True  # a put before the subscription is found by this first take
        while True:
            if woken:
                self.taking, self.emptied = True, False
                self.refill(started)
                if self.inflight or self.resume_at is not None or self.again_at is not None or self.more:
                    return True
            remaining = until - time.monotonic()
            if remaining <= 0 or self.should_yield(time.monotonic(), lingering=True):
                return False
            # A wake-up may be an old one (a put while this drain ran): the take then finds nothing.
            woken = self.pubsub.get_message(timeout=min(remaining, LINGER_CHECK_S)) is not None

    def unsubscribe(self) -> None:
        if self.pubsub is not None:
            _release_pubsub(self.pubsub, announcements.channel(self.svc, self.queue, self.level))
            self.pubsub = None

    def run(self) -> int:
        started = time.monotonic()
        while True:
            self.drain(started)
            now = time.monotonic()
            if self.emptied:
                due_s = task_service.next_due_s(self.queue, self.level)  # delayed tasks, maybe of others
                if due_s is not None:
                    self.come_back(now + due_s)
            if self.more:
                self.again_in = 0.0
                self.again()
                return self.taken
            if self.again_at is not None:
                # one consumer per queue level comes back after a wait; the others' messages just end
                self.again_in = max(0.0, self.again_at - now)
                if task_service.claim_comeback(self.queue, self.level, self.again_in):
                    self.again()
                else:
                    announcements.leave(self.svc, self.queue, self.level, self.token)
                return self.taken
            if self.emptied and not self.inflight and self.linger(started):
                continue
            announcements.leave(self.svc, self.queue, self.level, self.token)
            # A put that saw this consumer counted sent nothing: look once more after leaving.
            self.taking, self.emptied = True, False
            self.refill(started)
            if not self.inflight and self.resume_at is None and not self.more:
                if self.again_at is not None:
                    self.again_in = max(0.0, self.again_at - time.monotonic())
                    if task_service.claim_comeback(self.queue, self.level, self.again_in):
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
        drain.settle()
        drain.unsubscribe()
        leases.renewer().release(drain.leased)
