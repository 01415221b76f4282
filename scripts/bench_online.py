"""Benchmark of the built-in workers and the online response modes, on a real deployment.

    python scripts/bench_online.py [--only throughput,rtt,held,stream] [--database-url URL]

Everything runs on this machine in subprocesses (``scripts.benchlib``): gunicorn with gevent
workers, Celery workers (gevent pool), the mock upstream (``python -m bellaq.mock_upstream``, gevent
server) and a callback sink; SQLite in a temp dir unless ``--database-url`` (MariaDB: a database
is created and dropped); Redis at ``BELLAQ_REDIS_URL`` under a unique prefix deleted at the end.
Four measurements (issue 3):

1. throughput: built-in put -> succeeded against the zero-latency mock, tasks/s. ``prefill``:
   N callback puts while no worker runs, then the workers start and drain (rate from the first
   to the last completion, by polling ``GET /v1/queue/{queue}:0/stats``); ``steady``: workers
   running, N puts on ``--conns`` connections, from the first put to the last completion. In
   the same run, bare Celery (a default-settings app on the same Redis) drains ``--bare-n``
   no-op tasks with a prefork and with a gevent worker.
2. rtt: sequential blocking puts against the zero-latency mock, p50/p99, with a breakdown from
   the task's own timestamps; beside bare Celery's ``apply_async().get()`` round trip.
3. held: ``--held`` concurrent blocking puts against a mock with ``--held-latency`` s latency on
   one web host, from a gevent client subprocess; all must be answered correctly. Peak RSS of
   the gunicorn master + workers during the hold minus before, per held request.
4. stream: time to the first chunk of a streaming put through bellaq vs. a direct
   ``stream: true`` call to the mock.

Results go to ``bench/results/online.json`` (merged: ``--only`` keeps the other measurements).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_hold-client":
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.benchlib import (  # noqa: E402
    PYTHON,
    REDIS_URL,
    JsonClient,
    MockServer,
    Sink,
    Stack,
    database,
    delete_prefix,
    new_key,
    percentiles,
    print_rows,
    raise_nofile,
    stop_group,
    tree_cpu,
    tree_rss,
    unique_prefix,
)

RESULTS = ROOT / "bench" / "results" / "online.json"
CHAT = "/v1/chat/completions"
ALL = ("throughput", "rtt", "held", "stream")


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return dict({"model": "mock-1", "messages": [{"role": "user", "content": text}]}, **extra)


def _redis() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL)


# --------------------------------------------------------------------------------- bare Celery

class BareCelery:
    """The comparison: a default-settings Celery app on the same Redis, own key prefix."""

    def __init__(self, prefix: str, log_dir: Path) -> None:
        self.prefix = f"{prefix}-bare:"
        os.environ["BENCH_BARE_BROKER"] = REDIS_URL
        os.environ["BENCH_BARE_PREFIX"] = self.prefix
        from scripts import benchlib

        self.app = benchlib.bare_celery
        self.log_dir = log_dir
        self.worker: subprocess.Popen | None = None

    def start_worker(self, pool: str, concurrency: int) -> None:
        from scripts.benchlib import _spawn

        self.worker = _spawn([PYTHON, "-m", "celery", "-A", "scripts.benchlib:bare_celery", "worker", "-P", pool,
                              "-c", str(concurrency), "-Q", "bench.bare", "--without-gossip", "--without-mingle",
                              "--without-heartbeat", "--loglevel", "WARNING", "-n", f"bare-{pool}@%h"],
                             self.log_dir / f"bare-{pool}.log", dict(os.environ))

    def stop_worker(self) -> None:
        if self.worker is not None:
            stop_group(self.worker)
            self.worker = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """A first round trip: the worker is up and connected."""
        self.app.tasks["bench.echo"].apply_async((0,)).get(timeout=timeout)

    def drain(self, pool: str, concurrency: int, n: int) -> dict[str, Any]:
        """Enqueue ``n`` no-op tasks, then start a worker and time how fast it drains them."""
        client = _redis()
        queue_key, unacked = f"{self.prefix}bench.bare", f"{self.prefix}unacked"
        noop = self.app.tasks["bench.noop"]
        t0 = time.perf_counter()
        with self.app.producer_or_acquire() as producer:
            for _ in range(n):
                noop.apply_async(producer=producer)
        enqueue_s = time.perf_counter() - t0
        assert client.llen(queue_key) == n, client.llen(queue_key)
        self.start_worker(pool, concurrency)
        first = last = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            left = client.llen(queue_key)
            now = time.perf_counter()
            if first is None and left < n:
                first, first_left = now, left
            if left == 0 and client.hlen(unacked) == 0:
                last = now
                break
            time.sleep(0.01)
        self.stop_worker()
        client.close()
        if first is None or last is None:
            raise RuntimeError(f"bare Celery ({pool}) did not drain {n} tasks; see {self.log_dir}")
        return {"pool": pool, "concurrency": concurrency, "tasks": n, "enqueue_per_s": n / enqueue_s,
                "drain_tasks_per_s": first_left / (last - first) if last > first else float("nan")}

    def round_trip(self, pool: str, concurrency: int, n: int) -> dict[str, Any]:
        self.start_worker(pool, concurrency)
        try:
            self.wait_ready()
            echo = self.app.tasks["bench.echo"]
            for i in range(20):
                echo.apply_async((i,)).get(timeout=30)
            samples = []
            for i in range(n):
                t0 = time.perf_counter()
                assert echo.apply_async((i,)).get(timeout=30) == i
                samples.append(time.perf_counter() - t0)
        finally:
            self.stop_worker()
        return {"pool": pool, "concurrency": concurrency, **percentiles(samples)}


# ----------------------------------------------------------------------------------- deployment

class Deployment:
    """One web host (gunicorn gevent), Celery workers, mocks, a callback sink; queues per test."""

    def __init__(self, tmp: Path, db_url: str, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.args = args
        self.prefix = unique_prefix("bqbench-online")
        self.mock = MockServer(tmp, latency=0.0, processes=args.mock_processes, nodelay=not args.raw_mock)
        self.sink = Sink(tmp)
        self.stack = Stack(tmp, self.prefix, db_url, self.mock.base_url, redis_url=REDIS_URL)
        self.extra: list[Any] = []

    def start(self) -> None:
        self.stack.start_web(workers=self.args.web_workers, worker_connections=20000, backlog=4096, timeout=300)
        self.admin = JsonClient(self.stack.url, self.stack.admin_key)
        self.user = new_key(self.stack.url, self.stack.admin_key, "user")

    def register(self, queue: str, base_url: str | None = None) -> None:
        body: dict[str, Any] = {"queue": queue, "endpoint": CHAT, "builtin": True, "strategy": "fifo"}
        if base_url:
            body["upstream"] = {"base_url": base_url}
        self.admin.ok("POST", "/v1/queue/register", body)

    def stats(self, queue: str) -> dict[str, Any]:
        return self.admin.ok("GET", f"/v1/queue/{queue}:0/stats")

    def start_workers(self, procs: int, concurrency: int) -> None:
        for _ in range(procs):
            self.stack.start_worker(concurrency=concurrency, pool="gevent")

    def wait_workers(self, queue: str, timeout: float = 60.0) -> None:
        """Until a blocking put is answered: the workers are up."""
        with JsonClient(self.stack.url, self.user, timeout=timeout) as client:
            status, body = client.call("POST", "/v1/queue/put", {"endpoint": CHAT, "queue": queue, "data": chat("up?"),
                                                                  "response_mode": "blocking", "timeout": 60})
        if status != 200:
            raise RuntimeError(f"workers did not answer: {status} {body}\n{self.stack.logs()}")

    def stop(self) -> None:
        with _suppress():
            self.admin.close()
        for thing in [self.stack, self.sink, self.mock, *self.extra]:
            with _suppress():
                thing.stop()
        delete_prefix(REDIS_URL, self.prefix)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc is not None:
            print(f"warning: cleanup step failed: {exc!r}", file=sys.stderr)
        return True


def _put_many(url: str, key: str, queue: str, n: int, conns: int, body_extra: dict[str, Any]) -> float:
    """``n`` callback puts on ``conns`` keep-alive connections (threads); returns seconds."""
    errors: list[str] = []

    def run(count: int, offset: int) -> None:
        with JsonClient(url, key) as client:
            for i in range(count):
                status, payload = client.call("POST", "/v1/queue/put", {
                    "endpoint": CHAT, "queue": queue, "data": chat(f"task {offset + i}"), **body_extra})
                if status != 200:
                    errors.append(f"put answered {status}: {payload}")
                    return

    per = [n // conns + (1 if i < n % conns else 0) for i in range(conns)]
    offsets = [sum(per[:i]) for i in range(conns)]
    threads = [threading.Thread(target=run, args=(c, o)) for c, o in zip(per, offsets, strict=True)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return time.perf_counter() - t0


def _wait_done(dep: Deployment, queue: str, n: int, timeout: float) -> tuple[float | None, int, float]:
    """Poll the queue's stats until ``done + failed`` reaches ``n``: (time of first done, done then,
    time of the last)."""
    first: float | None = None
    first_done = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = dep.stats(queue)
        now = time.perf_counter()
        ended = s["done"] + s["failed"]
        if first is None and ended > 0:
            first, first_done = now, ended
        if ended >= n:
            return first, first_done, now
        time.sleep(0.05)
    raise RuntimeError(f"only {dep.stats(queue)} of {n} tasks ended within {timeout} s\n{dep.stack.logs()}")


def _sql_status_counts(db_url: str, queue: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT status, COUNT(*) FROM tasks WHERE queue = :q GROUP BY status"),
                                {"q": queue}).all()
    finally:
        engine.dispose()
    return {status: count for status, count in rows}


# ---------------------------------------------------------------------------------- measurements

def bench_throughput(dep: Deployment, bare: BareCelery, db_url: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"bellaq_workers": f"{args.workers} x celery -P gevent -c {args.concurrency}",
                           "take_size": int(dep.stack.env.get("BELLAQ_WORKER_TAKE_SIZE", "32"))}
    n = args.n
    sink_before = dep.sink.count()
    client = _redis()
    l0 = f"{dep.prefix}:celery:bellaq.l0"
    control = f"{dep.prefix}:celery:bellaq.control"

    # prefill: no worker runs while the puts arrive; then the workers drain
    dep.register("tp_prefill")
    put_s = _put_many(dep.stack.url, dep.user, "tp_prefill", n, args.conns, {"callback_url": dep.sink.url})
    messages = client.llen(l0)
    t_start = time.perf_counter()
    dep.start_workers(args.workers, args.concurrency)
    first, first_done, last = _wait_done(dep, "tp_prefill", n, timeout=600)
    assert first is not None
    left_l0, left_control = client.llen(l0), client.llen(control)
    deadline = time.monotonic() + 300
    while dep.sink.count() - sink_before < n and time.monotonic() < deadline:
        time.sleep(0.1)
    callbacks_s = time.perf_counter() - t_start
    counts = _sql_status_counts(db_url, "tp_prefill")
    out["prefill"] = {
        "tasks": n,
        "put_per_s": n / put_s,
        "celery_messages_after_puts": messages,
        "drain_tasks_per_s": (n - first_done) / (last - first) if last > first else float("nan"),
        "workers_start_to_last_done_s": last - t_start,
        "celery_l0_messages_left_at_last_done": left_l0,
        "callback_messages_left_at_last_done": left_control,
        "callbacks_delivered": dep.sink.count() - sink_before,
        "workers_start_to_all_callbacks_s": callbacks_s,
        "sql_status_counts": counts,
    }

    # steady: workers already running, puts and work at the same time
    dep.register("tp_steady")
    sink_before = dep.sink.count()
    web_cpu0 = sum(tree_cpu(p) for p in dep.stack.web_pids()[1:])
    worker_cpu0 = sum(tree_cpu(w.pid) for w in dep.stack.workers)
    t0 = time.perf_counter()
    put_s = _put_many(dep.stack.url, dep.user, "tp_steady", n, args.conns, {"callback_url": dep.sink.url})
    _first, _fd, last = _wait_done(dep, "tp_steady", n, timeout=600)
    web_cpu = sum(tree_cpu(p) for p in dep.stack.web_pids()[1:]) - web_cpu0
    worker_cpu = sum(tree_cpu(w.pid) for w in dep.stack.workers) - worker_cpu0
    out["steady"] = {
        "tasks": n,
        "put_connections": args.conns,
        "put_per_s": n / put_s,
        "end_to_end_tasks_per_s": n / (last - t0),
        "web_cpu_ms_per_task": web_cpu / n * 1000,
        "worker_cpu_ms_per_task": worker_cpu / n * 1000,
        "sql_status_counts": _sql_status_counts(db_url, "tp_steady"),
    }
    deadline = time.monotonic() + 300
    while dep.sink.count() - sink_before < n and time.monotonic() < deadline:
        time.sleep(0.1)
    out["steady"]["callbacks_delivered"] = dep.sink.count() - sink_before
    dep.stack.stop_workers()
    client.close()

    # bare Celery on the same Redis, same machine, same moment
    out["bare_celery"] = [bare.drain("prefork", args.bare_prefork_c, args.bare_n),
                          bare.drain("gevent", args.bare_gevent_c, args.bare_n)]
    best = max(r["drain_tasks_per_s"] for r in out["bare_celery"])
    out["bellaq_drain_vs_best_bare_celery"] = out["prefill"]["drain_tasks_per_s"] / best
    return out


def bench_rtt(dep: Deployment, bare: BareCelery, args: argparse.Namespace) -> dict[str, Any]:
    dep.register("rtt")
    dep.start_workers(1, args.concurrency)
    dep.wait_workers("rtt")
    samples: list[float] = []
    parts: dict[str, list[float]] = {"put_to_taken_ms": [], "taken_to_completed_ms": [], "rest_ms": []}
    body = {"endpoint": CHAT, "queue": "rtt", "response_mode": "blocking", "timeout": 60}
    with JsonClient(dep.stack.url, dep.user) as client:
        for i in range(args.rtt_n + 20):
            payload = json.dumps(dict(body, data=chat(f"rtt {i}"))).encode()
            t0 = time.perf_counter()
            client.conn.request("POST", "/v1/queue/put", body=payload, headers=client.headers)
            resp = client.conn.getresponse()
            data = resp.read()
            rtt = time.perf_counter() - t0
            if resp.status != 200 or json.loads(data)["choices"][0]["message"]["content"] != f"echo: rtt {i}":
                raise RuntimeError(f"blocking put answered {resp.status}: {data[:300]!r}")
            if i < 20:
                continue  # warm-up
            samples.append(rtt)
            task = client.ok("GET", f"/v1/queue/{resp.getheader('X-Bella-Task-Id')}")
            parts["put_to_taken_ms"].append(task["running_time"] - task["start_time"])
            parts["taken_to_completed_ms"].append(task["completed_time"] - task["running_time"])
            parts["rest_ms"].append(rtt * 1000 - (task["completed_time"] - task["start_time"]))
    dep.stack.stop_workers()
    out: dict[str, Any] = {"bellaq_blocking": percentiles(samples),
                           "bellaq_worker": f"1 x celery -P gevent -c {args.concurrency}",
                           "bellaq_breakdown_median_ms": {k: sorted(v)[len(v) // 2] for k, v in parts.items()}}
    out["bare_celery"] = [bare.round_trip("prefork", args.bare_prefork_c, args.rtt_n),
                          bare.round_trip("gevent", args.bare_gevent_c, args.rtt_n)]
    best = min(r["p50_ms"] for r in out["bare_celery"])
    out["bellaq_p50_vs_best_bare_celery_p50"] = out["bellaq_blocking"]["p50_ms"] / best
    return out


def bench_held(dep: Deployment, args: argparse.Namespace) -> dict[str, Any]:
    slow = MockServer(dep.tmp, latency=args.held_latency, processes=1, nodelay=not args.raw_mock)
    dep.extra.append(slow)
    dep.register("held", slow.base_url)
    dep.register("held_warm")
    dep.start_workers(args.held_workers, args.held_concurrency)
    dep.wait_workers("held_warm")
    out: dict[str, Any] = {
        "upstream_latency_s": args.held_latency,
        "web": f"1 host: gunicorn -k gevent -w {args.web_workers} --worker-connections 20000",
        "workers": f"{args.held_workers} x celery -P gevent -c {args.held_concurrency}",
    }
    if args.held:
        out["bellaq"] = _held_rss(dep, args)
    dep.stack.stop_workers()
    return out


def _held_rss(dep: Deployment, args: argparse.Namespace) -> dict[str, Any]:
    # warm-up: a few hundred concurrent blocking puts, so lazily built things exist before "before"
    warm = _run_hold_client(dep, "held_warm", 300, ramp=1000, timeout=120, quiet=True)
    if warm["ok"] != 300:
        raise RuntimeError(f"warm-up failed: {warm}\n{dep.stack.logs()}")
    time.sleep(1.0)
    web_pid = dep.stack.web.pid  # type: ignore[union-attr]
    before = tree_rss(web_pid)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), tree_rss(web_pid)))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        run = _run_hold_client(dep, "held", args.held, ramp=args.held_ramp, timeout=args.held_timeout)
    finally:
        stop.set()
        sampler.join()
    peak = max(rss for _, rss in samples)
    peak_inflight = run.get("peak_inflight", 0)
    return {
        "web_app": "workers.wsgi:app",
        "requests": args.held,
        "client": f"1 gevent process, one connection per request, opened at {args.held_ramp:g}/s",
        "answered_ok": run["ok"],
        "shed_by_status": run["shed"],
        "reset": run["reset"],
        "timed_out": run["timed_out"],
        "other_error": run["other_error"],
        "unfinished": run["unfinished"],
        "max_held_requests_per_web_process": int(dep.stack.env.get("BELLAQ_MAX_HELD_REQUESTS", "10000")),
        "statuses": run["statuses"],
        "errors": run["errors"],
        "seconds": time.perf_counter() - t0,
        "latency": run["latency"],
        "peak_in_flight": peak_inflight,
        "web_rss_before_mb": before / 2**20,
        "web_rss_peak_mb": peak / 2**20,
        "peak_rss_per_held_request_kb": (peak - before) / args.held / 1024,
        "peak_rss_per_peak_in_flight_kb": (peak - before) / peak_inflight / 1024 if peak_inflight else None,
    }


def _run_hold_client(dep: Deployment, queue: str, n: int, ramp: float, timeout: float,
                     quiet: bool = False) -> dict[str, Any]:
    out_path = dep.tmp / f"hold-{queue}-{n}.json"
    argv = [PYTHON, str(Path(__file__).resolve()), "_hold-client", "--url", dep.stack.url, "--key", dep.user,
            "--queue", queue, "--n", str(n), "--ramp", str(ramp), "--timeout", str(timeout), "--out", str(out_path)]
    proc = subprocess.run(argv, cwd=ROOT, stdout=None if not quiet else subprocess.DEVNULL, timeout=timeout + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"hold client exited with {proc.returncode}")
    return json.loads(out_path.read_text())


def hold_client(argv: list[str]) -> None:
    """(Subprocess, gevent-patched.) ``n`` concurrent blocking puts, one connection each."""
    import gevent

    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--ramp", type=float, default=2000.0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    limit = raise_nofile(args.n + 1000)
    if limit < args.n + 100:
        raise SystemExit(f"open-files limit {limit} is too low for {args.n} connections")
    host, port = args.url.split("//")[1].split(":")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    state = {"inflight": 0, "peak": 0, "done": 0, "ok": 0, "reset": 0, "timed_out": 0, "other_error": 0}
    shed: dict[str, int] = {}

    def one(i: int) -> None:
        body = json.dumps({"endpoint": CHAT, "queue": args.queue, "data": chat(f"held {i}"),
                           "response_mode": "blocking", "timeout": int(args.timeout)}).encode()
        conn = http.client.HTTPConnection(host, int(port), timeout=args.timeout + 30)
        t0 = time.perf_counter()
        state["inflight"] += 1
        state["peak"] = max(state["peak"], state["inflight"])
        try:
            conn.request("POST", "/v1/queue/put", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
            if resp.status == 200 and json.loads(data)["choices"][0]["message"]["content"] == f"echo: held {i}":
                state["ok"] += 1
                latencies.append(time.perf_counter() - t0)
            elif resp.status in (429, 503) and resp.getheader("Retry-After"):
                shed[str(resp.status)] = shed.get(str(resp.status), 0) + 1
            elif len(errors) < 20:
                errors[f"{resp.status}: {data[:200]!r}"] = errors.get(f"{resp.status}: {data[:200]!r}", 0) + 1
        except Exception as err:  # noqa: BLE001 - counted and reported
            if isinstance(err, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
                state["reset"] += 1
            elif isinstance(err, TimeoutError):
                state["timed_out"] += 1
            else:
                state["other_error"] += 1
            name = f"{type(err).__name__}: {err}"[:200]
            errors[name] = errors.get(name, 0) + 1
        finally:
            state["inflight"] -= 1
            state["done"] += 1
            conn.close()

    def report() -> None:
        while True:
            gevent.sleep(2.0)
            print(f"  held client: in flight {state['inflight']}, answered {state['done']}/{args.n}, "
                  f"ok {state['ok']}, shed {sum(shed.values())}, reset {state['reset']}, "
                  f"timed out {state['timed_out']}", flush=True)

    reporter = gevent.spawn(report)
    t0 = time.perf_counter()
    greenlets = []
    batch = max(1, int(args.ramp / 20))
    for i in range(args.n):
        greenlets.append(gevent.spawn(one, i))
        if (i + 1) % batch == 0:
            gevent.sleep(max(0.0, (i + 1) / args.ramp - (time.perf_counter() - t0)))
    gevent.joinall(greenlets, timeout=args.timeout + 60)
    reporter.kill()
    Path(args.out).write_text(json.dumps({
        "n": args.n, "ok": state["ok"], "statuses": statuses, "errors": errors, "peak_inflight": state["peak"],
        "shed": shed, "reset": state["reset"], "timed_out": state["timed_out"], "other_error": state["other_error"],
        "seconds": time.perf_counter() - t0, "latency": percentiles(latencies),
        "unfinished": sum(1 for g in greenlets if not g.dead),
    }))


def _first_chunk(conn: http.client.HTTPConnection, path: str, body: dict[str, Any], headers: dict[str, str],
                 expect: str) -> float:
    """Seconds from sending to the first ``data: {`` line of an SSE answer; reads it to the end."""
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn.request("POST", path, body=payload, headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{path} answered {resp.status}: {resp.read()[:300]!r}")
    first = None
    text = []
    done = False
    while True:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            if first is None:
                first = time.perf_counter() - t0
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if chunk.get("choices"):
                text.append(chunk["choices"][0]["delta"].get("content") or "")
    resp.read()
    if first is None or not done or "".join(text) != expect:
        raise RuntimeError(f"bad stream from {path}: done={done} text={''.join(text)!r}")
    return first


def bench_stream(dep: Deployment, args: argparse.Namespace) -> dict[str, Any]:
    mock = MockServer(dep.tmp, latency=0.0, processes=1, stream_chunk_delay=args.chunk_delay,
                      nodelay=not args.raw_mock)
    dep.extra.append(mock)
    dep.register("stream", mock.base_url)
    dep.start_workers(1, args.concurrency)
    dep.wait_workers("stream")
    direct: list[float] = []
    via: list[float] = []
    text = "one two three four five six seven eight"
    data = chat(text, stream=True)
    host = "127.0.0.1"
    mconn = http.client.HTTPConnection(host, mock.port, timeout=60)
    bconn = http.client.HTTPConnection(host, dep.stack.port, timeout=60)
    bheaders = {"Content-Type": "application/json", "Authorization": f"Bearer {dep.user}"}
    for i in range(args.stream_n + 10):
        # alternate, so that both see the same machine load
        d = _first_chunk(mconn, CHAT, data, {"Content-Type": "application/json"}, f"echo: {text}")
        v = _first_chunk(bconn, "/v1/queue/put", {"endpoint": CHAT, "queue": "stream", "data": data,
                                                  "response_mode": "streaming", "timeout": 60},
                         bheaders, f"echo: {text}")
        if i >= 10:
            direct.append(d)
            via.append(v)
    mconn.close()
    bconn.close()
    dep.stack.stop_workers()
    pd, pv = percentiles(direct), percentiles(via)
    return {"direct": pd, "via_bellaq": pv, "chunk_delay_s": args.chunk_delay,
            "extra_first_chunk_p50_ms": pv["p50_ms"] - pd["p50_ms"],
            "extra_first_chunk_p99_ms": pv["p99_ms"] - pd["p99_ms"],
            "bellaq_worker": f"1 x celery -P gevent -c {args.concurrency}"}


# ----------------------------------------------------------------------------------------- report

AIMS = {
    "throughput": "built-in drain >= bare Celery no-op drain (issue: ~1,100/s prefork, ~825/s gevent)",
    "rtt": "bellaq blocking p50 <= 2x bare Celery apply_async().get() p50 (issue: ~2.2 ms)",
    "held": "10,000 held requests all answered (200, or shed with 503/429 + Retry-After), none reset or timed "
            "out; < 50 KB RSS each (bare gevent ~19 KB)",
    "stream": "first chunk within 20 ms of calling the mock directly",
}


def print_report(results: dict[str, Any]) -> None:
    rows: list[tuple[Any, ...]] = []
    tp = results.get("throughput")
    if tp:
        rows.append(("1 built-in drain (prefill)", f"{tp['prefill']['drain_tasks_per_s']:,.0f} tasks/s",
                     ", ".join(f"{b['pool']} -c {b['concurrency']}: {b['drain_tasks_per_s']:,.0f}/s"
                               for b in tp["bare_celery"]), f"{tp['bellaq_drain_vs_best_bare_celery']:.2f}x best"))
        rows.append(("1 put->succeeded (steady)", f"{tp['steady']['end_to_end_tasks_per_s']:,.0f} tasks/s",
                     f"puts {tp['steady']['put_per_s']:,.0f}/s", ""))
    rtt = results.get("rtt")
    if rtt:
        rows.append(("2 blocking round trip p50/p99", f"{rtt['bellaq_blocking']['p50_ms']:.1f} / "
                     f"{rtt['bellaq_blocking']['p99_ms']:.1f} ms",
                     ", ".join(f"{b['pool']}: {b['p50_ms']:.1f} / {b['p99_ms']:.1f} ms" for b in rtt["bare_celery"]),
                     f"{rtt['bellaq_p50_vs_best_bare_celery_p50']:.2f}x best p50"))
    for held in [v for k, v in sorted(results.items()) if k.startswith("held")]:
        fix = held.get("bellaq")
        if fix:
            shed = ", ".join(f"{n:,} x {status}" for status, n in sorted(fix.get("shed_by_status", {}).items()))
            rows.append((f"3 held ({fix['requests']:,} x {held['upstream_latency_s']:g} s)",
                         f"{fix['answered_ok']:,} ok, shed {shed or 0}, reset {fix.get('reset', '?')}, "
                         f"timed out {fix.get('timed_out', '?')}, {fix['peak_rss_per_held_request_kb']:.1f} KB each",
                         f"peak in flight {fix['peak_in_flight']:,}, {fix['seconds']:.0f} s", ""))
    st = results.get("stream")
    if st:
        rows.append(("4 first chunk p50 (direct -> bellaq)", f"+{st['extra_first_chunk_p50_ms']:.1f} ms",
                     f"{st['direct']['p50_ms']:.1f} -> {st['via_bellaq']['p50_ms']:.1f} ms", ""))
    print_rows(["measurement", "bellaq", "comparison", "ratio"], rows)
    for name, aim in AIMS.items():
        if name in results:
            print(f"  aim {name}: {aim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated subset of " + ",".join(ALL))
    parser.add_argument("--database-url", default=None,
                        help="default: SQLite in a temp dir; e.g. mysql+pymysql://root@127.0.0.1:3306 "
                             "(a database is created and dropped)")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn gevent workers (default 2)")
    parser.add_argument("--mock-processes", type=int, default=1, help="processes of the zero-latency mock")
    parser.add_argument("--raw-mock", action="store_true",
                        help="run the mock as is (no TCP_NODELAY: ~44 ms per keep-alive answer, see benchlib)")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes for throughput")
    parser.add_argument("--concurrency", type=int, default=20, help="their gevent concurrency (default 20)")
    parser.add_argument("--take-size", type=int, default=None, help="BELLAQ_WORKER_TAKE_SIZE (default: bellaq's)")
    parser.add_argument("--n", type=int, default=5000, help="tasks per throughput run (default 5000)")
    parser.add_argument("--conns", type=int, default=8, help="put connections (default 8)")
    parser.add_argument("--bare-n", type=int, default=20000, help="no-op tasks for bare Celery (default 20000)")
    parser.add_argument("--bare-prefork-c", type=int, default=2, help="bare Celery prefork concurrency")
    parser.add_argument("--bare-gevent-c", type=int, default=20, help="bare Celery gevent concurrency")
    parser.add_argument("--rtt-n", type=int, default=300, help="sequential round trips (default 300)")
    parser.add_argument("--held", type=int, default=10000, help="concurrent blocking puts (default 10000)")
    parser.add_argument("--held-latency", type=float, default=5.0, help="mock latency for them (default 5 s)")
    parser.add_argument("--held-ramp", type=float, default=150.0,
                        help="new connections per second (default 150: about what one web host can put per "
                             "second here)")
    parser.add_argument("--held-timeout", type=float, default=600.0, help="task timeout of the held puts")
    parser.add_argument("--held-bound", type=int, default=None,
                        help="BELLAQ_MAX_HELD_REQUESTS of each web process (default: bellaq's)")
    parser.add_argument("--held-workers", type=int, default=4, help="Celery worker processes for held")
    parser.add_argument("--held-concurrency", type=int, default=512, help="their gevent concurrency")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="results file (merged; default bench/results/online.json)")
    parser.add_argument("--keep-logs", default=None, help="copy every process's log to this directory at the end")
    parser.add_argument("--stream-n", type=int, default=100, help="streaming requests (default 100)")
    parser.add_argument("--chunk-delay", type=float, default=0.01, help="mock seconds between chunks")
    args = parser.parse_args()
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(ALL)
    if unknown:
        parser.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    raise_nofile()
    out = args.results.resolve()
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="bqbench-online-") as tmp_name, \
            database(args.database_url, Path(tmp_name)) as db_url:
        tmp = Path(tmp_name)
        dep = Deployment(tmp, db_url, args)
        if args.held_bound is not None:
            dep.stack.env["BELLAQ_MAX_HELD_REQUESTS"] = str(args.held_bound)
        if args.take_size:
            dep.stack.env["BELLAQ_WORKER_TAKE_SIZE"] = str(args.take_size)
        bare = BareCelery(dep.prefix, tmp)
        try:
            dep.start()
            for name in only:
                print(f"== {name}", flush=True)
                t0 = time.perf_counter()
                if name == "throughput":
                    value = bench_throughput(dep, bare, db_url, args)
                elif name == "rtt":
                    value = bench_rtt(dep, bare, args)
                elif name == "held":
                    value = bench_held(dep, args)
                else:
                    value = bench_stream(dep, args)
                value["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                value["database"] = db_url.split(":", 1)[0]
                value["mock"] = "python -m bellaq.mock_upstream" + ("" if args.raw_mock else " + TCP_NODELAY")
                value["aim"] = AIMS[name]
                key = name
                if name == "held":  # a variant keeps the result of the benchmark as it is
                    variant = "".join([f"_latency_{args.held_latency:g}s" if args.held_latency != 5.0 else "",
                                       f"_n_{args.held}" if args.held != 10000 else "",
                                       f"_bound_{args.held_bound}" if args.held_bound is not None else ""])
                    key = f"held{variant}"
                results[key] = value
                print(json.dumps(value, indent=1)[:3000], flush=True)
                print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
        except BaseException:
            print(dep.stack.logs()[-6000:], file=sys.stderr)
            raise
        finally:
            dep.stop()
            bare.stop_worker()
            delete_prefix(REDIS_URL, bare.prefix)
            if args.keep_logs:
                import shutil

                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                for log in tmp.glob("*.log"):
                    shutil.copy(log, Path(args.keep_logs) / log.name)
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print_report(results)
    print(f"written to {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_hold-client":
        hold_client(sys.argv[2:])
    else:
        main()
