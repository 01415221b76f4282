"""Benchmark of the queue engine against a local Redis, from one Python process.

    python scripts/bench_engine.py [--n 20000] [--engine-only]
    python scripts/bench_engine.py --http [--http-only] [--database-url mysql+pymysql://root@127.0.0.1:3306]

Engine part: for each strategy, enqueue N tasks with ``enqueue_many``, then take+complete
them one by one (``take(size=1)``) and in takes of 32 (``take(size=32)``, then one complete per
task). Baseline: the raw redis-py cost of one trivial Lua call (EVALSHA of ``return 1`` with one
key); the ratio compares the engine's take(size=1)+complete per task to two such raw calls.
Redis: ``BELLAQ_REDIS_URL`` (default redis://127.0.0.1:6379/0), under a unique key prefix that
is deleted afterwards. Results are merged into ``bench/results/engine.json`` under the key
``"engine"``; the HTTP part (``bench_http``) adds its own key ``"http"`` to the same file.

HTTP part (``--http``): gunicorn with gevent workers in a subprocess (``scripts.benchlib.Stack``,
SQLite in a temp dir unless ``--database-url``), a queue registered with ``builtin: false`` so
that only this client takes; ``--http-conns`` threads put (callback mode) on keep-alive
connections while ``--http-takers`` threads loop take(size=k) + one complete per task. Reports
tasks/s end to end, p50/p99 of each route, and the CPU the web processes spent per task.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bellaq.queue_engine import STRATEGIES, QueueEngine  # noqa: E402
from scripts.benchlib import (  # noqa: E402
    JsonClient,
    Stack,
    database,
    delete_prefix,
    new_key,
    percentiles,
    print_rows,
    tree_cpu,
    unique_prefix,
)

RESULTS = ROOT / "bench" / "results" / "engine.json"


def _queues_for(strategy: str) -> list[tuple[str, int]]:
    # sequential gives one task per queue at a time, so it gets 32 queues; the others take from
    # two levels of one queue (cluster-safe: same hash slot)
    if strategy == "sequential":
        return [(f"seq{i}", 0) for i in range(32)]
    return [("bench", 0), ("bench", 1)]


def _fill(engine: QueueEngine, queues: list[tuple[str, int]], n: int, tag: str) -> float:
    per_queue = n // len(queues)
    start = time.perf_counter()
    base = time.time_ns() // 1000
    for q, level in queues:
        items = [(f"{tag}-{q}-{level}-{i}", '{"body": {}}', float(base + i)) for i in range(per_queue)]
        engine.enqueue_many(q, level, items)
    return per_queue * len(queues) / (time.perf_counter() - start)


def _drain(engine: QueueEngine, queues: list[tuple[str, int]], strategy: str, size: int) -> tuple[int, float]:
    done = 0
    start = time.perf_counter()
    while True:
        tasks = engine.take(queues, size, strategy=strategy)
        if not tasks:
            break
        for t in tasks:
            engine.complete(t.queue, t.level, t.task_id)
        done += len(tasks)
    return done, time.perf_counter() - start


def _raw_lua_ops_per_s(client: redis.Redis, prefix: str, calls: int) -> float:
    script = client.register_script("return 1")
    key = f"{prefix}:raw"
    script(keys=[key])  # load it
    start = time.perf_counter()
    for _ in range(calls):
        script(keys=[key])
    return calls / (time.perf_counter() - start)


def bench_engine(results: dict[str, Any], n: int = 20_000) -> None:
    """Run the engine benchmark and store it under ``results["engine"]``."""
    url = os.environ.get("BELLAQ_REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url)
    prefix = f"bqbench-{uuid4().hex}"
    engine = QueueEngine(client, prefix=prefix)
    strategies: dict[str, dict[str, float]] = {}
    try:
        raw = _raw_lua_ops_per_s(client, prefix, n)
        for strategy in STRATEGIES:
            queues = _queues_for(strategy)
            row: dict[str, float] = {"queues": len(queues)}
            row["enqueue_many_tasks_per_s"] = _fill(engine, queues, n, f"{strategy}-1")
            count, secs = _drain(engine, queues, strategy, 1)
            row["take1_complete_tasks_per_s"] = count / secs
            _fill(engine, queues, n, f"{strategy}-32")
            count, secs = _drain(engine, queues, strategy, 32)
            row["take32_complete_tasks_per_s"] = count / secs
            # per task: seconds(take1 + complete) / seconds(2 raw Lua calls)
            row["take1_complete_vs_2_raw_lua"] = raw / (2 * row["take1_complete_tasks_per_s"])
            strategies[strategy] = row
        info = client.info("server")
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        client.close()
    results["engine"] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "redis_version": info.get("redis_version"),
        "python": sys.version.split()[0],
        "tasks_per_run": n,
        "raw_lua_evalsha_ops_per_s": raw,
        "strategies": strategies,
    }


def _http_worker(base_url: str, key: str, queue: str, take_size: int, lat: dict[str, list[float]],
                 done: list[int], total: int, puts_done: threading.Event, errors: list[str]) -> None:
    """One external worker: take(size) then complete each task, until every task is completed."""
    take_body = {"queues": [f"{queue}:0"], "size": take_size, "process_timeout": 300}
    result = {"status_code": 200, "request_id": "", "body": {"ok": True}}
    with JsonClient(base_url, key) as client:
        while sum(done) < total and not errors:
            t0 = time.perf_counter()
            status, payload = client.call("POST", "/v1/queue/take", take_body)
            lat["take"].append(time.perf_counter() - t0)
            if status != 200:
                errors.append(f"take answered {status}: {payload}")
                return
            tasks = payload[f"{queue}:0"]
            if not tasks:
                lat["take"].pop()  # an empty poll says nothing about the route under load
                if not puts_done.is_set():
                    time.sleep(0.002)
                else:
                    time.sleep(0.01)
                continue
            for task in tasks:
                t0 = time.perf_counter()
                status, payload = client.call("POST", f"/v1/queue/{task['task_id']}/complete", result)
                lat["complete"].append(time.perf_counter() - t0)
                if status != 200 or not payload.get("completed"):
                    errors.append(f"complete answered {status}: {payload}")
                    return
            done.append(len(tasks))


def _http_putter(base_url: str, key: str, queue: str, count: int, lat: dict[str, list[float]],
                 errors: list[str]) -> None:
    body = {"endpoint": "/v1/chat/completions", "queue": queue, "callback_url": "http://127.0.0.1:9/cb",
            "data": {"model": "bench", "messages": [{"role": "user", "content": "hello"}]}}
    with JsonClient(base_url, key) as client:
        for _ in range(count):
            t0 = time.perf_counter()
            status, payload = client.call("POST", "/v1/queue/put", body)
            lat["put"].append(time.perf_counter() - t0)
            if status != 200:
                errors.append(f"put answered {status}: {payload}")
                return


def _http_round(base_url: str, user: str, worker: str, queue: str, n: int, conns: int, takers: int,
                take_size: int) -> dict[str, Any]:
    lat: dict[str, list[float]] = {"put": [], "take": [], "complete": []}
    done: list[int] = []
    errors: list[str] = []
    puts_done = threading.Event()
    per = [n // conns + (1 if i < n % conns else 0) for i in range(conns)]
    putters = [threading.Thread(target=_http_putter, args=(base_url, user, queue, c, lat, errors)) for c in per]
    workers = [threading.Thread(target=_http_worker, args=(base_url, worker, queue, take_size, lat, done, n,
                                                           puts_done, errors)) for _ in range(takers)]
    cpu0 = time.process_time()
    start = time.perf_counter()
    for t in putters + workers:
        t.start()
    for t in putters:
        t.join()
    puts_done.set()
    put_secs = time.perf_counter() - start
    for t in workers:
        t.join()
    secs = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"HTTP benchmark failed: {errors[0]}")
    return {"tasks": sum(done), "seconds": secs, "put_seconds": put_secs, "lat": lat,
            "client_cpu_s": time.process_time() - cpu0}


def _route_costs(stack: Stack, user: str, worker: str, queue: str, n: int = 300) -> dict[str, dict[str, float]]:
    """One route at a time on one connection: wall time and web CPU (all gunicorn workers) per call."""
    pids = stack.web_pids()[1:]
    put_body = {"endpoint": "/v1/chat/completions", "queue": queue, "callback_url": "http://127.0.0.1:9/cb",
                "data": {"model": "bench", "messages": [{"role": "user", "content": "hello"}]}}
    out: dict[str, dict[str, float]] = {}
    with JsonClient(stack.url, user) as u, JsonClient(stack.url, worker) as w:
        ids: list[str] = []

        def phase(name: str, calls: int, one: Any) -> None:
            cpu0, t0 = sum(tree_cpu(p) for p in pids), time.perf_counter()
            for i in range(calls):
                one(i)
            out[name] = {"calls": calls, "wall_ms": (time.perf_counter() - t0) / calls * 1000,
                         "web_cpu_ms": (sum(tree_cpu(p) for p in pids) - cpu0) / calls * 1000}

        phase("healthz (no auth, no SQL write)", n, lambda i: u.raw("GET", "/healthz"))
        phase("put", n, lambda i: u.ok("POST", "/v1/queue/put", put_body))
        take = {"queues": [f"{queue}:0"], "size": 16}
        phase("take(size=16)", n // 16, lambda i: ids.extend(t["task_id"] for t in w.ok("POST", "/v1/queue/take",
                                                                                         take)[f"{queue}:0"]))
        phase("complete", len(ids), lambda i: w.ok("POST", f"/v1/queue/{ids[i]}/complete",
                                                   {"status_code": 200, "body": {}}))
        phase("get", len(ids), lambda i: u.ok("GET", f"/v1/queue/{ids[i]}"))
    return out


def bench_http(results: dict[str, Any], n: int = 3000, conns: int = 8, takers: int = 2, take_size: int = 16,
               web_workers: int = 2, database_url: str | None = None) -> None:
    """put->take->complete over HTTP against gunicorn (gevent workers) on a queue registered with
    ``builtin: false``, so only this client takes; stores ``results["http"]``.

    ``conns`` threads put (callback mode, one keep-alive connection each) while ``takers``
    threads each loop take(size=``take_size``) and complete every task they got.
    """
    redis_url = os.environ.get("BELLAQ_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = unique_prefix("bqbench-http")
    queue = "benchhttp"
    with tempfile.TemporaryDirectory(prefix="bqbench-http-") as tmp, database(database_url, Path(tmp)) as db_url:
        stack = Stack(Path(tmp), prefix, db_url, "http://127.0.0.1:9", redis_url=redis_url)
        try:
            stack.start_web(workers=web_workers, worker_connections=20000)
            with JsonClient(stack.url, stack.admin_key) as admin:
                admin.ok("POST", "/v1/queue/register", {"queue": queue, "endpoint": "/v1/chat/completions",
                                                         "builtin": False})
            user = new_key(stack.url, stack.admin_key, "user")
            worker = new_key(stack.url, stack.admin_key, "worker")
            # warm-up: every route once per gunicorn worker, lazy imports and SQL statement caches
            _http_round(stack.url, user, worker, queue, 200, conns, takers, take_size)
            cpu0 = sum(tree_cpu(pid) for pid in stack.web_pids()[1:])
            run = _http_round(stack.url, user, worker, queue, n, conns, takers, take_size)
            web_cpu = sum(tree_cpu(pid) for pid in stack.web_pids()[1:]) - cpu0
            costs = _route_costs(stack, user, worker, queue)
        finally:
            stack.stop()
            delete_prefix(redis_url, prefix)
    results["http"] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "database": db_url.split(":", 1)[0],
        "web": f"gunicorn -k gevent -w {web_workers}",
        "tasks": run["tasks"],
        "put_connections": conns,
        "taker_connections": takers,
        "take_size": take_size,
        "seconds": run["seconds"],
        "end_to_end_tasks_per_s": run["tasks"] / run["seconds"],
        "put_only_phase_puts_per_s": run["tasks"] / run["put_seconds"],
        "web_cpu_ms_per_task": web_cpu / run["tasks"] * 1000,
        "client_cpu_ms_per_task": run["client_cpu_s"] / run["tasks"] * 1000,
        "latency_ms": {route: percentiles(samples) for route, samples in run["lat"].items()},
        "sequential_route_cost": costs,
        "cpus": os.cpu_count(),
    }


def print_table(results: dict[str, Any]) -> None:
    eng = results.get("engine")
    if not eng:
        return
    print(f"engine on Redis {eng['redis_version']}, {eng['tasks_per_run']} tasks per run")
    print(f"baseline: raw EVALSHA 'return 1' (1 key): {eng['raw_lua_evalsha_ops_per_s']:,.0f} ops/s")
    header = f"{'strategy':<16}{'queues':>7}{'enqueue_many/s':>16}{'take1+compl/s':>15}{'take32+compl/s':>16}"
    print(header + f"{'x 2 raw calls':>15}")
    for name, row in eng["strategies"].items():
        print(
            f"{name:<16}{row['queues']:>7}{row['enqueue_many_tasks_per_s']:>16,.0f}"
            f"{row['take1_complete_tasks_per_s']:>15,.0f}{row['take32_complete_tasks_per_s']:>16,.0f}"
            f"{row['take1_complete_vs_2_raw_lua']:>15.2f}"
        )


def print_http_table(results: dict[str, Any]) -> None:
    http = results.get("http")
    if not http:
        return
    print(f"\nHTTP put->take->complete: {http['web']}, {http['database']}, {http['tasks']} tasks, "
          f"{http['put_connections']} put connections, {http['taker_connections']} takers x "
          f"take(size={http['take_size']})")
    print(f"end to end {http['end_to_end_tasks_per_s']:,.0f} tasks/s; web CPU {http['web_cpu_ms_per_task']:.2f} ms "
          f"per task, client CPU {http['client_cpu_ms_per_task']:.2f} ms per task")
    rows = [(route, s["n"], s["p50_ms"], s["p99_ms"], s["max_ms"]) for route, s in http["latency_ms"].items()]
    print_rows(["route", "calls", "p50 ms", "p99 ms", "max ms"], rows)
    costs = http.get("sequential_route_cost")
    if costs:
        print("one route at a time, one connection:")
        print_rows(["route", "calls", "wall ms/call", "web CPU ms/call"],
                   [(name, c["calls"], c["wall_ms"], c["web_cpu_ms"]) for name, c in costs.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="tasks per run (default 20000)")
    parser.add_argument("--engine-only", action="store_true", help="skip the HTTP part")
    parser.add_argument("--http", action="store_true", help="run the HTTP part too")
    parser.add_argument("--http-only", action="store_true", help="run only the HTTP part (keeps 'engine')")
    parser.add_argument("--http-n", type=int, default=3000, help="tasks of the HTTP run (default 3000)")
    parser.add_argument("--http-conns", type=int, default=8, help="concurrent put connections (default 8)")
    parser.add_argument("--http-takers", type=int, default=2, help="concurrent take+complete loops (default 2)")
    parser.add_argument("--http-take-size", type=int, default=16, help="size of each take (default 16)")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn gevent workers (default 2)")
    parser.add_argument("--database-url", default=None,
                        help="SQL for the HTTP part: default a SQLite file in a temp dir; or e.g. "
                             "mysql+pymysql://root@127.0.0.1:3306 (a database is created and dropped)")
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.http_only:
        bench_engine(results, n=args.n)
    if (args.http or args.http_only) and not args.engine_only:
        bench_http(results, n=args.http_n, conns=args.http_conns, takers=args.http_takers,
                   take_size=args.http_take_size, web_workers=args.web_workers, database_url=args.database_url)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print_table(results)
    print_http_table(results)
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
