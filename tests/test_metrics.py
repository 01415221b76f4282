"""``GET /metrics`` (SPEC 6): the Prometheus text format, admin-only unless public, counters that
move with real work, gauges read from the engine at a cost that does not grow with the number
of queues, and counts of many processes added up through ``PROMETHEUS_MULTIPROC_DIR``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from bellaq.config import Settings
from bellaq.services import services
from scripts.benchlib import free_port
from tests.batch_fixtures import CHAT, chat_line, create_batch, jsonl, until_status
from tests.conftest import ADMIN_KEY, REDIS_URL, make_settings, running_app, wait_for
from tests.receivers import Receiver

pytest_plugins = ("tests.engine_fixtures",)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client, headers: dict[str, str] | None = None) -> Samples:
    resp = client.get("/metrics", headers=headers or {})
    assert resp.status_code == 200, resp.data[:300]
    assert resp.content_type.startswith("text/plain")
    return parse(resp.get_data(as_text=True))


def register(client, admin, builtin: bool) -> str:
    name = f"m-{uuid.uuid4().hex[:10]}"  # counters live as long as the process: a name per test
    resp = client.post("/v1/queue/register", headers=admin,
                       json={"queue": name, "endpoint": CHAT, "builtin": builtin})
    assert resp.status_code == 200, resp.json
    return name


def put(client, headers, queue: str, **fields) -> str:
    body = {"endpoint": CHAT, "queue": queue, "callback_url": "http://127.0.0.1:9/cb",
            "data": {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}, **fields}
    resp = client.post("/v1/queue/put", json=body, headers=headers)
    assert resp.status_code == 200, resp.json
    return resp.json["data"]


# ------------------------------------------------------------------------------------- access

def test_metrics_need_an_admin_key(client, admin, user, worker):
    for headers, status in (({}, 401), ({"Authorization": "Bearer bq-nope"}, 401), (user, 403), (worker, 403)):
        resp = client.get("/metrics", headers=headers)
        assert resp.status_code == status
        assert set(resp.json["error"]) == {"message", "type", "param", "code"}
        assert b"bellaq_" not in resp.data
    assert value(scrape(client, admin), "bellaq_scrape_source_up", source="redis") == 1


def test_public_metrics_need_no_key(settings, monkeypatch):
    monkeypatch.setenv("BELLAQ_METRICS_PUBLIC", "true")
    assert Settings.from_env().metrics_public
    with running_app(settings.replace(metrics_public=True)) as app:
        client = app.test_client()
        for headers in ({}, {"Authorization": "Bearer \x01garbage"}):
            samples = scrape(client, headers)
            assert value(samples, "bellaq_scrape_source_up", source="sql") == 1


# ------------------------------------------------------------------------------------ gauges

def test_queue_gauges_follow_the_engine(app, client, admin, user, worker):
    queue = register(client, admin, builtin=False)
    ids = [put(client, user, queue, level=2) for _ in range(4)]
    taken = client.post("/v1/queue/take", headers=worker,
                        json={"queues": [f"{queue}:2"], "size": 2, "process_timeout": 60}).json[f"{queue}:2"]
    with app.app_context():
        assert services().engine.delay(queue, 2, taken[0]["task_id"], 60_000) == "delayed"
    samples = scrape(client, admin)
    labels = {"queue": queue, "level": "2"}
    assert value(samples, "bellaq_queue_waiting", **labels) == 2
    assert value(samples, "bellaq_queue_leased", **labels) == 1
    assert value(samples, "bellaq_queue_delayed", **labels) == 1
    assert value(samples, "bellaq_queue_oldest_waiting_age_seconds", **labels) >= 0
    assert value(samples, "bellaq_tasks_put_total", **labels) == 4
    assert value(samples, "bellaq_tasks_taken_total", **labels) == 2

    client.post(f"/v1/queue/{ids[3]}/cancel", headers=user)
    samples = scrape(client, admin)
    assert value(samples, "bellaq_queue_waiting", **labels) == 1
    assert value(samples, "bellaq_tasks_ended_total", status="cancelled", **labels) == 1


class CountingConnection(redis.Connection):
    """Counts what it sends: one send per command, or per pipeline."""

    sent = 0

    def send_packed_command(self, command, check_health: bool = True) -> None:  # type: ignore[no-untyped-def]
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def scrape_round_trips(client, admin) -> int:
    CountingConnection.sent = 0
    scrape(client, admin)
    return CountingConnection.sent


@pytest.fixture
def sqlite_app(tmp_path: Path, redis_prefix: str):
    """For what does not concern SQL: one database is enough."""
    with running_app(make_settings(tmp_path, redis_prefix, f"sqlite:///{tmp_path / 'm.db'}")) as app:
        yield app


def test_a_scrape_costs_the_same_round_trips_with_10_or_1000_queue_levels(sqlite_app):
    client, admin = sqlite_app.test_client(), {"Authorization": f"Bearer {ADMIN_KEY}"}
    svc = sqlite_app.extensions["bellaq"]
    svc.redis.connection_pool = redis.ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection,
                                                              decode_responses=True)

    def make_levels(start: int, stop: int) -> None:
        for n in range(start, stop):
            svc.engine.enqueue(f"q{n // 10}", n % 10, f"task-{n}", "{}")

    make_levels(0, 10)
    scrape(client, admin)  # loads the stats script into Redis if it was not there
    few = scrape_round_trips(client, admin)
    make_levels(10, 1000)
    many = scrape_round_trips(client, admin)
    samples = scrape(client, admin)
    assert sum(1 for name, _ in samples if name == "bellaq_queue_waiting") == 1000
    assert many == few <= 3


def test_stats_all_reads_every_level_in_two_round_trips(any_engine):
    engine = any_engine
    engine.enqueue("a", 0, "t1", "{}")
    engine.enqueue("a", 3, "t2", "{}")
    engine.enqueue("b", 1, "t3", "{}")
    engine.take([("a", 3)], 1)
    kwargs = engine.redis.connection_pool.connection_kwargs
    engine.redis.connection_pool = redis.ConnectionPool(connection_class=CountingConnection, host=kwargs["host"],
                                                        port=kwargs["port"], db=kwargs.get("db", 0))
    now = int(time.time() * 1000) + 1 + 5000  # + 1: the truncated ms is before the enqueues' time
    engine.stats_all(now_ms=now)
    CountingConnection.sent = 0
    every = engine.stats_all(now_ms=now)
    assert CountingConnection.sent == 2
    assert every == {pair: engine.stats(*pair, now_ms=now) for pair in (("a", 0), ("a", 3), ("b", 1))}
    assert (every[("a", 3)].waiting, every[("a", 3)].running) == (0, 1)
    assert every[("a", 0)].oldest_age_ms >= 5000


def test_a_scrape_with_redis_down_still_answers_what_it_can(settings):
    with running_app(settings.replace(redis_url="redis://127.0.0.1:1/0")) as app:
        client = app.test_client()
        samples = scrape(client, {"Authorization": f"Bearer {ADMIN_KEY}"})
        assert value(samples, "bellaq_scrape_source_up", source="redis") == 0
        assert value(samples, "bellaq_scrape_source_up", source="sql") == 1
        assert not any(name.startswith("bellaq_queue_") for name, _ in samples)


# ---------------------------------------------------------------------- counters, real work

@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def test_counters_move_with_real_batches_tasks_and_callbacks(app, client, admin, user, celery_worker, receiver):
    queue = register(client, admin, builtin=True)
    lines = [chat_line(f"c{i}", model="mock-1") for i in range(5)]
    lines.append(chat_line("bad", model="mock-1", body={"model": "mock-1", "messages": [], "mock_status": 400}))
    batch = create_batch(client, user, jsonl(lines), extra_headers={"X-BELLA-QUEUE-NAME": queue})
    task_id = put(client, user, queue, callback_url=receiver.url)
    until_status(client, user, batch["id"], "completed", timeout=60)
    assert receiver.delivered.wait(30)

    def settled() -> Samples | None:
        samples = scrape(client, admin)
        done = value(samples, "bellaq_callback_deliveries_total", queue=queue, outcome="delivered")
        return samples if done else None

    samples = wait_for(settled, message="the callback's outcome to be counted")
    batch_level, put_level = {"queue": queue, "level": "1"}, {"queue": queue, "level": "0"}
    assert value(samples, "bellaq_tasks_put_total", **batch_level) == 6
    assert value(samples, "bellaq_tasks_ended_total", status="succeeded", **batch_level) == 5
    assert value(samples, "bellaq_tasks_ended_total", status="failed", **batch_level) == 1
    assert value(samples, "bellaq_tasks_ended_total", status="succeeded", **put_level) == 1
    assert value(samples, "bellaq_batch_lines_processed_total", queue=queue, status="succeeded") == 5
    assert value(samples, "bellaq_batch_lines_processed_total", queue=queue, status="failed") == 1
    assert value(samples, "bellaq_batches", queue=queue, status="completed") == 1
    assert value(samples, "bellaq_queue_waiting", **batch_level) == 0
    assert value(samples, "bellaq_tasks_put_total", **put_level) == 1
    assert value(samples, "bellaq_tasks_taken_total", **batch_level) == 6
    # every upstream call of the built-in worker: six lines and the put, seven calls, one answered 400
    assert value(samples, "bellaq_upstream_request_duration_seconds_count", queue=queue, status_class="2xx") == 6
    assert value(samples, "bellaq_upstream_request_duration_seconds_count", queue=queue, status_class="4xx") == 1
    assert client.get(f"/v1/queue/{task_id}", headers=user).json["callback_status"] == "delivered"


# --------------------------------------------------------------------------- many processes

RECORD = textwrap.dedent("""
    import sys
    from bellaq import metrics
    from bellaq.queue_engine import TakenTask
    queue, n = sys.argv[1], int(sys.argv[2])
    metrics.tasks_put(queue, 0, n)
    metrics.tasks_taken([TakenTask(queue, 0, f"t{i}", "{}", 1) for i in range(n)])
    metrics.upstream_answer(queue, 429, 0.2)
    metrics.upstream_answer(queue, 200, 1.5)
    metrics.upstream_answer(queue, None, 30)
    metrics.callback_outcome(queue, "retrying")
