"""Benchmark: a batch against an upstream that enforces a hard rate limit (429 beyond it).

The mock upstream (a subprocess) enforces ``--rpm`` requests and ``--tpm`` tokens per minute,
as OpenAI does (buckets holding a minute's worth, refilled continuously, 429 with Retry-After and
``x-ratelimit-*`` headers). The same chat file (``scripts/bench_batch.py``'s) goes through:

1. bellaq, the queue's ``rpm`` / ``tpm`` set to the mock's;
2. bellaq, the queue's limits unset: only the upstream's signals steer it;
3. the plain client of the batch benchmark: the same requests straight to the mock with the same
   concurrency, one request per line (what a user would write instead).

Each run starts a fresh mock with full buckets. Reported for each: lines that ended in the error
file (for the plain client: lines not answered 200), 429s received as a share of every request
the mock saw, and throughput as a fraction of the mock's limit (lines answered 200 per minute
over the run / rpm; the mock's buckets start full, so a run can pass a minute's worth at once on
top of the limit: ``steady_fraction_of_limit`` leaves out the first minute).

    python scripts/bench_limits.py                    # writes bench/results/limits.json
    python scripts/bench_limits.py --lines 2000 --no-write
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_batch import make_file, run_plain  # noqa: E402
from scripts.benchlib import (  # noqa: E402
    ADMIN_KEY,
    REDIS_URL,
    MockServer,
    Stack,
    database,
    delete_prefix,
    raise_nofile,
    unique_prefix,
)

CHAT = "/v1/chat/completions"
RESULTS = ROOT / "bench" / "results" / "limits.json"
NOTES = {
    "fraction_of_limit": "lines answered 200 per minute of the run / the mock's rpm; the mock's buckets start "
                         "full (a minute's worth), so a run may pass that burst on top of the limit",
    "steady_fraction_of_limit": "the same, leaving out the run's first minute",
    "plain_client": "one request per line and no retries: its fraction is the mock's initial burst over a "
                    "few seconds, and every line past it is lost",
}


def mock_stats(base_url: str) -> dict[str, Any]:
    import requests

    return requests.get(f"{base_url}/mock/stats", params={"window": 60}, timeout=30).json()


def figures(ok: int, lost: int, stats: dict[str, Any], seconds: float, served_first_minute: int | None,
            rpm: int) -> dict[str, Any]:
    refused = int(stats["statuses"].get("429", 0))
    out: dict[str, Any] = {
        "lines_in_error_file": lost,
        "share_429": round(refused / stats["requests"], 4) if stats["requests"] else 0.0,
        "fraction_of_limit": round(ok / (seconds / 60) / rpm, 3),
        "seconds": round(seconds, 1),
        "upstream_requests": stats["requests"],
        "upstream_429": refused,
        "max_requests_in_60s": stats["max_requests_in_window"],
    }
    if served_first_minute is not None and seconds > 75:
        out["steady_fraction_of_limit"] = round((ok - served_first_minute) / ((seconds - 60) / 60) / rpm, 3)
    return out


def run_bellaq(args: argparse.Namespace, path: Path, tmp: Path, with_limits: bool) -> dict[str, Any]:
    import openai
    import requests

    name = "limits-set" if with_limits else "limits-unset"
    prefix = unique_prefix("bqlimits")
    run_dir = tmp / name
    run_dir.mkdir()
    env = {"BELLAQ_WORKER_TAKE_SIZE": str(args.take_size)}
    mock_args = ["--rpm", str(args.rpm), "--tpm", str(args.tpm)]
    with MockServer(run_dir, latency=args.latency, extra_args=mock_args) as mock, \
            database(args.database, run_dir) as db_url, Stack(run_dir, prefix, db_url, mock.base_url, **env) as stack:
        try:
            stack.start_web(workers=args.web_workers)
            for _ in range(args.worker_processes):
                stack.start_worker(concurrency=args.concurrency)
            stack.start_beat()
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            limits = {"rpm": args.rpm, "tpm": args.tpm} if with_limits else {}
            requests.post(f"{stack.url}/v1/queue/register", headers=admin, timeout=30,
                          json={"queue": "limited", "endpoint": CHAT, **limits}).raise_for_status()
            key = requests.post(f"{stack.url}/v1/keys", json={"name": "bench", "role": "user"}, headers=admin,
                                timeout=30).json()["key"]
            client = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=3, timeout=120)
            time.sleep(2.0)  # workers up
            with path.open("rb") as f:
                source = client.files.create(file=(path.name, f), purpose="batch")
            t0 = time.time()
            batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h",
                                          extra_headers={"X-BELLA-QUEUE-NAME": "limited"})
            first_minute: int | None = None
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.5)
                batch = client.batches.retrieve(batch.id)
                if first_minute is None and time.time() - t0 >= 60:
                    counts = batch.request_counts
                    first_minute = counts.completed if counts else 0
            seconds = time.time() - t0
            counts = batch.request_counts
            out = {"status": batch.status, "lines": counts.total, "completed": counts.completed,
                   **figures(counts.completed, counts.failed, mock_stats(mock.base_url), seconds, first_minute,
                             args.rpm)}
            if batch.status != "completed" or counts.failed:
                out["logs"] = stack.logs()[-3000:]
            return out
        finally:
            stack.stop()
            delete_prefix(REDIS_URL, prefix)


def run_plain_limited(args: argparse.Namespace, path: Path, tmp: Path, concurrency: int) -> dict[str, Any]:
    """The batch benchmark's plain client against a mock with the same limits."""
    plain_dir = tmp / "plain"
    plain_dir.mkdir()
    plain = run_plain(path, args.latency, concurrency, plain_dir, ("--rpm", str(args.rpm), "--tpm", str(args.tpm)))
    return {"lines": plain["requests"], "completed": plain["ok"], "concurrency": concurrency,
            **figures(plain["ok"], plain["requests"] - plain["ok"], plain["upstream"], plain["seconds"], None,
                      args.rpm)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=5_000)
    parser.add_argument("--rpm", type=int, default=1_200, help="the mock's requests per minute")
    parser.add_argument("--tpm", type=int, default=120_000, help="the mock's tokens per minute")
    parser.add_argument("--latency", type=float, default=0.05, help="the mock's answer latency (s)")
    parser.add_argument("--database", default="sqlite", help="sqlite, or a mysql+pymysql:// server URL")
    parser.add_argument("--web-workers", type=int, default=1)
    parser.add_argument("--worker-processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4, help="Celery concurrency (gevent) per worker")
    parser.add_argument("--take-size", type=int, default=32, help="BELLAQ_WORKER_TAKE_SIZE")
    parser.add_argument("--runs", default="set,unset,plain", help="which runs, comma-separated (set,unset,plain)")
    parser.add_argument("--keep", default="", help="copy the runs' logs to this directory")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    raise_nofile()
    in_flight = args.worker_processes * args.concurrency * args.take_size
    result: dict[str, Any] = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "database": args.database if args.database.startswith("sqlite") else "mysql",
        "mock": {"rpm": args.rpm, "tpm": args.tpm, "latency_s": args.latency,
                 "buckets": "a minute's worth each, refilled continuously, full at the start"},
        "deployment": {"web": f"gunicorn -k gevent -w {args.web_workers}",
                       "workers": f"{args.worker_processes} x celery -P gevent -c {args.concurrency}",
                       "take_size": args.take_size, "in_flight": in_flight, "beat": True},
        "lines": args.lines,
        "aims": {"lines_in_error_file": 0, "share_429": "under 0.02", "fraction_of_limit": "at least 0.9"},
        "notes": NOTES,
    }
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmpdir:
        tmp = Path(tmpdir)
        path = tmp / "chat.jsonl"
        result["file_bytes"] = make_file(path, args.lines)
        runs = args.runs.split(",")
        for name, with_limits in (("set", True), ("unset", False)):
            if name in runs:
                key = f"bellaq_limits_{name}"
                result[key] = run_bellaq(args, path, tmp, with_limits=with_limits)
                print(json.dumps({key: result[key]}, indent=2), flush=True)
        if "plain" in runs:
            result["plain_client"] = run_plain_limited(args, path, tmp, in_flight)
            print(json.dumps({"plain_client": result["plain_client"]}, indent=2), flush=True)
        if args.keep:
            import shutil

            shutil.copytree(tmp, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.jsonl", "*.db*"))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
