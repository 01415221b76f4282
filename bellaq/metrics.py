"""Prometheus metrics: the counters every process records, and what ``GET /metrics`` answers.

Counters and the upstream histogram are recorded where things happen (web and Celery processes).
With ``PROMETHEUS_MULTIPROC_DIR`` set (before the process starts), ``prometheus_client`` keeps
them in files in that folder, one per process, and a scrape adds up every process of the host
that shares the folder; without it a scrape shows this process's counts only. Queue and batch
gauges are not recorded but read when scraped: the queue engine's every level in one pipeline,
and the batches by status in one SQL query. Label values are queue names (``[A-Za-z0-9_-]``),
levels and fixed words, never anything a user wrote freely.
"""

from __future__ import annotations

import logging
import os
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from bellaq.models import Task
    from bellaq.queue_engine import TakenTask

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Read when this module is first imported, as prometheus_client decides at its import where values live.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
if MULTIPROC_DIR:
    os.makedirs(MULTIPROC_DIR, exist_ok=True)  # a missing folder would make every count raise

# Seconds; LLM requests take from tens of milliseconds (embeddings) to minutes (long generations).
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)

_recorded = CollectorRegistry()
TASKS_PUT = Counter("bellaq_tasks_put", "Tasks made takeable (puts and batch lines).",
                    ["queue", "level"], registry=_recorded)
TASKS_TAKEN = Counter("bellaq_tasks_taken", "Tasks leased by a take (built-in or external workers).",
                      ["queue", "level"], registry=_recorded)
TASKS_ENDED = Counter("bellaq_tasks_ended", "Tasks that reached an end state, by status "
                      "(succeeded, failed, timeout, cancelled).", ["queue", "level", "status"], registry=_recorded)
UPSTREAM_SECONDS = Histogram("bellaq_upstream_request_duration_seconds",
                             "Upstream HTTP requests by status class (2xx..5xx; 'error': no answer).",
                             ["queue", "status_class"], buckets=UPSTREAM_BUCKETS, registry=_recorded)
UPSTREAM_RATE_LIMITED = Counter("bellaq_upstream_rate_limited", "Upstream answers with status 429.",
                                ["queue"], registry=_recorded)
CALLBACKS = Counter("bellaq_callback_deliveries", "Callback attempts by outcome (delivered; retrying: "
                    "failed, another attempt follows; failed: the last attempt failed).",
                    ["queue", "outcome"], registry=_recorded)
BATCH_LINES = Counter("bellaq_batch_lines_processed", "Batch lines that reached an end state, by status.",
                      ["queue", "status"], registry=_recorded)


# ----------------------------------------------------------------------------------- recording

def tasks_put(queue: str, level: int, count: int = 1) -> None:
    if count:
        TASKS_PUT.labels(queue, str(level)).inc(count)


def tasks_taken(taken: Iterable[TakenTask]) -> None:
    for (queue, level), n in Tally((t.queue, t.level) for t in taken).items():
        TASKS_TAKEN.labels(queue, str(level)).inc(n)


def tasks_ended(tasks: Iterable[Task]) -> None:
    """Task-end listener (every process): count the end states, and the batch lines among them."""
    tally = Tally((t.queue, t.level, t.status, bool(t.batch_id)) for t in tasks)
    for (queue, level, status, of_batch), n in tally.items():
        TASKS_ENDED.labels(queue, str(level), status).inc(n)
        if of_batch:
            BATCH_LINES.labels(queue, status).inc(n)


def batch_lines_processed(queue: str, status: str, count: int) -> None:
    """Batch lines that ended without becoming a task (the batch ended while they were read)."""
    if count:
        BATCH_LINES.labels(queue, status).inc(count)


def upstream_answer(queue: str, status: int | None, seconds: float) -> None:
    """One upstream HTTP attempt: its status (None when no answer came) and how long it took."""
    UPSTREAM_SECONDS.labels(queue, status_class(status)).observe(seconds)
    if status == 429:
        UPSTREAM_RATE_LIMITED.labels(queue).inc()


def callback_outcome(queue: str, outcome: str) -> None:
    CALLBACKS.labels(queue, outcome).inc()


def status_class(status: int | None) -> str:
    if status is None or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


# ------------------------------------------------------------------------------------ scraping

def scrape() -> bytes:
    """The text exposition: the recorded counts (every process of the folder, or this one) and
    the gauges read now. Runs in an app context."""
    registry = CollectorRegistry(auto_describe=False)
    if MULTIPROC_DIR:
        MultiProcessCollector(registry, MULTIPROC_DIR)
    else:
        registry.register(_recorded)
    registry.register(_ReadNow())
    return generate_latest(registry)


def serve_folder(host: str, port: int) -> None:
    """Serve the counts of ``PROMETHEUS_MULTIPROC_DIR`` over HTTP until interrupted: for a host
    whose processes are read by no web process (a worker-only host)."""
    from prometheus_client import start_http_server

    if not MULTIPROC_DIR:
        raise SystemExit("PROMETHEUS_MULTIPROC_DIR is not set: there are no counts of other processes to serve")
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, MULTIPROC_DIR)
    _server, thread = start_http_server(port, addr=host, registry=registry)
    thread.join()


class _ReadNow:
    """Gauges read from the queue engine and SQL at each scrape. A source that cannot be read
    leaves its gauges out and says so in ``bellaq_scrape_source_up``, so the counts still come."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("bellaq_scrape_source_up", "1 if the source of the read-now gauges answered.",
                               labels=["source"])
        for source, read in (("redis", _queue_gauges), ("sql", _batch_gauges)):
            families = read()
            up.add_metric([source], 0 if families is None else 1)
            yield from families or ()
        yield up


def _queue_gauges() -> list[Metric] | None:
    from redis.exceptions import RedisError

    from bellaq.services import services

    try:
        stats = services().engine.stats_all()
    except RedisError as err:
        log.warning("metrics: the queue engine is unreadable: %s", err)
        return None
    labels = ["queue", "level"]
    waiting = GaugeMetricFamily("bellaq_queue_waiting", "Tasks waiting to be taken.", labels=labels)
    leased = GaugeMetricFamily("bellaq_queue_leased", "Tasks taken and running (leased).", labels=labels)
    delayed = GaugeMetricFamily("bellaq_queue_delayed", "Tasks set aside until a retry time (429, 5xx).",
                                labels=labels)
    oldest = GaugeMetricFamily("bellaq_queue_oldest_waiting_age_seconds",
                               "Age of the oldest waiting task (0 when none waits).", labels=labels)
    for (queue, level), s in stats.items():
        key = [queue, str(level)]
        waiting.add_metric(key, s.waiting)
        leased.add_metric(key, s.running)
        delayed.add_metric(key, s.delayed)
        oldest.add_metric(key, s.oldest_age_ms / 1000)
    return [waiting, leased, delayed, oldest]


def _batch_gauges() -> list[Metric] | None:
    from sqlalchemy import func
    from sqlalchemy.exc import SQLAlchemyError

    from bellaq.extensions import db
    from bellaq.models import Batch

    try:
        rows = db.session.execute(db.select(Batch.queue, Batch.status, func.count())
                                  .group_by(Batch.queue, Batch.status)).all()
        db.session.commit()  # ends the read: the scrape holds no transaction open
    except SQLAlchemyError as err:
        log.warning("metrics: SQL is unreadable: %s", err)
        db.session.rollback()
        return None
    batches = GaugeMetricFamily("bellaq_batches", "Batches by status.", labels=["queue", "status"])
    for queue, status, n in rows:
        batches.add_metric([queue, str(status)], n)
    return [batches]