""")


def record_in_two_processes(folder: Path, queue: str) -> None:
    """Two processes, one after the other, record 3 and 4 puts: their counts stay in ``folder``."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(folder))
    for n in (3, 4):
        subprocess.run([sys.executable, "-c", RECORD, queue, str(n)], env=env, check=True, timeout=60)
    assert len(list(folder.glob("counter_*.db"))) == 2


def test_counts_of_many_processes_add_up_in_the_multiprocess_folder(tmp_path: Path, sqlite_app, monkeypatch):
    from bellaq import metrics

    client, admin = sqlite_app.test_client(), {"Authorization": f"Bearer {ADMIN_KEY}"}

    folder, queue = tmp_path / "prometheus", f"m-{uuid.uuid4().hex[:8]}"
    record_in_two_processes(folder, queue)
    monkeypatch.setattr(metrics, "MULTIPROC_DIR", str(folder))  # this app now serves that folder's counts
    samples = scrape(client, admin)
    labels = {"queue": queue, "level": "0"}
    assert value(samples, "bellaq_tasks_put_total", **labels) == 7
    assert value(samples, "bellaq_tasks_taken_total", **labels) == 7
    assert value(samples, "bellaq_upstream_rate_limited_total", queue=queue) == 2
    assert value(samples, "bellaq_upstream_request_duration_seconds_count", queue=queue, status_class="4xx") == 2
    assert value(samples, "bellaq_upstream_request_duration_seconds_count", queue=queue, status_class="error") == 2
    assert value(samples, "bellaq_upstream_request_duration_seconds_bucket", queue=queue, status_class="2xx",
                 le="2.5") == 2
    assert value(samples, "bellaq_upstream_request_duration_seconds_bucket", queue=queue, status_class="2xx",
                 le="1.0") == 0
    assert value(samples, "bellaq_callback_deliveries_total", queue=queue, outcome="retrying") == 2
    assert value(samples, "bellaq_scrape_source_up", source="redis") == 1


def test_the_exporter_serves_a_worker_hosts_counts(tmp_path: Path):
    folder, queue = tmp_path / "prometheus", f"m-{uuid.uuid4().hex[:8]}"
    record_in_two_processes(folder, queue)
    port = free_port()
    exporter = subprocess.Popen([sys.executable, "-m", "workers.cli", "metrics-exporter", "--port", str(port)],
                                env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(folder)))
    try:
        def served() -> str | None:
            try:
                return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.ConnectionError:
                assert exporter.poll() is None, "the exporter exited"
                return None

        samples = parse(wait_for(served, message="the exporter to answer"))
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
    assert value(samples, "bellaq_tasks_put_total", queue=queue, level="0") == 7
    assert not any(name.startswith(("bellaq_queue_", "bellaq_batches")) for name, _ in samples)
