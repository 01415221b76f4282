"""Benchmark of the queue engine against a local Redis, from one Python process.

    python scripts/bench_engine.py [--n 20000] [--engine-only]

Engine part: for each strategy, enqueue N tasks with ``enqueue_many``, then take+complete
them one by one (``take(size=1)``) and in takes of 32 (``take(size=32)``, then one complete per
task). Baseline: the raw redis-py cost of one trivial Lua call (EVALSHA of ``return 1`` with one
key); the ratio compares the engine's take(size=1)+complete per task to two such raw calls.
Redis: ``BELLAQ_REDIS_URL`` (default redis://127.0.0.1:6379/0), under a unique key prefix that
is deleted afterwards. Results are merged into ``bench/results/engine.json`` under the key
``"engine"``; the HTTP part (``bench_http``) adds its own key ``"http"`` to the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bellaq.queue_engine import STRATEGIES, QueueEngine  # noqa: E402

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


def bench_http(results: dict[str, Any]) -> None:
    """HTTP part: to be written by the API side; stores ``results["http"]``."""
    # TODO(http): put/take/complete over HTTP against a running service.


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="tasks per run (default 20000)")
    parser.add_argument("--engine-only", action="store_true", help="skip the HTTP part")
    parser.add_argument("--http", action="store_true", help="run the HTTP part too")
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    bench_engine(results, n=args.n)
    if args.http and not args.engine_only:
        bench_http(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print_table(results)
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
