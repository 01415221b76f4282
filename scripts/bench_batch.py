"""Benchmark: a generated chat batch through create -> completed with built-in workers.

Two runs of the same file (default 50,000 lines) against the mock upstream in a subprocess:

1. zero latency: end-to-end seconds, requests/s, peak RSS of the web and worker processes, and
   the time spent in ingest (create -> every task written and enqueued) and in the finalisation
   chord (claim -> completed);
2. 200 ms latency with a stated worker concurrency C (in-flight upstream requests =
   worker processes x Celery concurrency x take size), compared with the ceiling C / 0.2 s.

Each run is compared with a plain client that sends the same file straight to the mock with the
same concurrency (a thread pool with keep-alive sessions: what a user would write instead).

    python scripts/bench_batch.py                      # writes bench/results/batch.json
    python scripts/bench_batch.py --lines 5000 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import (  # noqa: E402
    ADMIN_KEY,
    REDIS_URL,
    MockServer,
    Stack,
    database,
    delete_prefix,
    raise_nofile,
    tree_rss,
    unique_prefix,
)

CHAT = "/v1/chat/completions"
RESULTS = ROOT / "bench" / "results" / "batch.json"


def make_file(path: Path, lines: int) -> int:
    """A chat batch of ``lines`` requests; returns its size in bytes."""
    with path.open("w") as f:
        for i in range(lines):
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": CHAT,
                                "body": {"model": "mock-model", "max_tokens": 16,
                                         "messages": [{"role": "user", "content": f"Say hello to number {i}."}]}})
                    + "\n")
    return path.stat().st_size


class RssSampler:
    """Peak RSS of the web process tree and of all worker process trees, sampled every 0.25 s."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.peak = {"web_mb": 0.0, "workers_mb": 0.0, "per_worker_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            web = tree_rss(self.stack.web.pid) / 2**20 if self.stack.web else 0.0
            workers = [tree_rss(p.pid) / 2**20 for p in self.stack.workers]
            self.peak["web_mb"] = max(self.peak["web_mb"], web)
            self.peak["workers_mb"] = max(self.peak["workers_mb"], sum(workers))
            self.peak["per_worker_mb"] = max(self.peak["per_worker_mb"], *workers, 0.0)
            self._stop.wait(0.25)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sql_times(database_url: str, batch_id: str) -> dict[str, Any]:
    """created_at (s), ingested_at and claimed_at (ms) of the batch, read from SQL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT created_at, ingested_at, claimed_at FROM batches WHERE id = :id"),
                           {"id": batch_id}).one()
    engine.dispose()
    return {"created_at": row[0], "ingested_at_ms": row[1], "claimed_at_ms": row[2]}


def steady_rate(samples: list[tuple[float, int]], total: int) -> float | None:
    """Requests/s between 10 % and 90 % done (without the ingest start and the chord)."""
    start = next((s for s in samples if s[1] >= total * 0.1), None)
    end = next((s for s in samples if s[1] >= total * 0.9), None)
    if not start or not end or end[0] <= start[0]:
        return None
    return round((end[1] - start[1]) / (end[0] - start[0]), 1)


def run_bellaq(args: argparse.Namespace, path: Path, latency: float, tmp: Path) -> dict[str, Any]:
    """One batch through a fresh deployment; returns its measurements."""
    import openai
    import requests

    prefix = unique_prefix("bqbatch")
    run_dir = tmp / f"run-{latency}"
    run_dir.mkdir()
    env = {"BELLAQ_WORKER_TAKE_SIZE": str(args.take_size), "BELLAQ_BATCH_CHUNK_SIZE": str(args.chunk)}
    with MockServer(run_dir, latency=latency) as mock, database(args.database, run_dir) as db_url, \
            Stack(run_dir, prefix, db_url, mock.base_url, **env) as stack:
        try:
            stack.start_web(workers=args.web_workers)
            extra = ["--prefetch-multiplier", str(args.prefetch)] if args.prefetch else []
            for _ in range(args.worker_processes):
                stack.start_worker(concurrency=args.concurrency, extra_args=extra)
            stack.start_beat()
            key = requests.post(f"{stack.url}/v1/keys", json={"name": "bench", "role": "user"},
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()["key"]
            client = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=3, timeout=120)
            time.sleep(2.0)  # workers up
            with RssSampler(stack) as rss:
                t_upload = time.time()
                with path.open("rb") as f:
                    source = client.files.create(file=(path.name, f), purpose="batch")
                t0 = time.time()
                batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
                seen: dict[str, float] = {}
                samples: list[tuple[float, int]] = []
                while batch.status not in ("completed", "failed", "expired", "cancelled"):
                    time.sleep(0.25)
                    batch = client.batches.retrieve(batch.id)
                    seen.setdefault(batch.status, time.time())
                    if batch.request_counts and batch.request_counts.total:
                        samples.append((time.time(), batch.request_counts.completed + batch.request_counts.failed))
                t_done = time.time()
            counts = batch.request_counts
            times = sql_times(db_url, batch.id)
            total_s = t_done - t0
            out = {
                "status": batch.status,
                "requests": counts.total,
                "completed": counts.completed,
                "failed": counts.failed,
                "upload_s": round(t0 - t_upload, 3),
                "end_to_end_s": round(total_s, 3),
                "requests_per_s": round(counts.total / total_s, 1),
                "ingest_s": round(times["ingested_at_ms"] / 1000 - t0, 3),
                "first_takeable_s": round(seen.get("in_progress", t0) - t0, 3),
                "chord_s": round(t_done - times["claimed_at_ms"] / 1000, 3),
                "steady_requests_per_s": steady_rate(samples, counts.total),
                "peak_rss_mb": {k: round(v, 1) for k, v in rss.peak.items()},
            }
            if batch.status != "completed" or counts.completed != counts.total:
                out["logs"] = stack.logs()[-4000:]
            return out
        finally:
            stack.stop()
            delete_prefix(REDIS_URL, prefix)


def run_plain(path: Path, latency: float, concurrency: int, tmp: Path,
              mock_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """The same requests sent straight to the mock by a thread pool of ``concurrency``; with
    ``mock_args`` (e.g. ``--rpm``), the mock's own counts are added as ``upstream``."""
    import requests

    bodies = [json.loads(line)["body"] for line in path.read_text().splitlines()]
    local = threading.local()
    upstream: dict[str, Any] = {}
    with MockServer(tmp, latency=latency, extra_args=mock_args) as mock:
        url = mock.base_url + CHAT

        def send(body: dict) -> int:
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            return session.post(url, json=body, timeout=120).status_code

        t0 = time.time()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            statuses = list(pool.map(send, bodies, chunksize=64))
        seconds = time.time() - t0
        if mock_args:
            upstream = requests.get(f"{mock.base_url}/mock/stats", params={"window": 60}, timeout=30).json()
    ok = sum(1 for s in statuses if s == 200)
    out = {"requests": len(bodies), "ok": ok, "seconds": round(seconds, 3),
           "requests_per_s": round(len(bodies) / seconds, 1), "concurrency": concurrency}
    return {**out, "upstream": upstream} if mock_args else out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--database", default="sqlite", help="sqlite, or a mysql+pymysql:// server URL")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--worker-processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4, help="Celery concurrency (gevent) per worker")
    parser.add_argument("--take-size", type=int, default=32, help="BELLAQ_WORKER_TAKE_SIZE")
    parser.add_argument("--chunk", type=int, default=2000, help="BELLAQ_BATCH_CHUNK_SIZE")
    parser.add_argument("--prefetch", type=int, default=4,
                        help="celery worker --prefetch-multiplier (0: the app's setting)")
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--latency-concurrency", type=int, default=4,
                        help="Celery concurrency per worker in the latency run")
    parser.add_argument("--latency-take-size", type=int, default=8)
    parser.add_argument("--skip-zero", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    raise_nofile()
    result: dict[str, Any] = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "database": args.database if args.database.startswith("sqlite") else "mysql",
        "deployment": {"web": f"gunicorn -k gevent -w {args.web_workers}",
                       "workers": f"{args.worker_processes} x celery -P gevent"
                                  + (f" --prefetch-multiplier {args.prefetch}" if args.prefetch else ""),
                       "beat": True, "mock": "scripts/benchlib.py mock (gevent, 1 process, TCP_NODELAY)"},
        "lines": args.lines,
    }
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmpdir:
        tmp = Path(tmpdir)
        path = tmp / "chat.jsonl"
        result["file_bytes"] = make_file(path, args.lines)
        if not args.skip_zero:
            in_flight = args.worker_processes * args.concurrency * args.take_size
            bellaq = run_bellaq(args, path, 0.0, tmp)
            plain = run_plain(path, 0.0, in_flight, tmp)
            result["zero_latency"] = {
                "aim": f"{args.lines} requests end to end in under 60 s",
                "worker_concurrency": args.concurrency, "take_size": args.take_size, "in_flight": in_flight,
                "bellaq": bellaq, "plain_client": plain,
                "bellaq_time_over_plain": round(bellaq["end_to_end_s"] / plain["seconds"], 2),
            }
            print(json.dumps(result["zero_latency"], indent=2), flush=True)
        if not args.skip_latency:
            c = args.worker_processes * args.latency_concurrency * args.latency_take_size
            lat_args = argparse.Namespace(**{**vars(args), "concurrency": args.latency_concurrency,
                                             "take_size": args.latency_take_size})
            bellaq = run_bellaq(lat_args, path, args.latency, tmp)
            plain = run_plain(path, args.latency, c, tmp)
            ceiling = c / args.latency
            result["with_latency"] = {
                "aim": "at least 80 % of the ceiling C / latency",
                "latency_s": args.latency,
                "C": c,
                "C_is": f"{args.worker_processes} worker processes x {args.latency_concurrency} Celery gevent "
                        f"slots x take size {args.latency_take_size}",
                "ceiling_requests_per_s": ceiling,
                "bellaq": bellaq,
                "fraction_of_ceiling": round(bellaq["requests_per_s"] / ceiling, 3),
                "steady_fraction_of_ceiling": round((bellaq["steady_requests_per_s"] or 0) / ceiling, 3),
                "plain_client": plain,
                "plain_fraction_of_ceiling": round(plain["requests_per_s"] / ceiling, 3),
                "bellaq_time_over_plain": round(bellaq["end_to_end_s"] / plain["seconds"], 2),
            }
            print(json.dumps(result["with_latency"], indent=2), flush=True)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            previous = json.loads(RESULTS.read_text())
            if args.skip_zero and "zero_latency" in previous:
                result["zero_latency"] = previous["zero_latency"]
            if args.skip_latency and "with_latency" in previous:
                result["with_latency"] = previous["with_latency"]
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
